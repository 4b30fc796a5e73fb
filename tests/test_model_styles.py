"""Sequential, Functional (branches, several inputs/outputs), subclassed and wrapped models;
a layer used twice; and that other optimizers train keras_kfac models exactly like Keras."""

import keras
import numpy as np
import pytest
import reference as ref

import keras_kfac


def _fit_kfac(model, x, y, loss, fisher="sampled", steps=3, **compile_kwargs):
    opt = keras_kfac.KFAC(learning_rate=0.05, damping=1e-2, inverse_every=2, fisher=fisher)
    model.compile(optimizer=opt, loss=loss, **compile_kwargs)
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, y, batch_size=8, epochs=1, steps_per_epoch=steps, verbose=0)
    return opt, before


def _assert_all_blocks_trained(model, opt, before, n_blocks):
    assert len(opt.blocks) == n_blocks
    for name, (a, g) in opt.factors().items():
        assert np.abs(a.numpy()).sum() > 0 and np.abs(g.numpy()).sum() > 0, name
    for old, new in zip(before, model.get_weights()):
        assert not np.array_equal(old, new)
    assert int(opt.iterations.numpy()) > 0


@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
def test_functional_branches_two_inputs_two_outputs(fisher):
    a = keras.Input((4,), name="a")
    b = keras.Input((3,), name="b")
    h1 = keras.layers.Dense(5, activation="relu", name="h1")(a)
    h2 = keras.layers.Dense(5, activation="tanh", name="h2")(b)
    c = keras.layers.Concatenate()([h1, h2])
    cls = keras.layers.Dense(3, activation="softmax", name="cls")(c)
    reg = keras.layers.Dense(2, name="reg")(h1)
    model = keras_kfac.Model([a, b], {"cls": cls, "reg": reg})
    assert isinstance(model, keras_kfac.Model) and isinstance(model, keras.Model)
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(24, 4)).astype("float32"), rng.normal(size=(24, 3)).astype("float32")]
    y = {"cls": rng.integers(0, 3, size=24), "reg": rng.normal(size=(24, 2)).astype("float32")}
    loss = {"cls": "sparse_categorical_crossentropy", "reg": "mse"}
    opt, before = _fit_kfac(model, x, y, loss, fisher=fisher, loss_weights={"cls": 1.0, "reg": 0.5})
    _assert_all_blocks_trained(model, opt, before, 4)


def test_subclassed_model_with_conv_and_dense():
    class Net(keras_kfac.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(4, 3, padding="same", activation="relu")
            self.flat = keras.layers.Flatten()
            self.dropout = keras.layers.Dropout(0.1)
            self.out = keras.layers.Dense(3, activation="softmax")

        def call(self, x, training=False):
            return self.out(self.dropout(self.flat(self.conv(x)), training=training))

    model = Net()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, size=24)
    opt, _ = _fit_kfac(model, x, y, "sparse_categorical_crossentropy")
    assert [b.kind for b in opt.blocks] == ["Conv2DBlock", "DenseBlock"]
    assert all(np.abs(a.numpy()).sum() > 0 for a, _ in opt.factors().values())


def test_shared_layer_statistics_combine_both_calls():
    rng = np.random.default_rng(2)
    m = 10
    x1 = rng.normal(size=(m, 3)).astype("float32")
    x2 = rng.normal(size=(m, 3)).astype("float32")
    y = rng.integers(0, 2, size=m)
    shared = keras.layers.Dense(4, activation="tanh")
    head = keras.layers.Dense(2, activation="softmax")
    i1, i2 = keras.Input((3,)), keras.Input((3,))
    model = keras_kfac.Model([i1, i2], head(keras.layers.Add()([shared(i1), shared(i2)])))
    w, bias = shared.kernel.numpy().astype(np.float64), shared.bias.numpy().astype(np.float64)
    w2, b2 = head.kernel.numpy().astype(np.float64), head.bias.numpy().astype(np.float64)
    opt = keras_kfac.KFAC(momentum=0.0, stats_decay=0.0, inverse_every=1, fisher="empirical")
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch([x1, x2], y)
    # NumPy: per-example gradients for each use of the shared layer.
    z1, z2 = x1 @ w + bias, x2 @ w + bias
    p = ref.softmax((np.tanh(z1) + np.tanh(z2)) @ w2 + b2)
    dh = (p - np.eye(2)[y]) @ w2.T  # m × ∂L/∂h (per-example)
    g1, g2 = dh * (1 - np.tanh(z1) ** 2), dh * (1 - np.tanh(z2) ** 2)
    rows = ref.with_ones(np.concatenate([x1, x2]).astype(np.float64))
    expected_a = rows.T @ rows / (2 * m)  # mean over examples and uses
    expected_g = (g1.T @ g1 + g2.T @ g2) / m  # sum over uses, mean over examples
    a, g = opt.factors()[shared.name]
    assert ref.rel_err(a.numpy(), expected_a) < 1e-5
    assert ref.rel_err(g.numpy(), expected_g) < 1e-4


def _plain_models():
    def sequential():
        return keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(3, activation="softmax")]
        )

    def functional():
        i = keras.Input((4,))
        return keras.Model(i, keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(6, activation="relu")(i)))

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d1 = keras.layers.Dense(6, activation="relu")
            self.d2 = keras.layers.Dense(3, activation="softmax")

        def call(self, x):
            return self.d2(self.d1(x))

    return {"sequential": sequential, "functional": functional, "subclassed": Sub}


@pytest.mark.parametrize("style", ["sequential", "functional", "subclassed"])
def test_wrap_shares_weights_and_trains(style):
    plain = _plain_models()[style]()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 4)).astype("float32")
    y = rng.integers(0, 3, size=24)
    plain(x[:1])
    wrapped = keras_kfac.wrap(plain)
    assert isinstance(wrapped, (keras_kfac.Model, keras_kfac.Sequential))
    np.testing.assert_array_equal(wrapped.predict(x, verbose=0), plain.predict(x, verbose=0))
    opt, _ = _fit_kfac(wrapped, x, y, "sparse_categorical_crossentropy")
    assert len(opt.blocks) == 2
    # Same variables: training the wrapper trained the original.
    np.testing.assert_array_equal(wrapped.predict(x, verbose=0), plain.predict(x, verbose=0))
    assert {id(v) for v in wrapped.trainable_variables} == {id(v) for v in plain.trainable_variables}
    assert keras_kfac.wrap(wrapped) is wrapped


def test_plain_keras_model_with_kfac_fails_at_first_step():
    model = _plain_models()["sequential"]()
    model.compile(optimizer=keras_kfac.KFAC(), loss="sparse_categorical_crossentropy")
    with pytest.raises(RuntimeError, match=r"keras_kfac\.wrap\(model\)"):
        model.fit(np.zeros((8, 4)), np.zeros(8), verbose=0)


@pytest.mark.parametrize(
    "make_opt",
    [lambda: keras.optimizers.Adam(1e-2), lambda: keras.optimizers.SGD(0.1, momentum=0.9)],
    ids=["adam", "sgd"],
)
def test_other_optimizers_train_exactly_like_keras(make_opt):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.integers(0, 3, size=64)
    results = []
    for cls in (keras.Sequential, keras_kfac.Sequential):
        keras.utils.set_random_seed(7)
        model = cls(
            [keras.Input((4,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(3, activation="softmax")]
        )
        model.compile(optimizer=make_opt(), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results.append((model.get_weights(), history.history))
    (w_keras, h_keras), (w_kfac, h_kfac) = results
    for a, b in zip(w_keras, w_kfac):
        np.testing.assert_array_equal(a, b)
    assert h_keras == h_kfac
