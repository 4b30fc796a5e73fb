"""Block-tridiagonal K-FAC: one step against a dense float64 Ξᵀ Λ Ξ, the defining property of the
approximation (section 4.3 of Martens & Grosse 2015) and the chain detector."""

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf
from exact import exact_kfac

import keras_kfac
from keras_kfac import discover_blocks, tridiagonal
from keras_kfac.blocks import DenseBlock
from keras_kfac.factors import DenseFactor
from keras_kfac.inversion import FactoredInversion

LR, DAMPING = 0.5, 1e-2
# Relative errors seen: ~1e-6 (float32 against float64).
TOL = 2e-4

ARCHITECTURES = {
    "3-layer": [(4, "tanh", True), (6, "relu", False), (3, "softmax", True)],
    "4-layer": [(4, "tanh", True), (6, "sigmoid", True), (4, "relu", True), (3, "softmax", True)],
}


def _kfac(**kwargs):
    settings = {"damping_mode": "factored", "approximation": "block_tridiagonal", **kwargs}
    return exact_kfac(**{"learning_rate": LR, "damping": DAMPING, **settings})


def _blocks_of(matrix, starts):
    k = len(starts) - 1
    return [[matrix[starts[i] : starts[i + 1], starts[j] : starts[j + 1]] for j in range(k)] for i in range(k)]


def _mlp(spec):
    return keras_kfac.Sequential(
        [keras.Input((5,))] + [keras.layers.Dense(n, activation=act, use_bias=bias) for n, act, bias in spec]
    )


def _data(m=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(m, 5)).astype("float32"), rng.integers(0, 3, size=m)


def _reference(model, spec, x, y, a_examples=None):
    """float64 weights, per-layer statistics, cross factors and F̂⁻¹∇ (dense Ξᵀ Λ Ξ); with
    `a_examples` k, every A and Ā_{i,i+1} from the first k examples (G from all m)."""
    m = x.shape[0]
    k = a_examples or m
    layers = [
        (
            layer.kernel.numpy().astype(np.float64),
            None if layer.bias is None else layer.bias.numpy().astype(np.float64),
            act,
        )
        for layer, (_, act, _) in zip(model.layers, spec)
    ]
    per_layer = ref.mlp_gradients(x.astype(np.float64), y, layers)
    factors = [(p["rows_a"][:k].T @ p["rows_a"][:k] / k, p["g"].T @ p["g"] / m) for p in per_layer]
    pairs = zip(per_layer[:-1], per_layer[1:])
    cross = [(p["rows_a"][:k].T @ q["rows_a"][:k] / k, p["g"].T @ q["g"] / m) for p, q in pairs]
    inverse, starts = ref.tridiagonal_inverse(factors, cross, DAMPING)
    gradient = np.concatenate([p["grad"].reshape(-1) for p in per_layer])
    return dict(layers=layers, per_layer=per_layer, factors=factors, cross=cross, starts=starts,
                gradient=gradient, direction=inverse @ gradient)  # fmt: skip


def _step(model, layers):
    step = []
    for layer, (kernel, bias, _) in zip(model.layers, layers):
        parts = [layer.kernel.numpy() - kernel] + ([] if bias is None else [(layer.bias.numpy() - bias)[None]])
        step.append(np.concatenate(parts).reshape(-1))
    return np.concatenate(step)


