"""The fallback optimizer (variables without a block) and layers K-FAC cannot record: every
Keras argument given to KFAC reaches the fallback, its default follows the graft, and a Dense
layer called inside a loop trains instead of crashing."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac

LR = 0.1
FALLBACK = ["norm"]  # the LayerNormalization of `_with_norm`, kept out of K-FAC (it has a block)


def _data(m=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, 5)).astype("float32"), rng.integers(0, 3, size=m)


def _with_norm():
    return keras_kfac.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, name="fc"),
            keras.layers.LayerNormalization(name="norm"),
            keras.layers.Dense(3, activation="softmax", name="out"),
        ]
    )


def _norm_gradients(model, x, y):
    with tf.GradientTape() as tape:
        loss = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, model(x, training=True)))
    norm = model.get_layer("norm")
    return [g.numpy().astype(np.float64) for g in tape.gradient(loss, norm.trainable_variables)]


def test_default_fallback_is_adam_at_the_kfac_learning_rate_with_the_adam_graft():
    x, y = _data()
    model = _with_norm()
    norm = model.get_layer("norm")
    grads = _norm_gradients(model, x, y)
    before = [v.numpy().copy() for v in norm.trainable_variables]
    opt = keras_kfac.KFAC(exclude=FALLBACK, learning_rate=LR)  # graft="adam"
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    assert isinstance(opt.fallback_optimizer, keras.optimizers.Adam)
    for v, b, g in zip(norm.trainable_variables, before, grads):
        # Keras Adam's first step: lr·√(1−β₂)/(1−β₁) · (1−β₁)g / (√(1−β₂)|g| + ε) = lr·g / (|g| + ε/√(1−β₂)).
        np.testing.assert_allclose(v.numpy(), b - LR * g / (np.abs(g) + 1e-7 / np.sqrt(1e-3)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("clip", [dict(clipnorm=1e-9), dict(clipvalue=1e-9), dict(global_clipnorm=1e-9)], ids=str)
def test_clipping_reaches_the_fallback(clip):
    x, y = _data()
    model = _with_norm()
    norm = model.get_layer("norm")
    before = [v.numpy().copy() for v in norm.trainable_variables]
    # SGD fallback: step = lr · clipped g
    opt = keras_kfac.KFAC(exclude=FALLBACK, learning_rate=LR, graft="sgd", momentum=0.0, **clip)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    moved = max(np.abs(v.numpy() - b).max() for v, b in zip(norm.trainable_variables, before))
    assert moved <= LR * 2e-9


def test_gradient_accumulation_reaches_the_fallback():
    x, y = _data(m=24)
    model = _with_norm()
    norm, fc = model.get_layer("norm"), model.get_layer("fc")
    opt = keras_kfac.KFAC(exclude=FALLBACK, learning_rate=LR, gradient_accumulation_steps=3)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    history = []
    for step in range(3):
        model.train_on_batch(x[8 * step : 8 * step + 8], y[8 * step : 8 * step + 8])
        history.append((norm.gamma.numpy().copy(), fc.kernel.numpy().copy()))
    gamma0, kernel0 = np.ones(4), None
    assert np.array_equal(history[0][0], gamma0) and np.array_equal(history[1][0], gamma0)  # accumulating
    assert np.array_equal(history[0][1], history[1][1])
    assert not np.array_equal(history[2][0], gamma0)  # the third batch applies both
    assert not np.array_equal(history[2][1], history[1][1]) and kernel0 is None


def test_exclude_from_weight_decay_reaches_the_fallback():
    x, y = _data()
    model = _with_norm()
    norm = model.get_layer("norm")
    opt = keras_kfac.KFAC(exclude=FALLBACK, learning_rate=LR, weight_decay=0.5, graft="sgd", momentum=0.0)
    opt.exclude_from_weight_decay(var_names=["gamma"])
    grads = _norm_gradients(model, x, y)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    beta0 = np.full(4, 0.25, np.float32)
    norm.beta.assign(beta0)
    grads = _norm_gradients(model, x, y)
    model.train_on_batch(x, y)
    np.testing.assert_allclose(norm.gamma.numpy(), 1.0 - LR * grads[0], rtol=1e-5, atol=1e-7)  # not decayed
    decayed = beta0 * (1 - LR * 0.5)
    np.testing.assert_allclose(norm.beta.numpy(), decayed - LR * grads[1], rtol=1e-5, atol=1e-7)


class _DenseCell(keras.layers.Layer):
    """An RNN cell built on a Dense layer: h' = tanh(W [x, h] + b)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = units
        self.dense = keras.layers.Dense(units, activation="tanh", name="cell_dense")

    def build(self, shape):
        self.dense.build((shape[0], shape[-1] + self.units))

    def call(self, inputs, states):
        h = self.dense(keras.ops.concatenate([inputs, states[0]], axis=-1))
        return h, [h]


