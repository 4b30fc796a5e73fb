"""Coverage of modern architectures: each model trains with the default `KFAC()` with at least 95%
of its trainable parameters under curvature blocks, its training loss falls, and after a few
epochs on small synthetic data it is no worse than Adam(1e-3)'s from the same initial weights
on the same batches.

The data are learnable (labels from a fixed rule on the inputs) but small, so "training loss"
here is mostly memorisation; what is compared is how fast each optimizer fits the same batches.
"""

import functools

import keras
import numpy as np
import pytest
from keras import layers, ops

import keras_kfac

BATCH = 16


class PositionEmbedding(layers.Layer):
    """Adds a learned embedding of each position (an `Embedding` over the position indices, so
    that it has a K-FAC block)."""

    def __init__(self, length: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.length = length
        self.embedding = layers.Embedding(length, dim)

    def call(self, x):
        positions = ops.broadcast_to(ops.arange(self.length), ops.shape(x)[:2])
        return x + self.embedding(positions)


def transformer_block(x, dim: int, heads: int, mlp: int):
    h = layers.LayerNormalization()(x)
    x = layers.Add()([x, layers.MultiHeadAttention(heads, dim // heads)(h, h)])
    h = layers.LayerNormalization()(x)
    h = layers.Dense(mlp, activation="gelu")(h)
    return layers.Add()([x, layers.Dense(dim)(h)])


def small_vit():
    inputs = keras.Input((16, 16, 1))
    x = layers.Conv2D(32, 4, strides=4)(inputs)  # 4x4 patches
    x = layers.Reshape((16, 32))(x)
    x = PositionEmbedding(16, 32)(x)
    x = transformer_block(x, 32, 4, 64)
    x = layers.LayerNormalization()(x)
    x = layers.GlobalAveragePooling1D()(x)
    return keras_kfac.Model(inputs, layers.Dense(4)(x))


def inverted_residual(x, expand: int, out: int, stride: int):
    c = x.shape[-1]
    h = layers.ReLU(6.0)(layers.BatchNormalization()(layers.Conv2D(c * expand, 1, use_bias=False)(x)))
    h = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False)(h)
    h = layers.ReLU(6.0)(layers.BatchNormalization()(h))
    h = layers.BatchNormalization()(layers.Conv2D(out, 1, use_bias=False)(h))
    return layers.Add()([x, h]) if stride == 1 and c == out else h


def small_mobilenet():
    inputs = keras.Input((16, 16, 3))
    x = layers.ReLU(6.0)(layers.BatchNormalization()(layers.Conv2D(16, 3, strides=2, padding="same")(inputs)))
    x = inverted_residual(x, 4, 16, 1)
    x = inverted_residual(x, 4, 24, 2)
    x = inverted_residual(x, 4, 24, 1)
    x = layers.GlobalAveragePooling2D()(x)
    return keras_kfac.Model(inputs, layers.Dense(4)(x))


def residual_unit(x, filters: int, stride: int):
    h = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(filters, 3, strides=stride, padding="same")(x)))
    h = layers.BatchNormalization()(layers.Conv2D(filters, 3, padding="same")(h))
    if stride != 1 or x.shape[-1] != filters:
        x = layers.BatchNormalization()(layers.Conv2D(filters, 1, strides=stride)(x))
    return layers.ReLU()(layers.Add()([x, h]))


def small_resnet():
    inputs = keras.Input((16, 16, 3))
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(16, 3, padding="same")(inputs)))
    x = residual_unit(x, 16, 1)
    x = residual_unit(x, 32, 2)
    x = layers.GlobalAveragePooling2D()(x)
    return keras_kfac.Model(inputs, layers.Dense(4)(x))


def conv1d_classifier():
    inputs = keras.Input((32, 3))
    x = layers.Conv1D(16, 5, padding="causal", activation="relu")(inputs)
    x = layers.Conv1D(32, 3, strides=2, activation="relu")(x)
    x = layers.GlobalMaxPooling1D()(x)
    return keras_kfac.Model(inputs, layers.Dense(4)(x))


def text_transformer():
    inputs = keras.Input((12,), dtype="int32")
    x = layers.Embedding(50, 32)(inputs)
    x = PositionEmbedding(12, 32)(x)
    x = transformer_block(x, 32, 4, 64)
    x = layers.LayerNormalization()(x)
    x = layers.GlobalAveragePooling1D()(x)
    return keras_kfac.Model(inputs, layers.Dense(4)(x))


def mobilenet_v2_application():
    net = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=4, alpha=0.35)
    return keras_kfac.wrap(net)


def resnet50_application():
    return keras_kfac.wrap(keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=4))


def image_data(rng, shape, count):
    """Images whose label is the quadrant (of 4) with the largest mean: learnable from pixels."""
    x = rng.normal(size=(count, *shape)).astype("float32")
    h, w = shape[0] // 2, shape[1] // 2
    quadrants = [x[:, :h, :w], x[:, :h, w:], x[:, h:, :w], x[:, h:, w:]]
    y = np.argmax(np.stack([q.mean(axis=(1, 2, 3)) for q in quadrants], axis=1), axis=1)
    return x, y


