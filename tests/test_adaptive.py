"""Quadratic model, exact Fisher products (its Gram matrix), automatic α/μ and Levenberg–Marquardt damping,
against dense float64 NumPy Fishers (Jacobians by central differences) and closed forms."""

import os

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf

import keras_kfac
from keras_kfac import damping as damping_lib
from keras_kfac import quadratic
from keras_kfac.datasets import DatasetNotFoundError, load_arrays
from keras_kfac.losses import resolve_loss
from keras_kfac.models import mlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSSES = {  # last activation, loss
    "softmax": ("softmax", "sparse_categorical_crossentropy"),
    "logits": (None, keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
    "sigmoid": ("sigmoid", "binary_crossentropy"),
    "mse": (None, "mean_squared_error"),
}


def _model(activation, seed=3):
    keras.utils.set_random_seed(seed)
    return keras_kfac.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3, activation=activation)]
    )


def _params(model):
    return [v.numpy().astype(np.float64) for v in model.trainable_weights]


def _unflatten(theta, shapes):
    out, start = [], 0
    for s in shapes:
        n = int(np.prod(s))
        out.append(theta[start : start + n].reshape(s))
        start += n
    return out


def _logits(theta, shapes, x):
    w1, b1, w2, b2 = _unflatten(theta, shapes)
    return np.tanh(x @ w1 + b1) @ w2 + b2


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _loss(theta, shapes, x, y, kind):
    z = _logits(theta, shapes, x)
    if kind in ("softmax", "logits"):
        return -np.mean(np.log(_softmax(z)[np.arange(len(y)), y]))
    raise NotImplementedError(kind)


def _two_steps(model, opt, x, y):
    """Compiles, takes two steps on the batch (x, y); returns the weight shapes, the flat weights
    before, between and after them, and the α, μ of the second step."""
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    shapes = [v.shape for v in model.trainable_weights]
    flat = lambda: np.concatenate([p.ravel() for p in _params(model)])  # noqa: E731
    theta0 = flat()
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)  # examples in order
    theta1 = flat()
    logs = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False).history
    return shapes, theta0, theta1, flat(), logs["learning_rate"][-1], logs["momentum"][-1]


def _gradient(theta, shapes, x, y, kind, eps=1e-6):
    """∇ of the mean loss by central differences (float64)."""
    grad = np.zeros_like(theta)
    for j in range(theta.size):
        e = np.zeros_like(theta)
        e[j] = eps
        grad[j] = (_loss(theta + e, shapes, x, y, kind) - _loss(theta - e, shapes, x, y, kind)) / (2 * eps)
    return grad


def _dense_fisher(theta, shapes, x, kind, coefficients=None):
    """F = Σ kᵢ Jᵢᵀ Hᵢ Jᵢ / m with J the Jacobian of the last layer's pre-activation (central
    differences) and kᵢ = m cᵢ the example's coefficient in the loss (1 by default)."""
    eps = 1e-6
    m, k = x.shape[0], 3
    jac = np.zeros((m, k, theta.size))
    for j in range(theta.size):
        e = np.zeros_like(theta)
        e[j] = eps
        jac[:, :, j] = (_logits(theta + e, shapes, x) - _logits(theta - e, shapes, x)) / (2 * eps)
    z = _logits(theta, shapes, x)
    fisher = np.zeros((theta.size, theta.size))
    for i in range(m):
        if kind in ("softmax", "logits"):
            p = _softmax(z[i : i + 1])[0]
            h = np.diag(p) - np.outer(p, p)
        elif kind == "sigmoid":
            p = 1 / (1 + np.exp(-z[i]))
            h = np.diag(p * (1 - p)) / k
        else:
            h = 2.0 / k * np.eye(k)
        fisher += (1.0 if coefficients is None else coefficients[i]) * jac[i].T @ h @ jac[i]
    return fisher / m


