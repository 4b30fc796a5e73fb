"""Mixed precision: statistics, inversions and the update stay float32 under mixed_bfloat16 and
mixed_float16 (with Keras' dynamic loss scaling), and training converges."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from reference import rel_err, with_ones

import keras_kfac

POLICIES = ["mixed_bfloat16", "mixed_float16"]


def _data(m=256):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(m, 8)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(8, 3)), axis=-1)
    return x, y


def _model(policy):
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(1)
    return keras_kfac.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh", name="hidden"),
            keras.layers.Dense(3, name="logits"),
            keras.layers.Activation("softmax", dtype="float32"),  # Keras' advice: a float32 output
        ]
    )


def _kfac(model):
    opt = model.optimizer
    return opt.inner_optimizer if isinstance(opt, keras.optimizers.LossScaleOptimizer) else opt


def _one_step(policy, x, y):
    model = _model(policy)
    opt = keras_kfac.KFAC(
        learning_rate=0.1,
        momentum=0.0,
        damping=0.1,
        stats_every=1,
        inverse_every=1,
        stats_batch_size=None,
        fisher="empirical",
        graft=None,
    )
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    logs = model.train_on_batch(x, y, return_dict=True)
    step = [w - b for w, b in zip(model.get_weights(), before)]
    factors = {name: (a.numpy(), g.numpy()) for name, (a, g) in _kfac(model).factors().items()}
    return model, logs, factors, step


@pytest.mark.parametrize("policy", POLICIES)
def test_statistics_inverses_and_step_are_float32(policy):
    x, y = _data(32)
    _, _, factors32, step32 = _one_step("float32", x, y)
    model, logs, factors, step = _one_step(policy, x, y)
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)  # Keras wraps it
        assert float(model.optimizer.dynamic_scale.numpy()) > 1.0  # and the loss was scaled
    assert logs["skipped_steps"] == 0
    opt = _kfac(model)
    for variable in opt.variables:
        assert variable.dtype in ("float32", "int64"), variable.path
    # The first layer sees x rounded to the compute dtype; A from it, computed in float32, is
    # exact to float32 round-off (in bfloat16 or float16 the error would be ~1e-3).
    seen = tf.cast(tf.cast(x, model.layers[0].compute_dtype), tf.float64).numpy()
    rows = with_ones(seen)
    assert rel_err(factors["hidden"][0], rows.T @ rows / len(x)) < 1e-6
    # The rest follows the float32 run within the precision of the forward pass.
    for name in ("hidden", "logits"):
        for ours, reference in zip(factors[name], factors32[name]):
            assert rel_err(ours, reference) < 2e-2
    for ours, reference in zip(step, step32):
        assert rel_err(ours, reference) < 5e-2


@pytest.mark.parametrize("policy", POLICIES)
def test_training_converges(policy):
    x, y = _data()
    model = _model(policy)
    model.compile(
        optimizer=keras_kfac.KFAC(learning_rate=0.05, stats_every=1, inverse_every=5),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0).history
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    assert history["accuracy"][-1] > 0.9
    assert history["skipped_steps"][-1] == 0
    for w in model.get_weights():
        assert w.dtype == np.float32 and np.all(np.isfinite(w))


def test_float16_dynamic_loss_scale_follows_keras_rules():
    """Overflowing steps are skipped and halve the scale; every 2 applied steps double it."""
    x, y = _data(128)
    model = _model("mixed_float16")
    kfac = keras_kfac.KFAC(learning_rate=0.05, stats_every=1, inverse_every=2, fisher="empirical")
    scaler = keras.optimizers.LossScaleOptimizer(kfac, initial_scale=2.0**30, dynamic_growth_steps=2)
    model.compile(optimizer=scaler, loss="sparse_categorical_crossentropy")
    scale, counter, skipped, losses = 2.0**30, 0, 0, []
    for i in range(24):
        batch = slice(32 * (i % 4), 32 * (i % 4 + 1))
        logs = model.train_on_batch(x[batch], y[batch], return_dict=True)
        if logs["skipped_steps"] > skipped:  # float16 gradients overflowed at this scale
            skipped, scale, counter = skipped + 1, scale / 2, 0
        elif counter == 1:
            scale, counter = scale * 2, 0
        else:
            counter += 1
        assert float(scaler.dynamic_scale.numpy()) == scale
        losses.append(logs["loss"])
    assert 10 <= skipped < 24  # 2**30 overflows float16 at first
    assert int(kfac.iterations.numpy()) == 24 - skipped
    assert np.mean(losses[-4:]) < 0.7 * np.log(3)  # it learned (chance: log 3)


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_static_loss_scale_factor_changes_nothing(fisher):
    """Keras' static `loss_scale_factor` (a power of 2: exact) is undone for every variable,
    those of the fallback optimizer (PReLU here) and of the scale-and-shift block included."""
    x, y = _data(32)
    weights = []
    for factor in (None, 1024.0):
        keras.utils.set_random_seed(1)
        model = keras_kfac.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="tanh"),
                keras.layers.LayerNormalization(),
                keras.layers.PReLU(),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
        opt = keras_kfac.KFAC(
            learning_rate=0.05, fisher=fisher, stats_every=1, inverse_every=1, loss_scale_factor=factor
        )
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
