"""KFC blocks of Conv1D, Conv3D and Conv2DTranspose against an independent float64 NumPy
reference (tests/reference_conv.py): the forward pass, the kernel gradient, the factors A and G
and one exact K-FAC step, for several strides, paddings, dilations, with and without bias; the
random location subsets of `stats_locations`; inputs of unknown length; unsupported settings;
and a few steps of training with `KFAC(learning_rate=1e-2)`."""

import keras
import numpy as np
import pytest
import reference as ref
import reference_conv as rc
import tensorflow as tf
from exact import exact_kfac

import keras_kfac
from keras_kfac.blocks import BlockOptions, Conv1DBlock, Conv2DTransposeBlock, Conv3DBlock, block_for_layer

LR, DAMPING = 0.5, 1e-2
TOL = 2e-4  # float32 arithmetic against float64 (as tests/test_one_step.py)

CONV1D = [
    dict(kernel_size=3, padding="valid"),
    dict(kernel_size=3, strides=2, padding="same"),
    dict(kernel_size=4, strides=2, padding="same", use_bias=False),  # even kernel: one more zero after
    dict(kernel_size=3, padding="causal", dilation_rate=2),
    dict(kernel_size=2, strides=3, padding="causal"),
    dict(kernel_size=2, padding="same", dilation_rate=3),
]
CONV3D = [
    dict(kernel_size=2, padding="valid"),
    dict(kernel_size=3, strides=(2, 1, 2), padding="same"),
    dict(kernel_size=(3, 2, 2), padding="same", dilation_rate=(2, 1, 1), use_bias=False),
]
CONV2D_TRANSPOSE = [
    dict(kernel_size=3, strides=2, padding="valid"),
    dict(kernel_size=3, strides=2, padding="same"),
    dict(kernel_size=(2, 4), strides=(1, 2), padding="same", use_bias=False),
    dict(kernel_size=(3, 2), strides=(2, 3), padding="valid", output_padding=(1, 0)),
    dict(kernel_size=3, strides=3, padding="same", output_padding=1),
    dict(kernel_size=(3, 2), dilation_rate=2, padding="valid"),
    dict(kernel_size=(3, 4), dilation_rate=(2, 1), padding="same", use_bias=False),
]


def _reference_branch(layer, x):
    """The layer's patches and kernel matrix from the reference, and how to put a (dim, filters)
    matrix back into the kernel's layout."""
    kernel = layer.kernel.numpy().astype(np.float64)
    bias = None if layer.bias is None else layer.bias.numpy().astype(np.float64)
    args = (layer.kernel_size, layer.strides, layer.padding, layer.dilation_rate)
    if isinstance(layer, keras.layers.Conv2DTranspose):
        out_sizes = list(layer.compute_output_shape(x.shape)[1:-1])
        rows = rc.conv_transpose_patches(x, *args, out_sizes)
        # The scatter form of the forward pass agrees with the gathered patches.
        scattered = rc.conv_transpose_forward(x, kernel, layer.strides, layer.padding, layer.dilation_rate, out_sizes)
        in_layout = np.swapaxes(kernel, -1, -2)  # (*k, c_in, c_out)
        np.testing.assert_allclose(
            rows @ in_layout.reshape(-1, kernel.shape[-2]), scattered.reshape(len(x), -1, kernel.shape[-2]), atol=1e-12
        )

        def to_kernel(matrix):
            return np.swapaxes(matrix.reshape(in_layout.shape), -1, -2)

        matrix = in_layout.reshape(-1, kernel.shape[-2])
    else:
        rows, out_sizes = rc.conv_patches(x, *args)
        matrix = kernel.reshape(-1, kernel.shape[-1])

        def to_kernel(matrix):
            return matrix.reshape(kernel.shape)

    return dict(rows=rows, matrix=matrix, bias=bias, out_sizes=out_sizes, to_kernel=to_kernel)


def _branch_model(input_shape, layers):
    inputs = keras.Input(input_shape)
    # Each branch averaged over its output locations, so that the Dense layer stays small.
    pooled = [
        keras.layers.GlobalAveragePooling1D()(keras.layers.Reshape((-1, layer.filters))(layer(inputs)))
        for layer in layers
    ]
    dense = keras.layers.Dense(3, activation="softmax")
    outputs = dense(keras.layers.Concatenate()(pooled) if len(pooled) > 1 else pooled[0])
    return keras_kfac.Model(inputs, outputs), dense


