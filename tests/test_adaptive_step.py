"""The adaptive mode (learning_rate=None, momentum=None, adapt_damping) models the step it
takes: raw gradients are clipped before preconditioning, the fallback optimizer's own step is
part of the quadratic model, its extra forward passes leave the model's state as one training
pass does, and `kl_clip` bounds the chosen step.  Against float64 references."""

import keras
import numpy as np
import pytest
import reference as ref
from exact import exact_kfac
from test_adaptive import _dense_fisher, _gradient, _model, _two_steps

import keras_kfac

LAM = 0.05


def _data(m=8, seed=2):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, 4)).astype("float32"), rng.integers(0, 3, size=m)


def _exact_adaptive(**kwargs):
    """One exact K-FAC direction per step (tests/exact.py) with an automatic α."""
    return exact_kfac(**{"learning_rate": None, "damping": LAM, **kwargs})


def _reference(model, x, y):
    layers = [
        (layer.kernel.numpy().astype(np.float64), layer.bias.numpy().astype(np.float64), act)
        for layer, act in zip(model.layers, ["tanh", "softmax"])
    ]
    return layers, ref.mlp_step(x.astype(np.float64), y, layers, 1.0, LAM, "eigen")


def _steps(model, layers):
    return [
        np.concatenate([layer.kernel.numpy() - k, (layer.bias.numpy() - b)[None]])
        for layer, (k, b, _) in zip(model.layers, layers)
    ]


@pytest.mark.parametrize("clip", ["clipnorm", "clipvalue"])
def test_clipping_acts_on_the_raw_gradients_before_preconditioning(clip):
    x, y = _data()
    model = _model("softmax")
    layers, expected = _reference(model, x, y)
    limit = 1e-3
    model.compile(optimizer=_exact_adaptive(**{clip: limit}), loss="sparse_categorical_crossentropy")
    logs = model.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    alpha = logs["learning_rate"][-1]
    assert alpha > 0
    for step, exp in zip(_steps(model, layers), expected):
        grad = exp["grad"]
        parts = []
        for part in (grad[:-1], grad[-1:]):  # Keras clips the kernel and the bias separately
            if clip == "clipnorm":
                parts.append(part * min(1.0, limit / np.linalg.norm(part)))
            else:
                parts.append(np.clip(part, -limit, limit))
        u = ref.kron_solve(exp["A"], exp["G"], np.concatenate(parts), LAM, "eigen")
        assert ref.rel_err(step, -alpha * u) < 1e-3
        # Clipping U instead would move every variable by exactly α·limit.
        assert not np.isclose(np.linalg.norm(step[:-1]), alpha * limit, rtol=1e-3)


def test_the_quadratic_model_includes_the_fallback_optimizers_own_step():
    """The first layer goes to the fallback (SGD with momentum); (α, μ) minimise M over the step
    taken, δ = αΔ + μδ₀ + δ_f, with δ_f the fallback's step, for the dense float64 F + λI."""
    x, y = _data()
    model = _model("softmax")
    first = model.layers[0].name
    opt = keras_kfac.KFAC(
        learning_rate=None, momentum=None, damping=LAM, stats_every=1, inverse_every=1, graft="sgd",
        exclude=[first], fallback=keras.optimizers.SGD(0.5, momentum=0.9), polynomial_averaging=None,
    )  # fmt: skip
    shapes, theta0, theta1, theta2, alpha, mu = _two_steps(model, opt, x, y)
    split = int(np.prod(shapes[0]) + np.prod(shapes[1]))  # the first layer's kernel and bias
    own = np.arange(theta1.size) >= split
    prev = np.where(own, theta1 - theta0, 0.0)
    fallback_step = np.where(own, 0.0, theta2 - theta1)
    assert np.abs(fallback_step).max() > 1e-3  # the fallback's momentum makes a step M must see
    direction = np.where(own, (theta2 - theta1 - mu * prev) / alpha, 0.0)
    x64 = x.astype(np.float64)
    grad = _gradient(theta1, shapes, x64, y, "softmax")
    c = _dense_fisher(theta1, shapes, x64, "softmax") + LAM * np.eye(theta1.size)
    tangents = [direction, prev]
    system = np.array([[a @ c @ b for b in tangents] for a in tangents])
    linear = np.array([grad @ t + t @ c @ fallback_step for t in tangents])
    np.testing.assert_allclose(ref.step_coefficients(system, linear), [alpha, mu], rtol=2e-2, atol=1e-4)
    # Without δ_f in the model the choice would differ markedly.
    plain = ref.step_coefficients(system, [grad @ t for t in tangents])
    assert abs(plain[0] - alpha) > 0.05 * abs(alpha) or abs(plain[1] - mu) > 0.05


@pytest.mark.parametrize("kwargs", [dict(learning_rate=None, momentum=None), dict(adapt_damping=True)], ids=str)
def test_extra_forward_passes_move_moving_statistics_once(kwargs):
    x, y = _data(m=16)

    def make():
        return keras_kfac.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(5),
                keras.layers.BatchNormalization(momentum=0.5),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )

    model, plain = make(), make()
    plain.set_weights(model.get_weights())
    model.compile(optimizer=keras_kfac.KFAC(damping_every=1, **kwargs), loss="sparse_categorical_crossentropy")
    plain.compile(optimizer=keras.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    plain.train_on_batch(x, y)
    bn, bn_plain = model.layers[1], plain.layers[1]
    np.testing.assert_allclose(bn.moving_mean.numpy(), bn_plain.moving_mean.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(bn.moving_variance.numpy(), bn_plain.moving_variance.numpy(), rtol=1e-5, atol=1e-7)


def test_extra_forward_passes_use_the_training_passs_dropout_mask():
    """ρ compares the loss before and after the step on the same batch: with the same dropout
    mask in every pass, a step that is a near-exact Newton step on that function gives ρ ≈ 1."""
    x, y = _data(m=32)
    model = keras_kfac.Sequential(
        [keras.Input((4,)), keras.layers.Dropout(0.5), keras.layers.Dense(3, activation="softmax")]
    )
    opt = keras_kfac.KFAC(
        learning_rate=None, momentum=None, adapt_damping=True, damping=1e-3, damping_every=1, stats_every=1,
        inverse_every=1, fisher="empirical", graft=None, stats_batch_size=None, damping_mode="eigen", stats_decay=0.0,
    )  # fmt: skip
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.layers[1].kernel.assign(np.zeros((4, 3), "float32"))
    rho = model.fit(x, y, batch_size=32, epochs=1, verbose=0).history["rho"][-1]
    assert 0.5 < rho < 1.5


def test_kl_clip_bounds_the_automatic_step():
    x, y = _data()
    model = _model("softmax")
    layers, expected = _reference(model, x, y)
    kl_clip = 1e-6
    model.compile(optimizer=_exact_adaptive(kl_clip=kl_clip), loss="sparse_categorical_crossentropy")
    logs = model.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    alpha = logs["learning_rate"][-1]
    assert logs["kl_clip_factor"][-1] < 1.0
    inner = sum(np.sum(e["update"] * e["grad"]) for e in expected)  # U·∇
    np.testing.assert_allclose(alpha**2 * inner, kl_clip, rtol=2e-3)
    for step, exp in zip(_steps(model, layers), expected):
        assert ref.rel_err(step, -alpha * exp["update"]) < 1e-3
