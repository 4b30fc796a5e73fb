"""Curvature blocks, one class per layer kind, and the registry that picks one for a layer."""

from keras_kfac.blocks.base import BlockOptions, CurvatureBlock
from keras_kfac.blocks.conv1d import Conv1DBlock
from keras_kfac.blocks.conv2d import Conv2DBlock
from keras_kfac.blocks.conv2d_transpose import Conv2DTransposeBlock
from keras_kfac.blocks.conv3d import Conv3DBlock
from keras_kfac.blocks.convolution import ConvolutionBlock
from keras_kfac.blocks.dense import DenseBlock
from keras_kfac.blocks.depthwise import DepthwiseConv2DBlock, SeparableConv2DBlock
from keras_kfac.blocks.diagonal import DiagonalFisherBlock
from keras_kfac.blocks.einsum_dense import (
    DenseExpandBlock,
    DenseReduceBlock,
    EinsumDenseBlock,
    EinsumDenseExpandBlock,
    EinsumDenseReduceBlock,
)
from keras_kfac.blocks.embedding import EmbeddingBlock
from keras_kfac.blocks.kronecker import KroneckerBlock
from keras_kfac.blocks.registry import block_for_layer, register_block, registered_blocks
from keras_kfac.blocks.scale_shift import (
    BatchNormalizationBlock,
    FeatureBlock,
    GroupNormalizationBlock,
    LayerNormalizationBlock,
    ScaleShiftBlock,
)

__all__ = [
    "BlockOptions",
    "CurvatureBlock",
    "KroneckerBlock",
    "DenseBlock",
    "DenseReduceBlock",
    "DenseExpandBlock",
    "Conv2DBlock",
    "FeatureBlock",
    "ScaleShiftBlock",
    "LayerNormalizationBlock",
    "BatchNormalizationBlock",
    "GroupNormalizationBlock",
    "EinsumDenseBlock",
    "EinsumDenseReduceBlock",
    "EinsumDenseExpandBlock",
    "EmbeddingBlock",
    "ConvolutionBlock",
    "Conv1DBlock",
    "Conv3DBlock",
    "Conv2DTransposeBlock",
    "DepthwiseConv2DBlock",
    "SeparableConv2DBlock",
    "DiagonalFisherBlock",
    "block_for_layer",
    "register_block",
    "registered_blocks",
]
