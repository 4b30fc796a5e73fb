"""keras_kfac.losses against float64 references built from Keras' own compiled loss.

L is computed by Keras' `CompileLoss` (what `model.compile(loss=..., loss_weights=...)` builds)
in float64, with sample weights and reductions; its Hessian in the outputs comes from nested
GradientTapes, one block per example (the blocks between examples must vanish). The sampler's
E[g gᵀ] is computed exactly: its random draw is replaced by every outcome in turn (all classes,
all Bernoulli patterns, or the basis vectors for the Gaussian of MSE), weighted by the outcome's
probability. Both must equal m·(Hessian block of L), and so must `fisher_product`. For probability
outputs the comparison is made in the logits z (y_pred = softmax(z) or sigmoid(z)), the
preactivation K-FAC sees: Jᵀ E[g gᵀ] J against the Hessian of L(softmax(z)) in z.
"""

import copy
import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.losses.losses import LossFunctionWrapper
from keras.src.trainers.compile_utils import CompileLoss

from keras_kfac import losses as kl

M, D = 5, 3
WEIGHTS = np.array([1.0, 0.0, 4.0, 0.5, 2.0])


@pytest.fixture
def float64():
    saved = keras.backend.floatx()
    keras.backend.set_floatx("float64")
    try:
        yield
    finally:
        keras.backend.set_floatx(saved)


def _compiled(loss, loss_weights=None, names=("out",)):
    return CompileLoss(loss, loss_weights, output_names=list(names))


def _hessian_blocks(total, z, transform=None):
    """Per-example Hessian blocks (m, d, d) of total(transform(z)) in z; asserts the cross-example blocks vanish."""
    z = tf.constant(z, tf.float64)
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(z)
        with tf.GradientTape() as inner:
            inner.watch(z)
            value = total(z if transform is None else transform(z))
        grad = inner.gradient(value, z)
    full = outer.jacobian(grad, z, experimental_use_pfor=False).numpy()  # (m, d, m, d)
    m = z.shape[0]
    blocks = np.stack([full[i, :, i, :] for i in range(m)])
    off = full.copy()
    for i in range(m):
        off[i, :, i, :] = 0.0
    assert np.abs(off).max() < 1e-12 * max(1.0, np.abs(full).max())
    return blocks


def _exact_second_moment(output_loss, y_pred, y_true, sample_weight, outcomes):
    """Σ_outcomes P(outcome)_i g_i g_iᵀ with g = sample_output_gradients at that outcome."""
    total = 0.0
    for draw, prob in outcomes:
        patched = copy.copy(output_loss)
        patched.draw = lambda y, seed, draw=draw: tf.constant(draw, y.dtype if draw.dtype.kind == "f" else tf.int32)
        g = patched.sample_output_gradients(tf.constant(y_pred), y_true, sample_weight, seed=[0, 0]).numpy()
        total = total + prob[:, None, None] * np.einsum("ij,ik->ijk", g, g)
    return total


def _categorical_outcomes(p):
    return [(np.full(p.shape[0], k, np.int32), p[:, k]) for k in range(p.shape[1])]


def _bernoulli_outcomes(p):
    out = []
    for bits in itertools.product([0.0, 1.0], repeat=p.shape[1]):
        b = np.tile(np.array(bits), (p.shape[0], 1))
        out.append((b, np.prod(np.where(b == 1.0, p, 1.0 - p), axis=1)))
    return out


def _gaussian_basis(shape):
    """E[g gᵀ] of a g linear in ε ~ N(0, I) is Σ_j g(e_j) g(e_j)ᵀ."""
    return [(np.tile(np.eye(shape[1])[j], (shape[0], 1)), np.ones(shape[0])) for j in range(shape[1])]


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _pull_back(second_moment, jacobians):
    return np.einsum("iab,iac,icd->ibd", jacobians, second_moment, jacobians)