def _batch(model, x, kind, loss=None, sample_weight=None):
    return quadratic.BatchQuadratic(
        lambda: [model(x)],
        None,
        [resolve_loss(LOSSES[kind][1] if loss is None else loss)],
        model.trainable_weights,
        x.shape[0],
        sample_weight=sample_weight,
    )


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_gram_matches_dense_fisher(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4))
    model = _model(LOSSES[kind][0])
    shapes = [v.shape for v in model.trainable_weights]
    theta = np.concatenate([p.ravel() for p in _params(model)])
    fisher = _dense_fisher(theta, shapes, x, kind)
    v, w = rng.normal(size=theta.size), rng.normal(size=theta.size)
    batch = _batch(model, tf.constant(x, tf.float32), kind)
    tangents = [[tf.constant(p, tf.float32) for p in _unflatten(t, shapes)] for t in (v, w)]
    gram = batch.gram(tangents).numpy()
    expected = np.array([[v @ fisher @ v, v @ fisher @ w], [w @ fisher @ v, w @ fisher @ w]])
    np.testing.assert_allclose(gram, expected, rtol=2e-3, atol=1e-5 * np.abs(expected).max())
    # M(δ) for δ = 0.3 v − 0.7 w: ½ δᵀ(F + λI)δ + ∇ᵀδ
    lam, grad = 0.1, rng.normal(size=theta.size)
    delta = 0.3 * v - 0.7 * w
    damped = gram + lam * np.array([[v @ v, v @ w], [w @ v, w @ w]])
    value = quadratic.quadratic_value(
        tf.constant([0.3, -0.7]), tf.constant(damped, tf.float32), [grad @ v, grad @ w], lam
    )
    exact = 0.5 * delta @ (fisher + lam * np.eye(theta.size)) @ delta + grad @ delta
    np.testing.assert_allclose(value.numpy(), exact, rtol=1e-3)


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean_with_sample_weight"])
@pytest.mark.parametrize("kind", ["logits", "sigmoid"])
def test_gram_honours_sample_weight_and_reduction(kind, reduction):
    """F of L = Σ cᵢ ℓᵢ: with sample weights s, cᵢ = sᵢ/m ("sum_over_batch_size"), sᵢ ("sum") or
    sᵢ/Σs ("mean_with_sample_weight"); F is the dense Σ m cᵢ JᵢᵀHᵢJᵢ / m."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 4))
    weights = np.array([0.0, 1.0, 4.0, 0.5, 2.0, 1.0])
    model = _model(LOSSES[kind][0])
    shapes = [v.shape for v in model.trainable_weights]
    theta = np.concatenate([p.ravel() for p in _params(model)])
    c = {"sum_over_batch_size": weights / 6, "sum": weights, "mean_with_sample_weight": weights / weights.sum()}
    fisher = _dense_fisher(theta, shapes, x, kind, coefficients=6 * c[reduction])
    if kind == "logits":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    else:
        loss = keras.losses.BinaryCrossentropy(reduction=reduction)
    batch = _batch(model, tf.constant(x, tf.float32), kind, loss, tf.constant(weights, tf.float32))
    v, w = rng.normal(size=theta.size), rng.normal(size=theta.size)
    tangents = [[tf.constant(p, tf.float32) for p in _unflatten(t, shapes)] for t in (v, w)]
    gram = batch.gram(tangents).numpy()
    expected = np.array([[v @ fisher @ v, v @ fisher @ w], [w @ fisher @ v, w @ fisher @ w]])
    np.testing.assert_allclose(gram, expected, rtol=2e-3, atol=1e-5 * np.abs(expected).max())


def test_solve_step_is_the_two_by_two_solution():
    rng = np.random.default_rng(1)
    r = rng.normal(size=(2, 2))
    c = r @ r.T + 0.1 * np.eye(2)
    for b in ([-1.3, 1.0], [-1.3, 2.0], [-1.3, 0.4]):  # the free μ inside [0, 0.99], below it, above it
        b = np.array(b)
        free = np.linalg.solve(c, -b)
        alpha, mu = quadratic.solve_step(tf.constant(c, tf.float32), tf.constant(b, tf.float32))
        if 0.0 <= free[1] <= 0.99:
            np.testing.assert_allclose([alpha.numpy(), mu.numpy()], free, rtol=1e-4)
        else:
            assert mu.numpy() in (0.0, np.float32(0.99))
        np.testing.assert_allclose([alpha.numpy(), mu.numpy()], ref.step_coefficients(c, b), rtol=1e-4, atol=1e-4)
    free_mu = [np.linalg.solve(c, -np.array(b))[1] for b in ([-1.3, 1.0], [-1.3, 2.0], [-1.3, 0.4])]
    assert 0 < free_mu[0] < 0.99 and free_mu[1] < 0 and free_mu[2] > 0.99
    b = np.array([-1.3, 0.4])
    alpha, mu = quadratic.solve_step(tf.constant(c, tf.float32), tf.constant(b, tf.float32), momentum=0.5)
    np.testing.assert_allclose(alpha.numpy(), -(b[0] + 0.5 * c[0, 1]) / c[0, 0], rtol=1e-5)
    alpha, mu = quadratic.solve_step(tf.constant(c, tf.float32), tf.constant(b, tf.float32), learning_rate=0.2)
    np.testing.assert_allclose(mu.numpy(), np.clip(-(b[1] + 0.2 * c[0, 1]) / c[1, 1], 0.0, 0.99), rtol=1e-5)
    inside = tf.constant([-1.3, -1.0], tf.float32)
    alpha, mu = quadratic.solve_step(tf.constant(c, tf.float32), inside, learning_rate=0.2)
    np.testing.assert_allclose(mu.numpy(), -(-1.0 + 0.2 * c[0, 1]) / c[1, 1], rtol=1e-5)  # inside [0, 0.99]
    assert 0 < mu.numpy() < 0.99
    singular = np.array([[2.0, 0.0], [0.0, 0.0]])  # δ₀ = 0: α alone
    alpha, mu = quadratic.solve_step(tf.constant(singular, tf.float32), tf.constant([-1.0, 0.0]))
    assert (alpha.numpy(), mu.numpy()) == (0.5, 0.0)
    alpha, mu = quadratic.solve_step(tf.constant(c, tf.float32), tf.constant([1.0, 0.0]))  # not a descent direction
    assert (alpha.numpy(), mu.numpy()) == (0.0, 0.0)


@pytest.mark.parametrize(
    "curvature_batch_size, quadratic_gradient, graft",
    [(None, "batch", None), (6, "batch", None), (None, "halves", None), (None, "halves", "sgd")],
)
def test_chosen_alpha_and_momentum_minimize_the_dense_quadratic_model(curvature_batch_size, quadratic_gradient, graft):
    """Second step: δ = αΔ + μδ₀ with Δ = −(A ⊗ G + λI)⁻¹∇ from the optimizer's factors and a float64
    gradient, and (α, μ) the 2×2 solution for the dense float64 F + λI and ∇.  With
    `curvature_batch_size=6`, F is the Fisher of the batch's first 6 examples, ∇ still the whole
    batch's gradient.  With `quadratic_gradient="halves"` the system's first gradient term is
    −∇₂ᵀ(A ⊗ G + λI)⁻¹∇₁, ∇₁ and ∇₂ the gradients of the batch's first and last 4 examples; with
    `graft="sgd"` each layer's Δ and term are scaled by ‖∇‖ / ‖(A ⊗ G + λI)⁻¹∇‖ of that layer."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.integers(0, 3, size=8)
    if quadratic_gradient == "halves":  # labels the two halves agree on, so that their term is a descent
        y = np.argmax(x[:, :3], axis=1)
    model = _model("softmax")
    lam = 0.05
    opt = keras_kfac.KFAC(
        learning_rate=None,
        momentum=None,
        damping=lam,
        stats_every=1,
        inverse_every=1,
        damping_mode="eigen",
        graft=graft,
        curvature_batch_size=curvature_batch_size,
        quadratic_gradient=quadratic_gradient,
        polynomial_averaging=None,  # the weights after the step, not their average
    )
    shapes, theta0, theta1, theta2, alpha, mu = _two_steps(model, opt, x, y)
    assert alpha != 0 and mu != 0
    prev, delta = theta1 - theta0, theta2 - theta1
    x64 = x.astype(np.float64)
    grad = _gradient(theta1, shapes, x64, y, "softmax")
    # Δ independently: each layer's [kernel; bias] gradient matrix through the damped Kronecker solve
    # with the factors the second step used (statistics and inverses every step).

    def solve(gradient):
        """Per layer, its slice of the flat weights and (A ⊗ G + λI)⁻¹ of that slice of `gradient`."""
        w1, b1, w2, b2 = _unflatten(gradient, shapes)
        out, start = [], 0
        for layer, (kernel, bias) in zip(model.layers, [(w1, b1), (w2, b2)]):
            a, g = (f.numpy().astype(np.float64) for f in opt.factors()[layer.name])
            u = ref.kron_solve(a, g, np.concatenate([kernel, bias[None]]), lam, "eigen")
            part = slice(start, start + u.size)
            out.append((part, np.concatenate([u[:-1].ravel(), u[-1].ravel()])))
            start += u.size
        return out

    scale = {p.start: 1.0 if graft is None else np.linalg.norm(grad[p]) / np.linalg.norm(u) for p, u in solve(grad)}
    direction = -np.concatenate([scale[p.start] * u for p, u in solve(grad)])
    np.testing.assert_allclose(delta, alpha * direction + mu * prev, rtol=2e-3, atol=1e-6 * np.abs(delta).max())
    first, second = (_gradient(theta1, shapes, x64[part], y[part], "softmax") for part in (slice(4), slice(4, 8)))
    halves_term = -sum(scale[p.start] * second[p] @ u for p, u in solve(first))

    def solution(examples, gradient_term):
        c = _dense_fisher(theta1, shapes, examples, "softmax") + lam * np.eye(theta1.size)
        system = np.array([[direction @ c @ direction, direction @ c @ prev], [prev @ c @ direction, prev @ c @ prev]])
        return ref.step_coefficients(system, [gradient_term, grad @ prev])

    term = grad @ direction if quadratic_gradient == "batch" else halves_term
    chosen = solution(x64 if curvature_batch_size is None else x64[:curvature_batch_size], term)
    np.testing.assert_allclose(chosen, [alpha, mu], rtol=2e-2, atol=1e-4)
    if curvature_batch_size is not None:  # and not what the whole batch's F gives
        assert np.max(np.abs(solution(x64, term) - chosen) / np.abs(chosen)) > 0.1
    if quadratic_gradient == "halves":  # and not what the batch gradient gives
        assert halves_term > grad @ direction  # the batch's own noise is gone from it
        assert np.max(np.abs(solution(x64, grad @ direction) - chosen) / np.abs(chosen)) > 0.1


