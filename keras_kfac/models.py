"""Ready-made models for the examples, benchmarks and tests, built as `keras_kfac.Sequential`."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from keras_kfac.model import Model, Sequential

__all__ = ["alexnet", "mlp", "deep_autoencoder", "vit"]

# The MNIST deep autoencoder of Hinton & Salakhutdinov (2006), as in Martens & Grosse (2015).
AUTOENCODER_UNITS = (1000, 500, 250, 30, 250, 500, 1000)

# AlexNet's (Krizhevsky et al., 2012) widths: five convolutions, then two hidden dense layers.
ALEXNET_CONV_FILTERS = (96, 256, 384, 384, 256)
ALEXNET_DENSE_UNITS = (4096, 4096)
# At `width=w` the convolutions get 5w/8 of AlexNet's filters and the dense layers w/16 of its
# units: 28x28 inputs need far smaller dense layers than 224x224 ones.
_CONV_SCALE = 5 / 8
_DENSE_SCALE = 1 / 16


def _scaled(widths: Sequence[int], factor: float) -> list[int]:
    return [max(1, round(w * factor)) for w in widths]


def alexnet(
    input_shape: tuple[int, ...] = (28, 28, 1),
    num_classes: int = 10,
    width: float = 0.5,
    dropout: float = 0.5,
) -> Sequential:
    """AlexNet adapted to 28x28 grayscale images (Fashion-MNIST, MNIST).

    AlexNet's layout: five convolutions with ReLU, overlapping 3x3 max-pooling with stride 2
    after the first, second and fifth, then dropout + dense ReLU twice and a softmax classifier.
    For 28x28 inputs every convolution is 3x3 with stride 1 and "same" padding (AlexNet's 11x11
    stride-4 and 5x5 kernels would shrink 28x28 to nothing), pooling uses "same" padding
    (28 -> 14 -> 7 -> 4), and no local response normalization. Widths: `5 * width / 8` times
    AlexNet's filters (96, 256, 384, 384, 256) and `width / 16` times its 4096 dense units,
    rounded, so about 0.5 M parameters and roughly 35-60 s per Fashion-MNIST epoch with Adam at
    batch 128 on 2 CPU cores. With the defaults (input (28, 28, 1), 10 classes, `width=0.5`):

    ===========  ============  ==========
    layer        output        parameters
    ===========  ============  ==========
    conv1        (28, 28, 30)         300
    pool1        (14, 14, 30)           0
    conv2        (14, 14, 80)      21,680
    pool2        (7, 7, 80)             0
    conv3        (7, 7, 120)       86,520
    conv4        (7, 7, 120)      129,720
    conv5        (7, 7, 80)        86,480
    pool5        (4, 4, 80)             0
    flatten      (1280,)                0
    dropout1     (1280,)                0
    fc1          (128,)           163,968
    dropout2     (128,)                 0
    fc2          (128,)            16,512
    predictions  (10,)              1,290
    ===========  ============  ==========

    Total: 506,470 parameters, all trainable (measured with `count_params()`).
    """
    conv_filters = _scaled(ALEXNET_CONV_FILTERS, width * _CONV_SCALE)
    dense_units = _scaled(ALEXNET_DENSE_UNITS, width * _DENSE_SCALE)
    layers: list = [keras.Input(shape=input_shape)]
    for i, filters in enumerate(conv_filters, start=1):
        layers.append(keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}"))
        if i in (1, 2, 5):
            layers.append(keras.layers.MaxPooling2D(3, strides=2, padding="same", name=f"pool{i}"))
    layers.append(keras.layers.Flatten(name="flatten"))
    for i, units in enumerate(dense_units, start=1):
        layers.append(keras.layers.Dropout(dropout, name=f"dropout{i}"))
        layers.append(keras.layers.Dense(units, activation="relu", name=f"fc{i}"))
    layers.append(keras.layers.Dense(num_classes, activation="softmax", name="predictions"))
    return Sequential(layers, name="alexnet")


def mlp(
    input_shape: tuple[int, ...] = (28, 28, 1),
    hidden: Sequence[int] = (256, 256),
    num_classes: int = 10,
) -> Sequential:
    """Flatten, a ReLU dense layer per entry of `hidden`, and a softmax classifier.

    With the defaults: 784*256 + 256 + 256*256 + 256 + 256*10 + 10 = 269,322 parameters.
    """
    layers: list = [keras.Input(shape=input_shape), keras.layers.Flatten(name="flatten")]
    for i, units in enumerate(hidden, start=1):
        layers.append(keras.layers.Dense(units, activation="relu", name=f"fc{i}"))
    layers.append(keras.layers.Dense(num_classes, activation="softmax", name="predictions"))
    return Sequential(layers, name="mlp")


def deep_autoencoder(inputs: int = 784, units: Sequence[int] = AUTOENCODER_UNITS, code_index: int = 3) -> Sequential:
    """784-1000-500-250-30-250-500-1000-784: logistic hidden layers, a linear code layer
    (`units[code_index]`), and a linear output layer giving logits for a sigmoid cross-entropy
    on the pixels (compile with `keras.losses.BinaryCrossentropy(from_logits=True)`).

    Every Dense layer's output is the next one's only input, so the eight layers form one chain
    for `KFAC(approximation="block_tridiagonal")`.  Keras' default (Glorot uniform) initializer.
    """
    layers: list = [keras.Input(shape=(inputs,))]
    for i, width in enumerate(units):
        activation = None if i == code_index else "sigmoid"
        layers.append(keras.layers.Dense(width, activation=activation, name=f"dense{i + 1}"))
    layers.append(keras.layers.Dense(inputs, name="logits"))
    return Sequential(layers, name="deep_autoencoder")


def vit(
    input_shape: tuple[int, int, int] = (28, 28, 1),
    num_classes: int = 10,
    patch_size: int = 4,
    dim: int = 64,
    depth: int = 4,
    num_heads: int = 4,
    mlp_dim: int = 128,
    dropout: float = 0.0,
) -> Model:
    """A small Vision Transformer (Dosovitskiy et al., 2021) for 28x28 images, built from layers
    that K-FAC gives a curvature block.

    - Patch embedding: `Conv2D(dim, patch_size, strides=patch_size)` (one Dense map per
      non-overlapping patch), reshaped to (tokens, dim): 49 tokens of 4x4 pixels with the defaults
      (`patch_size` must divide the image sides; 7 gives 16 tokens).
    - Learned position embedding: an `Embedding(tokens, dim)` looked up at the position indices
      0 .. tokens-1 of every example (an Embedding layer rather than a bare weight, so that its
      parameters get a block) and added to the tokens.
    - `depth` pre-LN Transformer blocks: x + MultiHeadAttention(LN(x)) (`num_heads` heads of
      `dim // num_heads` features; its query/key/value/output projections are EinsumDense layers),
      then x + Dense(dim)(Dense(mlp_dim, gelu)(LN(x))).
    - A final LayerNormalization, the mean over tokens and a softmax `Dense(num_classes)`.

    No class token: mean pooling over the tokens.  `dropout` applies after the attention and the
    MLP of every block (0 by default).  With the defaults: 138,890 parameters (1,088 patch
    embedding, 3,136 position embedding, 33,472 per block, 128 final LayerNormalization, 650 head).
    """
    height, width, _ = input_shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"patch_size={patch_size} does not divide the image sides {height}x{width}")
    if dim % num_heads:
        raise ValueError(f"dim={dim} is not a multiple of num_heads={num_heads}")
    tokens = (height // patch_size) * (width // patch_size)
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Conv2D(dim, patch_size, strides=patch_size, name="patch_embedding")(inputs)
    x = keras.layers.Reshape((tokens, dim), name="tokens")(x)
    # Position indices (batch, tokens): 0 .. tokens-1 for every example.
    positions = keras.ops.zeros_like(x[..., 0], dtype="int32") + keras.ops.arange(tokens, dtype="int32")
    x = x + keras.layers.Embedding(tokens, dim, name="position_embedding")(positions)
    for i in range(1, depth + 1):
        h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln1")(x)
        h = keras.layers.MultiHeadAttention(num_heads, dim // num_heads, name=f"block{i}_attention")(h, h)
        if dropout:
            h = keras.layers.Dropout(dropout, name=f"block{i}_dropout1")(h)
        x = keras.layers.Add(name=f"block{i}_residual1")([x, h])
        h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln2")(x)
        h = keras.layers.Dense(mlp_dim, activation="gelu", name=f"block{i}_mlp1")(h)
        h = keras.layers.Dense(dim, name=f"block{i}_mlp2")(h)
        if dropout:
            h = keras.layers.Dropout(dropout, name=f"block{i}_dropout2")(h)
        x = keras.layers.Add(name=f"block{i}_residual2")([x, h])
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="final_ln")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return Model(inputs, outputs, name="vit")
