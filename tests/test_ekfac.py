"""damping_mode="ekfac" (eigenvalue-corrected K-FAC, George et al. 2018) against float64 NumPy:
the per-example scaling S = mean_n (Q_Aᵀ ∇_n Q_G)² in the eigenbasis of the last inversion, its
restart at each inversion and its averaging, and the step R / (S + λ) of a Conv2D + Dense model
whose per-example gradients come from separate tapes, one example at a time."""

import keras
import numpy as np
import reference as ref
import tensorflow as tf
from exact import exact_kfac

import keras_kfac
from keras_kfac.factors import DenseFactor, DiagonalFactor
from keras_kfac.inversion import EigenvalueCorrectedInversion


def _spd(rng, n):
    x = rng.normal(size=(2 * n, n))
    return (x.T @ x / x.shape[0]).astype(np.float32)


def _scaling_reference(qa, qg, per_example_grads):
    return np.mean([(qa.T @ grad @ qg) ** 2 for grad in per_example_grads], axis=0)


def _variables(strategy, state):
    moments = [tf.Variable(tf.zeros(shape)) for shape, _, _ in strategy.moment_specs()]
    state = [tf.Variable(v) for v in state]
    return state, moments


def test_scaling_is_the_per_example_second_moment_in_the_eigenbasis():
    rng = np.random.default_rng(0)
    a, g = _spd(rng, 5), _spd(rng, 3)
    strategy = EigenvalueCorrectedInversion(DenseFactor(5), DenseFactor(3))
    values, ok = strategy.compute([tf.constant(a), tf.constant(g)], 1e-3)
    state, moments = _variables(strategy, values)
    strategy.after_inverse(state, moments, ok)
    qa, qg = np.linalg.eigh(a.astype(np.float64))[1], np.linalg.eigh(g.astype(np.float64))[1]
    # Restarted from the product of the eigenvalues.
    expected = np.outer(np.linalg.eigvalsh(a.astype(np.float64)), np.linalg.eigvalsh(g.astype(np.float64)))
    assert ref.rel_err(moments[0].numpy(), expected) < 1e-5 and float(moments[1].numpy()) == 0.0

    # Two calls of a layer with 4 locations each: ∇_n = Σ_calls Σ_l ā gᵀ.
    calls = [(rng.normal(size=(6, 4, 5)), rng.normal(size=(6, 4, 3))) for _ in range(2)]
    grads = [sum(ca[n].T @ cg[n] for ca, cg in calls) for n in range(6)]
    first = _scaling_reference(qa, qg, grads)
    got = strategy.batch_scaling(state, [(tf.constant(x, tf.float32), tf.constant(y, tf.float32)) for x, y in calls])
    assert ref.rel_err(got.numpy(), first) < 1e-4
    # One call, one row per example (the outer-product shortcut).
    rows = (rng.normal(size=(7, 1, 5)), rng.normal(size=(7, 1, 3)))
    second = _scaling_reference(qa, qg, [rows[0][n].T @ rows[1][n] for n in range(7)])
    got_single = strategy.batch_scaling(state, [tuple(tf.constant(r, tf.float32) for r in rows)])
    assert ref.rel_err(got_single.numpy(), second) < 1e-4

    # The first estimate in a basis replaces S, the next ones average with min(1 − 1/k, decay).
    strategy.update_scaling(moments, tf.constant(first, tf.float32), 0.95)
    assert ref.rel_err(moments[0].numpy(), first) < 1e-5
    strategy.update_scaling(moments, tf.constant(second, tf.float32), 0.95)
    assert ref.rel_err(moments[0].numpy(), 0.5 * first + 0.5 * second) < 1e-5
    strategy.update_scaling(moments, tf.constant(first, tf.float32), 0.6)
    blend = 0.6 * (0.5 * first + 0.5 * second) + 0.4 * first
    assert ref.rel_err(moments[0].numpy(), blend) < 1e-5

    # The direction: Q_A [(Q_Aᵀ V Q_G) / (S + λ)] Q_Gᵀ.
    v = rng.normal(size=(5, 3))
    direction = strategy.apply(state, tf.constant(v, tf.float32), 1e-2, moments).numpy()
    assert ref.rel_err(direction, qa @ ((qa.T @ v @ qg) / (blend + 1e-2)) @ qg.T) < 1e-4
    # Not K-FAC's eigen solve.
    assert ref.rel_err(direction, ref.kron_solve(a, g, v, 1e-2, "eigen")) > 0.1