def test_lm_rule_closed_form():
    omega = 0.95**5
    for rho, factor in ((0.9, omega), (0.5, 1.0), (0.1, 1 / omega), (-np.inf, 1 / omega)):
        np.testing.assert_allclose(
            damping_lib.lm_update(2.0, tf.constant(rho, tf.float32), 5, 1e-8, 1e8), 2.0 * factor, rtol=1e-6
        )
    assert damping_lib.lm_update(1.0, tf.constant(0.9), 5, 0.99, 10.0).numpy() == pytest.approx(0.99)
    np.testing.assert_allclose(damping_lib.reduction_ratio(2.0, 1.5, -1.0).numpy(), 0.5)
    assert damping_lib.reduction_ratio(2.0, 1.5, 0.1).numpy() == -np.inf


def _linear_problem():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 2)) + 0.1 * rng.normal(size=(32, 2))).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras_kfac.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    return model, x, y


def test_damping_falls_on_a_quadratic_problem():
    """Linear model + MSE: M is the loss itself up to λ, so ρ ≈ 1 and λ ← ω λ at every adaptation."""
    model, x, y = _linear_problem()
    lam, steps = 1e-3, 4
    opt = keras_kfac.KFAC(learning_rate=None, momentum=None, adapt_damping=True, damping=lam, damping_every=1)
    model.compile(optimizer=opt, loss="mse")
    logs = model.fit(x, y, batch_size=32, epochs=steps, verbose=0).history
    assert all(r > 0.75 for r in logs["rho"]), logs["rho"]
    np.testing.assert_allclose(logs["damping"], lam * 0.95 ** np.arange(1, steps + 1), rtol=1e-5)
    assert logs["loss"][-1] < 0.1 * logs["loss"][0]


