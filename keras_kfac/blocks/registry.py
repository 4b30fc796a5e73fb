"""The table from layer classes to block classes, and the rule that picks a block for a layer.

`register_block(layer_class, block_class)` adds or replaces an entry; a layer gets the block
of the first class in its method resolution order that has one, so a registered subclass wins
over its base.  A subclass that overrides `call()` of a registered Keras class does not inherit
that class's block (the block's recording would bypass the override); register one for it.
"""

from __future__ import annotations

import keras

from keras_kfac.blocks.base import BlockOptions, CurvatureBlock
from keras_kfac.blocks.conv1d import Conv1DBlock
from keras_kfac.blocks.conv2d import Conv2DBlock
from keras_kfac.blocks.conv2d_transpose import Conv2DTransposeBlock
from keras_kfac.blocks.conv3d import Conv3DBlock
from keras_kfac.blocks.dense import DenseBlock
from keras_kfac.blocks.depthwise import DepthwiseConv2DBlock, SeparableConv2DBlock
from keras_kfac.blocks.diagonal import DiagonalFisherBlock
from keras_kfac.blocks.einsum_dense import EinsumDenseBlock
from keras_kfac.blocks.embedding import EmbeddingBlock
from keras_kfac.blocks.scale_shift import BatchNormalizationBlock, GroupNormalizationBlock, LayerNormalizationBlock

_BLOCKS: dict[type, type] = {}


def register_block(layer_class: type, block_class: type) -> None:
    """Makes every layer of `layer_class` (and its subclasses) get a `block_class` block."""
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(f"register_block: layer_class must be a keras.layers.Layer subclass; received {layer_class!r}.")
    if not (isinstance(block_class, type) and issubclass(block_class, CurvatureBlock)):
        raise TypeError(
            f"register_block: block_class must be a keras_kfac.CurvatureBlock subclass; received {block_class!r}."
        )
    _BLOCKS[layer_class] = block_class


def registered_blocks() -> dict:
    """A copy of the table {layer class: block class}."""
    return dict(_BLOCKS)


def block_for_layer(layer, options: BlockOptions | None = None) -> tuple[CurvatureBlock | None, str]:
    """Returns (block, "") for a supported layer, or (None, reason) otherwise.  With
    `options.diagonal_fisher`, a layer that would get none gets a `DiagonalFisherBlock`."""
    block, reason = _registered_block(layer, options)
    if block is None and options is not None and options.diagonal_fisher:
        if DiagonalFisherBlock.unsupported_reason(layer) is None:
            return DiagonalFisherBlock(layer, options), ""
    return block, reason


def _registered_block(layer, options: BlockOptions | None) -> tuple[CurvatureBlock | None, str]:
    for cls in type(layer).__mro__:
        block_class = _BLOCKS.get(cls)
        if block_class is None:
            continue
        if cls is not type(layer) and type(layer).call is not cls.call:
            return None, f"{type(layer).__name__} overrides call() (register a block for it)"
        reason = block_class.unsupported_reason(layer)
        if reason:
            return None, reason
        return block_class(layer, options), ""
    return None, "no block for this layer kind"


register_block(keras.layers.Dense, DenseBlock)
register_block(keras.layers.Conv2D, Conv2DBlock)
register_block(keras.layers.LayerNormalization, LayerNormalizationBlock)
register_block(keras.layers.BatchNormalization, BatchNormalizationBlock)
register_block(keras.layers.GroupNormalization, GroupNormalizationBlock)
register_block(keras.layers.Embedding, EmbeddingBlock)
register_block(keras.layers.EinsumDense, EinsumDenseBlock)
register_block(keras.layers.Conv1D, Conv1DBlock)
register_block(keras.layers.Conv3D, Conv3DBlock)
register_block(keras.layers.Conv2DTranspose, Conv2DTransposeBlock)
register_block(keras.layers.DepthwiseConv2D, DepthwiseConv2DBlock)
register_block(keras.layers.SeparableConv2D, SeparableConv2DBlock)
