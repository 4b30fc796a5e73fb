"""Last-epoch training losses of optimizer expressions on the five small synthetic models of
`tests/test_coverage.py` (48 steps of batch 16 on 128 examples), from that test's weights and data.

    python benchmarks/coverage_probe.py vit,mobilenet_style,resnet_bn,conv1d,text_transformer "KFAC()" "adam" ...

Each expression is a `KFAC(...)` call (or "adam" for Adam(1e-3), the test's reference); every
model is trained by `tests/test_coverage.train` (same batches, no shuffling) for each of them.
Besides the test's models, "vit_bare_weights" is its small ViT with weights no block models, as
many ViTs are written: a position embedding that is a bare (16, 32) weight and LayerScale
(per-feature scales, initialised to 0.1, CaiT) on both residual branches; with `KFAC()` those go
to the fallback optimizer, with `KFAC(diagonal_fisher=True)` to diagonal Fisher blocks.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import test_coverage  # noqa: E402
from keras import layers  # noqa: E402

import keras_kfac  # noqa: E402


class BarePositionEmbedding(layers.Layer):
    def build(self, input_shape):
        self.table = self.add_weight(shape=tuple(input_shape[1:]), initializer="random_normal", name="table")

    def call(self, x):
        return x + self.table


class LayerScale(layers.Layer):
    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer=keras.initializers.Constant(0.1))

    def call(self, x):
        return x * self.scale


def vit_bare_weights():
    inputs = keras.Input((16, 16, 1))
    x = layers.Reshape((16, 32))(layers.Conv2D(32, 4, strides=4)(inputs))
    x = BarePositionEmbedding()(x)
    h = layers.LayerNormalization()(x)
    x = layers.Add()([x, LayerScale()(layers.MultiHeadAttention(4, 8)(h, h))])
    h = layers.Dense(32)(layers.Dense(64, activation="gelu")(layers.LayerNormalization()(x)))
    x = layers.Add()([x, LayerScale()(h)])
    x = layers.GlobalAveragePooling1D()(layers.LayerNormalization()(x))
    return keras_kfac.Model(inputs, layers.Dense(4)(x))


MODELS = dict(test_coverage.MODELS)
MODELS["vit_bare_weights"] = (vit_bare_weights, MODELS["vit"][1], MODELS["vit"][2], MODELS["vit"][3])


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    names, expressions = argv[0].split(","), argv[1:]
    for name in names:
        build, make_data, count, epochs = MODELS[name]
        x, y = make_data(np.random.default_rng(0), count)
        keras.utils.set_random_seed(0)
        weights = build().get_weights()
        for expression in expressions:
            if expression == "adam":
                optimizer = keras.optimizers.Adam(1e-3)
            else:
                optimizer = eval(expression, {"KFAC": keras_kfac.KFAC, "keras": keras})
            losses, _ = test_coverage.train(build, weights, optimizer, x, y, epochs)
            print(f"{name:18s} {expression:70s} last {losses[-1]:.3f}  {np.round(losses, 3).tolist()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
