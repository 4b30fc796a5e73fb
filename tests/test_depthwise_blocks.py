"""DepthwiseConv2D and SeparableConv2D blocks: per-channel Kronecker factors, one exact K-FAC step
against float64 NumPy references (explicit loops, dense solves of the whole block-diagonal
matrix in the layer's own parameter order), the two-records-per-call recording of
SeparableConv2D, and training of small MobileNet-style models with `KFAC(learning_rate=1e-2)`."""

import itertools
import math

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf
from exact import exact_kfac

import keras_kfac
from keras_kfac.blocks import DepthwiseConv2DBlock, SeparableConv2DBlock, block_for_layer
from keras_kfac.capture import capture

LR, DAMPING = 0.5, 1e-2
TOL = 2e-4


# ----------------------------------------------------------------------------- references
def _padded(x, kernel_size, strides, padding, dilation):
    """Zero-padded input (TF's "same" convention: the odd pixel after) and the output size."""
    m, h, w, c = x.shape
    sizes, pads = [], []
    for n, k, s, d in zip((h, w), kernel_size, strides, dilation):
        span = (k - 1) * d + 1
        if padding == "same":
            out = math.ceil(n / s)
            total = max((out - 1) * s + span - n, 0)
            pads.append((total // 2, total - total // 2))
        else:
            out = (n - span) // s + 1
            pads.append((0, 0))
        sizes.append(out)
    padded = np.zeros((m, h + sum(pads[0]), w + sum(pads[1]), c))
    padded[:, pads[0][0] : pads[0][0] + h, pads[1][0] : pads[1][0] + w] = x
    return padded, sizes


def channel_patches(x, kernel_size, strides, padding, dilation):
    """(m, H', W', C, kh·kw): the taps of channel c feeding each output location, (kh, kw) order."""
    padded, (oh, ow) = _padded(x, kernel_size, strides, padding, dilation)
    kh, kw = kernel_size
    out = np.zeros((x.shape[0], oh, ow, x.shape[3], kh * kw))
    for i in range(oh):
        for j in range(ow):
            for a in range(kh):
                for b in range(kw):
                    row = i * strides[0] + a * dilation[0]
                    col = j * strides[1] + b * dilation[1]
                    out[:, i, j, :, a * kw + b] = padded[:, row, col, :]
    return out


def depthwise_forward(patches, kernel):
    """z[..., c·dm + q] = Σ_t patch_c[t] W[t, c, q], channel by channel."""
    kh, kw, channels, dm = kernel.shape
    out = np.zeros(patches.shape[:3] + (channels * dm,))
    for c in range(channels):
        for q in range(dm):
            out[..., c * dm + q] = patches[..., c, :] @ kernel[:, :, c, q].reshape(-1)
    return out


def depthwise_kernel_grad(patches, dz, kernel_shape):
    kh, kw, channels, dm = kernel_shape
    grad = np.zeros(kernel_shape)
    for c in range(channels):
        for q in range(dm):
            taps = np.einsum("nijt,nij->t", patches[..., c, :], dz[..., c * dm + q])
            grad[:, :, c, q] = taps.reshape(kh, kw)
    return grad


def depthwise_factors(patches, g, dm, with_bias):
    """Per channel: A_c = mean over examples and locations of ā_c ā_cᵀ, G_c = (1/m) Σ g_c g_cᵀ."""
    m, channels = patches.shape[0], patches.shape[3]
    factors = []
    for c in range(channels):
        rows = patches[..., c, :].reshape(-1, patches.shape[4])
        if with_bias:
            rows = ref.with_ones(rows)
        gc = g[..., c * dm : (c + 1) * dm].reshape(-1, dm)
        factors.append((rows.T @ rows / rows.shape[0], gc.T @ gc / m))
    return factors


def damped_kron(factor_a, factor_g, mode):
    da, dg = factor_a.shape[0], factor_g.shape[0]
    if mode == "eigen":
        return np.kron(factor_a, factor_g) + DAMPING * np.eye(da * dg)
    pi = math.sqrt((np.trace(factor_a) / da) / (np.trace(factor_g) / dg))
    root = math.sqrt(DAMPING)
    return np.kron(factor_a + pi * root * np.eye(da), factor_g + root / pi * np.eye(dg))


def depthwise_matrix(factors, kernel_shape, with_bias, mode):
    """The damped block-diagonal curvature in the layer's parameter order [kernel.ravel(), bias]:
    channel c's block couples W[t, c, q] (and bias[c·dm + q]) with each other only."""
    kh, kw, channels, dm = kernel_shape
    taps, size = kh * kw, kh * kw * channels * dm
    total = size + (channels * dm if with_bias else 0)
    matrix = np.zeros((total, total))
    for c, (factor_a, factor_g) in enumerate(factors):
        block = damped_kron(factor_a, factor_g, mode)
        index = []
        for t in range(factor_a.shape[0]):
            for q in range(dm):
                index.append(((t * channels + c) * dm + q) if t < taps else size + c * dm + q)
        matrix[np.ix_(index, index)] = block
    return matrix


def head_backward(h, y, w2, b2, mode):
    """Flatten → Dense(softmax) with mean cross-entropy: dL/dh and the head's own step."""
    m = h.shape[0]
    flat = h.reshape(m, -1)
    probs = ref.softmax(flat @ w2 + b2)
    dz2 = (probs - np.eye(w2.shape[1])[y]) / m
    rows = ref.with_ones(flat)
    update = ref.kron_solve(rows.T @ rows / m, (m * dz2).T @ (m * dz2) / m, rows.T @ dz2, DAMPING, mode)
    return (dz2 @ w2.T).reshape(h.shape), update


def _data(shape, m, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, *shape)).astype("float32"), rng.integers(0, classes, size=m)


def _f64(v):
    return v.numpy().astype(np.float64)


CONV_ARGS = {
    "valid": dict(strides=(1, 1), padding="valid", dilation_rate=(1, 1)),
    "stride2-same": dict(strides=(2, 2), padding="same", dilation_rate=(1, 1)),
    "dilated-same": dict(strides=(1, 1), padding="same", dilation_rate=(2, 1)),
    "stride21-valid": dict(strides=(2, 1), padding="valid", dilation_rate=(1, 1)),
    "stride2-dilated2-same": dict(strides=(2, 2), padding="same", dilation_rate=(2, 2)),
}


# ----------------------------------------------------------------------------- DepthwiseConv2D
@pytest.mark.parametrize(
    "case, dm, use_bias, mode",
    [
        ("valid", 1, True, "eigen"),
        ("stride2-same", 2, True, "factored"),
        ("dilated-same", 2, False, "eigen"),
        ("stride21-valid", 3, True, "eigen"),
        ("stride2-dilated2-same", 1, True, "factored"),
    ],
)
def test_depthwise_step_matches_numpy(case, dm, use_bias, mode):
    conv_args = CONV_ARGS[case]
    x, y = _data((7, 6, 3), m=5, seed=1)
    layer = keras.layers.DepthwiseConv2D(
        (3, 2), depth_multiplier=dm, use_bias=use_bias, activation="tanh", bias_initializer="random_normal", **conv_args
    )
    head = keras.layers.Dense(3, activation="softmax", bias_initializer="random_normal")
    model = keras_kfac.Sequential([keras.Input((7, 6, 3)), layer, keras.layers.Flatten(), head])
    kernel, w2, b2 = _f64(layer.kernel), _f64(head.kernel), _f64(head.bias)
    bias = _f64(layer.bias) if use_bias else 0.0
    args = ((3, 2), conv_args["strides"], conv_args["padding"], conv_args["dilation_rate"])

    patches = channel_patches(x.astype(np.float64), *args)
    pre = depthwise_forward(patches, kernel) + bias
    assert ref.rel_err(layer(x).numpy(), np.tanh(pre)) < 1e-5  # the reference's conventions are Keras'
    h = np.tanh(pre)
    dh, head_update = head_backward(h, y, w2, b2, mode)
    dz = dh * (1 - h**2)  # gradient of the mean loss
    grads = [depthwise_kernel_grad(patches, dz, kernel.shape)]
    if use_bias:
        grads.append(dz.sum(axis=(0, 1, 2)))
    factors = depthwise_factors(patches, dz * x.shape[0], dm, use_bias)
    matrix = depthwise_matrix(factors, kernel.shape, use_bias, mode)
    update = np.linalg.solve(matrix, np.concatenate([g.ravel() for g in grads]))

    opt = exact_kfac(learning_rate=LR, damping=DAMPING, damping_mode=mode)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    assert [b.kind for b in opt.blocks] == ["DepthwiseConv2DBlock", "DenseBlock"]
    factor_a, factor_g = opt.factors()[layer.name]
    assert ref.rel_err(factor_a.numpy(), np.stack([a for a, _ in factors])) < TOL
    assert ref.rel_err(factor_g.numpy(), np.stack([g for _, g in factors])) < TOL
    new = [layer.kernel.numpy()] + ([layer.bias.numpy()] if use_bias else [])
    step = np.concatenate([(n - o).ravel() for n, o in zip(new, [kernel] + ([bias] if use_bias else []))])
    assert ref.rel_err(step, -LR * update) < TOL
    assert ref.rel_err(head.kernel.numpy(), w2 - LR * head_update[:-1]) < TOL


# ----------------------------------------------------------------------------- SeparableConv2D
@pytest.mark.parametrize(
    "case, dm, use_bias, mode",
    [
        ("valid", 2, True, "eigen"),
        ("stride2-same", 1, True, "factored"),
        ("dilated-same", 2, False, "factored"),
        ("stride2-dilated2-same", 2, True, "eigen"),
    ],
)
def test_separable_step_matches_numpy(case, dm, use_bias, mode):
    conv_args = CONV_ARGS[case]
    x, y = _data((7, 6, 3), m=5, seed=2)
    layer = keras.layers.SeparableConv2D(
        4,
        (3, 2),
        depth_multiplier=dm,
        use_bias=use_bias,
        activation="tanh",
        bias_initializer="random_normal",
        **conv_args,
    )
    head = keras.layers.Dense(3, activation="softmax", bias_initializer="random_normal")
    model = keras_kfac.Sequential([keras.Input((7, 6, 3)), layer, keras.layers.Flatten(), head])
    wd, wp, w2, b2 = _f64(layer.depthwise_kernel), _f64(layer.pointwise_kernel), _f64(head.kernel), _f64(head.bias)
    bias = _f64(layer.bias) if use_bias else np.zeros(4)
    args = ((3, 2), conv_args["strides"], conv_args["padding"], conv_args["dilation_rate"])
    m, channels = x.shape[0], 3

    patches = channel_patches(x.astype(np.float64), *args)
    z = depthwise_forward(patches, wd)
    wp2 = wp.reshape(channels * dm, 4)
    pre = z @ wp2 + bias
    assert ref.rel_err(layer(x).numpy(), np.tanh(pre)) < 1e-5
    h = np.tanh(pre)
    dh, _ = head_backward(h, y, w2, b2, mode)
    dp = dh * (1 - h**2)
    dz = dp @ wp2.T
    rows_z = z.reshape(-1, channels * dm)
    rows_p = dp.reshape(-1, 4)
    grads = [depthwise_kernel_grad(patches, dz, wd.shape), rows_z.T @ rows_p]
    if use_bias:
        grads.append(rows_p.sum(axis=0))
        rows_z = ref.with_ones(rows_z)
    depthwise = depthwise_factors(patches, dz * m, dm, with_bias=False)
    factor_a, factor_g = rows_z.T @ rows_z / rows_z.shape[0], (m * rows_p).T @ (m * rows_p) / m
    blocks = [depthwise_matrix(depthwise, wd.shape, False, mode), damped_kron(factor_a, factor_g, mode)]
    sizes = [b.shape[0] for b in blocks]
    matrix = np.zeros((sum(sizes), sum(sizes)))
    matrix[: sizes[0], : sizes[0]], matrix[sizes[0] :, sizes[0] :] = blocks
    update = np.linalg.solve(matrix, np.concatenate([g.ravel() for g in grads]))

    opt = exact_kfac(learning_rate=LR, damping=DAMPING, damping_mode=mode)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    assert [b.kind for b in opt.blocks] == ["SeparableConv2DBlock", "DenseBlock"]
    got = [f.numpy() for f in opt.factors()[layer.name]]
    expected = [np.stack([a for a, _ in depthwise]), np.stack([g for _, g in depthwise]), factor_a, factor_g]
    for actual, exp in zip(got, expected):
        assert ref.rel_err(actual, exp) < TOL
    before = [wd, wp] + ([bias] if use_bias else [])
    after = [v.numpy() for v in opt.blocks[0].variables]
    step = np.concatenate([(n - o).ravel() for n, o in zip(after, before)])
    assert ref.rel_err(step, -LR * update) < TOL


def test_separable_records_two_targets_per_call_in_order():
    """A shared SeparableConv2D called twice records [x₁, z₁, x₂, z₂] with targets
    [z₁, p₁, z₂, p₂]; the gradient w.r.t. z is Wₚ times the gradient w.r.t. p."""
    layer = keras.layers.SeparableConv2D(4, 3, depth_multiplier=2, padding="same")
    first, second = keras.Input((6, 6, 3)), keras.Input((5, 5, 3))
    pooled = [keras.layers.GlobalAveragePooling2D()(layer(t)) for t in (first, second)]
    model = keras.Model([first, second], keras.layers.Add()(pooled))
    block = SeparableConv2DBlock(layer)
    xs = [tf.random.normal((2, 6, 6, 3)), tf.random.normal((2, 5, 5, 3))]
    with capture([block]) as recording:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(xs)))
    inputs, targets = recording.inputs[0], recording.targets[0]
    # (Keras runs the two branches in an order of its own: the pairs stay together.)
    sizes = sorted(int(inputs[2 * i].shape[1]) for i in range(2))
    assert sizes == [5, 6] and len(inputs) == len(targets) == 4
    for i in range(2):
        n = int(inputs[2 * i].shape[1])
        assert [tuple(t.shape) for t in inputs[2 * i : 2 * i + 2]] == [(2, n, n, 3), (2, n, n, 6)]
        assert [tuple(t.shape) for t in targets[2 * i : 2 * i + 2]] == [(2, n, n, 6), (2, n, n, 4)]
    assert targets[0] is inputs[1] and targets[2] is inputs[3]
    grads = tape.gradient(loss, recording.flat_targets())
    wp = layer.pointwise_kernel.numpy().reshape(6, 4)
    for gz, gp in [(grads[0], grads[1]), (grads[2], grads[3])]:
        assert ref.rel_err(gz.numpy(), gp.numpy() @ wp.T) < 1e-5
    stats = block.batch_statistics(inputs, grads, 2)
    assert [tuple(s.shape) for s in stats] == [(3, 9, 9), (3, 2, 2), (7, 7), (4, 4)]
    rows = tf.concat([tf.reshape(inputs[1], (-1, 6)), tf.reshape(inputs[3], (-1, 6))], 0).numpy()
    rows = ref.with_ones(rows.astype(np.float64))
    assert ref.rel_err(stats[2].numpy(), rows.T @ rows / rows.shape[0]) < 1e-5
    with pytest.raises(ValueError, match="two records per call"):
        block.batch_statistics(inputs[:3], grads[:3], 2)