@pytest.mark.parametrize("inverse_dtype", ["float32", "float64"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_one_step_is_minus_lr_times_xi_lambda_xi_gradient(arch, inverse_dtype):
    x, y = _data()
    spec = ARCHITECTURES[arch]
    model = _mlp(spec)
    r = _reference(model, spec, x, y)
    expected, starts = -LR * r["direction"], r["starts"]

    opt = _kfac(inverse_dtype=inverse_dtype)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)

    state = opt._state.tridiagonal
    assert state.chains == [list(range(len(spec)))]
    for (cross_a, cross_g), (exp_a, exp_g) in zip(state.cross, r["cross"]):
        assert ref.rel_err(cross_a.numpy(), exp_a) < TOL
        assert ref.rel_err(cross_g.numpy(), exp_g) < TOL
    step = _step(model, r["layers"])
    assert ref.rel_err(step, expected) < TOL
    for i in range(len(spec)):  # per layer too
        s = slice(starts[i], starts[i + 1])
        assert ref.rel_err(step[s], expected[s]) < TOL
    # The cross-layer terms matter: the block-diagonal step is far from it.
    diagonal = np.concatenate(
        [
            np.linalg.solve(ref.factored_damped_block(a, g, DAMPING), p["grad"].reshape(-1))
            for (a, g), p in zip(r["factors"], r["per_layer"])
        ]
    )
    assert ref.rel_err(-LR * diagonal, expected) > 1e-2


def test_input_stats_batch_size_takes_a_and_the_cross_a_from_the_same_first_examples():
    """With input_stats_batch_size=k the diagonal A blocks and the cross Ā_{i,i+1} are means over
    the first k examples and every G over all m: the step is the dense Ξᵀ Λ Ξ solve built from them."""
    x, y = _data()
    spec, k = ARCHITECTURES["3-layer"], 5
    model = _mlp(spec)
    r = _reference(model, spec, x, y)
    subset = _reference(model, spec, x, y, a_examples=k)
    factors, cross, expected = subset["factors"], subset["cross"], -LR * subset["direction"]

    opt = _kfac(input_stats_batch_size=k, stats_batch_size=None)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)

    for (cross_a, cross_g), (exp_a, exp_g) in zip(opt._state.tridiagonal.cross, cross):
        assert ref.rel_err(cross_a.numpy(), exp_a) < TOL
        assert ref.rel_err(cross_g.numpy(), exp_g) < TOL
    for block, (exp_a, exp_g) in zip(opt.blocks, factors):
        assert ref.rel_err(block.factor_a.numpy(), exp_a) < TOL
        assert ref.rel_err(block.factor_g.numpy(), exp_g) < TOL
    assert ref.rel_err(_step(model, r["layers"]), expected) < TOL
    assert ref.rel_err(-LR * r["direction"], expected) > 1e-2  # the subsample changed the step


@pytest.mark.parametrize("option", ["graft_sgd", "kl_clip", "xla"])
def test_graft_kl_clip_and_xla_inversions_on_the_tridiagonal_direction(option):
    x, y = _data()
    spec = ARCHITECTURES["3-layer"]
    model = _mlp(spec)
    r = _reference(model, spec, x, y)
    u, grad, starts = r["direction"], r["gradient"], r["starts"]
    if option == "graft_sgd":
        kwargs = dict(graft="sgd")
        expected = np.concatenate(
            [
                u[s] * np.linalg.norm(grad[s]) / np.linalg.norm(u[s])
                for s in (slice(starts[i], starts[i + 1]) for i in range(len(spec)))
            ]
        )
    elif option == "xla":  # statistics and inversions (Cholesky, eigh) XLA-compiled as on GPU/TPU
        kwargs = dict(inverse_jit=True, statistics_jit=True)
        expected = u
    else:
        kl_clip = 1e-3
        nu = min(1.0, np.sqrt(kl_clip / (LR**2 * np.sum(u * grad))))
        assert nu < 0.5  # the clip is active
        kwargs = dict(kl_clip=kl_clip)
        expected = nu * u
    model.compile(optimizer=_kfac(**kwargs), loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    assert ref.rel_err(_step(model, r["layers"]), -LR * expected) < TOL


def test_saved_state_resumes_the_same_run(tmp_path):
    x, y = _data()
    spec = ARCHITECTURES["4-layer"]
    model = _mlp(spec)
    model.compile(
        optimizer=_kfac(momentum=0.9, stats_decay=0.9, inverse_every=2), loss="sparse_categorical_crossentropy"
    )
    model.train_on_batch(x, y)
    path = str(tmp_path / "run.keras")
    model.save(path)
    model.train_on_batch(x[::-1], y[::-1])
    model.train_on_batch(x, y)
    loaded = keras.models.load_model(path)
    assert loaded.optimizer.approximation == "block_tridiagonal"
    saved_cross = [v.numpy() for pair in loaded.optimizer._state.tridiagonal.cross for v in pair]
    assert all(np.any(c != 0) for c in saved_cross)
    loaded.train_on_batch(x[::-1], y[::-1])
    loaded.train_on_batch(x, y)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(model.optimizer._state.tridiagonal.state, loaded.optimizer._state.tridiagonal.state):
        for va, vb in zip(a, b):
            np.testing.assert_array_equal(va.numpy(), vb.numpy())


def _joint_statistics(rng, dims_a, dims_g, n=200):
    """Factors and cross factors of a chain from joint samples, so that the Fisher blocks are
    consistent (the Kronecker-factored tridiagonal matrix is positive semi-definite)."""
    a = [rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=d) for d in dims_a]
    for i in range(1, len(a)):  # correlate consecutive layers' inputs and gradients
        a[i][:, : min(dims_a[i], dims_a[i - 1])] += 0.8 * a[i - 1][:, : min(dims_a[i], dims_a[i - 1])]
    g = [rng.normal(size=(n, d)) for d in dims_g]
    for i in range(1, len(g)):
        g[i][:, : min(dims_g[i], dims_g[i - 1])] += 0.8 * g[i - 1][:, : min(dims_g[i], dims_g[i - 1])]
    factors = [(u.T @ u / n, v.T @ v / n) for u, v in zip(a, g)]
    cross = [(a[i].T @ a[i + 1] / n, g[i].T @ g[i + 1] / n) for i in range(len(a) - 1)]
    return factors, cross


