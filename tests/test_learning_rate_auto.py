"""`KFAC()`'s learning_rate="auto": 3e-3 / (1 + t / (400 · max(b, 1))) at step t, b = B / 128
for the global batch B of the first step (replicas and gradient accumulation included), set once
and saved with the model; the decay follows the step counter; and kl_clip="auto", 1e-3 with it.

The reference is the closed form, and the same run with that rate given as a schedule and the
clip given as a number: both must give the same weights, so the rate and the clip are in effect
from the first step on."""

import os

import keras
import numpy as np
import pytest

import keras_kfac

PEAK, DECAY_STEPS, FAR, KL_CLIP = 3e-3, 400, 10**6, 1e-3


def closed_form(batch: int, step: int) -> float:
    """The rate of step `step` (counted from 0), as the optimizer reports it after `step` steps."""
    return PEAK / (1.0 + step / (DECAY_STEPS * max(batch / 128, 1.0)))


class ClosedForm(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, batch):
        self.peak = float(closed_form(batch, 0))
        self.horizon = float(DECAY_STEPS * max(batch / 128, 1.0))

    def __call__(self, step):
        return self.peak / (1.0 + keras.ops.cast(step, "float32") / self.horizon)


def far_rate(optimizer) -> float:
    """The rate at step 10⁶, where the batch the horizon was set from shows most."""
    counter = optimizer._iterations  # the step counter schedules read (micro-steps, with accumulation)
    saved = int(counter.numpy())
    counter.assign(FAR)
    rate = float(optimizer.learning_rate)
    counter.assign(saved)
    return rate


def data(count=1024):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(count, 6)).astype("float32")
    return x, rng.integers(0, 3, size=count)


def build(optimizer, width=8, activation="tanh"):
    keras.utils.set_random_seed(7)
    model = keras_kfac.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(width, activation=activation),
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
def test_rate_follows_the_closed_form_at_each_batch(batch_size):
    optimizer = keras_kfac.KFAC()
    assert float(optimizer.learning_rate) == pytest.approx(PEAK)  # before the first step
    model = fit(build(optimizer), batch_size, steps=3)
    assert float(optimizer.learning_rate) == pytest.approx(closed_form(batch_size, 3), rel=1e-6)
    assert far_rate(optimizer) == pytest.approx(closed_form(batch_size, FAR), rel=1e-5)
    given = fit(build(keras_kfac.KFAC(learning_rate=ClosedForm(batch_size), kl_clip=KL_CLIP)), batch_size, steps=3)
    for auto, scheduled in zip(model.get_weights(), given.get_weights()):
        np.testing.assert_allclose(auto, scheduled, rtol=1e-6, atol=1e-7)


def test_the_auto_clip_binds_and_is_the_given_clip():
    """kl_clip="auto" is kl_clip=1e-3 with the auto rate: where ν < 1 (512 units, inputs ×10),
    the weights match a run given both by hand and differ from one without the clip."""

    def run(optimizer):
        model = build(optimizer, width=512, activation="relu")
        x, y = data(32 * 3)
        nus = []
        record = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: nus.append(float(logs.get("kl_clip_factor", 1.0)))
        )
        model.fit(10 * x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[record])
        return model.get_weights(), nus

    auto, nus = run(keras_kfac.KFAC())
    assert min(nus) < 0.95, nus
    given, given_nus = run(keras_kfac.KFAC(learning_rate=ClosedForm(32), kl_clip=KL_CLIP))
    np.testing.assert_allclose(nus, given_nus, rtol=1e-5)
    for a, b in zip(auto, given):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    unclipped, _ = run(keras_kfac.KFAC(kl_clip=None))
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(auto, unclipped)) > 1e-4


def test_the_auto_clip_follows_the_rate_in_the_config():
    assert keras_kfac.KFAC().kl_clip == KL_CLIP
    assert keras_kfac.KFAC().get_config()["kl_clip"] == "auto"
    assert keras_kfac.KFAC(learning_rate=1e-3).kl_clip is None
    assert keras_kfac.KFAC(learning_rate=None).kl_clip is None
    assert keras_kfac.KFAC(kl_clip=None).kl_clip is None
    assert keras_kfac.KFAC(learning_rate=1e-3, kl_clip=1e-2).kl_clip == 1e-2
    assert keras_kfac.KFAC.from_config(keras_kfac.KFAC().get_config()).kl_clip == KL_CLIP
    with pytest.raises(ValueError, match="kl_clip"):
        keras_kfac.KFAC(kl_clip="on")


def test_the_rate_decays_with_the_step_counter_and_the_fallback_follows():
    optimizer = keras_kfac.KFAC(exclude=lambda layer: isinstance(layer, keras.layers.LayerNormalization))
    fit(build(optimizer), 1024, steps=1)  # horizon 400 · 8 = 3,200 steps
    fallback = optimizer.fallback_optimizer
    assert fallback is not None
    for step, expected in [(1, 3e-3 / (1 + 1 / 3200)), (3200, 1.5e-3), (6400, 1e-3), (32000, 3e-3 / 11)]:
        optimizer.iterations.assign(step)  # the step counter alone sets the decay
        assert float(optimizer.learning_rate) == pytest.approx(expected, rel=1e-6)
        assert float(fallback.learning_rate) == pytest.approx(expected, rel=1e-6)


def test_a_given_rate_is_left_alone_whatever_the_batch():
    optimizer = keras_kfac.KFAC(learning_rate=1e-3)
    fit(build(optimizer), 512)
    assert float(optimizer.learning_rate) == pytest.approx(1e-3)


def test_gradient_accumulation_counts_in_the_batch():
    optimizer = keras_kfac.KFAC(gradient_accumulation_steps=2)
    fit(build(optimizer), 256, steps=4)
    assert float(optimizer.learning_rate) == pytest.approx(closed_form(512, 4), rel=1e-6)
    assert far_rate(optimizer) == pytest.approx(closed_form(512, FAR), rel=1e-5)


def test_horizon_set_once_a_smaller_last_batch_a_later_fit_and_a_reload_keep_it(tmp_path):
    optimizer = keras_kfac.KFAC()
    model = build(optimizer)
    x, y = data(1024 + 40)  # the last batch has 40 examples
    model.fit(x, y, batch_size=1024, epochs=1, shuffle=False, verbose=0)
    assert float(optimizer.learning_rate) == pytest.approx(closed_form(1024, 2), rel=1e-6)
    fit(model, 64)
    assert float(optimizer.learning_rate) == pytest.approx(closed_form(1024, 4), rel=1e-6)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert float(loaded.optimizer.learning_rate) == pytest.approx(closed_form(1024, 4), rel=1e-6)
    fit(loaded, 64)  # resumed: iterations > 0, so the horizon is not set again; the decay goes on
    assert float(loaded.optimizer.learning_rate) == pytest.approx(closed_form(1024, 6), rel=1e-6)
    assert far_rate(loaded.optimizer) == pytest.approx(closed_form(1024, FAR), rel=1e-5)


def test_config_says_auto_before_and_after_the_first_step():
    optimizer = keras_kfac.KFAC()
    assert optimizer.get_config()["learning_rate"] == "auto"
    again = keras_kfac.KFAC.from_config(optimizer.get_config())
    assert again.learning_rate_from_batch
    fit(build(again), 512)
    assert again.get_config()["learning_rate"] == "auto"
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
    # The clip it was built with stays, and a reload from the config keeps it.
    assert optimizer.get_config()["kl_clip"] == pytest.approx(KL_CLIP)
    assert keras_kfac.KFAC.from_config(optimizer.get_config()).kl_clip == pytest.approx(KL_CLIP)