def _jacobians(transform, z):
    z = tf.constant(z, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(z)
        y = transform(z)
    return tape.batch_jacobian(y, z).numpy()  # (m, d_out, d_in)


def _fisher_product_blocks(output_loss, y_pred, y_true, sample_weight):
    """The (m, d, d) matrices with columns fisher_product(e_j)."""
    cols = []
    for j in range(y_pred.shape[1]):
        u = np.tile(np.eye(y_pred.shape[1])[j], (y_pred.shape[0], 1))
        cols.append(output_loss.fisher_product(tf.constant(y_pred), y_true, sample_weight, tf.constant(u)).numpy())
    return np.stack(cols, axis=-1)


def _check(keras_loss, y_true, z, sample_weight, outcomes_fn, transform=None, rtol=1e-6):
    """E[g gᵀ] and fisher_product against m × the Hessian blocks of Keras' compiled loss (in z)."""
    compiled = _compiled(keras_loss)
    sw = None if sample_weight is None else tf.constant(sample_weight, tf.float64)
    yt = tf.constant(y_true)
    blocks = _hessian_blocks(lambda y: compiled(yt, y, sw), z, transform)
    output_loss = kl.resolve_loss(keras_loss)
    y_pred = z if transform is None else transform(tf.constant(z, tf.float64)).numpy()
    second = _exact_second_moment(output_loss, y_pred, yt, sw, outcomes_fn(y_pred))
    product = _fisher_product_blocks(output_loss, y_pred, yt, sw)
    if transform is not None:
        jac = _jacobians(transform, z)
        second, product = _pull_back(second, jac), _pull_back(product, jac)
    m = z.shape[0]
    scale = np.abs(blocks).max() * m
    np.testing.assert_allclose(second, m * blocks, rtol=rtol, atol=1e-9 * scale)
    np.testing.assert_allclose(product, m * blocks, rtol=rtol, atol=1e-9 * scale)
    return blocks


REDUCTIONS = ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight"]


def _data(seed=0, classes=D):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(M, classes))
    labels = rng.integers(0, classes, size=M)
    return rng, z, labels


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_sparse_categorical_from_logits_matches_keras_hessian(float64, reduction, weighted):
    _, z, labels = _data()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction, dtype="float64")
    _check(loss, labels, z, WEIGHTS if weighted else None, lambda y: _categorical_outcomes(_softmax(y)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sparse_categorical_from_probabilities_matches_keras_hessian_in_the_logits(float64, reduction):
    _, z, labels = _data(1)
    loss = keras.losses.SparseCategoricalCrossentropy(reduction=reduction, dtype="float64")
    _check(loss, labels, z, WEIGHTS, lambda y: _categorical_outcomes(y), transform=tf.nn.softmax, rtol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_fisher_is_the_expected_keras_hessian_over_the_models_labels(float64, reduction):
    """In ŷ itself: E[g gᵀ] = Σ_k p_k · m · (Hessian block of Keras' loss at label k)."""
    _, z, _ = _data(2)
    p = _softmax(z)
    loss = keras.losses.SparseCategoricalCrossentropy(reduction=reduction, dtype="float64")
    compiled, sw = _compiled(loss), tf.constant(WEIGHTS)
    expected = 0.0
    for k in range(D):
        labels = tf.constant(np.full(M, k))
        expected = expected + p[:, k, None, None] * _hessian_blocks(lambda y, t=labels: compiled(t, y, sw), p)
    output_loss = kl.resolve_loss(loss)
    second = _exact_second_moment(output_loss, p, None, sw, _categorical_outcomes(p))
    np.testing.assert_allclose(second, M * expected, rtol=1e-6)
    np.testing.assert_allclose(_fisher_product_blocks(output_loss, p, None, sw), M * expected, rtol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("from_logits", [True, False])
def test_ignore_class_examples_have_no_curvature_and_leave_the_mean(float64, reduction, from_logits):
    """Keras zeroes and masks the ignored examples (the mean divides by the valid ones only)."""
    _, z, labels = _data(3)
    labels[[1, 3]] = 7  # ignored (one of them has weight 0.5)
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=from_logits, ignore_class=7, reduction=reduction, dtype="float64"
    )
    blocks = _check(
        loss,
        labels,
        z,
        WEIGHTS,
        lambda y: _categorical_outcomes(_softmax(y) if from_logits else y),
        transform=None if from_logits else tf.nn.softmax,
        rtol=1e-5,
    )
    assert np.all(blocks[[1, 3]] == 0.0) and np.abs(blocks[[0, 4]]).min() > 0


def test_ignore_class_without_labels_is_a_clear_error():
    loss = kl.resolve_loss(keras.losses.SparseCategoricalCrossentropy(ignore_class=0))
    with pytest.raises(ValueError, match="ignore_class.*labels"):
        loss.sample_output_gradients(tf.ones((2, 3)) / 3, None, None, seed=[0, 0])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum"])
def test_categorical_with_label_smoothing_from_logits(float64, label_smoothing, reduction):
    """The Hessian in the logits does not depend on (smoothed) targets that sum to 1."""
    _, z, labels = _data(4)
    loss = keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=label_smoothing, reduction=reduction, dtype="float64"
    )
    _check(loss, np.eye(D)[labels], z, WEIGHTS, lambda y: _categorical_outcomes(_softmax(y)))


def test_categorical_soft_targets(float64):
    rng, z, _ = _data(5)
    targets = rng.dirichlet(np.ones(D), size=M)  # e.g. distillation
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1, dtype="float64")
    _check(loss, targets, z, WEIGHTS, lambda y: _categorical_outcomes(_softmax(y)))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_categorical_with_label_smoothing_from_probabilities_in_the_logits(float64, label_smoothing):
    _, z, labels = _data(6)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing, reduction="sum", dtype="float64")
    _check(loss, np.eye(D)[labels], z, WEIGHTS, lambda y: _categorical_outcomes(y), tf.nn.softmax, rtol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("from_logits", [True, False])
def test_binary_crossentropy_matches_keras_hessian(float64, reduction, label_smoothing, from_logits):
    rng, z, _ = _data(7)
    targets = rng.integers(0, 2, size=(M, D)).astype("float64")
    loss = keras.losses.BinaryCrossentropy(
        from_logits=from_logits, label_smoothing=label_smoothing, reduction=reduction, dtype="float64"
    )
    outcomes = lambda y: _bernoulli_outcomes(_sigmoid(y) if from_logits else y)  # noqa: E731
    _check(loss, targets, z, WEIGHTS, outcomes, transform=None if from_logits else tf.sigmoid, rtol=1e-5)


@pytest.mark.parametrize("loss", ["mse", "mean_squared_error", "MeanSquaredError", *REDUCTIONS])
def test_mean_squared_error_matches_keras_hessian(float64, loss):
    """Names (default reduction) and MeanSquaredError objects with each reduction."""
    rng, z, _ = _data(8)
    if loss in REDUCTIONS:
        loss = keras.losses.MeanSquaredError(reduction=loss, dtype="float64")
    _check(loss, rng.normal(size=(M, D)), z, WEIGHTS, lambda y: _gaussian_basis(y.shape))


def test_class_weight_reaches_train_step_as_sample_weight():
    """fit(class_weight=...) is turned into sample_weight before train_step, so the Fisher needs
    no class-weight handling of its own."""
    seen = []

    class Recorder(keras.Model):
        def train_step(self, data):
            seen.append(keras.utils.unpack_x_y_sample_weight(data)[2].numpy())
            return super().train_step(data)

    inputs = keras.Input((2,))
    model = Recorder(inputs, keras.layers.Dense(3)(inputs))
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)
    y = np.array([0, 1, 2, 1])
    model.fit(np.zeros((4, 2)), y, class_weight={0: 0.5, 1: 3.0, 2: 1.0}, batch_size=4, shuffle=False, verbose=0)
    np.testing.assert_array_equal(seen[0], [0.5, 3.0, 1.0, 3.0])


