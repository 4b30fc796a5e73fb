"""fisher="sampled": over many draws, G of the output layer approaches the loss Hessian
averaged over examples (closed forms below), within sampling error."""

import keras
import numpy as np
import pytest
import reference as ref

import keras_kfac

M, STEPS = 32, 400  # 12,800 draws: sampling error of an entry is below ~0.004 here


def _sampled_g(activation, loss, units=4, labels=None, fisher="sampled", steps=STEPS, **fit_kwargs):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(M, 3)).astype("float32")
    layer = keras.layers.Dense(units, activation=activation)
    model = keras_kfac.Sequential([keras.Input((3,)), layer])
    opt = keras_kfac.KFAC(
        learning_rate=0.0,
        momentum=0.0,
        stats_decay=0.999999,
        stats_every=1,
        stats_batch_size=None,
        inverse_every=10**6,
        fisher=fisher,
    )
    model.compile(optimizer=opt, loss=loss)
    y = labels(rng) if labels else rng.integers(0, units, size=M)
    if "sample_weight" in fit_kwargs:
        fit_kwargs["sample_weight"] = np.tile(fit_kwargs["sample_weight"], steps)
    model.fit(
        np.tile(x, (steps, 1)),
        np.tile(y, (steps,) + (1,) * (y.ndim - 1)),
        batch_size=M,
        shuffle=False,
        verbose=0,
        **fit_kwargs,
    )
    z = x.astype(np.float64) @ layer.kernel.numpy() + layer.bias.numpy()
    return opt.factors()[layer.name][1].numpy(), z


def _categorical_hessian(z):
    p = ref.softmax(z)
    return np.mean([np.diag(pi) - np.outer(pi, pi) for pi in p], axis=0)


@pytest.mark.parametrize(
    "activation, loss",
    [
        ("softmax", "sparse_categorical_crossentropy"),
        (None, keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
    ],
    ids=["probabilities", "logits"],
)
def test_sampled_softmax_g_matches_closed_form(activation, loss):
    g, z = _sampled_g(activation, loss)
    expected = _categorical_hessian(z)
    assert np.abs(g - expected).max() < 0.012, np.abs(g - expected).max()


def test_sampled_one_hot_categorical():
    labels = lambda rng: np.eye(4)[rng.integers(0, 4, size=M)]  # noqa: E731
    g, z = _sampled_g("softmax", keras.losses.CategoricalCrossentropy(), labels=labels)
    assert np.abs(g - _categorical_hessian(z)).max() < 0.012


@pytest.mark.parametrize("from_logits", [False, True])
def test_sampled_binary_g_is_loss_hessian(from_logits):
    labels = lambda rng: rng.integers(0, 2, size=(M, 4)).astype("float32")  # noqa: E731
    loss = keras.losses.BinaryCrossentropy(from_logits=from_logits)
    g, z = _sampled_g(None if from_logits else "sigmoid", loss, labels=labels)
    p = 1 / (1 + np.exp(-z))
    expected = np.diag(np.mean(p * (1 - p), axis=0)) / 4  # Keras averages over the 4 outputs
    assert np.abs(g - expected).max() < 0.006, np.abs(g - expected).max()


def test_sampled_mse_g_is_loss_hessian():
    labels = lambda rng: rng.normal(size=(M, 4)).astype("float32")  # noqa: E731
    g, _ = _sampled_g(None, "mse", labels=labels)
    assert np.abs(g - 0.5 * np.eye(4)).max() < 0.03  # (2/d) I with d = 4


def test_unsupported_loss_with_sampled_fisher_is_a_clear_error():
    model = keras_kfac.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras_kfac.KFAC(), loss="mean_absolute_error")
    with pytest.raises(ValueError, match="sparse_categorical_crossentropy.*empirical"):
        model.fit(np.zeros((4, 3)), np.zeros((4, 2)), verbose=0)


