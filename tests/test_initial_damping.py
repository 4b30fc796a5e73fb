"""The starting damping of the untuned adaptive mode: with damping=None and adapt_damping=True, λ₀ is
the largest block curvature bound of the first statistics (‖A‖_F·‖G‖_F for a Kronecker block, the
largest per-feature trace for a scale-and-shift block, the largest per-channel product for a
depthwise block), checked in float64 against the blocks' statistics and against the largest
eigenvalue of each dense A ⊗ G it bounds."""

import keras
import numpy as np
import pytest

import keras_kfac
from keras_kfac.blocks import DepthwiseConv2DBlock, KroneckerBlock, SeparableConv2DBlock
from keras_kfac.blocks.scale_shift import FeatureBlock


def _model():
    keras.utils.set_random_seed(5)
    return keras_kfac.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, padding="same", activation="relu"),
            keras.layers.DepthwiseConv2D(3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.SeparableConv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 6, 6, 2)).astype("float32"), rng.integers(0, 3, size=32)


def _kronecker_bound(a, g):
    """(‖A‖_F·‖G‖_F, λ_max(A ⊗ G)) in float64; a 1-D side is a diagonal."""
    a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
    top = [np.max(np.linalg.eigvalsh(f)) if f.ndim == 2 else np.max(f) for f in (a, g)]
    return np.linalg.norm(a) * np.linalg.norm(g), top[0] * top[1]


def _bound(block):
    """The block's bound and the largest eigenvalue of the curvature it bounds."""
    stats = [v.numpy().astype(np.float64) for v in block.statistics_variables]
    if isinstance(block, KroneckerBlock):
        return _kronecker_bound(*stats)
    if isinstance(block, FeatureBlock):
        fisher = stats[0]
        if fisher.shape[0] == 1:
            return fisher[0].max(), fisher[0].max()
        per_feature = np.stack([[fisher[0], fisher[1]], [fisher[1], fisher[2]]]).transpose(2, 0, 1)
        return (fisher[0] + fisher[2]).max(), np.linalg.eigvalsh(per_feature).max()
    if isinstance(block, (DepthwiseConv2DBlock, SeparableConv2DBlock)):
        pairs = [(stats[0][c], stats[1][c]) for c in range(stats[0].shape[0])]
        if isinstance(block, SeparableConv2DBlock):
            pairs.append((stats[2], stats[3]))
        bounds = np.array([_kronecker_bound(a, g) for a, g in pairs])
        return bounds[:, 0].max(), bounds[:, 1].max()
    raise AssertionError(f"no reference for {type(block).__name__}")


def _lm_factor(rho, every):
    omega = 0.95**every
    return omega if rho > 0.75 else (1.0 / omega if rho < 0.25 else 1.0)


def test_untuned_adaptive_damping_starts_from_the_largest_block_curvature():
    model = _model()
    opt = keras_kfac.KFAC(learning_rate=None, momentum=None, adapt_damping=True)
    assert opt.damping_from_factors and opt.get_config()["damping"] is None
    assert keras_kfac.KFAC.from_config(opt.get_config()).damping_from_factors
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    x, y = _data()
    logs = model.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    kinds = {type(b).__name__ for b in opt.blocks}
    assert {"Conv2DBlock", "DepthwiseConv2DBlock", "SeparableConv2DBlock", "DenseBlock"} <= kinds
    assert {"BatchNormalizationBlock", "LayerNormalizationBlock"} <= kinds
    bounds = [_bound(block) for block in opt.blocks]
    for bound, top in bounds:
        assert bound >= top * (1 - 1e-5) > 0.0
    start = max(bound for bound, _ in bounds)
    # One step: λ₀ set before the step, then one Levenberg–Marquardt adaptation (step 0 is due).
    expected = start * _lm_factor(logs["rho"][0], opt.damping_every)
    np.testing.assert_allclose(float(opt.damping.numpy()), expected, rtol=1e-5)
    np.testing.assert_allclose(logs["damping"][0], expected, rtol=1e-5)
    assert opt.get_config()["damping"] == pytest.approx(expected, rel=1e-6)  # now a value
    # λ₀ is not chosen again: the next step (not a damping step) keeps the adapted λ.
    assert expected != pytest.approx(start, rel=1e-3)
    logs = model.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    np.testing.assert_allclose(logs["damping"][0], expected, rtol=1e-6)


def test_a_given_damping_and_the_fixed_step_keep_their_values():
    x, y = _data()
    model = _model()
    opt = keras_kfac.KFAC(learning_rate=None, momentum=None, adapt_damping=True, damping=150.0)
    assert not opt.damping_from_factors
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    logs = model.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    np.testing.assert_allclose(logs["damping"][0], 150.0 * _lm_factor(logs["rho"][0], 5), rtol=1e-6)
    fixed = keras_kfac.KFAC()
    assert not fixed.damping_from_factors and fixed.get_config()["damping"] == pytest.approx(1e-4)
    model = _model()
    model.compile(optimizer=fixed, loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert float(fixed.damping.numpy()) == pytest.approx(1e-4)