def test_diagonal_sides_keep_the_identity_basis():
    rng = np.random.default_rng(1)
    strategy = EigenvalueCorrectedInversion(DiagonalFactor(4), DenseFactor(3))
    g = _spd(rng, 3)
    values, _ = strategy.compute([tf.constant(rng.uniform(0.5, 2.0, 4), tf.float32), tf.constant(g)], 0.1)
    state, _ = _variables(strategy, values)
    calls = [(rng.normal(size=(5, 3, 4)), rng.normal(size=(5, 3, 3)))]
    qg = np.linalg.eigh(g.astype(np.float64))[1]
    grads = [calls[0][0][n].T @ calls[0][1][n] for n in range(5)]
    got = strategy.batch_scaling(state, [tuple(tf.constant(r, tf.float32) for r in calls[0])])
    assert ref.rel_err(got.numpy(), _scaling_reference(np.eye(4), qg, grads)) < 1e-4


def _conv_model():
    keras.utils.set_random_seed(3)
    return keras_kfac.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )


def _per_example_matrices(model, block, x, y):
    """∇_n of example n's own loss for `block`'s kernel (+ bias) as (dim_a, dim_g), float64."""
    loss = keras.losses.SparseCategoricalCrossentropy()
    out = []
    for n in range(len(x)):
        with tf.GradientTape() as tape:
            value = loss(y[n : n + 1], model(x[n : n + 1]))
        kernel, bias = tape.gradient(value, block.variables)
        out.append(np.concatenate([kernel.numpy().reshape(block.in_features, -1), bias.numpy()[None]], 0))
    return [m.astype(np.float64) for m in out]


def test_ekfac_step_of_a_conv_model():
    """Step 0 inverts (the basis of its factors); step 1's statistics re-estimate S in that basis
    from the examples of batch 1, and step 1's update is −lr Q_A [R / (S + λ)] Q_Gᵀ."""
    rng = np.random.default_rng(2)
    # 40 examples, more than the Dense layer's 28 input rows: no factor has a null space of
    # several dimensions, so the eigenbases (hence S) are unique up to signs.
    batches = [(rng.normal(size=(40, 6, 6, 2)).astype("float32"), rng.integers(0, 4, size=40)) for _ in range(2)]
    model = _conv_model()
    lr, damping = 0.1, 1e-3
    opt = exact_kfac(learning_rate=lr, damping=damping, damping_mode="ekfac", inverse_every=2)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(*batches[0])
    bases = []
    for block in opt.blocks:
        assert "ekfac" in block.summary()["curvature"]
        a, g = (f.numpy().astype(np.float64) for f in block.statistics_variables)
        bases.append((np.linalg.eigh(a)[1], np.linalg.eigh(g)[1]))
    before = [[v.numpy().astype(np.float64) for v in block.variables] for block in opt.blocks]
    expected_scaling = []
    expected_step = []
    for block, (qa, qg) in zip(opt.blocks, bases):
        grads = _per_example_matrices(model, block, *batches[1])
        scaling = _scaling_reference(qa, qg, grads)
        expected_scaling.append(scaling)
        mean = np.mean(grads, axis=0)
        expected_step.append(-lr * qa @ ((qa.T @ mean @ qg) / (scaling + damping)) @ qg.T)
    model.train_on_batch(*batches[1])
    for block, start, scaling, step in zip(opt.blocks, before, expected_scaling, expected_step):
        s, count = block._moments
        assert float(count.numpy()) == 1.0
        assert ref.rel_err(s.numpy(), scaling) < 2e-3, block.name
        moved = [v.numpy().astype(np.float64) - w for v, w in zip(block.variables, start)]
        got = np.concatenate([moved[0].reshape(block.in_features, -1), moved[1][None]], 0)
        assert ref.rel_err(got, step) < 5e-3, block.name
    # The next inversion restarts S from the new eigenvalues.
    model.train_on_batch(*batches[0])
    for block in opt.blocks:
        a, g = (f.numpy().astype(np.float64) for f in block.statistics_variables)
        assert float(block._moments[1].numpy()) == 0.0
        assert ref.rel_err(block._moments[0].numpy(), np.outer(np.linalg.eigvalsh(a), np.linalg.eigvalsh(g))) < 1e-3


def test_blocks_without_per_example_rows_run_ekfac_as_eigen():
    model = keras_kfac.Sequential(
        [keras.Input((4,), dtype="int32"), keras.layers.Embedding(9, 3), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    opt = keras_kfac.KFAC(damping_mode="ekfac")
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.train_on_batch(np.arange(8).reshape(2, 4) % 9, np.array([0, 1]))
    kinds = {type(b.layer).__name__: b.inversion.name for b in opt.blocks}
    assert kinds == {"Embedding": "eigen", "Dense": "ekfac"}
