"""Scale-and-shift blocks of LayerNormalization, BatchNormalization and GroupNormalization.

The reference is float64 NumPy and uses no keras_kfac code: the normalisation's forward pass
written out, each example's own loss (norm → Flatten → Dense → softmax cross-entropy), its
gradients with respect to γ and β by central finite differences, the per-feature 2x2 empirical
Fisher and the damped 2x2 solves of one exact step (tests/exact.py settings).
"""

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf
from exact import exact_kfac

import keras_kfac
from keras_kfac.blocks import block_for_layer
from keras_kfac.capture import capture

LR, DAMPING = 0.5, 1e-2
M = 8
# float32 arithmetic against float64; finite differences are accurate to ~1e-9 here.
TOL = 2e-4
RENORM_CLIPPING = {"rmin": 0.9, "rmax": 1.1, "dmax": 0.05}

pytestmark = pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")


# ----------------------------------------------------------------------------- reference
def reference_normalized(kind, x, cfg):
    """x̂ in float64, from the layers' documented formulas (population variance)."""
    rank = x.ndim
    eps = cfg.get("epsilon", 1e-3)
    if kind == "ln":
        axis = cfg.get("axis", -1)
        axes = tuple(sorted(a % rank for a in (axis if isinstance(axis, list) else [axis])))
        var = x.var(axis=axes, keepdims=True)
        if cfg.get("rms_scaling"):
            return x / np.sqrt(var + eps)
        return (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(var + eps)
    if kind == "bn":
        axis = cfg.get("axis", -1) % rank
        axes = tuple(d for d in range(rank) if d != axis)
        mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
        xhat = (x - mean) / np.sqrt(var + eps)
        if cfg.get("renorm"):  # renorm_mean = 0, renorm_stddev = 1 before the first step
            clip = cfg["renorm_clipping"]
            r = np.clip(np.sqrt(var + eps), clip["rmin"], clip["rmax"])
            d = np.clip(mean, -clip["dmax"], clip["dmax"])
            xhat = xhat * r + d
        return xhat
    if kind == "gn":  # channels split into `groups` contiguous groups
        axis, groups = cfg.get("axis", -1) % rank, cfg["groups"]
        moved = np.moveaxis(x, axis, -1)
        channels = moved.shape[-1]
        grouped = moved.reshape(moved.shape[:-1] + (groups, channels // groups))
        axes = tuple(d for d in range(1, grouped.ndim) if d != grouped.ndim - 2)
        mean, var = grouped.mean(axis=axes, keepdims=True), grouped.var(axis=axes, keepdims=True)
        xhat = ((grouped - mean) / np.sqrt(var + eps)).reshape(moved.shape)
        return np.moveaxis(xhat, -1, axis)
    raise ValueError(kind)


def feature_axes(kind, cfg, rank):
    axis = cfg.get("axis", -1)
    return sorted(a % rank for a in (axis if isinstance(axis, list) else [axis]))


def example_losses(xhat, labels, gamma, beta, features, kernel, bias):
    """ℓ_i = −log softmax(flatten(γ ⊙ x̂_i + β) W + c)[label_i], γ, β over the feature axes."""
    shape = [xhat.shape[d] if d in features else 1 for d in range(xhat.ndim)]
    y = xhat
    if gamma is not None:
        y = y * gamma.reshape(shape)
    if beta is not None:
        y = y + beta.reshape(shape)
    probs = ref.softmax(y.reshape(y.shape[0], -1) @ kernel + bias)
    return -np.log(probs[np.arange(len(labels)), labels])


def per_example_gradients(xhat, labels, params, features, kernel, bias, h=1e-5):
    """{name: (m, P)} ∂ℓ_i/∂θ_j by central differences, θ the present ones of γ, β."""
    out = {}
    for name, value in params.items():
        if value is None:
            continue
        grads = np.zeros((xhat.shape[0], value.size))
        for j in range(value.size):
            shifted = []
            for sign in (1.0, -1.0):
                moved = value.copy().reshape(-1)
                moved[j] += sign * h
                trial = {**params, name: moved.reshape(value.shape)}
                shifted.append(example_losses(xhat, labels, trial["gamma"], trial["beta"], features, kernel, bias))
            grads[:, j] = (shifted[0] - shifted[1]) / (2 * h)
        out[name] = grads
    return out


def reference_step(rows, damping):
    """Per feature: F_j = (1/m) Σ_i r_ij r_ijᵀ, ∇_j = mean_i r_ij, u_j = (F_j + λI)⁻¹ ∇_j."""
    stacked = np.stack(rows, axis=-1)  # (m, P, k)
    m, size, k = stacked.shape
    fisher = np.einsum("ipa,ipb->pab", stacked, stacked) / m
    grad = stacked.mean(axis=0)
    update = np.stack([np.linalg.solve(fisher[j] + damping * np.eye(k), grad[j]) for j in range(size)])
    entries = [fisher[:, 0, 0]] if k == 1 else [fisher[:, 0, 0], fisher[:, 0, 1], fisher[:, 1, 1]]
    return np.stack(entries), update


# ----------------------------------------------------------------------------- cases
CASES = {
    "ln-last": ("ln", dict(), (4, 3), True),
    "ln-axes12": ("ln", dict(axis=[1, 2]), (4, 3), True),
    "ln-axis1": ("ln", dict(axis=1), (4, 3), True),
    "ln-rms": ("ln", dict(rms_scaling=True), (4, 3), True),
    "ln-no-center": ("ln", dict(center=False), (6,), True),
    "ln-no-scale": ("ln", dict(scale=False), (6,), True),
    "ln-compiled": ("ln", dict(axis=[1, 2]), (3, 2), False),
    "bn-last": ("bn", dict(), (4, 3), True),
    "bn-axis1": ("bn", dict(axis=1), (4, 3), True),
    "bn-renorm": ("bn", dict(renorm=True, renorm_clipping=RENORM_CLIPPING), (5,), True),
    "bn-compiled": ("bn", dict(), (2, 3), False),
    "gn": ("gn", dict(groups=2), (3, 4), True),
    "gn-axis1": ("gn", dict(groups=2, axis=1), (4, 3), True),
}
LAYERS = {
    "ln": keras.layers.LayerNormalization,
    "bn": keras.layers.BatchNormalization,
    "gn": keras.layers.GroupNormalization,
}


def _layer(kind, cfg, name="norm"):
    return LAYERS[kind](name=name, **cfg)


def _randomise(layer, rng):
    for name, scale, offset in (("gamma", 0.3, 1.0), ("beta", 0.2, 0.0)):
        variable = getattr(layer, name, None)
        if variable is not None:
            variable.assign(offset + scale * rng.normal(size=variable.shape).astype("float32"))


@pytest.mark.parametrize("case", list(CASES))
def test_fisher_and_exact_step_match_numpy(case):
    kind, cfg, shape, eager = CASES[case]
    rng = np.random.default_rng(3)
    x = (1.5 * rng.normal(size=(M, *shape)) + 0.5).astype("float32")
    labels = rng.integers(0, 3, size=M)
    norm, head = _layer(kind, cfg), keras.layers.Dense(3, activation="softmax")
    model = keras_kfac.Sequential([keras.Input(shape), norm, keras.layers.Flatten(), head])
    _randomise(norm, rng)
    params = {
        "gamma": None if getattr(norm, "gamma", None) is None else norm.gamma.numpy().astype(np.float64),
        "beta": None if getattr(norm, "beta", None) is None else norm.beta.numpy().astype(np.float64),
    }
    kernel, bias = head.kernel.numpy().astype(np.float64), head.bias.numpy().astype(np.float64)
    xhat = reference_normalized(kind, x.astype(np.float64), cfg)
    features = feature_axes(kind, cfg, x.ndim)
    grads = per_example_gradients(xhat, labels, params, features, kernel, bias)
    expected_fisher, update = reference_step([grads[n] for n in ("gamma", "beta") if n in grads], DAMPING)

    opt = exact_kfac(learning_rate=LR, damping=DAMPING)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", run_eagerly=eager)
    model.train_on_batch(x, labels)

    block = next(b for b in opt.blocks if b.layer is norm)
    assert block.kind == {"ln": "LayerNormalizationBlock", "bn": "BatchNormalizationBlock"}.get(
        kind, "GroupNormalizationBlock"
    )
    assert [v.path for v in block.variables] == [v.path for v in norm.trainable_variables]
    (fisher,) = opt.factors()[norm.name]
    assert ref.rel_err(fisher.numpy(), expected_fisher) < TOL
    for index, name in enumerate(n for n in ("gamma", "beta") if n in grads):
        new = getattr(norm, name).numpy().reshape(-1)
        assert ref.rel_err(new - params[name].reshape(-1), -LR * update[:, index]) < TOL


def test_diagonal_and_2x2_summaries():
    layer = keras.layers.LayerNormalization(center=False)
    layer.build((None, 5))
    block, reason = block_for_layer(layer)
    assert reason == "" and block.summary()["curvature"] == "diagonal (γ) × 5, exact damping"
    layer = keras.layers.BatchNormalization()
    layer.build((None, 4, 6))
    block, _ = block_for_layer(layer)
    assert block.summary()["curvature"] == "2x2 (γ, β) per feature × 6, exact damping"
    assert block.summary()["state_bytes"] == 2 * 4 * 3 * 6
    layer.beta.trainable = False
    assert [v.name for v in block_for_layer(layer)[0].variables] == ["gamma"]
    layer.gamma.trainable = False
    assert block_for_layer(layer) == (None, "no trainable parameters")


# ----------------------------------------------------------------------------- recording
RECORDING = [
    ("ln", dict(axis=[1, 2]), (3, 4), {}),
    ("ln", dict(rms_scaling=True), (3, 4), {}),
    ("bn", dict(), (3, 4), dict(training=True)),
    ("bn", dict(axis=1), (3, 4), dict(training=True)),
    ("bn", dict(), (3, 4), dict(training=False)),
    ("bn", dict(), (3, 4), dict(training=True, mask=True)),
    ("bn", dict(renorm=True, renorm_clipping=RENORM_CLIPPING), (4,), dict(training=True)),
    ("gn", dict(groups=2, axis=1), (4, 3), {}),
]


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("kind,cfg,shape,kwargs", RECORDING, ids=[f"{r[0]}-{i}" for i, r in enumerate(RECORDING)])
def test_recording_call_is_the_layers_call(kind, cfg, shape, kwargs, graph):
    """Same output (bitwise), same state changes (moving statistics) as the layer's own call,
    and x̂ recorded as the reference computes it."""
    rng = np.random.default_rng(5)
    x = (2.0 * rng.normal(size=(M, *shape)) + 1.0).astype("float32")
    kwargs = dict(kwargs)
    if kwargs.pop("mask", False):
        kwargs["mask"] = tf.constant(rng.random(size=(M, *shape[:-1])) < 0.7)
    plain, recorded = _layer(kind, cfg, "plain"), _layer(kind, cfg, "recorded")
    plain.build((None, *shape))
    recorded.build((None, *shape))
    _randomise(plain, rng)
    recorded.set_weights(plain.get_weights())
    block, _ = block_for_layer(recorded)

    def run(layer, with_capture):
        if not with_capture:
            return layer(x, **kwargs), None
        with capture([block]) as recording:
            out = layer(x, **kwargs)
        return out, recording.inputs[0][0]

    def both():
        return run(plain, False)[0], *run(recorded, True)

    expected, actual, xhat = tf.function(both)() if graph else both()
    np.testing.assert_array_equal(actual.numpy(), expected.numpy())
    for a, b in zip(recorded.non_trainable_weights, plain.non_trainable_weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    if kind != "bn" or (kwargs.get("training") and "mask" not in kwargs):
        np.testing.assert_allclose(xhat.numpy(), reference_normalized(kind, x.astype(np.float64), cfg), atol=1e-5)
    if kwargs.get("training"):
        assert not np.array_equal(plain.moving_mean.numpy(), np.zeros(plain.moving_mean.shape))


# ----------------------------------------------------------------------------- moving statistics
@pytest.mark.parametrize(
    "settings,bn",
    [
        ("exact", dict(renorm=True, renorm_clipping=RENORM_CLIPPING)),
        ("default", dict(momentum=0.5)),
    ],
    ids=["exact-renorm", "default-kfac"],
)
def test_batchnorm_moving_statistics_move_once_as_in_keras(settings, bn):
    """One step of K-FAC moves the moving statistics exactly as one step of plain Keras: the
    recording in the training pass (exact settings: statistics from the whole batch) and the
    separate statistics pass (default KFAC(), whose changes are put back)."""
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(16, 5)) + 2.0).astype("float32")
    labels = rng.integers(0, 3, size=16)

    def layers():
        return [keras.Input((5,)), keras.layers.Dense(6), keras.layers.BatchNormalization(**bn), keras.layers.Dense(3)]

    plain = keras.Sequential(layers())
    model = keras_kfac.Sequential(layers())
    model.set_weights(plain.get_weights())
    initial = [w.numpy().copy() for w in plain.layers[1].non_trainable_weights]
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(True))
    plain.train_on_batch(x, labels)
    opt = exact_kfac(learning_rate=0.1, damping=1e-2) if settings == "exact" else keras_kfac.KFAC()
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(True))
    model.train_on_batch(x, labels)
    assert "BatchNormalizationBlock" in [b.kind for b in opt.blocks]
    for before, a, b in zip(initial, model.layers[1].non_trainable_weights, plain.layers[1].non_trainable_weights):
        assert not np.allclose(b.numpy(), before)
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- training
def _fit_losses(model, x, y, epochs):
    """Per-epoch losses of `fit` with KFAC(learning_rate=1e-2), the rest default; checks they are
    finite and fall."""
    model.compile(optimizer=keras_kfac.KFAC(learning_rate=1e-2), loss="sparse_categorical_crossentropy")
    losses = model.fit(x, y, batch_size=32, epochs=epochs, shuffle=False, verbose=0).history["loss"]
    assert np.isfinite(losses).all() and all(b < a for a, b in zip(losses, losses[1:]))
    return losses