def test_stats_locations_sample_the_same_locations_for_both_parts():
    """With `stats_locations`, A of each part is the mean over a subset of the locations; at
    least as many locations as there are gives the full factors, G never changes."""
    layer = keras.layers.SeparableConv2D(4, 3, depth_multiplier=2, strides=2)
    layer.build((None, 9, 9, 3))
    xs = tf.random.normal((3, 9, 9, 3))
    full = SeparableConv2DBlock(layer)
    with capture([full]) as recording:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.sin(layer(xs)))
    recorded = recording.inputs[0]
    grads = tape.gradient(loss, recording.flat_targets())
    seed = tf.constant([1, 2], tf.int64)
    expected = full.batch_statistics(recorded, grads, 3, seed)
    for locations, same in [(16, True), (3, False)]:
        block = SeparableConv2DBlock(layer, keras_kfac.BlockOptions(stats_locations=locations))
        got = block.batch_statistics(recorded, grads, 3, seed)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g.shape == e.shape and np.all(np.isfinite(g.numpy()))
            if same or i in (1, 3):  # the G factors never subsample
                assert ref.rel_err(g.numpy(), e.numpy()) < 1e-5
            else:
                assert ref.rel_err(g.numpy(), e.numpy()) > 1e-3
    # Both parts see the same 3 locations: find them from the pointwise A's bias column (the
    # mean of z there), then the depthwise A must be the mean of the patches at those locations.
    block = SeparableConv2DBlock(layer, keras_kfac.BlockOptions(stats_locations=3))
    depthwise_a, _, pointwise_a, _ = [t.numpy() for t in block.batch_statistics(recorded, grads, 3, seed)]
    patches = channel_patches(xs.numpy().astype(np.float64), (3, 3), (2, 2), "valid", (1, 1)).reshape(3, 16, 3, 9)
    z = np.einsum("nlct,tcq->nlcq", patches, layer.depthwise_kernel.numpy().reshape(9, 3, 2)).reshape(3, 16, 6)
    subsets = [list(c) for c in itertools.combinations(range(16), 3)]
    errors = [np.abs(z[:, c].mean(axis=(0, 1)) - pointwise_a[-1, :-1]).max() for c in subsets]
    chosen = subsets[int(np.argmin(errors))]
    assert min(errors) < 1e-5
    taps = patches[:, chosen]  # (examples, 3, C, 9)
    expected_a = np.einsum("nlct,nlcs->cts", taps, taps) / 9
    assert ref.rel_err(depthwise_a, expected_a) < 1e-5