def test_damping_rises_when_steps_overshoot():
    model, x, y = _linear_problem()
    lam, steps = 1e-3, 3
    opt = keras_kfac.KFAC(
        learning_rate=30.0, momentum=0.0, adapt_damping=True, damping=lam, damping_every=1, graft="sgd"
    )
    model.compile(optimizer=opt, loss="mse")
    logs = model.fit(x, y, batch_size=32, epochs=steps, verbose=0).history
    assert all(r < 0.25 for r in logs["rho"]), logs["rho"]
    np.testing.assert_allclose(logs["damping"], lam / 0.95 ** np.arange(1, steps + 1), rtol=1e-5)


def test_adaptive_kfac_trains_fashion_mnist_mlp_without_tuning(monkeypatch):
    monkeypatch.setenv("KERAS_KFAC_NO_TFDS", "1")
    arrays = None
    for candidate in (os.path.join(ROOT, "..", "shared", "data", "fashion_mnist"), "/usr/share/datasets/fashion-mnist"):
        try:
            arrays = load_arrays("fashion_mnist", candidate if os.path.isdir(candidate) else None)
            break
        except DatasetNotFoundError:
            continue
    if arrays is None:
        pytest.skip("Fashion-MNIST not found (install it with `apt-get install dataset-fashion-mnist`).")
    (x_train, y_train), (x_test, y_test) = arrays
    x_train = x_train[:3072].astype("float32") / 255.0
    x_test = x_test[:1000].astype("float32") / 255.0
    keras.utils.set_random_seed(0)
    model = mlp()
    opt = keras_kfac.KFAC(learning_rate=None, momentum=None, adapt_damping=True)  # untuned: λ₀ from the factors
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    logs = model.fit(x_train, y_train[:3072], batch_size=256, epochs=5, verbose=0).history
    assert logs["loss"][-1] < 0.6 * logs["loss"][0]
    assert model.evaluate(x_test, y_test[:1000], verbose=0)[1] > 0.6  # chance is 0.1