def test_applied_matrix_matches_damped_fisher_on_tridiagonal_and_its_inverse_is_block_tridiagonal():
    rng = np.random.default_rng(3)
    dims_a, dims_g = [3, 4, 5, 3], [4, 5, 3, 2]
    damping = 0.05
    factors, cross = _joint_statistics(rng, dims_a, dims_g)
    f32 = lambda t: tf.constant(t, tf.float32)  # noqa: E731
    inverses = [
        FactoredInversion(DenseFactor(len(a)), DenseFactor(len(g)), "float64").compute([f32(a), f32(g)], damping)[0]
        for a, g in factors
    ]
    links = []
    for i in range(len(factors) - 1):
        *state, ok = tridiagonal.link_state(
            f32(factors[i][0]), f32(factors[i][1]), *inverses[i + 1], f32(cross[i][0]), f32(cross[i][1]), damping,
            tf.float64,
        )  # fmt: skip
        assert bool(ok)
        links.append(state)
    sizes = [da * dg for da, dg in zip(dims_a, dims_g)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    columns = []
    for col in range(starts[-1]):  # F̂⁻¹ column by column through the package's step
        unit = np.zeros(starts[-1])
        unit[col] = 1.0
        matrices = [f32(unit[starts[i] : starts[i + 1]].reshape(dims_a[i], dims_g[i])) for i in range(len(sizes))]
        out = tridiagonal.chain_directions(matrices, links, inverses[-1])
        columns.append(np.concatenate([u.numpy().reshape(-1) for u in out]))
    applied_inverse = np.array(columns, dtype=np.float64).T
    expected_inverse, _ = ref.tridiagonal_inverse(factors, cross, damping)
    assert ref.rel_err(applied_inverse, expected_inverse) < 1e-4

    approx = _blocks_of(np.linalg.inv(applied_inverse), starts)
    inverse_blocks = _blocks_of(applied_inverse, starts)
    scale = np.linalg.norm(applied_inverse)
    for i in range(len(sizes)):
        damped = ref.factored_damped_block(*factors[i], damping)
        assert ref.rel_err(approx[i][i], damped) < 1e-4
        if i + 1 < len(sizes):
            assert ref.rel_err(approx[i][i + 1], np.kron(*cross[i])) < 1e-4
            assert ref.rel_err(approx[i + 1][i], np.kron(*cross[i]).T) < 1e-4
            assert np.linalg.norm(inverse_blocks[i][i + 1]) > 1e-2 * scale  # tridiagonal, not diagonal
        for j in range(i + 2, len(sizes)):
            assert np.linalg.norm(inverse_blocks[i][j]) < 1e-6 * scale
            assert np.linalg.norm(inverse_blocks[j][i]) < 1e-6 * scale
    # F̂ itself is not tridiagonal: beyond the first off-diagonal it fills in.
    assert np.linalg.norm(approx[0][2]) > 1e-3 * np.linalg.norm(approx[0][0])


def _dense_names(model, chains):
    blocks = discover_blocks(model)[0]
    return [[blocks[i].name for i in chain] for chain in chains]


def test_chains_in_sequential_model():
    d = keras.layers.Dense
    model = keras_kfac.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(2, 3, name="conv"),
            keras.layers.Flatten(),
            d(8, activation="relu", name="d1"),
            d(8, activation="tanh", name="d2"),
            keras.layers.Dropout(0.1),
            d(6, activation="relu", name="d3"),
            d(5, activation="sigmoid", name="d4"),
            d(4, name="d5"),
            keras.layers.Activation("softmax"),
        ]
    )
    blocks = discover_blocks(model)[0]
    chains = tridiagonal.find_chains(model, blocks)
    assert _dense_names(model, chains) == [["d1", "d2"], ["d3", "d4", "d5"]]
    text = model.kfac_summary(print_fn=None)
    assert "d1 → d2 (+" in text and "d3 → d4 → d5 (+" in text
    # d3 (A 9x9, G 6x6) → d4 (7x7, 5x5) → d5 (6x6, 4x4): per link the cross factors and Ψ (twice), K_1, s_1, K_2, s_2.
    floats = 2 * (9 * 7 + 6 * 5) + 9 * 9 + 9 + 6 * 6 + 6 + 2 * (7 * 6 + 5 * 4) + 7 * 7 + 7 + 5 * 5 + 5
    assert tridiagonal.chain_bytes(blocks, chains[1]) == 4 * floats