# ----------------------------------------------------------------------------- selection and reports
def test_registry_summary_and_unsupported_settings():
    depthwise = keras.layers.DepthwiseConv2D(3, depth_multiplier=2)
    depthwise.build((None, 8, 8, 5))
    block, reason = block_for_layer(depthwise)
    assert isinstance(block, DepthwiseConv2DBlock) and reason == ""
    assert [tuple(v.shape) for v in block.variables] == [(3, 3, 5, 2), (10,)]
    info = block.summary()
    assert "per channel A 10x10 ⊗ G 2x2 (×5)" in info["curvature"]
    # factored: A (5, 10, 10), G (5, 2, 2), two inverses of the same shapes.
    assert info["state_bytes"] == 4 * 2 * (5 * 100 + 5 * 4)
    separable = keras.layers.SeparableConv2D(7, 3, use_bias=False)
    separable.build((None, 8, 8, 5))
    block, _ = block_for_layer(separable, keras_kfac.BlockOptions(damping_mode="eigen"))
    assert isinstance(block, SeparableConv2DBlock)
    assert [tuple(v.shape) for v in block.variables] == [(3, 3, 5, 1), (1, 1, 5, 7)]
    assert "pointwise: A 5x5 ⊗ G 7x7, eigen" in block.summary()["curvature"]
    first = keras.layers.DepthwiseConv2D(3, data_format="channels_first")
    first.build((None, 5, 8, 8))
    assert block_for_layer(first) == (None, "channels_first is not supported")
    frozen = keras.layers.SeparableConv2D(4, 3)
    frozen.build((None, 8, 8, 5))
    frozen.pointwise_kernel.trainable = False
    assert block_for_layer(frozen) == (None, "not trainable")


