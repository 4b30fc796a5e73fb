"""One K-FAC step against a float64 NumPy computation of A, G, the gradient and a dense
np.kron solve (stats_decay=0, inverse_every=1, momentum=0, fisher="empirical")."""

import keras
import numpy as np
import pytest
import reference as ref
from exact import exact_kfac

import keras_kfac

LR, DAMPING = 0.5, 1e-2
# Worst relative errors seen here are ~1e-6; float32 arithmetic against float64.
TOL = 2e-4


def _kfac(mode, **kwargs):
    return exact_kfac(**{"learning_rate": LR, "damping": DAMPING, "damping_mode": mode, **kwargs})


def _mlp_data(m=16):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(m, 5)).astype("float32")
    y = rng.integers(0, 3, size=m)
    return x, y


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["compiled", "eager"])
@pytest.mark.parametrize("mode", ["eigen", "factored"])
def test_dense_step_matches_numpy(mode, run_eagerly):
    x, y = _mlp_data()
    model = keras_kfac.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(6, activation="relu", use_bias=False),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    before = [
        (layer.kernel.numpy().astype(np.float64), None if layer.bias is None else layer.bias.numpy().astype(np.float64))
        for layer in model.layers
    ]
    acts = ["tanh", "relu", "softmax"]
    expected = ref.mlp_step(x.astype(np.float64), y, [(k, b, a) for (k, b), a in zip(before, acts)], LR, DAMPING, mode)
    opt = _kfac(mode)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", run_eagerly=run_eagerly)
    model.train_on_batch(x, y)
    factors = opt.factors()
    for layer, exp in zip(model.layers, expected):
        a, g = factors[layer.name]
        assert ref.rel_err(a.numpy(), exp["A"]) < TOL
        assert ref.rel_err(g.numpy(), exp["G"]) < TOL
        assert ref.rel_err(layer.kernel.numpy(), exp["kernel"]) < TOL
        if exp["bias"] is not None:
            assert ref.rel_err(layer.bias.numpy(), exp["bias"]) < TOL
        # The step itself (new − old), which is much smaller than the weights.
        step = np.concatenate(
            [layer.kernel.numpy() - before[model.layers.index(layer)][0]]
            + ([] if layer.bias is None else [(layer.bias.numpy() - before[model.layers.index(layer)][1])[None]])
        )
        assert ref.rel_err(step, -LR * exp["update"]) < TOL


@pytest.mark.parametrize("mode", ["eigen", "factored"])
@pytest.mark.parametrize(
    "conv_args",
    [
        dict(strides=(1, 1), padding="valid", dilation_rate=(1, 1)),
        dict(strides=(2, 2), padding="same", dilation_rate=(1, 1)),
        dict(strides=(1, 1), padding="same", dilation_rate=(2, 2)),
        dict(strides=(2, 1), padding="valid", dilation_rate=(1, 1)),
    ],
    ids=["valid", "stride2-same", "dilated-same", "stride21-valid"],
)
def test_conv2d_step_matches_numpy(mode, conv_args):
    rng = np.random.default_rng(1)
    m = 6
    x = rng.normal(size=(m, 7, 6, 2)).astype("float32")
    y = rng.integers(0, 3, size=m)
    conv = keras.layers.Conv2D(3, (3, 2), activation="relu", **conv_args)
    dense = keras.layers.Dense(3, activation="softmax")
    model = keras_kfac.Sequential([keras.Input((7, 6, 2)), conv, keras.layers.Flatten(), dense])
    expected = ref.conv_step(
        x.astype(np.float64),
        y,
        (conv.kernel.numpy().astype(np.float64), conv.bias.numpy().astype(np.float64)),
        (dense.kernel.numpy().astype(np.float64), dense.bias.numpy().astype(np.float64)),
        conv_args,
        LR,
        DAMPING,
        mode,
    )
    opt = _kfac(mode)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    factors = opt.factors()
    for layer, key in [(conv, "conv"), (dense, "dense")]:
        a, g = factors[layer.name]
        assert ref.rel_err(a.numpy(), expected[key]["A"]) < TOL
        assert ref.rel_err(g.numpy(), expected[key]["G"]) < TOL
        assert ref.rel_err(layer.kernel.numpy(), expected[key]["kernel"]) < TOL
        assert ref.rel_err(layer.bias.numpy(), expected[key]["bias"]) < TOL