def test_sampled_runs_are_reproducible():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = rng.integers(0, 3, size=64)
    weights = []
    for _ in range(2):
        keras.utils.set_random_seed(5)
        model = keras_kfac.Sequential(
            [keras.Input((3,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(3, "softmax")]
        )
        model.compile(
            optimizer=keras_kfac.KFAC(learning_rate=0.05, inverse_every=2), loss="sparse_categorical_crossentropy"
        )
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


def test_sampled_fisher_matches_each_output_to_its_own_loss():
    """Dict outputs whose keys are not in sorted order: each head gets its own loss's Hessian."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(M, 3)).astype("float32")
    inputs = keras.Input((3,))
    zeta = keras.layers.Dense(3, activation="softmax", name="zeta")
    alpha = keras.layers.Dense(2, name="alpha")
    model = keras_kfac.Model(inputs, {"zeta": zeta(inputs), "alpha": alpha(inputs)})
    opt = keras_kfac.KFAC(
        learning_rate=0.0, momentum=0.0, stats_decay=0.999999, stats_every=1, stats_batch_size=None, inverse_every=10**6
    )
    model.compile(
        optimizer=opt,
        loss={"zeta": "sparse_categorical_crossentropy", "alpha": "mse"},
        loss_weights={"zeta": 1.0, "alpha": 4.0},
    )
    y = {"zeta": rng.integers(0, 3, size=M), "alpha": rng.normal(size=(M, 2)).astype("float32")}
    tiled = {k: np.tile(v, (STEPS,) + (1,) * (v.ndim - 1)) for k, v in y.items()}
    model.fit(np.tile(x, (STEPS, 1)), tiled, batch_size=M, shuffle=False, verbose=0)
    z = x.astype(np.float64) @ zeta.kernel.numpy() + zeta.bias.numpy()
    g_zeta = opt.factors()["zeta"][1].numpy()
    g_alpha = opt.factors()["alpha"][1].numpy()
    assert np.abs(g_zeta - _categorical_hessian(z)).max() < 0.012
    assert np.abs(g_alpha - 4.0 * np.eye(2)).max() < 0.25  # weight 4 × (2/d) I with d = 2


def _softmax_hessians(z):
    return np.stack([np.diag(pi) - np.outer(pi, pi) for pi in ref.softmax(z)])


def test_sampled_g_follows_the_losss_reduction():
    """reduction="sum": Keras minimises Σ ℓ_i, whose Hessian is M times the mean one (was 1x)."""
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    g, z = _sampled_g(None, loss)
    expected = _softmax_hessians(z).sum(axis=0)
    assert np.abs(g - expected).max() < 0.012 * M, np.abs(g - expected).max()


WEIGHTS = np.tile([0.0, 1.0, 4.0, 0.5], M // 4)


@pytest.mark.parametrize("weighting", ["sample_weight", "class_weight"])
def test_sampled_g_honours_sample_and_class_weights(weighting):
    """G = Σ_i c_i H_i with c_i = s_i / M; class weights arrive as sample weights."""
    labels = lambda rng: np.arange(M) % 4  # noqa: E731  (class i % 4 has weight WEIGHTS[i % 4])
    if weighting == "sample_weight":
        kwargs = {"sample_weight": WEIGHTS}
    else:
        kwargs = {"class_weight": dict(enumerate(WEIGHTS[:4]))}
    g, z = _sampled_g(None, keras.losses.SparseCategoricalCrossentropy(from_logits=True), labels=labels, **kwargs)
    expected = np.einsum("i,ijk->jk", WEIGHTS / M, _softmax_hessians(z))
    assert np.abs(g - expected).max() < 0.012 * WEIGHTS.max(), np.abs(g - expected).max()


def test_sampled_g_with_ignore_class():
    """Examples labelled ignore_class have no loss, so no curvature, and leave the mean."""
    labels = lambda rng: np.where(np.arange(M) % 4 == 0, 9, np.arange(M) % 3)  # noqa: E731
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=9)
    g, z = _sampled_g(None, loss, units=3, labels=labels)
    valid = np.arange(M) % 4 != 0
    expected = _softmax_hessians(z)[valid].mean(axis=0)
    assert np.abs(g - expected).max() < 0.015, np.abs(g - expected).max()


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum"])
def test_empirical_g_honours_sample_weight_and_reduction(reduction):
    """Empirical G = (1/M) Σ m c_i ∇ℓ_i ∇ℓ_iᵀ, ∇ℓ_i = p_i − e_{y_i} (was (1/M) Σ (m c_i)² ∇ℓ ∇ℓᵀ)."""
    labels = lambda rng: np.arange(M) % 4  # noqa: E731
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    g, z = _sampled_g(None, loss, labels=labels, fisher="empirical", steps=2, sample_weight=WEIGHTS)
    grads = ref.softmax(z) - np.eye(4)[np.arange(M) % 4]
    k = WEIGHTS * (M if reduction == "sum" else 1.0)
    expected = np.einsum("i,ij,ik->jk", k / M, grads, grads)
    np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-6)


class _TenTimes(keras.losses.SparseCategoricalCrossentropy):
    def call(self, y_true, y_pred):
        return 10.0 * super().call(y_true, y_pred)


def test_sampled_fisher_refuses_a_loss_subclass_that_changes_the_loss():
    model = keras_kfac.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras_kfac.KFAC(), loss=_TenTimes(from_logits=True))
    with pytest.raises(ValueError, match="_TenTimes overrides call.*fisher='empirical'.*register_loss"):
        model.fit(np.zeros((4, 3)), np.zeros(4), verbose=0)


def test_sampled_fisher_trains_a_per_token_classifier_with_padding():
    """Outputs (batch, time, classes) with a Keras mask (mask_zero): the default KFAC() samples
    one target per position; padded positions carry no curvature."""
    rng = np.random.default_rng(5)
    tokens = rng.integers(1, 20, size=(64, 6))
    tokens[:, 4:] = 0  # padding
    labels = tokens % 3
    model = keras_kfac.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(20, 8, mask_zero=True),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras_kfac.KFAC(learning_rate=0.05), loss="sparse_categorical_crossentropy")
    history = model.fit(tokens, labels, batch_size=16, epochs=6, verbose=0).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < 0.7 * history[0]
    opt = model.optimizer
    assert [b.name for b in opt.blocks] == [layer.name for layer in model.layers]  # the Embedding too