class _LoopedDense(keras.layers.Layer):
    """Applies a Dense layer three times in a tf.while_loop."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(6, activation="tanh", name="looped_dense")

    def build(self, shape):
        self.dense.build(shape)

    def call(self, x):
        return tf.while_loop(lambda i, h: i < 3, lambda i, h: (i + 1, self.dense(h)), (tf.constant(0), x))[1]


# (XLA cannot differentiate a tf.while_loop without maximum_iterations, with or without K-FAC.)
@pytest.mark.parametrize("kind, jit_compile", [("rnn_cell", False), ("rnn_cell", True), ("while_loop", False)], ids=str)
def test_a_dense_layer_called_in_a_loop_trains_with_the_fallback(kind, jit_compile):
    rng = np.random.default_rng(1)
    if kind == "rnn_cell":
        x = rng.normal(size=(16, 4, 6)).astype("float32")
        looped = keras.layers.RNN(_DenseCell(6))
        name = "cell_dense"
    else:
        x = rng.normal(size=(16, 6)).astype("float32")
        looped = _LoopedDense()
        name = "looped_dense"
    y = rng.integers(0, 3, size=16)
    inputs = keras.Input(x.shape[1:])
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(looped(inputs))
    model = keras_kfac.Model(inputs, outputs)
    opt = keras_kfac.KFAC(learning_rate=0.05)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", jit_compile=jit_compile)
    dense = looped.cell.dense if kind == "rnn_cell" else looped.dense
    kernel = dense.kernel.numpy().copy()
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0).history
    assert np.all(np.isfinite(history["loss"]))
    assert [b.name for b in opt.blocks] == ["head"]
    assert not np.array_equal(kernel, dense.kernel.numpy())
    summary = model.kfac_summary(print_fn=None)
    assert f"{name} (Dense" in summary and "called inside a loop or branch" in summary


class _TimeFolded(keras.layers.Layer):
    """A Dense applied to (batch·time, features): its input's first axis is not the example axis."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3, activation="tanh", name="folded_dense")

    def build(self, shape):
        self.dense.build((None, shape[-1]))

    def call(self, x):
        batch, time = keras.ops.shape(x)[0], keras.ops.shape(x)[1]
        out = self.dense(keras.ops.reshape(x, (batch * time, x.shape[-1])))
        return keras.ops.reshape(out, (batch, time * 3))


@pytest.mark.parametrize("jit_compile", [False, True], ids=["plain", "xla"])
@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
def test_stats_batch_size_takes_whole_examples_when_time_is_folded_into_the_batch(jit_compile, fisher):
    rng = np.random.default_rng(2)
    m, time, k = 12, 5, 4
    x = rng.normal(size=(m, time, 2)).astype("float32")
    y = rng.integers(0, 3, size=m)
    inputs = keras.Input((time, 2))
    outputs = keras.layers.Dense(3, activation="softmax")(_TimeFolded()(inputs))
    model = keras_kfac.Model(inputs, outputs)
    opt = keras_kfac.KFAC(learning_rate=0.0, stats_batch_size=k, stats_decay=0.0, stats_every=1, fisher=fisher)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", jit_compile=jit_compile)
    model.train_on_batch(x, y)
    a, _ = opt.factors()["folded_dense"]
    rows = np.concatenate([x[:k].reshape(-1, 2), np.ones((k * time, 1))], axis=1).astype(np.float64)
    np.testing.assert_allclose(a.numpy(), rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6)