# ----------------------------------------------------------------------------- training
def _mobilenet(separable: bool):
    layers = [
        keras.Input((12, 12, 3)),
        keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu"),
        keras.layers.DepthwiseConv2D(3, padding="same", activation="relu"),
        keras.layers.Conv2D(12, 1, activation="relu"),
    ]
    if separable:
        layers.append(keras.layers.SeparableConv2D(12, 3, strides=2, depth_multiplier=2, activation="relu"))
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")]
    return keras_kfac.Sequential(layers)


@pytest.mark.parametrize("separable", [False, True], ids=["depthwise", "separable"])
def test_mobilenet_style_model_trains_with_kfac(separable):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(256, 12, 12, 3)) + rng.normal(size=(256, 1, 1, 3))  # a colour cast per image
    x = x.astype("float32")
    y = np.argmax(x.mean(axis=(1, 2)), axis=1)  # which colour dominates: learnable through the pooling
    keras.utils.set_random_seed(0)
    model = _mobilenet(separable)
    opt = keras_kfac.KFAC(learning_rate=1e-2)  # the rest default; 1e-3 needs more epochs
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0)
    kinds = [b.kind for b in opt.blocks]
    assert "DepthwiseConv2DBlock" in kinds and ("SeparableConv2DBlock" in kinds) == separable
    assert opt.fallback_optimizer is None
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.75 * losses[0], losses


def test_block_tridiagonal_with_a_depthwise_layer_in_the_model():
    x, y = _data((6, 6, 2), m=8)
    model = keras_kfac.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.DepthwiseConv2D(3, activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    opt = keras_kfac.KFAC(approximation="block_tridiagonal")
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    kernel = model.layers[0].kernel.numpy().copy()
    loss = model.train_on_batch(x, y)
    assert np.all(np.isfinite(loss))
    assert [b.kind for b in opt.blocks] == ["DepthwiseConv2DBlock", "DenseBlock", "DenseBlock"]
    assert opt._state.tridiagonal.chains == [[1, 2]]  # the two Dense layers; the depthwise block stays diagonal
    assert not np.array_equal(kernel, model.layers[0].kernel.numpy())