def sequence_data(rng, count):
    """Series whose label is the quarter of the sequence with the largest mean of channel 0."""
    x = rng.normal(size=(count, 32, 3)).astype("float32")
    y = np.argmax(x[:, :, 0].reshape(count, 4, 8).mean(axis=2), axis=1)
    return x, y


def token_data(rng, count):
    """Token sequences labelled by which of four marker tokens (1-4) occurs most often."""
    x = rng.integers(5, 50, size=(count, 12))
    for i in range(count):
        marker = rng.integers(1, 5)
        x[i, rng.choice(12, size=3, replace=False)] = marker
    counts = np.stack([(x == t).sum(axis=1) for t in range(1, 5)], axis=1)
    return x.astype("int32"), np.argmax(counts, axis=1)


# name: (builder, data maker, examples, epochs)
MODELS = {
    "vit": (small_vit, lambda rng, n: image_data(rng, (16, 16, 1), n), 128, 6),
    "mobilenet_style": (small_mobilenet, lambda rng, n: image_data(rng, (16, 16, 3), n), 128, 6),
    "resnet_bn": (small_resnet, lambda rng, n: image_data(rng, (16, 16, 3), n), 128, 6),
    "conv1d": (conv1d_classifier, sequence_data, 128, 6),
    "text_transformer": (text_transformer, token_data, 128, 6),
    "keras_mobilenet_v2": (mobilenet_v2_application, lambda rng, n: image_data(rng, (32, 32, 3), n), 64, 4),
    "keras_resnet50": (resnet50_application, lambda rng, n: image_data(rng, (32, 32, 3), n), 32, 4),
}


def train(build, weights, optimizer, x, y, epochs: int) -> list:
    """Per-epoch mean training losses from `weights`, same batches (no shuffling) for every optimizer."""
    keras.utils.set_random_seed(1)
    model = build()
    model.set_weights(weights)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    if not isinstance(optimizer, keras_kfac.KFAC):
        # Keras builds an optimizer inside the first traced step (then traces it twice); built
        # here, the reference run takes the same steps and compiles in half the time.
        optimizer.build(model.trainable_variables)
    history = model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    return history.history["loss"], model


def covered_share(model, optimizer) -> float:
    under = {id(v) for b in optimizer.blocks for v in b.variables}
    total = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    covered = sum(int(np.prod(v.shape)) for v in model.trainable_variables if id(v) in under)
    return covered / total


@functools.cache
def runs(name: str) -> dict:
    """K-FAC's and Adam(1e-3)'s per-epoch training losses from the same weights and batches."""
    build, make_data, count, epochs = MODELS[name]
    rng = np.random.default_rng(0)
    x, y = make_data(rng, count)
    keras.utils.set_random_seed(0)
    weights = build().get_weights()
    kfac = keras_kfac.KFAC()
    kfac_losses, model = train(build, weights, kfac, x, y, epochs)
    adam_losses, _ = train(build, weights, keras.optimizers.Adam(1e-3), x, y, epochs)
    share = covered_share(model, kfac)
    print(name, f"share {share:.4f}", "kfac", np.round(kfac_losses, 3), "adam", np.round(adam_losses, 3))
    summary = model.kfac_summary(print_fn=None).splitlines()[-1]
    return {
        "kfac": kfac_losses,
        "adam": adam_losses,
        "share": share,
        "summary": summary,
        "steps": epochs * (count // BATCH),
    }


@pytest.mark.parametrize("name", list(MODELS))
def test_model_trains_under_curvature_blocks(name):
    run = runs(name)
    assert run["share"] >= 0.95, f"{name}: {run['share']:.1%} of the parameters under curvature blocks"
    assert run["summary"].endswith(f"({100 * run['share']:.1f}%)")
    assert run["steps"] <= 50
    losses = run["kfac"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], (
        f"{name}: the K-FAC training loss did not fall: {losses}"
    )


# Measured (2026-12-02): on these small synthetic sets KFAC() with a constant learning rate of 1e-3
# (an Adam-length step in K-FAC's direction) ended behind Adam(1e-3) on the five small models.  The
# "auto" rate (a 3e-3 start decaying as 1/t, KL-clipped at 1e-3) with Adam's norm grafted on each
# block put six of the seven ahead and left the text Transformer behind (0.041 vs 0.013).  Since
# graft="auto" (no graft under the KL clip, 2026-12-04) all seven are ahead, last-epoch training loss
# K-FAC vs Adam: vit 0.227 vs 0.883, mobilenet_style 0.003 vs 0.265, resnet_bn 0.017 vs 0.926,
# conv1d 0.397 vs 1.310, text_transformer 0.001 vs 0.013, keras MobileNetV2 0.262 vs 0.649, ResNet50
# 0.209 vs 2.022 (BENCHMARKS.md, "The clip alone").  A model put here runs as a strict xfail.
BEHIND_ADAM: set = set()


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="KFAC() behind Adam(1e-3) here; see BEHIND_ADAM"))
        if n in BEHIND_ADAM
        else n
        for n in MODELS
    ],
)
def test_kfac_training_loss_is_no_worse_than_adams(name):
    run = runs(name)
    assert run["kfac"][-1] <= run["adam"][-1], f"{name}: K-FAC {run['kfac']} against Adam(1e-3) {run['adam']}"