def test_cnn_with_batchnorm_trains():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(192, 8, 8, 2)).astype("float32")
    y = np.argmax(x.reshape(192, -1) @ rng.normal(size=(128, 3)), axis=1)
    model = keras_kfac.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.layers.Conv2D(6, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    losses = _fit_losses(model, x, y, epochs=4)
    assert [b.kind for b in model.optimizer.blocks] == ["Conv2DBlock", "BatchNormalizationBlock", "DenseBlock"]
    assert model.optimizer.fallback_layers == []
    assert losses[-1] < 0.7 * losses[0]


def test_transformer_block_with_layernorm_trains():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(192, 6, 8)).astype("float32")
    y = np.argmax(x.mean(axis=1) @ rng.normal(size=(8, 3)), axis=1)
    inputs = keras.Input((6, 8))
    h = keras.layers.Dense(8)(inputs)
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(h, h)
    h = keras.layers.LayerNormalization()(h + attended)
    ffn = keras.layers.Dense(8)(keras.layers.Dense(16, activation="relu")(h))
    h = keras.layers.LayerNormalization()(h + ffn)
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling1D()(h))
    model = keras_kfac.Model(inputs, outputs)
    losses = _fit_losses(model, x, y, epochs=4)
    kinds = [b.kind for b in model.optimizer.blocks]
    assert kinds.count("LayerNormalizationBlock") == 2
    assert losses[-1] < 0.85 * losses[0]