def _check_one_step(layer_class, settings, x, mode="eigen", max_factor_size=8192, filters=3):
    """Every configuration of `settings` as a branch of one model; checks forward pass, kernel
    gradient, factors and the step of each branch against the reference."""
    rng = np.random.default_rng(5)
    m = len(x)
    y = rng.integers(0, 3, size=m)
    layers = [layer_class(filters, activation="tanh", **s) for s in settings]
    model, dense = _branch_model(x.shape[1:], layers)
    x64 = x.astype(np.float64)
    branches = [_reference_branch(layer, x64) for layer in layers]
    dense_before = (dense.kernel.numpy().astype(np.float64), dense.bias.numpy().astype(np.float64))
    expected = rc.branches_step(y, branches, dense_before, LR, DAMPING, mode)
    # Forward pass and gradient of the mean loss against the reference.
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x))
        loss = tf.reduce_mean(loss)
    grads = tape.gradient(loss, [layer.kernel for layer in layers])
    for layer, branch, exp, grad in zip(layers, branches, expected, grads):
        out = layer(x).numpy()
        assert out.shape == (m, *branch["out_sizes"], filters)
        assert ref.rel_err(out.reshape(m, -1, filters), np.tanh(exp["z"])) < 1e-5, layer.get_config()
        dim = branch["rows"].shape[-1]
        assert ref.rel_err(grad.numpy(), branch["to_kernel"](exp["grad"][:dim])) < 1e-5, layer.get_config()
    before = [(layer.kernel.numpy(), None if layer.bias is None else layer.bias.numpy()) for layer in layers]
    opt = exact_kfac(learning_rate=LR, damping=DAMPING, damping_mode=mode, max_factor_size=max_factor_size)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    factors = opt.factors()
    for layer, branch, exp, (kernel, bias) in zip(layers, branches, expected, before):
        a, g = (f.numpy() for f in factors[layer.name])
        exp_a = exp["A"]
        if a.ndim == 1:  # a diagonal factor: the step solves with diag(A)
            exp_a = np.diag(np.diag(exp_a))
            a = np.diag(a)
            update = ref.kron_solve(exp_a, exp["G"], exp["grad"], DAMPING, mode)
        else:
            update = exp["update"]
        assert ref.rel_err(a, exp_a) < TOL, layer.get_config()
        assert ref.rel_err(g, exp["G"]) < TOL, layer.get_config()
        dim = branch["rows"].shape[-1]
        step = layer.kernel.numpy() - kernel
        assert ref.rel_err(step, -LR * branch["to_kernel"](update[:dim])) < TOL, layer.get_config()
        if bias is not None:
            assert ref.rel_err(layer.bias.numpy() - bias, -LR * update[dim]) < TOL, layer.get_config()
        else:
            assert update.shape[0] == dim
    a, g = (f.numpy() for f in factors[dense.name])
    exp_a = expected[-1]["A"]
    assert ref.rel_err(a, np.diag(exp_a) if a.ndim == 1 else exp_a) < TOL
    assert ref.rel_err(g, expected[-1]["G"]) < TOL
    return opt


def _inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def test_conv1d_step_matches_numpy():
    opt = _check_one_step(keras.layers.Conv1D, CONV1D, _inputs((5, 9, 2)))
    assert [type(b).__name__ for b in opt.blocks].count("Conv1DBlock") == len(CONV1D)


def test_conv3d_step_matches_numpy():
    opt = _check_one_step(keras.layers.Conv3D, CONV3D, _inputs((4, 5, 4, 5, 2)))
    assert [type(b).__name__ for b in opt.blocks].count("Conv3DBlock") == len(CONV3D)


def test_conv2d_transpose_step_matches_numpy():
    opt = _check_one_step(keras.layers.Conv2DTranspose, CONV2D_TRANSPOSE, _inputs((4, 3, 4, 2)))
    assert [type(b).__name__ for b in opt.blocks].count("Conv2DTransposeBlock") == len(CONV2D_TRANSPOSE)


def test_factored_damping_and_diagonal_input_side():
    """damping_mode="factored", and max_factor_size below dim A: A keeps its diagonal, G (3
    filters) stays dense (the same code for every convolution block)."""
    settings = CONV2D_TRANSPOSE[:2] + CONV2D_TRANSPOSE[3:4]
    _check_one_step(keras.layers.Conv2DTranspose, settings, _inputs((4, 3, 4, 2)), mode="factored", max_factor_size=4)


