"""Damped Kronecker inverses against dense np.kron solves; eigenvalue clipping; XLA/float64
inversion paths."""

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf

import keras_kfac
from keras_kfac import linalg


def _spd(rng, n, rank=None):
    x = rng.normal(size=(rank or 2 * n, n))
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("mode", ["eigen", "factored"])
@pytest.mark.parametrize("damping", [1e-4, 1e-1, 10.0])
def test_precondition_matches_dense_kron_solve(mode, damping):
    rng = np.random.default_rng(0)
    a, g = _spd(rng, 7), _spd(rng, 4) * 3.0
    v = rng.normal(size=(7, 4))
    ea, qa = linalg.symmetric_eigh(tf.constant(a), tf.float64)
    eg, qg = linalg.symmetric_eigh(tf.constant(g), tf.float64)
    u = linalg.precondition(tf.constant(v), ea, qa, eg, qg, damping, mode).numpy()
    assert ref.rel_err(u, ref.kron_solve(a, g, v, damping, mode)) < 1e-8


def test_negative_eigenvalues_are_clipped_to_zero():
    rng = np.random.default_rng(1)
    low_rank = _spd(rng, 6, rank=2)  # rank 2: four zero eigenvalues, some come out negative
    values, vectors = linalg.symmetric_eigh(tf.constant(low_rank - 1e-6 * np.eye(6), tf.float32))
    assert float(tf.reduce_min(values)) == 0.0
    assert np.allclose(vectors.numpy() @ vectors.numpy().T, np.eye(6), atol=1e-5)


def test_pi_is_one_when_a_trace_is_zero():
    assert float(linalg.pi_factor(tf.zeros(3), tf.ones(2))) == 1.0
    assert abs(float(linalg.pi_factor(tf.constant([4.0, 4.0]), tf.constant([1.0]))) - 2.0) < 1e-7


@pytest.mark.parametrize(
    "options", [dict(inverse_dtype="float64"), dict(inverse_jit=True)], ids=["float64", "xla-eigh"]
)
def test_inversion_options_give_the_same_step(options):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5)).astype("float32")
    y = rng.integers(0, 3, size=16)
    model = keras_kfac.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3, activation="softmax")]
    )
    params = [
        (layer.kernel.numpy().astype(np.float64), layer.bias.numpy().astype(np.float64), act)
        for layer, act in zip(model.layers, ["tanh", "softmax"])
    ]
    expected = ref.mlp_step(x.astype(np.float64), y, params, 0.5, 1e-2, "eigen")
    opt = keras_kfac.KFAC(
        learning_rate=0.5,
        momentum=0.0,
        damping=1e-2,
        stats_decay=0.0,
        stats_every=1,
        stats_batch_size=None,
        inverse_every=1,
        fisher="empirical",
        damping_mode="eigen",
        graft=None,
        **options,
    )
    assert opt.inverse_in_xla == (options.get("inverse_jit") is True)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    for layer, exp in zip(model.layers, expected):
        assert ref.rel_err(layer.kernel.numpy(), exp["kernel"]) < 2e-4


def test_auto_inverse_jit_is_plain_on_cpu():
    assert not tf.config.list_physical_devices("GPU")
    assert keras_kfac.KFAC().inverse_in_xla is False
    assert keras_kfac.KFAC(inverse_jit=True).inverse_in_xla is True


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_factored_inverses_match_numpy(dtype):
    rng = np.random.default_rng(4)
    a, g = _spd(rng, 9, rank=3), _spd(rng, 5) * 4.0
    damping = 1e-3
    inv_a, inv_g, ok = linalg.factored_inverses(tf.constant(a, tf.float32), tf.constant(g, tf.float32), damping, dtype)
    assert bool(ok)
    pi = np.sqrt((np.trace(a) / 9) / (np.trace(g) / 5))
    expected_a = np.linalg.inv(a + pi * np.sqrt(damping) * np.eye(9))
    expected_g = np.linalg.inv(g + np.sqrt(damping) / pi * np.eye(5))
    assert ref.rel_err(inv_a.numpy(), expected_a) < (1e-3 if dtype == tf.float32 else 1e-5)
    assert ref.rel_err(inv_g.numpy(), expected_g) < 1e-5
    # Applied to a gradient they give the dense factored-Tikhonov solve.
    v = rng.normal(size=(9, 5))
    u = inv_a.numpy().astype(np.float64) @ v @ inv_g.numpy().astype(np.float64)
    assert ref.rel_err(u, ref.kron_solve(a, g, v, damping, "factored")) < (1e-3 if dtype == tf.float32 else 1e-5)


def test_factored_inverses_flag_non_finite_input():
    bad = np.eye(3, dtype=np.float32)
    bad[0, 1] = np.nan
    _, _, ok = linalg.factored_inverses(tf.constant(bad), tf.eye(2), 1e-3)
    assert not bool(ok)
