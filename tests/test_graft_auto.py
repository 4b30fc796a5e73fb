"""graft="auto" (the default): no graft when the step is KL-clipped, so that the clip alone bounds
the natural-gradient step −lr·ν·U; Adam's norm otherwise.  Checked against the float64 NumPy step
of `tests/reference.py` and against runs given the resolved graft by hand."""

import keras
import numpy as np
import pytest
import reference as ref
from exact import exact_kfac

import keras_kfac

LR, DAMPING, KL_CLIP = 0.3, 1e-2, 1e-3


def _mlp():
    keras.utils.set_random_seed(3)
    return keras_kfac.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3, activation="softmax")]
    )


def _data(m=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(m, 5)).astype("float32"), rng.integers(0, 3, size=m)


def _one_step(optimizer):
    x, y = _data()
    model = _mlp()
    before = [
        (lay.kernel.numpy().astype(np.float64), lay.bias.numpy().astype(np.float64), act)
        for lay, act in zip(model.layers, ["tanh", "softmax"])
    ]
    expected = ref.mlp_step(x.astype(np.float64), y, before, LR, DAMPING, "eigen")
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    steps = [
        np.concatenate([lay.kernel.numpy() - k, (lay.bias.numpy() - b)[None]])
        for lay, (k, b, _) in zip(model.layers, before)
    ]
    return steps, expected


def test_auto_with_a_kl_clip_is_the_clipped_natural_gradient_step():
    steps, expected = _one_step(exact_kfac(learning_rate=LR, damping=DAMPING, graft="auto", kl_clip=KL_CLIP))
    inner = sum(np.sum(e["update"] * e["grad"]) for e in expected)
    nu = min(1.0, np.sqrt(KL_CLIP / (LR**2 * inner)))
    assert nu < 0.5  # the clip binds, so a graft would change the length
    for step, exp in zip(steps, expected):
        assert ref.rel_err(step, -LR * nu * exp["update"]) < 2e-4


def test_auto_without_a_kl_clip_takes_adams_norm():
    steps, expected = _one_step(exact_kfac(learning_rate=LR, damping=DAMPING, graft="auto", kl_clip=None))
    for step, exp in zip(steps, expected):
        u, grad = exp["update"], exp["grad"]
        assert np.sum(step * -u) / (np.linalg.norm(step) * np.linalg.norm(u)) > 1 - 1e-5
        # First Adam step: v̂ = g², the Adam direction g / (|g| + ε).
        assert abs(np.linalg.norm(step) / (LR * np.linalg.norm(grad / (np.abs(grad) + 1e-7))) - 1) < 1e-4


@pytest.mark.parametrize(
    "kwargs, graft",
    [
        ({}, None),  # learning_rate="auto" with kl_clip="auto" = 1e-3
        (dict(kl_clip=None), "adam"),
        (dict(learning_rate=1e-3), "adam"),  # a given rate: no auto clip
        (dict(learning_rate=1e-3, kl_clip=1e-2), None),
        (dict(learning_rate=None), "adam"),  # the quadratic model chooses α; no auto clip
        (dict(learning_rate=None, kl_clip=1e-2), "adam"),
        (dict(graft="sgd"), "sgd"),
        (dict(graft=None, kl_clip=None), None),
        (dict(graft="adam"), "adam"),
    ],
    ids=str,
)
def test_auto_resolves_from_the_clip_and_survives_the_config(kwargs, graft):
    optimizer = keras_kfac.KFAC(**kwargs)
    assert optimizer.graft == graft
    config = optimizer.get_config()
    assert config["graft"] == kwargs.get("graft", "auto")
    assert keras_kfac.KFAC.from_config(config).graft == graft


def _fallback_run(optimizer):
    """Two steps of a model whose LayerNormalization is left to the fallback optimizer."""
    keras.utils.set_random_seed(5)
    model = keras_kfac.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.LayerNormalization(name="norm"),
            keras.layers.Dense(3),
        ]
    )
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 3, size=64)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    return model


def test_the_default_blocks_step_ungrafted_and_the_fallback_is_adam_at_the_rate():
    default = keras_kfac.KFAC(exclude="norm")
    model = _fallback_run(default)
    assert default.graft is None and isinstance(default.fallback_optimizer, keras.optimizers.Adam)
    assert float(default.fallback_optimizer.learning_rate) == pytest.approx(float(default.learning_rate))
    # The same blocks' step given by hand (graft=None) with that Adam as the fallback.
    adam = keras.optimizers.Adam(learning_rate=lambda: by_hand.learning_rate, beta_2=0.999, epsilon=1e-7)
    by_hand = keras_kfac.KFAC(exclude="norm", graft=None, fallback=adam)
    same = _fallback_run(by_hand)
    for a, b in zip(model.get_weights(), same.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    grafted = _fallback_run(keras_kfac.KFAC(exclude="norm", graft="adam"))
    kernel = model.layers[0].kernel.numpy()
    assert float(np.max(np.abs(kernel - grafted.layers[0].kernel.numpy()))) > 1e-4
