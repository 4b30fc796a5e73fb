"""Curvature blocks, one class per layer kind, and the rule that picks one for a layer."""

from __future__ import annotations

import keras

from keras_kfac.blocks.base import KroneckerBlock
from keras_kfac.blocks.conv2d import Conv2DBlock
from keras_kfac.blocks.dense import DenseBlock

__all__ = ["KroneckerBlock", "DenseBlock", "Conv2DBlock", "block_for_layer"]


def _plain(layer, base) -> str | None:
    """Why `layer` cannot use the block of `base`, or None when it can."""
    if type(layer).call is not base.call:
        return f"{type(layer).__name__} overrides call()"
    if getattr(layer, "quantization_mode", None):
        return "quantized layer"
    if getattr(layer, "lora_enabled", False):
        return "LoRA is enabled"
    if not layer.trainable or not layer.kernel.trainable:
        return "not trainable"
    if getattr(layer, "use_bias", False) and not layer.bias.trainable:
        return "bias not trainable"
    return None


def block_for_layer(layer) -> tuple[KroneckerBlock | None, str]:
    """Returns (block, "") for a supported layer, or (None, reason) otherwise."""
    if isinstance(layer, keras.layers.Dense):
        reason = _plain(layer, keras.layers.Dense)
        return (None, reason) if reason else (DenseBlock(layer), "")
    if isinstance(layer, keras.layers.Conv2D):
        reason = _plain(layer, keras.layers.Conv2D)
        if reason is None and layer.data_format != "channels_last":
            reason = "channels_first is not supported"
        if reason is None and layer.groups != 1:
            reason = "grouped convolution is not supported"
        return (None, reason) if reason else (Conv2DBlock(layer), "")
    return None, "no block for this layer kind"
