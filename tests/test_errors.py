"""Bad hyperparameters fail at construction; a non-finite step changes nothing but a counter."""

import keras
import numpy as np
import pytest

import keras_kfac


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(learning_rate=-0.1), "learning_rate"),
        (dict(damping=-1e-3), "damping"),
        (dict(damping=0.0), "damping"),
        (dict(momentum=-0.5), "momentum"),
        (dict(stats_decay=1.0), "stats_decay"),
        (dict(stats_decay=-0.1), "stats_decay"),
        (dict(inverse_every=0), "inverse_every"),
        (dict(inverse_every=2.5), "inverse_every"),
        (dict(stats_every=0), "stats_every"),
        (dict(fisher="true"), "fisher"),
        (dict(damping_mode="tikhonov"), "damping_mode"),
        (dict(kl_clip=-1.0), "kl_clip"),
        (dict(graft="lamb"), "graft"),
        (dict(stats_batch_size=0), "stats_batch_size"),
        (dict(inverse_jit="yes"), "inverse_jit"),
        (dict(damping=float("inf")), "damping"),
        (dict(damping=float("nan")), "damping"),
        (dict(learning_rate=float("inf")), "learning_rate"),
        (dict(kl_clip=float("inf")), "kl_clip"),
        (dict(max_factor_size=0), "max_factor_size"),
        (dict(fallback="no_such_optimizer"), "fallback"),
        (dict(fallback=3), "fallback"),
    ],
)
def test_invalid_hyperparameters_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        keras_kfac.KFAC(**kwargs)


def test_adapt_damping_arguments_are_validated():
    with pytest.raises(ValueError, match="damping_every"):
        keras_kfac.KFAC(adapt_damping=True, damping_every=0)
    with pytest.raises(ValueError, match="min_damping"):
        keras_kfac.KFAC(adapt_damping=True, min_damping=2.0, max_damping=1.0)
    with pytest.raises(ValueError, match="schedule"):
        keras_kfac.KFAC(adapt_damping=True, damping=keras.optimizers.schedules.ExponentialDecay(1.0, 10, 0.5))
    config = keras_kfac.KFAC(learning_rate=None, momentum=None, adapt_damping=True, damping_every=3).get_config()
    assert (config["learning_rate"], config["momentum"], config["adapt_damping"], config["damping_every"]) == (
        None,
        None,
        True,
        3,
    )


def _state(model, opt):
    return [v.numpy().copy() for v in model.weights] + [v.numpy().copy() for v in opt.variables]


@pytest.mark.parametrize("bad", ["nan_input", "inf_label"])
def test_non_finite_step_is_skipped_and_changes_nothing(bad):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    model = keras_kfac.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(2),
        ]
    )
    opt = keras_kfac.KFAC(learning_rate=0.05, inverse_every=1)
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    before = _state(model, opt)
    iterations = int(opt.iterations.numpy())
    x_bad, y_bad = x[:8].copy(), y[:8].copy()
    if bad == "nan_input":
        x_bad[3, 1] = np.nan
    else:
        y_bad[0, 0] = np.inf
    logs = model.train_on_batch(x_bad, y_bad, return_dict=True)
    assert logs["skipped_steps"] == 1
    after = _state(model, opt)
    skipped_index = [i for i, v in enumerate(model.weights + opt.variables) if v is opt.skipped_steps]
    for i, (a, b) in enumerate(zip(before, after)):
        if i not in skipped_index:
            np.testing.assert_array_equal(a, b)
    assert int(opt.iterations.numpy()) == iterations
    # Training goes on from the unchanged state.
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert int(opt.iterations.numpy()) == iterations + 2