def test_several_outputs_each_times_its_loss_weight(float64):
    """L = Σ_o w_o L_o (Keras' CompileLoss): each output's blocks are w_o times its own loss's."""
    rng, z, labels = _data(9)
    r = rng.normal(size=(M, 2))
    loss = {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64"), "reg": "mse"}
    weights = {"cls": 0.3, "reg": 2.5}
    compiled = _compiled(loss, weights, names=("cls", "reg"))
    y_true = {"cls": tf.constant(labels), "reg": tf.constant(rng.normal(size=(M, 2)))}
    sw = tf.constant(WEIGHTS)
    outputs = kl.resolve_losses(loss, weights, ["cls", "reg"])
    for name, value, other, outcomes, output_loss in (
        ("cls", z, r, _categorical_outcomes(_softmax(z)), outputs[0]),
        ("reg", r, z, _gaussian_basis(r.shape), outputs[1]),
    ):
        other_name = "reg" if name == "cls" else "cls"

        def total(y, name=name, other=other, other_name=other_name):
            return compiled(y_true, {name: y, other_name: tf.constant(other)}, sw)

        blocks = _hessian_blocks(total, value)
        second = _exact_second_moment(output_loss, value, y_true[name], sw, outcomes)
        np.testing.assert_allclose(second, M * blocks, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(
            _fisher_product_blocks(output_loss, value, y_true[name], sw), M * blocks, rtol=1e-6, atol=1e-12
        )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore", [False, True])
def test_empirical_gradients_are_per_example_gradients_times_sqrt_coefficients(float64, reduction, ignore):
    """∂L/∂ŷ_i = c_i ∇ℓ_i in Keras; empirical_output_gradients turns it into √(m c_i) ∇ℓ_i and
    example_coefficients gives m c_i (checked through k_i ∇ℓ_i = m ∂L/∂ŷ_i)."""
    _, z, labels = _data(10)
    if ignore:
        labels[2] = 9
    options = dict(from_logits=True, ignore_class=9 if ignore else None, dtype="float64")
    loss = keras.losses.SparseCategoricalCrossentropy(reduction=reduction, **options)
    per_example = keras.losses.SparseCategoricalCrossentropy(reduction=None, **options)
    compiled, yt, sw = _compiled(loss), tf.constant(labels), tf.constant(WEIGHTS)
    y = tf.constant(z)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(y)
        total = compiled(yt, y, sw)
        values = tf.reduce_sum(per_example(yt, y))
    batch_grad, example_grads = tape.gradient(total, y).numpy(), tape.gradient(values, y).numpy()
    output_loss = kl.resolve_loss(loss)
    k = output_loss.example_coefficients(yt, sw, M, dtype=tf.float64).numpy()
    np.testing.assert_allclose(k[:, None] * example_grads, M * batch_grad, rtol=1e-10, atol=1e-14)
    assert np.all(k >= 0) and k[1] == 0.0 and (not ignore or k[2] == 0.0)
    g = output_loss.empirical_output_gradients(tf.constant(batch_grad), yt, sw).numpy()
    np.testing.assert_allclose(g, np.sqrt(k)[:, None] * example_grads, rtol=1e-10, atol=1e-14)
    assert np.all(g[k == 0] == 0.0)


def test_coefficients_of_each_reduction_in_closed_form():
    """k_i = m c_i: s_i ("sum_over_batch_size", "mean"), m s_i ("sum"), m s_i / Σs
    ("mean_with_sample_weight"), times the loss weight; without weights 1, m, 1."""
    s = tf.constant(WEIGHTS, tf.float32)
    expected = {
        "sum_over_batch_size": WEIGHTS,
        "mean": WEIGHTS,
        "sum": M * WEIGHTS,
        "mean_with_sample_weight": M * WEIGHTS / WEIGHTS.sum(),
    }
    for reduction, k in expected.items():
        loss = kl.resolve_loss(keras.losses.MeanSquaredError(reduction=reduction), weight=0.5)
        np.testing.assert_allclose(loss.example_coefficients(None, s, M).numpy(), 0.5 * k, rtol=1e-6)
        unweighted = loss.example_coefficients(None, None, M).numpy()
        np.testing.assert_allclose(unweighted, np.full(M, 0.5 * (M if reduction == "sum" else 1.0)), rtol=1e-6)


def test_sampled_draws_follow_the_predictive_distribution():
    """Monte Carlo over seeds: the mean of g gᵀ of sample_output_gradients approaches m c_i H_i."""
    rng = np.random.default_rng(11)
    z = rng.normal(size=(2, D)).astype("float32")
    sw = tf.constant([1.0, 3.0])
    cases = [
        (keras.losses.SparseCategoricalCrossentropy(from_logits=True), z),
        (keras.losses.BinaryCrossentropy(), _sigmoid(z).astype("float32")),
        (keras.losses.MeanSquaredError(reduction="sum"), z),
    ]
    for keras_loss, y_pred in cases:
        output_loss = kl.resolve_loss(keras_loss)
        tiled = tf.constant(np.tile(y_pred, (4000, 1)))
        k = np.tile(output_loss.example_coefficients(None, sw, 2).numpy(), 4000)
        g = output_loss.sample_output_gradients(tiled, None, None, seed=[3, 4], coefficients=k).numpy()
        second = np.einsum("ij,ik->ijk", g, g).reshape(4000, 2, D, D).mean(axis=0)
        expected = _fisher_product_blocks(output_loss, y_pred, None, sw)
        np.testing.assert_allclose(second, expected, atol=0.06 * np.abs(expected).max())


class TenTimes(keras.losses.SparseCategoricalCrossentropy):
    def call(self, y_true, y_pred):
        return 10.0 * super().call(y_true, y_pred)


def _ten_times_fn(y_true, y_pred):
    return 10.0 * keras.losses.sparse_categorical_crossentropy(y_true, y_pred)


@pytest.mark.parametrize(
    "loss",
    [
        TenTimes(),
        keras.losses.BinaryFocalCrossentropy(),
        keras.losses.CategoricalFocalCrossentropy(),
        "mean_absolute_error",
        "crossentropy",
        _ten_times_fn,
        LossFunctionWrapper(_ten_times_fn),
    ],
    ids=["overridden-call", "binary-focal", "categorical-focal", "mae", "ambiguous-name", "function", "wrapper"],
)
def test_unknown_or_modified_losses_are_a_clear_error(loss):
    with pytest.raises(ValueError, match="fisher='empirical'.*register_loss"):
        kl.resolve_loss(loss)


def test_overriding_dunder_call_is_detected_too():
    class Doubled(keras.losses.MeanSquaredError):
        def __call__(self, y_true, y_pred, sample_weight=None):
            return 2.0 * super().__call__(y_true, y_pred, sample_weight)

    with pytest.raises(ValueError, match="Doubled overrides __call__"):
        kl.resolve_loss(Doubled())


class TenTimesLoss(kl.SparseCategoricalCrossentropyLoss):
    """ℓ = 10 · cross-entropy: H and s scale by 10 and √10."""

    def unit_gradients(self, y_pred, draw):
        return 10.0**0.5 * super().unit_gradients(y_pred, draw)

    def hessian_product(self, y_pred, u):
        return 10.0 * super().hessian_product(y_pred, u)


def test_registered_losses_are_resolved_and_match_keras(float64):
    """register_loss for a Loss subclass and for a function; the subclass's own Hessian is checked."""
    try:
        kl.register_loss(TenTimes, TenTimesLoss)
        kl.register_loss(_ten_times_fn, TenTimesLoss)
        assert type(kl.resolve_loss(_ten_times_fn)) is TenTimesLoss
        resolved = kl.resolve_loss(TenTimes(from_logits=True))
        assert type(resolved) is TenTimesLoss and resolved.from_logits
        _, z, labels = _data(12)
        loss = TenTimes(from_logits=True, reduction="sum", dtype="float64")
        _check(loss, labels, z, WEIGHTS, lambda y: _categorical_outcomes(_softmax(y)))
    finally:
        kl._REGISTRY.pop(TenTimes, None)
        kl._REGISTRY.pop(_ten_times_fn, None)
    with pytest.raises(TypeError, match="OutputLoss"):
        kl.register_loss(_ten_times_fn, object)


def test_resolve_losses_follows_compile_conventions():
    out = kl.resolve_losses({"b": "mse", "a": "binary_crossentropy"}, {"b": 2.0}, ["a", "b", "c"])
    assert [type(o) for o in out] == [kl.BinaryCrossentropyLoss, kl.MeanSquaredErrorLoss, kl.NoLoss]
    assert [o.weight for o in out[:2]] == [1.0, 2.0]
    out = kl.resolve_losses(keras.losses.CategoricalCrossentropy(from_logits=True), [0.5, 3.0], ["x", "y"])
    assert [o.weight for o in out] == [0.5, 3.0] and all(o.from_logits for o in out)
    with pytest.raises(ValueError, match="2 losses for 3 outputs"):
        kl.resolve_losses(["mse", "mse"], None, ["a", "b", "c"])


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_per_position_sampling_of_sequence_outputs_matches_keras_hessian(float64, reduction, masked):
    """Outputs (m, T, C): every position is drawn on its own; with a Keras mask (padding) and
    sample weights, E[g gᵀ] per example is m × the Hessian block of Keras' loss in the logits."""
    rng = np.random.default_rng(7)
    m, steps, classes = 4, 3, 3
    z = rng.normal(size=(m, steps * classes))
    y_true = rng.integers(0, classes, size=(m, steps))
    sw = np.array([[1.0], [0.5], [2.0], [0.0]])  # Keras needs (m, 1) to broadcast over the positions
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], bool) if masked else None
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    compiled = _compiled(loss)

    def with_mask(flat):
        y = tf.reshape(flat, (m, steps, classes))
        if mask is not None:
            y._keras_mask = tf.constant(mask)
        return y

    hessian = _hessian_blocks(lambda y: compiled(tf.constant(y_true), y, sample_weight=tf.constant(sw)), z, with_mask)
    output_loss = kl.resolve_loss(loss)
    y_pred = z.reshape(m, steps, classes)
    p = _softmax(y_pred)
    expected = np.zeros((m, steps * classes, steps * classes))
    for c in range(classes):
        patched = copy.copy(output_loss)
        patched.draw = lambda y, seed, c=c: tf.fill(tf.shape(y)[:-1], c)
        g = patched.sample_output_gradients(
            tf.constant(y_pred), tf.constant(y_true), tf.constant(sw), seed=[0, 0],
            output_mask=None if mask is None else tf.constant(mask),
        ).numpy()  # fmt: skip
        for t in range(steps):
            block = slice(t * classes, (t + 1) * classes)
            expected[:, block, block] += p[:, t, c][:, None, None] * np.einsum("ij,ik->ijk", g[:, t], g[:, t])
    np.testing.assert_allclose(expected, m * hessian, rtol=1e-6, atol=1e-12)
    # The quadratic model's product agrees with it.
    product = np.stack(
        [
            output_loss.fisher_product(
                tf.constant(y_pred),
                tf.constant(y_true),
                tf.constant(sw),
                tf.constant(np.eye(steps * classes)[j].reshape(1, steps, classes).repeat(m, 0)),
                output_mask=None if mask is None else tf.constant(mask),
            ).numpy().reshape(m, -1)
            for j in range(steps * classes)
        ],
        axis=-1,
    )  # fmt: skip
    np.testing.assert_allclose(product, m * hessian, rtol=1e-6, atol=1e-12)