def test_chains_in_functional_model_with_branches_and_shared_layer():
    d = keras.layers.Dense
    inputs = keras.Input((5,))
    h = d(8, activation="relu", name="d1")(inputs)
    h = d(8, activation="relu", name="d2")(h)  # its output feeds two layers: the chain ends here
    left = d(4, activation="tanh", name="left")(h)
    right = d(4, activation="tanh", name="right")(h)
    h = keras.layers.Concatenate()([left, right])
    h = d(6, activation="relu", name="d3")(h)
    h = d(6, activation="relu", name="d4")(h)
    shared = d(6, activation="relu", name="shared")
    h = shared(shared(h))  # a layer called twice is in no chain
    h = d(5, activation="relu", name="d5")(h)
    outputs = d(3, activation="softmax", name="d6")(h)
    extra = d(2, name="d7")(h)  # d5's output also feeds d7: d5 → d6 is not a chain
    model = keras_kfac.Model(inputs, [outputs, extra])
    chains = tridiagonal.find_chains(model, discover_blocks(model)[0])
    assert _dense_names(model, chains) == [["d1", "d2"], ["d3", "d4"]]


def test_subclassed_model_has_no_chains_and_trains_block_diagonal():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.d1 = keras.layers.Dense(4, activation="tanh")
            self.d2 = keras.layers.Dense(3, activation="softmax")

        def call(self, x):
            return self.d2(self.d1(x))

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 5)).astype("float32"), rng.integers(0, 3, size=8)
    model = keras_kfac.wrap(Net())
    model(x)
    assert tridiagonal.find_chains(model, discover_blocks(model)[0]) == []
    model.compile(optimizer=_kfac(), loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    assert model.optimizer._state.tridiagonal.chains == []
    assert all(isinstance(b, DenseBlock) for b in model.optimizer.blocks)


def test_eigen_damping_with_tridiagonal_is_an_error():
    with pytest.raises(ValueError, match="damping_mode='factored'"):
        keras_kfac.KFAC(approximation="block_tridiagonal", damping_mode="eigen")
    with pytest.raises(ValueError, match="approximation"):
        keras_kfac.KFAC(approximation="tridiagonal")
