"""Damped Kronecker inverses (both strategies, dense and diagonal factors) against dense
np.kron solves in float64; eigenvalue clipping; XLA/float64 inversion paths."""

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf

import keras_kfac
from keras_kfac.factors import DenseFactor, DiagonalFactor, factor_for, lower_triangular_inverse, spd_inverse
from keras_kfac.inversion import EigenbasisAdamInversion, EigenInversion, FactoredInversion, pi_factor


def _spd(rng, n, rank=None):
    x = rng.normal(size=(rank or 2 * n, n))
    return x.T @ x / x.shape[0]


def _strategy(mode, side_a, side_g, dtype="float64"):
    return (EigenInversion if mode == "eigen" else FactoredInversion)(side_a, side_g, dtype)


@pytest.mark.parametrize("mode", ["eigen", "factored"])
@pytest.mark.parametrize("damping", [1e-4, 1e-1, 10.0])
@pytest.mark.parametrize("diagonal", [(False, False), (True, False), (False, True), (True, True)], ids=str)
def test_inverse_matches_dense_kron_solve(mode, damping, diagonal):
    rng = np.random.default_rng(0)
    # Factors are float32 variables; the reference starts from the same rounded values.
    a = _spd(rng, 7).astype(np.float32).astype(np.float64)
    g = (_spd(rng, 4) * 3.0).astype(np.float32).astype(np.float64)
    v = rng.normal(size=(7, 4)).astype(np.float32).astype(np.float64)
    sides = [DiagonalFactor(n) if diag else DenseFactor(n) for n, diag in zip((7, 4), diagonal)]
    stored = [np.diag(m) if diag else m for m, diag in zip((a, g), diagonal)]
    strategy = _strategy(mode, *sides)
    values, ok = strategy.compute([tf.constant(s, tf.float32) for s in stored], damping)
    assert bool(ok)
    u = strategy.apply(values, tf.constant(v, tf.float32), damping).numpy()
    # The reference sees the factor each side keeps: the whole matrix or its diagonal.
    ref_a, ref_g = (np.diag(np.diag(m)) if diag else m for m, diag in zip((a, g), diagonal))
    assert ref.rel_err(u, ref.kron_solve(ref_a, ref_g, v, damping, mode)) < 1e-5


def test_state_shapes_follow_the_sides():
    specs = EigenInversion(DenseFactor(5), DiagonalFactor(3)).state_specs()
    assert [(shape, name) for shape, _, name in specs] == [
        ((5,), "eigenvalues_a"),
        ((5, 5), "eigenvectors_a"),
        ((3,), "eigenvalues_g"),
    ]
    specs = FactoredInversion(DiagonalFactor(5), DenseFactor(3)).state_specs()
    assert [(shape, name) for shape, _, name in specs] == [((5,), "inverse_a"), ((3, 3), "inverse_g")]
    assert isinstance(factor_for(10, 9), DiagonalFactor) and isinstance(factor_for(9, 9), DenseFactor)
    assert isinstance(factor_for(10**6, None), DenseFactor)


def test_negative_eigenvalues_are_clipped_to_zero():
    rng = np.random.default_rng(1)
    low_rank = _spd(rng, 6, rank=2)  # rank 2: four zero eigenvalues, some come out negative
    values, vectors = DenseFactor(6).eigh(tf.constant(low_rank - 1e-6 * np.eye(6), tf.float32), tf.float32)
    assert float(tf.reduce_min(values)) == 0.0
    assert np.allclose(vectors.numpy() @ vectors.numpy().T, np.eye(6), atol=1e-5)


def test_pi_is_one_when_a_trace_is_zero():
    assert float(pi_factor(tf.constant(0.0), tf.constant(1.0))) == 1.0
    assert abs(float(pi_factor(tf.constant(4.0), tf.constant(1.0))) - 2.0) < 1e-7


def test_gram_with_ones_matches_augmented_rows():
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(11, 4))
    augmented = np.concatenate([rows, np.ones((11, 1))], axis=1)
    dense = DenseFactor(5).gram(tf.constant(rows), with_ones=True).numpy()
    diag = DiagonalFactor(5).gram(tf.constant(rows), with_ones=True).numpy()
    assert ref.rel_err(dense, augmented.T @ augmented) < 1e-12
    assert ref.rel_err(diag, np.sum(augmented**2, axis=0)) < 1e-12