def _reference_patches(layer, x):
    return _reference_branch(layer, x.astype(np.float64))["rows"]


@pytest.mark.parametrize(
    "layer_class, settings, shape",
    [
        (keras.layers.Conv1D, dict(kernel_size=3, padding="causal", dilation_rate=2), (3, 12, 2)),
        (keras.layers.Conv3D, dict(kernel_size=2, strides=(1, 2, 1), padding="same"), (3, 3, 4, 3, 2)),
        (keras.layers.Conv2DTranspose, dict(kernel_size=3, strides=2, padding="same"), (3, 3, 2, 2)),
    ],
    ids=["conv1d", "conv3d", "conv2d_transpose"],
)
def test_stats_locations_are_a_uniform_subset_shared_by_the_examples(layer_class, settings, shape):
    x = _inputs(shape)
    layer = layer_class(4, **settings)
    layer.build(x.shape)
    full = _reference_patches(layer, x)
    m, count, dim = full.shape
    locations = count // 3
    block, _ = block_for_layer(layer, BlockOptions(stats_locations=locations))
    block_all, _ = block_for_layer(layer, BlockOptions(stats_locations=count + 5))
    out_shape = (m, *layer.compute_output_shape(x.shape)[1:])
    draws, picks = 150, np.zeros(count)
    for s in range(draws):
        seed = tf.constant([3, s], tf.int64)
        # `batch_statistics` gives the i-th recorded call of the layer the seed fold_in(seed, i).
        rows = block.input_rows(tf.constant(x), locations, tf.random.experimental.stateless_fold_in(seed, 0))
        rows = rows.numpy().reshape(m, locations, dim)
        # Which location each row is (the patches of example 0 are distinct, zero ones aside).
        chosen = [int(np.argmin(np.abs(full - rows[:, j : j + 1]).max(axis=(0, 2)))) for j in range(locations)]
        np.testing.assert_allclose(full[:, chosen], rows, atol=1e-6)  # the same location for every example
        assert len(set(chosen)) == locations
        picks[chosen] += 1
        if s < 3:
            a, _ = block.batch_statistics([tf.constant(x)], [tf.zeros(out_shape)], m, seed)
            kept = ref.with_ones(full[:, chosen].reshape(-1, dim))
            assert ref.rel_err(a.numpy(), kept.T @ kept / len(kept)) < 1e-5
    p = locations / count
    assert np.all(np.abs(picks - draws * p) < 5 * np.sqrt(draws * p * (1 - p))), picks
    # More locations asked for than there are: A over all of them.
    a_all, _ = block_all.batch_statistics([tf.constant(x)], [tf.zeros(out_shape)], m, tf.constant([3, 0], tf.int64))
    rows_all = ref.with_ones(full.reshape(-1, dim))
    assert ref.rel_err(a_all.numpy(), rows_all.T @ rows_all / len(rows_all)) < 1e-5


@pytest.mark.parametrize(
    "layer_class, settings, shape",
    [
        (keras.layers.Conv1D, dict(kernel_size=3, strides=2, padding="causal"), (2, 7, 3)),
        (keras.layers.Conv1D, dict(kernel_size=4, strides=2, padding="same"), (2, 7, 3)),
        (keras.layers.Conv3D, dict(kernel_size=(2, 3, 2), strides=(1, 2, 1), padding="same"), (2, 3, 5, 2, 2)),
        (keras.layers.Conv2DTranspose, dict(kernel_size=3, strides=2, padding="valid"), (2, 3, 2, 3)),
        (keras.layers.Conv2DTranspose, dict(kernel_size=3, strides=3, padding="same", output_padding=1), (2, 3, 2, 3)),
    ],
)
def test_patches_of_inputs_of_unknown_size(layer_class, settings, shape):
    """Inputs whose spatial sizes are only known when the graph runs (e.g. sequences)."""
    x = _inputs(shape)
    layer = layer_class(2, **settings)
    layer.build((None,) * (len(shape) - 1) + shape[-1:])
    block, _ = block_for_layer(layer)
    spec = tf.TensorSpec((None,) * (len(shape) - 1) + shape[-1:], tf.float32)
    rows = tf.function(lambda t: block.input_rows(t), input_signature=[spec])(tf.constant(x))
    expected = _reference_patches(layer, x)
    assert ref.rel_err(rows.numpy(), expected.reshape(-1, expected.shape[-1])) < 1e-6
    pre = tf.function(block.preactivation, input_signature=[spec])(tf.constant(x))
    np.testing.assert_allclose(pre.numpy(), layer(x).numpy(), rtol=1e-6, atol=1e-6)


