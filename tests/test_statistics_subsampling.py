"""Cheaper statistics: the separate forward/backward pass of `stats_batch_size` examples and
the random subset of convolution locations (`stats_locations`), against NumPy."""

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf
from reference_conv import conv_patches

import keras_kfac
from keras_kfac import blocks
from keras_kfac.blocks import BlockOptions, Conv2DBlock
from keras_kfac.blocks.convolution import choose_locations, sample_locations


def _mlp(batch_norm=False):
    layers = [keras.Input((5,)), keras.layers.Dense(4, activation="tanh")]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(3, activation="softmax"))
    return keras_kfac.Sequential(layers)


def _kfac(**kwargs):
    base = dict(learning_rate=0.1, momentum=0.0, stats_decay=0.0, stats_every=1, inverse_every=1, graft=None)
    base["input_stats_batch_size"] = None  # A from every example of the sample unless a test says otherwise
    return keras_kfac.KFAC(**{**base, **kwargs})


def _data(m=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(m, 5)).astype("float32"), rng.integers(0, 3, size=m)


def test_sampled_statistics_of_the_first_examples_come_from_their_own_pass():
    x, y = _data()
    model = _mlp()
    subset = _kfac(stats_batch_size=5)
    model.compile(optimizer=subset, loss="sparse_categorical_crossentropy")
    # The same weights trained on the first 5 examples alone, all of them used for statistics:
    # the targets are drawn from the same stateless seed for the same 5 predictions.
    alone = _mlp()
    alone.set_weights(model.get_weights())
    whole = _kfac(stats_batch_size=None)
    alone.compile(optimizer=whole, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    alone.train_on_batch(x[:5], y[:5])
    for layer, twin in zip(model.layers, alone.layers):
        a, g = subset.factors()[layer.name]
        a_ref, g_ref = whole.factors()[twin.name]
        np.testing.assert_allclose(a.numpy(), a_ref.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(g.numpy(), g_ref.numpy(), rtol=1e-5, atol=1e-8)
    # A of the first layer is the input Gram matrix of those 5 examples (NumPy, float64).
    a_first = ref.with_ones(x[:5].astype(np.float64))
    assert ref.rel_err(subset.factors()[model.layers[0].name][0].numpy(), a_first.T @ a_first / 5) < 1e-6


def test_models_with_moving_statistics_update_them_once_per_step():
    x, y = _data()
    model = _mlp(batch_norm=True)
    plain = _mlp(batch_norm=True)
    plain.set_weights(model.get_weights())
    model.compile(optimizer=_kfac(stats_batch_size=5), loss="sparse_categorical_crossentropy")
    plain.compile(optimizer=keras.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    plain.train_on_batch(x, y)
    bn, bn_plain = model.layers[1], plain.layers[1]
    np.testing.assert_allclose(bn.moving_mean.numpy(), bn_plain.moving_mean.numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(bn.moving_variance.numpy(), bn_plain.moving_variance.numpy(), rtol=1e-6, atol=1e-8)
    assert np.abs(bn.moving_mean.numpy()).max() > 1e-4  # the update did happen


@pytest.mark.parametrize("conv_args", [dict(padding="valid"), dict(padding="same", strides=2)])
def test_conv_locations_are_a_uniform_random_subset_shared_by_the_examples(conv_args):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 6, 6, 2)).astype("float32")
    layer = keras.layers.Conv2D(4, 3, **conv_args)
    layer.build(x.shape)
    full = ref.patches(x.astype(np.float64), (3, 3), layer.strides, layer.padding, (1, 1))
    m, oh, ow, d = full.shape
    full = full.reshape(m, oh * ow, d)
    count = oh * ow
    locations = count // 4
    block = Conv2DBlock(layer, BlockOptions(stats_locations=locations))
    block_all = Conv2DBlock(layer, BlockOptions(stats_locations=count))
    picks = np.zeros(count)
    for s in range(300):
        seed = tf.constant([7, s], tf.int64)
        # `batch_statistics` gives the i-th recorded call of the layer the seed fold_in(seed, i).
        rows = block.input_rows(tf.constant(x), locations, tf.random.experimental.stateless_fold_in(seed, 0))
        rows = rows.numpy()
        rows = rows.reshape(m, locations, d)
        chosen = []
        for j in range(locations):
            match = [loc for loc in range(count) if np.allclose(full[0, loc], rows[0, j], atol=1e-6)]
            loc = match[0]
            np.testing.assert_allclose(full[:, loc], rows[:, j], atol=1e-6)  # same location for every example
            chosen.append(loc)
        assert len(set(chosen)) == locations  # without repetition
        picks[chosen] += 1
        a, _ = block.batch_statistics([tf.constant(x)], [tf.zeros((m, oh, ow, 4))], m, seed)
        kept = ref.with_ones(full[:, chosen].reshape(-1, d))
        assert ref.rel_err(a.numpy(), kept.T @ kept / len(kept)) < 1e-5
    # Uniform (so A's estimate is unbiased): each location is kept with probability
    # locations/count (binomial counts, within 5 sd).
    expected = 300 * locations / count
    sd = np.sqrt(300 * (locations / count) * (1 - locations / count))
    assert np.all(np.abs(picks - expected) < 5 * sd), picks
    rows_all = ref.with_ones(full.reshape(-1, d))
    a_full = rows_all.T @ rows_all / len(rows_all)
    # At least as many locations as there are: exactly A over all of them.
    seed = tf.constant([7, 0], tf.int64)
    a_all, _ = block_all.batch_statistics([tf.constant(x)], [tf.zeros((m, oh, ow, 4))], m, seed)
    assert ref.rel_err(a_all.numpy(), a_full) < 1e-5


def test_stats_locations_trains_a_cnn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 1)).astype("float32")
    y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype("int32")
    model = keras_kfac.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras_kfac.KFAC(learning_rate=0.01, stats_locations=8, stats_every=1, inverse_every=5),
        loss="sparse_categorical_crossentropy",
    )
    history = model.fit(x, y, batch_size=32, epochs=8, verbose=0)
    assert history.history["loss"][-1] < 0.7 * history.history["loss"][0]


