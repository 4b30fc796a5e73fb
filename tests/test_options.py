"""Grafting, KL clipping, statistics subsampling, momentum, schedules, weight decay, periods
and the fallback optimizer, each against NumPy."""

import keras
import numpy as np
import pytest
import reference as ref
from exact import exact_kfac

import keras_kfac

LR, DAMPING = 0.3, 1e-2


def _mlp():
    return keras_kfac.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3, activation="softmax")]
    )


def _data(m=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, 5)).astype("float32"), rng.integers(0, 3, size=m)


def _params(model):
    return [
        (layer.kernel.numpy().astype(np.float64), layer.bias.numpy().astype(np.float64), act)
        for layer, act in zip(model.layers, ["tanh", "softmax"])
    ]


def _step(model, before):
    return [
        np.concatenate([layer.kernel.numpy() - k, (layer.bias.numpy() - b)[None]])
        for layer, (k, b, _) in zip(model.layers, before)
    ]


def _kfac(**kwargs):
    return exact_kfac(**{"learning_rate": LR, "damping": DAMPING, **kwargs})


@pytest.mark.parametrize("graft", ["sgd", "adam"])
def test_graft_keeps_direction_and_takes_first_order_norm(graft):
    x, y = _data()
    model = _mlp()
    before = _params(model)
    expected = ref.mlp_step(x.astype(np.float64), y, before, LR, DAMPING, "eigen")
    model.compile(optimizer=_kfac(graft=graft), loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    for step, exp in zip(_step(model, before), expected):
        u, grad = exp["update"], exp["grad"]
        cosine = np.sum(step * -u) / (np.linalg.norm(step) * np.linalg.norm(u))
        assert cosine > 1 - 1e-5
        # First Adam step: v̂ = g², so the Adam direction is g / (|g| + ε).
        first_order = grad if graft == "sgd" else grad / (np.abs(grad) + 1e-7)
        assert abs(np.linalg.norm(step) / (LR * np.linalg.norm(first_order)) - 1) < 1e-4


def test_kl_clip_scales_the_step():
    x, y = _data()
    model = _mlp()
    before = _params(model)
    expected = ref.mlp_step(x.astype(np.float64), y, before, LR, DAMPING, "eigen")
    kl_clip = 1e-3
    inner = sum(np.sum(e["update"] * e["grad"]) for e in expected)
    nu = min(1.0, np.sqrt(kl_clip / (LR**2 * inner)))
    assert nu < 0.5  # the clip is active in this test
    model.compile(optimizer=_kfac(kl_clip=kl_clip), loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    for step, exp in zip(_step(model, before), expected):
        assert ref.rel_err(step, -LR * nu * exp["update"]) < 2e-4


def test_stats_batch_size_uses_the_first_examples():
    x, y = _data(m=16)
    model = _mlp()
    before = _params(model)
    opt = _kfac(stats_batch_size=5)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    sub = ref.mlp_step(x[:5].astype(np.float64), y[:5], before, LR, DAMPING, "eigen")
    full = ref.mlp_step(x.astype(np.float64), y, before, LR, DAMPING, "eigen")
    for layer, s, f in zip(model.layers, sub, full):
        a, g = opt.factors()[layer.name]
        assert ref.rel_err(a.numpy(), s["A"]) < 1e-5
        # G of the first 5 examples, but from the gradient of the whole batch's loss:
        # the per-example g do not depend on the batch, so it equals the 5-example G.
        assert ref.rel_err(g.numpy(), s["G"]) < 1e-4
        assert ref.rel_err(g.numpy(), f["G"]) > 1e-2


@pytest.mark.parametrize("form", [None, "average", "heavy_ball"])
def test_momentum_two_steps(form):
    """Heavy-ball: θ₂ = θ₁ + μ(θ₁ − θ₀) − lr·U₁.  Average (the default): v₁ = (1 − μ)U₀ and
    θ₁ = θ₀ − lr·U₀, then θ₂ = θ₁ − lr(μv₁ + (1 − μ)U₁)/(1 − μ²) = θ₁ + μ(θ₁ − θ₀)/(1 + μ) − lr·U₁/(1 + μ)."""
    mu = 0.9
    x, y = _data(m=16)
    model = _mlp()
    w0 = _params(model)
    model.compile(optimizer=_kfac(momentum=mu, momentum_form=form), loss="sparse_categorical_crossentropy")
    model.train_on_batch(x[:8], y[:8])
    w1 = _params(model)
    first = ref.mlp_step(x[:8].astype(np.float64), y[:8], w0, LR, DAMPING, "eigen")
    model.train_on_batch(x[8:], y[8:])
    second = ref.mlp_step(x[8:].astype(np.float64), y[8:], w1, LR, DAMPING, "eigen")
    for layer, p0, p1, one, two in zip(model.layers, w0, w1, first, second):
        assert ref.rel_err(p1[0], one["kernel"]) < 2e-4  # the first step is −lr·U₀ in both forms
        if form == "heavy_ball":
            expected_kernel = p1[0] + mu * (p1[0] - p0[0]) - LR * two["update"][:-1]
        else:
            expected_kernel = p1[0] + mu * (p1[0] - p0[0]) / (1 + mu) - LR * two["update"][:-1] / (1 + mu)
        assert ref.rel_err(layer.kernel.numpy(), expected_kernel) < 2e-4


def test_average_momentum_cannot_go_with_the_quadratic_model():
    with pytest.raises(ValueError, match="momentum_form='heavy_ball'"):
        keras_kfac.KFAC(learning_rate=None, momentum_form="average")
    assert keras_kfac.KFAC(learning_rate=None).step_momentum_form == "heavy_ball"
    assert keras_kfac.KFAC().step_momentum_form == "average"


def test_damping_and_learning_rate_schedules():
    x, y = _data(m=16)
    damping = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    lr = keras.optimizers.schedules.PiecewiseConstantDecay([0], [LR, LR / 3])
    model = _mlp()
    opt = _kfac(damping=damping, learning_rate=lr)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    for step, (lam, rate) in enumerate([(0.1, LR), (0.05, LR / 3)]):
        assert abs(float(opt.damping) - lam) < 1e-7
        before = _params(model)
        batch = slice(8 * step, 8 * step + 8)
        expected = ref.mlp_step(x[batch].astype(np.float64), y[batch], before, rate, lam, "eigen")
        model.train_on_batch(x[batch], y[batch])
        for layer, exp in zip(model.layers, expected):
            assert ref.rel_err(layer.kernel.numpy(), exp["kernel"]) < 2e-4


def test_weight_decay_as_keras_does_it():
    x, y = _data()
    model = _mlp()
    before = _params(model)
    expected = ref.mlp_step(x.astype(np.float64), y, before, LR, DAMPING, "eigen")
    model.compile(optimizer=_kfac(weight_decay=0.1), loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    for layer, (k, _, _), exp in zip(model.layers, before, expected):
        decayed = k - LR * 0.1 * k
        assert ref.rel_err(layer.kernel.numpy(), decayed - LR * exp["update"][:-1]) < 2e-4


def test_statistics_and_inverses_only_on_their_steps():
    x, y = _data(m=32)
    model = _mlp()
    opt = keras_kfac.KFAC(learning_rate=0.05, stats_every=2, inverse_every=3, damping_mode="eigen")
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    name = model.layers[0].name
    history = []
    for step in range(6):
        model.train_on_batch(x[4 * step : 4 * step + 4], y[4 * step : 4 * step + 4])
        eig = [v for v in opt.variables if v.name == f"{name}_eigenvectors_a"][0]
        history.append((opt.factors()[name][0].numpy().copy(), eig.numpy().copy()))
    changed = lambda i, j: not np.array_equal(history[i][j], history[i - 1][j])  # noqa: E731
    assert [changed(i, 0) for i in range(1, 6)] == [False, True, False, True, False]  # stats at 0, 2, 4
    assert [changed(i, 1) for i in range(1, 6)] == [False, False, True, False, False]  # inverses at 0, 3
    assert int(opt._stats_updates.numpy()) == 3


def test_fallback_updates_layers_without_a_block():
    x, y = _data()
    model = keras_kfac.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    norm = model.layers[1]
    with keras.src.backend.tensorflow.core.tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x, training=True))
        loss = keras.ops.mean(loss)
    grads = tape.gradient(loss, norm.trainable_variables)
    before = [v.numpy().copy() for v in norm.trainable_variables]
    opt = _kfac(exclude=[norm.name])  # LayerNormalization has a block; keep it out
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    assert isinstance(opt.fallback_optimizer, keras.optimizers.SGD)
    for v, b, g in zip(norm.trainable_variables, before, grads):
        np.testing.assert_allclose(v.numpy(), b - LR * g.numpy(), rtol=1e-5, atol=1e-6)
    summary = model.kfac_summary(print_fn=None)
    assert norm.name in summary and "excluded" in summary and "fallback" in summary and summary.count("DenseBlock") == 2


def test_custom_fallback_optimizer():
    x, y = _data()
    model = keras_kfac.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    opt = _kfac(fallback="adam", exclude=lambda layer: isinstance(layer, keras.layers.BatchNormalization))
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    gamma = model.layers[1].gamma.numpy().copy()
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert isinstance(opt.fallback_optimizer, keras.optimizers.Adam)
    assert not np.array_equal(gamma, model.layers[1].gamma.numpy())
    assert int(opt.fallback_optimizer.iterations.numpy()) == 4
