"""`KFAC(diagonal_fisher=True)`: a layer no block models gets a `DiagonalFisherBlock`, checked
against per-example gradients from separate tapes (float64): its statistics (Σ_n ∇_n)² / m, its
step −lr ∇ / (F + λ), and, with sampled targets, that the estimate's mean is the diagonal of the
per-example Fisher in closed form."""

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf
from exact import exact_kfac

import keras_kfac
from keras_kfac.blocks import DiagonalFisherBlock


class Affine(keras.layers.Layer):
    """y = tanh(x ⊙ w + b) with bare weights (no registered block)."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="random_normal", name="w")
        self.b = self.add_weight(shape=(input_shape[-1],), initializer="random_normal", name="b")

    def call(self, x):
        return tf.tanh(x * self.w + self.b)


def _model():
    keras.utils.set_random_seed(5)
    return keras_kfac.Sequential([keras.Input((5,)), Affine(), keras.layers.Dense(3, activation="softmax")])


def _optimizer():
    return exact_kfac(learning_rate=0.1, damping=1e-2, diagonal_fisher=True)


def _expected_statistics_and_step(model, variables, x, y):
    """float64, from per-example gradients of separate tapes: F = (Σ_n ∇_n)² / m and the step
    −lr ∇ / (F + λ) of `_optimizer()`'s settings, per variable (a lookup's `IndexedSlices`
    gradient is summed into its dense table first)."""
    loss = keras.losses.SparseCategoricalCrossentropy()
    total = [np.zeros(v.shape) for v in variables]
    for n in range(len(x)):
        with tf.GradientTape() as tape:
            value = loss(y[n : n + 1], model(x[n : n + 1]))
        for t, g in zip(total, tape.gradient(value, variables)):
            t += tf.convert_to_tensor(g).numpy().astype(np.float64)
    fisher = [t**2 / len(x) for t in total]
    return fisher, [-0.1 * (t / len(x)) / (f + 1e-2) for t, f in zip(total, fisher)]


def test_a_layer_without_a_block_gets_the_diagonal_fisher_and_its_step():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(24, 5)).astype("float32"), rng.integers(0, 3, size=24)
    model = _model()
    affine = model.layers[0]
    start = [v.numpy().astype(np.float64) for v in affine.trainable_variables]
    expected_fisher, expected_step = _expected_statistics_and_step(model, affine.trainable_variables, x, y)

    opt = _optimizer()
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    block = next(b for b in opt.blocks if b.layer is affine)
    assert isinstance(block, DiagonalFisherBlock)
    for got, want in zip(block.statistics_variables, expected_fisher):
        assert ref.rel_err(got.numpy(), want) < 1e-4
    for v, s, want in zip(affine.trainable_variables, start, expected_step):
        assert ref.rel_err(v.numpy() - s, want) < 1e-3
    summary = model.kfac_summary(print_fn=None)
    assert "DiagonalFisherBlock" in summary and summary.splitlines()[-1].endswith("(100.0%)")


def test_without_the_option_the_layer_stays_with_the_fallback():
    model = _model()
    opt = keras_kfac.KFAC()
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(np.ones((4, 5), "float32"), np.array([0, 1, 2, 0]))
    assert [type(b).__name__ for b in opt.blocks] == ["DenseBlock"]
    assert [layer.name for layer, _ in opt.fallback_layers] == [model.layers[0].name]
    assert opt.get_config()["diagonal_fisher"] is False
    assert keras_kfac.KFAC.from_config(_optimizer().get_config()).diagonal_fisher is True


def test_sampled_estimate_has_the_per_example_fisher_as_its_mean():
    """With y ~ softmax(z) the output gradient of example n is p_n − e_y; the mean of
    (Σ_n ∇_n)² / m over draws is (1/m) Σ_n Σ_y p_ny (J_nᵀ(p_n − e_y))² (float64 closed form)."""
    rng = np.random.default_rng(1)
    layer = Affine()
    layer.build((None, 3))
    x = rng.normal(size=(6, 3)).astype("float32")
    block = DiagonalFisherBlock(layer)
    block.recording_call(layer.call, lambda *a: None)
    z = layer.call(tf.constant(x)).numpy().astype(np.float64)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    w, b = (v.numpy().astype(np.float64) for v in (layer.w, layer.b))
    slope = 1.0 - np.tanh(x * w + b) ** 2  # ∂z/∂(x w + b), elementwise
    exact = [np.zeros(3), np.zeros(3)]
    for n in range(len(x)):
        for label in range(3):
            g = p[n] - np.eye(3)[label]
            exact[0] += p[n, label] * (g * slope[n] * x[n]) ** 2
            exact[1] += p[n, label] * (g * slope[n]) ** 2
    exact = [e / len(x) for e in exact]

    draws = 3000
    labels = np.stack([[rng.choice(3, p=p[n]) for n in range(len(x))] for _ in range(draws)])
    grads = tf.constant((p[None] - np.eye(3)[labels]).astype("float32"))  # (draws, m, 3)
    estimate = tf.function(
        lambda g: tf.map_fn(lambda gd: tf.stack(block.batch_statistics([((tf.constant(x),), {})], [gd], 6)), g)
    )(grads)
    mean = tf.reduce_mean(estimate, axis=0).numpy()
    for got, want in zip(mean, exact):
        assert ref.rel_err(got, want) < 0.1
    # A single draw is far from it (the estimate is unbiased, not exact).
    assert max(ref.rel_err(estimate[0, i].numpy(), exact[i]) for i in range(2)) > 0.2


def test_an_embedding_registered_to_the_diagonal_block_gets_its_statistics_and_step():
    """README's recipe for a position table, `register_block(Embedding, DiagonalFisherBlock)`:
    the lookup's gradient (an `IndexedSlices`, ids repeated within and across examples) is summed
    into the dense table before squaring, F = (Σ_n ∇_n)² / m, and the step is −lr ∇ / (F + λ);
    ids no example uses keep F = 0 and do not move."""
    rng = np.random.default_rng(2)
    x = rng.integers(0, 5, size=(16, 4)).astype("int32")  # ids 0..4 of a 7-row table: rows 5, 6 unused
    y = rng.integers(0, 3, size=16)
    keras.utils.set_random_seed(7)
    model = keras_kfac.Sequential(
        [
            keras.Input((4,), dtype="int32"),
            keras.layers.Embedding(7, 3, embeddings_initializer="random_normal"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    table = model.layers[0].embeddings
    start = table.numpy().astype(np.float64)
    (expected_fisher,), (expected_step,) = _expected_statistics_and_step(model, [table], x, y)

    registered = keras_kfac.registered_blocks()[keras.layers.Embedding]
    keras_kfac.register_block(keras.layers.Embedding, DiagonalFisherBlock)
    try:
        opt = _optimizer()  # its diagonal_fisher finds nothing else: Flatten has no variables
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
        model.train_on_batch(x, y)
    finally:
        keras_kfac.register_block(keras.layers.Embedding, registered)
    block = next(b for b in opt.blocks if b.layer is model.layers[0])
    assert isinstance(block, DiagonalFisherBlock)
    assert ref.rel_err(block.statistics_variables[0].numpy(), expected_fisher) < 1e-4
    moved = table.numpy() - start
    assert ref.rel_err(moved, expected_step) < 1e-3
    assert np.all(moved[5:] == 0.0) and np.all(np.abs(moved[:5]) > 0)
    assert keras_kfac.registered_blocks()[keras.layers.Embedding] is registered


def test_a_layer_returning_a_structure_is_refused_with_a_clear_error():
    class Pair(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1],), name="w")

        def call(self, x):
            return x * self.w, x

    inputs = keras.Input((4,))
    first, _ = Pair()(inputs)
    model = keras_kfac.Model(inputs, keras.layers.Dense(2)(first))
    model.compile(optimizer=keras_kfac.KFAC(diagonal_fisher=True), loss="mse")
    with pytest.raises(ValueError, match="returns one tensor"):
        model.train_on_batch(np.ones((2, 4), "float32"), np.ones((2, 2), "float32"))