@pytest.mark.parametrize(
    "layer, shape",
    [
        (keras.layers.Conv1D(3, 3, strides=2, dilation_rate=1, padding="causal"), (2, 11, 2)),
        (keras.layers.Conv1D(3, 3, dilation_rate=2, padding="same"), (2, 9, 2)),
        (keras.layers.Conv2D(3, (3, 2), strides=(2, 1), padding="same"), (2, 7, 6, 2)),
        (keras.layers.Conv2D(3, 3, dilation_rate=2, padding="same"), (2, 7, 8, 2)),
        (keras.layers.Conv2D(3, 3, strides=2, padding="valid"), (2, 9, 8, 2)),
        (keras.layers.Conv3D(3, 2, strides=(1, 2, 1), padding="same"), (2, 5, 5, 4, 2)),
    ],
    ids=["conv1d-causal-stride", "conv1d-dilated", "conv2d-same-stride", "conv2d-dilated", "conv2d-valid", "conv3d"],
)
def test_sampled_locations_gather_only_their_patches(layer, shape):
    # With stats_locations the patches of the chosen locations are gathered from the input
    # directly (the CNN's statistics update at batch 128: 95 -> 64 ms); the rows must be the
    # patches NumPy builds at those locations, and the ones the former path (all patches, then
    # the choice) took.
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape).astype("float32")
    layer.build(shape)
    block = {1: blocks.Conv1DBlock, 2: Conv2DBlock, 3: blocks.Conv3DBlock}[len(shape) - 2](layer, BlockOptions())
    full, outs = conv_patches(
        x.astype(np.float64), layer.kernel_size, layer.strides, layer.padding, layer.dilation_rate
    )
    count = int(np.prod(outs))
    for s in range(3):
        seed = tf.constant([3, s], tf.int64)
        rows = block.input_rows(tf.constant(x), 5, seed).numpy().reshape(shape[0], 5, -1)
        chosen = choose_locations(count, 5, seed).numpy()
        np.testing.assert_allclose(rows, full[:, chosen], rtol=0, atol=1e-6)
        former = sample_locations(block.patches(tf.constant(x)), 5, seed).numpy()
        np.testing.assert_array_equal(rows, former)
        # Under XLA too (the statistics are XLA-compiled on GPU/TPU, statistics_jit=True); XLA's
        # stateless draw may pick other locations, so both paths are compiled.
        compiled = tf.function(lambda x, seed: block.input_rows(x, 5, seed), jit_compile=True)
        compiled_former = tf.function(lambda x, seed: sample_locations(block.patches(x), 5, seed), jit_compile=True)
        rows_xla = compiled(tf.constant(x), seed).numpy().reshape(rows.shape)
        chosen_xla = tf.function(lambda seed: choose_locations(count, 5, seed), jit_compile=True)(seed).numpy()
        np.testing.assert_allclose(rows_xla, full[:, chosen_xla], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(rows_xla, compiled_former(tf.constant(x), seed).numpy())


def _small_cnn():
    return keras_kfac.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(2, 3, padding="same", activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def test_input_stats_batch_size_takes_a_from_the_first_examples_and_g_from_all():
    """A of every Kronecker block from the first k examples (as statistics of those k alone),
    G from all of them (as without the option); the conv's A against NumPy's patches."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, size=12)
    names = ("option", "first", "all")
    models = {name: _small_cnn() for name in names}
    for model in models.values():
        model.set_weights(models["option"].get_weights())
    opts = {
        "option": _kfac(stats_batch_size=None, stats_locations=None, input_stats_batch_size=5),
        "first": _kfac(stats_batch_size=None, stats_locations=None),
        "all": _kfac(stats_batch_size=None, stats_locations=None),
    }
    for name, model in models.items():
        model.compile(optimizer=opts[name], loss="sparse_categorical_crossentropy")
    models["option"].train_on_batch(x, y)
    models["all"].train_on_batch(x, y)
    models["first"].train_on_batch(x[:5], y[:5])  # the same weights, statistics of 5 examples alone
    checked = 0
    for option, first, whole in zip(*(models[name].layers for name in names)):
        if not option.weights:
            continue
        a, g = opts["option"].factors()[option.name]
        np.testing.assert_allclose(a.numpy(), opts["first"].factors()[first.name][0].numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(g.numpy(), opts["all"].factors()[whole.name][1].numpy(), rtol=1e-5, atol=1e-9)
        assert not np.allclose(g.numpy(), opts["first"].factors()[first.name][1].numpy(), rtol=1e-3)
        checked += 1
    assert checked == 2
    conv = models["option"].layers[0]
    patches, _ = conv_patches(x[:5].astype(np.float64), (3, 3), (1, 1), "same", (1, 1))
    rows = ref.with_ones(patches.reshape(-1, 9))
    assert ref.rel_err(opts["option"].factors()[conv.name][0].numpy(), rows.T @ rows / len(rows)) < 1e-6


def _folded_model():
    """A Dense layer that sees time folded into the batch axis: rows (example, time), example-major."""
    inputs = keras.Input((4, 3))
    h = keras.layers.Lambda(lambda t: keras.ops.reshape(t, (-1, 3)))(inputs)
    h = keras.layers.Dense(5, activation="tanh", name="folded")(h)
    h = keras.layers.Lambda(lambda t: keras.ops.reshape(t, (-1, 20)))(h)
    return keras_kfac.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(h))


def test_input_stats_batch_size_takes_whole_examples_where_time_is_folded_into_the_batch():
    """A layer whose recorded input has 4 rows per example gets A from the 4·k rows of the first k
    examples (as a model trained on those k alone), not from k rows."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 4, 3)).astype("float32")
    y = rng.integers(0, 3, size=6)
    option, first = _folded_model(), _folded_model()
    first.set_weights(option.get_weights())
    opts = [_kfac(stats_batch_size=None, input_stats_batch_size=2), _kfac(stats_batch_size=None)]
    for model, opt in zip((option, first), opts):
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    option.train_on_batch(x, y)
    first.train_on_batch(x[:2], y[:2])
    a = opts[0].factors()["folded"][0].numpy()
    np.testing.assert_allclose(a, opts[1].factors()["folded"][0].numpy(), rtol=1e-5, atol=1e-7)
    rows = ref.with_ones(x[:2].reshape(8, 3).astype(np.float64))
    assert ref.rel_err(a, rows.T @ rows / 8) < 1e-6
    # The head sees one row per example: A from the first 2 rows, as from the 2 examples alone.
    head = opts[0].factors()["head"][0].numpy()
    np.testing.assert_allclose(head, opts[1].factors()["head"][0].numpy(), rtol=1e-5, atol=1e-7)


def test_input_stats_batch_size_leaves_the_ekfac_scaling_on_every_example():
    """damping_mode="ekfac" (eigenbases still the identity): A from the first 4 examples, G and
    S = mean_n (ā_n g_nᵀ)² from all 10 (NumPy, float64)."""
    layer = keras.layers.Dense(3)
    layer.build((None, 5))
    block, _ = blocks.block_for_layer(layer, BlockOptions(damping_mode="ekfac", input_stats_batch_size=4))

    def add(shape, initializer, name):
        return tf.Variable(keras.initializers.get(initializer)(shape), name=name)

    block.build(add)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 5))
    g = rng.normal(size=(10, 3))
    a_batch, g_batch, s_batch = block.batch_statistics([tf.constant(x, tf.float32)], [tf.constant(g, tf.float32)], 10)
    rows = ref.with_ones(x)
    assert ref.rel_err(a_batch.numpy(), rows[:4].T @ rows[:4] / 4) < 1e-6
    assert ref.rel_err(g_batch.numpy(), g.T @ g / 10) < 1e-6
    per_example = rows[:, :, None] * g[:, None, :]
    assert ref.rel_err(s_batch.numpy(), np.mean(per_example**2, axis=0)) < 1e-6


def test_input_stats_batch_size_is_checked_and_configured():
    with pytest.raises(ValueError, match="input_stats_batch_size"):
        keras_kfac.KFAC(input_stats_batch_size=0)
    opt = keras_kfac.KFAC(input_stats_batch_size=32)
    assert opt.get_config()["input_stats_batch_size"] == 32
    assert keras_kfac.KFAC.from_config(opt.get_config()).block_options.input_stats_batch_size == 32
