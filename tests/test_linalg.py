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
    inverse_jit = options.get("inverse_jit", "auto")
    assert opt.inverse_in_xla == (_machine_has_accelerator() if inverse_jit == "auto" else inverse_jit)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    for layer, exp in zip(model.layers, expected):
        assert ref.rel_err(layer.kernel.numpy(), exp["kernel"]) < 2e-4


def _machine_has_accelerator():
    return bool(tf.config.list_physical_devices("GPU") or tf.config.list_physical_devices("TPU"))


def _fake_devices(*kinds):
    devices = [tf.config.PhysicalDevice(name="/physical_device:CPU:0", device_type="CPU")]
    devices += [tf.config.PhysicalDevice(name=f"/physical_device:{k}:0", device_type=k) for k in kinds]
    return lambda device_type=None: [d for d in devices if device_type in (None, d.device_type)]


@pytest.mark.parametrize("prop, arg", [("inverse_in_xla", "inverse_jit"), ("statistics_in_xla", "statistics_jit")])
def test_auto_jit_follows_this_machine_and_true_false_force_it(prop, arg):
    # "auto": XLA where the machine has a GPU or TPU, plain tf.function on CPU; whichever
    # machine runs this, the property must agree with what TensorFlow sees.
    assert getattr(keras_kfac.KFAC(), prop) is _machine_has_accelerator()
    assert getattr(keras_kfac.KFAC(**{arg: "auto"}), prop) is _machine_has_accelerator()
    assert getattr(keras_kfac.KFAC(**{arg: True}), prop) is True
    assert getattr(keras_kfac.KFAC(**{arg: False}), prop) is False


@pytest.mark.parametrize(
    "kinds, expected", [((), False), (("GPU",), True), (("TPU",), True)], ids=["cpu", "gpu", "tpu"]
)
@pytest.mark.parametrize("prop, arg", [("inverse_in_xla", "inverse_jit"), ("statistics_in_xla", "statistics_jit")])
def test_auto_jit_on_simulated_machines(monkeypatch, prop, arg, kinds, expected):
    # The same promise on a CPU-only, a GPU and a TPU host, whatever this machine is
    # (the device list TensorFlow reports is replaced).
    monkeypatch.setattr(tf.config, "list_physical_devices", _fake_devices(*kinds))
    assert getattr(keras_kfac.KFAC(), prop) is expected
    assert getattr(keras_kfac.KFAC(**{arg: True}), prop) is True
    assert getattr(keras_kfac.KFAC(**{arg: False}), prop) is False


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
