"""get_config/from_config round trips; .keras saving of a compiled, trained model."""

import keras
import numpy as np
import pytest

import keras_kfac


def _all_arguments():
    return dict(
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.1, 100, 0.9),
        momentum=0.5,
        damping=keras.optimizers.schedules.PolynomialDecay(1e-2, 50, 1e-4),
        stats_decay=0.9,
        stats_every=3,
        inverse_every=7,
        fisher="empirical",
        damping_mode="factored",
        kl_clip=1e-3,
        graft="adam",
        stats_batch_size=16,
        fallback=keras.optimizers.Adam(learning_rate=1e-3),
        inverse_jit=False,
        inverse_dtype="float64",
        seed=11,
        weight_decay=1e-4,
        clipnorm=1.0,
        name="my_kfac",
    )


@pytest.mark.parametrize("kwargs", [{}, _all_arguments()], ids=["defaults", "every-argument"])
def test_get_config_round_trip(kwargs):
    opt = keras_kfac.KFAC(**kwargs)
    config = opt.get_config()
    clone = keras_kfac.KFAC.from_config(config)
    assert clone.get_config() == config
    # Also through Keras' registry (no custom_objects).
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, keras_kfac.KFAC)
    assert restored.get_config() == config
    for key in (
        "momentum",
        "stats_decay",
        "stats_every",
        "inverse_every",
        "fisher",
        "damping_mode",
        "kl_clip",
        "graft",
    ):
        assert getattr(restored, key) == getattr(opt, key)


@pytest.mark.parametrize("style", ["sequential", "functional"])
def test_save_and_load_compiled_model(tmp_path, style):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.integers(0, 3, size=32)
    if style == "sequential":
        model = keras_kfac.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(6, activation="relu"),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
    else:
        i = keras.Input((4,))
        h = keras.layers.BatchNormalization()(keras.layers.Dense(6, activation="relu")(i))
        model = keras_kfac.Model(i, keras.layers.Dense(3, activation="softmax")(h))
    opt = keras_kfac.KFAC(learning_rate=0.05, inverse_every=3, fisher="empirical", graft="adam")
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(model)
    assert isinstance(loaded.optimizer, keras_kfac.KFAC)
    assert loaded.optimizer.get_config() == opt.get_config()
    assert len(loaded.optimizer.variables) == len(opt.variables)
    for a, b in zip(opt.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    # Both continue identically.
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_export_serves_the_same_outputs(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, size=16)
    model = keras_kfac.Sequential(
        [keras.Input((4,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(3, activation="softmax")]
    )
    model.compile(optimizer=keras_kfac.KFAC(), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, verbose=0)
    path = str(tmp_path / "export")
    model.export(path, verbose=False)
    loaded = tf.saved_model.load(path)  # keep a reference: its variables live as long as it does
    served = loaded.serve(tf.constant(x))
    np.testing.assert_allclose(served.numpy(), model.predict(x, verbose=0), rtol=1e-6, atol=1e-7)
