"""Curvature blocks, one class per layer kind, and the registry that picks one for a layer."""

from keras_kfac.blocks.base import BlockOptions, CurvatureBlock
from keras_kfac.blocks.conv2d import Conv2DBlock
from keras_kfac.blocks.dense import DenseBlock
from keras_kfac.blocks.depthwise import DepthwiseConv2DBlock, SeparableConv2DBlock
from keras_kfac.blocks.kronecker import KroneckerBlock
from keras_kfac.blocks.registry import block_for_layer, register_block, registered_blocks

__all__ = [
    "BlockOptions",
    "CurvatureBlock",
    "KroneckerBlock",
    "DenseBlock",
    "Conv2DBlock",
    "DepthwiseConv2DBlock",
    "SeparableConv2DBlock",
    "block_for_layer",
    "register_block",
    "registered_blocks",
]