def _mlp_problem(seed: int):
    """16 examples of 5 features, 3 classes, a tanh-softmax MLP and its float64 parameters."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(16, 5)).astype("float32")
    y = rng.integers(0, 3, size=16)
    model = keras_kfac.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3, activation="softmax")]
    )
    params = [
        (layer.kernel.numpy().astype(np.float64), layer.bias.numpy().astype(np.float64), act)
        for layer, act in zip(model.layers, ["tanh", "softmax"])
    ]
    return x, y, model, params


@pytest.mark.parametrize(
    "options", [dict(inverse_dtype="float64"), dict(inverse_jit=True)], ids=["float64", "xla-eigh"]
)
def test_inversion_options_give_the_same_step(options):
    x, y, model, params = _mlp_problem(seed=0)
    expected = ref.mlp_step(x.astype(np.float64), y, params, 0.5, 1e-2, "eigen")
    opt = keras_kfac.KFAC(
        learning_rate=0.5,
        momentum=0.0,
        damping=1e-2,
        stats_decay=0.0,
        stats_every=1,
        stats_batch_size=None,
        inverse_every=1,
        fisher="empirical",
        damping_mode="eigen",
        graft=None,
        **options,
    )
    accelerated = any(d.device_type in ("GPU", "TPU") for d in tf.config.list_physical_devices())
    assert opt.inverse_in_xla == (options.get("inverse_jit") is True or accelerated)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    for layer, exp in zip(model.layers, expected):
        assert ref.rel_err(layer.kernel.numpy(), exp["kernel"]) < 2e-4


@pytest.mark.parametrize("argument", ["inverse_jit", "statistics_jit"])
def test_auto_jit_follows_the_accelerators_of_the_machine(argument, monkeypatch):
    """ "auto" means XLA exactly when TensorFlow sees a GPU or TPU, whatever this machine has."""
    prop = {"inverse_jit": "inverse_in_xla", "statistics_jit": "statistics_in_xla"}[argument]
    accelerated = any(d.device_type in ("GPU", "TPU") for d in tf.config.list_physical_devices())
    assert getattr(keras_kfac.KFAC(), prop) is accelerated
    for present in (True, False):
        devices = [tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")] if present else []
        monkeypatch.setattr(tf.config, "list_physical_devices", lambda *a, devices=devices: devices)
        assert getattr(keras_kfac.KFAC(), prop) is present
        assert getattr(keras_kfac.KFAC(**{argument: True}), prop) is True
        assert getattr(keras_kfac.KFAC(**{argument: False}), prop) is False


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_factored_inverses_match_numpy(dtype):
    rng = np.random.default_rng(4)
    a, g = _spd(rng, 9, rank=3), _spd(rng, 5) * 4.0
    damping = 1e-3
    strategy = FactoredInversion(DenseFactor(9), DenseFactor(5), dtype)
    (inv_a, inv_g), ok = strategy.compute([tf.constant(a, tf.float32), tf.constant(g, tf.float32)], damping)
    assert bool(ok)
    pi = np.sqrt((np.trace(a) / 9) / (np.trace(g) / 5))
    expected_a = np.linalg.inv(a + pi * np.sqrt(damping) * np.eye(9))
    expected_g = np.linalg.inv(g + np.sqrt(damping) / pi * np.eye(5))
    assert ref.rel_err(inv_a.numpy(), expected_a) < (1e-3 if dtype == "float32" else 1e-5)
    assert ref.rel_err(inv_g.numpy(), expected_g) < 1e-5


def test_factored_inverses_flag_non_finite_input():
    bad = np.eye(3, dtype=np.float32)
    bad[0, 1] = np.nan
    strategy = FactoredInversion(DenseFactor(3), DenseFactor(2))
    _, ok = strategy.compute([tf.constant(bad), tf.eye(2)], 1e-3)
    assert not bool(ok)


@pytest.mark.parametrize("size, solve_size", [(1, 1), (2, 1), (7, 2), (33, 4), (256, 256), (257, 256), (700, 256)])
def test_lower_triangular_inverse_by_blocks_matches_numpy(size, solve_size):
    rng = np.random.default_rng(size)
    lower = np.tril(rng.normal(size=(size, size))) / np.sqrt(size) + np.diag(rng.uniform(1.0, 2.0, size))
    inverse = lower_triangular_inverse(tf.constant(lower), solve_size).numpy()
    assert ref.rel_err(inverse, np.linalg.inv(lower)) < 1e-12
    assert np.all(np.triu(inverse, 1) == 0.0)


@pytest.mark.parametrize("size, solve_size", [(5, 2), (300, 256), (600, 256), (600, 64)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_spd_inverse_matches_numpy_across_the_split(size, solve_size, dtype):
    """A damped Gram matrix of low rank (as a factor is) inverted by blocks, against float64 NumPy."""
    rng = np.random.default_rng(size + solve_size)
    rows = rng.normal(size=(size // 2, size))
    matrix = rows.T @ rows / rows.shape[0] + 1e-2 * np.eye(size)
    expected = np.linalg.inv(matrix)
    inverse = spd_inverse(tf.constant(matrix, dtype), solve_size).numpy()
    assert ref.rel_err(inverse, expected) < (2e-4 if dtype == "float32" else 1e-10)
    compiled = tf.function(lambda m: spd_inverse(m, solve_size), jit_compile=True)
    assert ref.rel_err(compiled(tf.constant(matrix, dtype)).numpy(), expected) < (2e-4 if dtype == "float32" else 1e-10)


def test_spd_inverse_of_a_matrix_that_is_not_positive_definite_is_not_finite():
    matrix = np.eye(400)
    matrix[300, 300] = -1.0
    inverse = spd_inverse(tf.constant(matrix, tf.float32))
    assert not np.all(np.isfinite(inverse.numpy()))


def _basis_adam_reference(factors, grads, beta_2=0.999, epsilon=1e-7):
    """Adam's scaling of R = Q_Aᵀ V Q_G in each step's eigenbasis, float64: s ← β₂s + (1 − β₂)R²,
    U = Q_A [R / (√(s / (1 − β₂ᵗ)) + ε)] Q_Gᵀ."""
    second = np.zeros(grads[0].shape)
    out = []
    for t, ((a, g), v) in enumerate(zip(factors, grads), start=1):
        qa, qg = np.linalg.eigh(a)[1], np.linalg.eigh(g)[1]
        rotated = qa.T @ v @ qg
        second = beta_2 * second + (1 - beta_2) * rotated**2
        out.append(qa @ (rotated / (np.sqrt(second / (1 - beta_2**t)) + epsilon)) @ qg.T)
    return out


def test_eigen_adam_is_adam_in_the_kronecker_eigenbasis():
    """Three steps, the factors (hence the bases) changing between them, against float64 NumPy;
    the second moment carries over a change of basis, as in SOAP."""
    rng = np.random.default_rng(3)
    factors = [(_spd(rng, 6).astype(np.float32), _spd(rng, 3).astype(np.float32)) for _ in range(3)]
    grads = [rng.normal(size=(6, 3)).astype(np.float32) * scale for scale in (1.0, 0.1, 3.0)]
    strategy = EigenbasisAdamInversion(DenseFactor(6), DenseFactor(3))
    moments = [tf.Variable(tf.zeros(shape), dtype=tf.float32) for shape, _, _ in strategy.moment_specs()]
    got = []
    for (a, g), v in zip(factors, grads):
        state, ok = strategy.compute([tf.constant(a), tf.constant(g)], 1e-4)
        assert bool(ok)
        got.append(strategy.apply(state, tf.constant(v), 1e-4, moments).numpy())
    expected = _basis_adam_reference([(a.astype(np.float64), g.astype(np.float64)) for a, g in factors], grads)
    for u, e in zip(got, expected):
        assert ref.rel_err(u, e) < 1e-4
    assert float(moments[1].numpy()) == 3.0
    # Not the plain eigen solve: the per-coordinate scaling differs from 1 / (a gᵀ + λ).
    plain = ref.kron_solve(*(f.astype(np.float64) for f in factors[-1]), grads[-1].astype(np.float64), 1e-4, "eigen")
    assert ref.rel_err(got[-1], plain) > 0.5


def test_eigen_adam_first_step_of_a_model():
    """The first step of a Dense layer is −lr · Q_A sign(R) Q_Gᵀ (v̂ = R² after one update),
    R = Q_Aᵀ ∇ Q_G in the eigenbasis of the batch's own factors; the block keeps the moments."""
    x, y, model, params = _mlp_problem(seed=4)
    expected = ref.mlp_step(x.astype(np.float64), y, params, 0.1, 1e-2, "eigen")[0]
    opt = keras_kfac.KFAC(
        learning_rate=0.1,
        momentum=0.0,
        stats_decay=0.0,
        stats_every=1,
        stats_batch_size=None,
        inverse_every=1,
        fisher="empirical",
        damping_mode="eigen_adam",
        graft=None,
    )
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    qa, qg = np.linalg.eigh(expected["A"])[1], np.linalg.eigh(expected["G"])[1]
    rotated = qa.T @ expected["grad"] @ qg
    update = qa @ (rotated / (np.abs(rotated) + 1e-7)) @ qg.T
    step = np.concatenate([model.layers[0].kernel.numpy(), model.layers[0].bias.numpy()[None]]) - np.concatenate(
        [params[0][0], params[0][1][None]]
    )
    assert ref.rel_err(step, -0.1 * update) < 1e-3
    block = opt.blocks[0]
    assert "eigen_adam" in block.summary()["curvature"]
    assert block.memory_bytes() == 4 * (36 + 16 + 6 + 36 + 4 + 16 + 6 * 4 + 1)
