"""Keras' `use_ema` with KFAC: the average covers the step actually taken, blocks and fallback.

The reference is the average recomputed in float64 from the weights seen after every step:
x₁ = w₁, x_t = β x_{t−1} + (1 − β) w_t; at the end of `fit` Keras replaces the weights by x.
The polynomial-decay average (`polynomial_averaging=η`) is checked against its closed form.
"""

import math

import keras
import numpy as np
import pytest

import keras_kfac

MOMENTUM = 0.9


def _model():
    # PReLU has no curvature block: its alpha is trained by the fallback optimizer.
    return keras_kfac.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8),
            keras.layers.PReLU(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


class _WeightsAfterEachStep(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append([v.numpy().astype("float64") for v in self.model.trainable_variables])


def _fit_recording(optimizer, data_seed: int = 0):
    """The model after two epochs (12 steps of 16) with `optimizer`, and the weights after each step."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(data_seed)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")
    model = _model()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    record = _WeightsAfterEachStep()
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[record])
    return model, record


@pytest.mark.parametrize(
    "options",
    [
        {"learning_rate": 1e-2},
        # The quadratic model undoes the fallback's step while it chooses α, μ and puts it back
        # after: the average must include it.
        {"learning_rate": None, "momentum": None, "adapt_damping": True},
        # Nothing under a block: the fallback takes the whole step.
        {"learning_rate": 1e-2, "exclude": lambda layer: True},
    ],
    ids=["fixed_step", "quadratic_model", "fallback_only"],
)
def test_average_of_the_weights_each_step_left(options):
    optimizer = keras_kfac.KFAC(use_ema=True, ema_momentum=MOMENTUM, stats_every=1, inverse_every=2, **options)
    model, record = _fit_recording(optimizer)

    assert len(record.seen) == 12
    average = record.seen[0]
    for weights in record.seen[1:]:
        average = [MOMENTUM * a + (1.0 - MOMENTUM) * w for a, w in zip(average, weights)]
    final = [v.numpy() for v in model.trainable_variables]
    raw = record.seen[-1]
    for name, a, f, r in zip([v.path for v in model.trainable_variables], average, final, raw):
        assert np.abs(a - r).max() > 1e-3, name  # the average differs from the last weights...
        np.testing.assert_allclose(f, a, rtol=1e-5, atol=1e-6, err_msg=name)  # ...and fit ends on it


def _polynomial_weights(steps: int, power: float) -> np.ndarray:
    """Closed form of the polynomial-decay average after `steps` steps: x_T = Σ_s c_s w_s with
    c_s = (η + 1) Γ(s + η) Γ(T) / (Γ(s) Γ(T + η + 1)) (they sum to one)."""
    lgamma = np.vectorize(math.lgamma)
    s = np.arange(1, steps + 1, dtype="float64")
    return (power + 1.0) * np.exp(lgamma(s + power) - lgamma(s) + math.lgamma(steps) - math.lgamma(steps + power + 1.0))


@pytest.mark.parametrize("power", [0.0, 2.5, 8.0])
def test_polynomial_average_is_the_closed_form_weighting(power):
    optimizer = keras_kfac.KFAC(polynomial_averaging=power, learning_rate=1e-2, stats_every=1, inverse_every=2)
    assert optimizer.use_ema
    model, record = _fit_recording(optimizer, data_seed=1)

    coefficients = _polynomial_weights(len(record.seen), power)
    np.testing.assert_allclose(coefficients.sum(), 1.0, rtol=1e-12)
    if power == 0.0:
        np.testing.assert_allclose(coefficients, 1.0 / len(record.seen), rtol=1e-12)  # the plain mean
    final = [v.numpy() for v in model.trainable_variables]
    for i, (variable, f) in enumerate(zip(model.trainable_variables, final)):
        expected = sum(c * weights[i] for c, weights in zip(coefficients, record.seen))
        assert np.abs(expected - record.seen[-1][i]).max() > 1e-3, variable.path
        np.testing.assert_allclose(f, expected, rtol=1e-5, atol=1e-6, err_msg=variable.path)


def test_the_default_average_and_keras_use_ema():
    """polynomial_averaging="auto" is η = 8 unless `use_ema` is given (Keras' meaning then)."""
    settings = {
        "default": ({}, 8.0, True),
        "use_ema=True": ({"use_ema": True}, None, True),  # Keras' exponential average
        "use_ema=False": ({"use_ema": False}, None, False),
        "none": ({"polynomial_averaging": None}, None, False),
    }
    for name, (kwargs, power, use_ema) in settings.items():
        optimizer = keras_kfac.KFAC(**kwargs)
        assert (optimizer.polynomial_averaging, optimizer.use_ema) == (power, use_ema), name
        restored = keras_kfac.KFAC.from_config(optimizer.get_config())
        assert (restored.polynomial_averaging, restored.use_ema) == (power, use_ema), name
    with pytest.raises(ValueError, match="polynomial_averaging"):
        keras_kfac.KFAC(polynomial_averaging="sometimes")


def test_polynomial_averaging_arguments():
    config = keras_kfac.KFAC(polynomial_averaging=8).get_config()
    assert config["polynomial_averaging"] == 8.0 and config["use_ema"] is True
    restored = keras_kfac.KFAC.from_config(config)
    assert restored.polynomial_averaging == 8.0 and restored.use_ema
    with pytest.raises(ValueError, match="polynomial_averaging"):
        keras_kfac.KFAC(polynomial_averaging=-1.0)
    with pytest.raises(ValueError, match="use_ema=False"):
        keras_kfac.KFAC(polynomial_averaging=3, use_ema=False)


class _WeightsAtFirstStep(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = None

    def on_train_batch_begin(self, batch, logs=None):
        if self.seen is None:
            self.seen = [v.numpy() for v in self.model.trainable_variables]


def _averaged(seed: int = 0):
    keras.utils.set_random_seed(seed)
    model = _model()
    optimizer = keras_kfac.KFAC(polynomial_averaging=8, learning_rate=1e-2, stats_every=1, inverse_every=2)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    return model


def _data(seed: int = 2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(96, 6)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")


@pytest.mark.parametrize("split", [[2], [1, 1], [1, 0, 1]], ids=["one_fit", "two_fits", "with_zero_epochs"])
def test_fit_calls_continue_from_the_trained_weights_not_the_average(split):
    """`fit` ends on the average; the next `fit` trains on from the weights training reached, so
    that any split of the epochs ends where one `fit` of all of them does, bitwise."""
    x, y = _data()
    whole = _averaged()
    whole_record = _WeightsAfterEachStep()
    whole.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[whole_record])

    model = _averaged()
    record = _WeightsAfterEachStep()
    for epochs in split:
        if epochs:
            first = _WeightsAtFirstStep()
            model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, callbacks=[record, first])
        else:
            model.fit(x, y, batch_size=16, epochs=0, verbose=0)
        averages = model.optimizer._model_variables_moving_average
        for v, a in zip(model.trainable_variables, averages):
            np.testing.assert_array_equal(v.numpy(), a.numpy())  # the average is in place after each fit
    assert len(record.seen) == 12
    # Each fit after the first started from the weights after the last step, not from the average.
    if len(split) > 1:
        last_of_first_fit = record.seen[5]
        for w, s in zip(first.seen, last_of_first_fit):
            np.testing.assert_array_equal(w, s)
    for a, b in zip(whole_record.seen, record.seen):
        for wa, wb in zip(a, b):
            np.testing.assert_array_equal(wa, wb)
    for a, b in zip(whole.weights + whole.optimizer.variables, model.weights + model.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_weights_set_after_fit_are_trained_from():
    x, y = _data()
    model = _averaged()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    chosen = [np.full(v.shape, 0.125, "float32") for v in model.trainable_variables]
    for v, c in zip(model.trainable_variables, chosen):
        v.assign(c)
    first = _WeightsAtFirstStep()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[first])
    for w, c in zip(first.seen, chosen):
        np.testing.assert_array_equal(w, c)
