"""`KFAC()`'s learning_rate="auto": 1e-3 · √(max(B, 128) / 128) for the global batch B of the
first step (replicas and gradient accumulation included), set once, saved with the model.

The reference is the closed form, and the same run with that number given as a float: both
must give the same weights, so the rate is in effect from the first step on."""

import os

import keras
import numpy as np
import pytest

import keras_kfac


def closed_form(batch: int) -> float:
    return 1e-3 * np.sqrt(max(batch, 128) / 128)


def data(count=1024):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(count, 6)).astype("float32")
    return x, rng.integers(0, 3, size=count)


def build(optimizer):
    keras.utils.set_random_seed(7)
    model = keras_kfac.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(3),
        ]
    )
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def fit(model, batch_size, steps=2, **kwargs):
    x, y = data(batch_size * steps)
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, **kwargs)
    return model


@pytest.mark.parametrize("batch_size", [32, 128, 512, 1000])
def test_learning_rate_grows_with_the_square_root_of_the_batch_above_128(batch_size):
    optimizer = keras_kfac.KFAC()
    assert float(optimizer.learning_rate) == pytest.approx(1e-3)  # before the first step
    model = fit(build(optimizer), batch_size)
    assert float(optimizer.learning_rate) == pytest.approx(closed_form(batch_size), rel=1e-6)
    given = fit(build(keras_kfac.KFAC(learning_rate=closed_form(batch_size))), batch_size)
    for auto, fixed in zip(model.get_weights(), given.get_weights()):
        np.testing.assert_array_equal(auto, fixed)


def test_a_given_rate_is_left_alone_whatever_the_batch():
    optimizer = keras_kfac.KFAC(learning_rate=1e-3)
    fit(build(optimizer), 512)
    assert float(optimizer.learning_rate) == pytest.approx(1e-3)


def test_gradient_accumulation_counts_in_the_batch():
    optimizer = keras_kfac.KFAC(gradient_accumulation_steps=2)
    fit(build(optimizer), 256, steps=4)
    assert float(optimizer.learning_rate) == pytest.approx(closed_form(512), rel=1e-6)


def test_set_once_a_smaller_last_batch_and_a_later_fit_keep_it(tmp_path):
    optimizer = keras_kfac.KFAC()
    model = build(optimizer)
    x, y = data(1024 + 40)  # the last batch has 40 examples
    model.fit(x, y, batch_size=1024, epochs=1, shuffle=False, verbose=0)
    assert float(optimizer.learning_rate) == pytest.approx(closed_form(1024), rel=1e-6)
    fit(model, 64)
    assert float(optimizer.learning_rate) == pytest.approx(closed_form(1024), rel=1e-6)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert float(loaded.optimizer.learning_rate) == pytest.approx(closed_form(1024), rel=1e-6)
    fit(loaded, 64)  # resumed: iterations > 0, so the rate is not set again
    assert float(loaded.optimizer.learning_rate) == pytest.approx(closed_form(1024), rel=1e-6)


def test_config_says_auto_until_the_first_step_then_the_rate_set():
    optimizer = keras_kfac.KFAC()
    assert optimizer.get_config()["learning_rate"] == "auto"
    again = keras_kfac.KFAC.from_config(optimizer.get_config())
    assert again.learning_rate_from_batch
    fit(build(again), 512)
    assert again.get_config()["learning_rate"] == pytest.approx(closed_form(512), rel=1e-6)
    assert keras_kfac.KFAC(learning_rate=3e-3).get_config()["learning_rate"] == pytest.approx(3e-3)


def test_an_unknown_string_is_refused():
    with pytest.raises(ValueError, match="learning_rate"):
        keras_kfac.KFAC(learning_rate="sqrt")


def test_a_rate_set_before_the_first_step_wins_over_auto():
    # LearningRateScheduler sets the rate at the start of each epoch, before the first step.
    optimizer = keras_kfac.KFAC()
    scheduler = keras.callbacks.LearningRateScheduler(lambda epoch: 0.02 / (epoch + 1))
    fit(build(optimizer), 512, callbacks=[scheduler])
    assert float(optimizer.learning_rate) == pytest.approx(0.02)
    assert not optimizer.learning_rate_from_batch
    assert optimizer.get_config()["learning_rate"] == pytest.approx(0.02)