def test_adapt_every_reuses_the_last_chosen_step_size_and_momentum():
    """adapt_every=3: α, μ are chosen on steps 0, 3, 6 and reused on the steps between; every
    step of adapt_every=1 chooses afresh, so its second step differs."""
    logs = {}
    for every in (1, 3):
        model, x, y = _linear_problem()
        opt = keras_kfac.KFAC(learning_rate=None, momentum=None, damping=1e-2, adapt_every=every)
        model.compile(optimizer=opt, loss="mse")
        logs[every] = model.fit(x, y, batch_size=32, epochs=7, verbose=0).history
        assert opt.get_config()["adapt_every"] == every
    alpha, mu = np.array(logs[3]["learning_rate"]), np.array(logs[3]["momentum"])
    np.testing.assert_allclose(alpha[0], logs[1]["learning_rate"][0], rtol=1e-6)
    for start in (0, 3):
        reused = [float(v) for v in quadratic.reusable_step(alpha[start], mu[start])]
        np.testing.assert_allclose(alpha[start + 1 : start + 3], reused[0], rtol=1e-7)
        np.testing.assert_allclose(mu[start + 1 : start + 3], reused[1], rtol=1e-7)
    assert alpha[3] != alpha[0] and alpha[6] != alpha[3]
    assert logs[1]["learning_rate"][1] != logs[1]["learning_rate"][0]
    with pytest.raises(ValueError, match="adapt_every"):
        keras_kfac.KFAC(learning_rate=None, adapt_every=0)


@pytest.mark.parametrize(
    "chosen, reused",
    [((0.3, 0.5), (0.3, 0.5)), ((-0.5, 10.5), (0.0, 0.99)), ((0.1, -0.2), (0.1, 0.0)), ((2.0, 1.0), (2.0, 0.99))],
)
def test_reused_step_size_and_momentum_are_clipped_to_a_bounded_heavy_ball(chosen, reused):
    """Between two choices α ≥ 0 and 0 ≤ μ ≤ 0.99 are repeated: a μ = 10 chosen once and
    repeated over adapt_every steps would multiply the velocity by 10 on each of them."""
    np.testing.assert_allclose([float(v) for v in quadratic.reusable_step(*chosen)], reused, rtol=1e-7)


def test_halves_on_a_batch_of_one_example_take_the_batch_term():
    """One example has no two halves: `quadratic_gradient="halves"` then takes the same steps as
    "batch" (same weights after three steps of one example each), and on larger batches not."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 4)).astype("float32")
    y = rng.integers(0, 3, size=6)

    def weights_after(quadratic_gradient, batch_size):
        model = _model("softmax")
        opt = keras_kfac.KFAC(
            learning_rate=None, momentum=None, damping=0.05, stats_every=1, inverse_every=1,
            quadratic_gradient=quadratic_gradient, polynomial_averaging=None,
        )  # fmt: skip
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
        model.fit(x[: 3 * batch_size], y[: 3 * batch_size], batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
        return np.concatenate([p.ravel() for p in _params(model)])

    np.testing.assert_array_equal(weights_after("halves", 1), weights_after("batch", 1))
    assert np.max(np.abs(weights_after("halves", 2) - weights_after("batch", 2))) > 1e-4