def test_layout_and_sizes_of_the_transposed_block():
    layer = keras.layers.Conv2DTranspose(5, (2, 3), strides=2)
    layer.build((None, 4, 4, 7))
    block, _ = block_for_layer(layer)
    assert isinstance(block, Conv2DTransposeBlock)
    assert (block.dim_a, block.dim_g) == (2 * 3 * 7 + 1, 5)
    kernel = np.arange(2 * 3 * 5 * 7, dtype="float32").reshape(2, 3, 5, 7)
    bias = np.arange(5, dtype="float32")
    matrix = block.to_matrix([tf.constant(kernel), tf.constant(bias)]).numpy()
    # Row (a1, a2, c_in) and column c_out hold kernel[a1, a2, c_out, c_in]; the last row the bias.
    np.testing.assert_array_equal(matrix[:-1], kernel.transpose(0, 1, 3, 2).reshape(-1, 5))
    np.testing.assert_array_equal(matrix[-1], bias)
    back = block.from_matrix(tf.constant(matrix))
    np.testing.assert_array_equal(back[0].numpy(), kernel)
    np.testing.assert_array_equal(back[1].numpy(), bias)


@pytest.mark.parametrize(
    "make_layer, reason",
    [
        (lambda: keras.layers.Conv1D(4, 3, groups=2), "grouped"),
        (lambda: keras.layers.Conv3D(4, 3, groups=2), "grouped"),
        (lambda: keras.layers.Conv1D(4, 3, data_format="channels_first"), "channels_first"),
        (lambda: keras.layers.Conv3D(4, 3, data_format="channels_first"), "channels_first"),
        (lambda: keras.layers.Conv2DTranspose(4, 3, data_format="channels_first"), "channels_first"),
    ],
    ids=["conv1d-groups", "conv3d-groups", "conv1d-first", "conv3d-first", "transpose-first"],
)
def test_unsupported_settings_have_a_reason(make_layer, reason):
    layer = make_layer()
    layer.build((None, 4, 6, 6, 4)[: layer.rank + 2])
    block, why = block_for_layer(layer)
    assert block is None and reason in why


def test_registered_blocks():
    table = keras_kfac.registered_blocks()
    assert table[keras.layers.Conv1D] is Conv1DBlock
    assert table[keras.layers.Conv3D] is Conv3DBlock
    assert table[keras.layers.Conv2DTranspose] is Conv2DTransposeBlock


def test_a_model_of_the_three_convolutions_trains_with_kfac():
    """Conv2DTranspose → Conv3D → Conv1D (causal) → Dense, 20 steps of `KFAC(learning_rate=1e-2)`."""
    x = _inputs((64, 3, 3, 2))
    y = (x[..., 0].mean(axis=(1, 2)) > x[..., 1].mean(axis=(1, 2))).astype("int32")
    model = keras_kfac.Sequential(
        [
            keras.Input((3, 3, 2)),
            keras.layers.Conv2DTranspose(3, 3, strides=2, padding="same", activation="relu"),  # (6, 6, 3)
            keras.layers.Reshape((6, 6, 3, 1)),
            keras.layers.Conv3D(2, 2, strides=2, padding="same", activation="relu"),  # (3, 3, 2, 2)
            keras.layers.Reshape((9, 4)),
            keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2, activation="relu"),  # (9, 4)
            keras.layers.Flatten(),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    opt = keras_kfac.KFAC(learning_rate=1e-2)  # the rest default
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    before = [layer.kernel.numpy() for layer in model.layers if hasattr(layer, "kernel")]
    history = model.fit(x, y, batch_size=16, epochs=5, verbose=0)  # 4 batches an epoch: 20 steps
    kinds = sorted(type(b).__name__ for b in opt.blocks)
    assert kinds == ["Conv1DBlock", "Conv2DTransposeBlock", "Conv3DBlock", "DenseBlock"] and not opt.fallback_layers
    after = [layer.kernel.numpy() for layer in model.layers if hasattr(layer, "kernel")]
    assert all(np.abs(a - b).max() > 1e-3 for a, b in zip(after, before))  # every block steps
    # The loss falls every epoch (seen: 0.685, 0.676, 0.663, 0.645, 0.620 with this seed).
    losses = history.history["loss"]
    assert np.all(np.diff(losses) < 0) and losses[-1] < 0.95 * losses[0], losses
