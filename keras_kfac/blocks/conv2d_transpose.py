"""KFC block of a `keras.layers.Conv2DTranspose` layer, channels_last (Grosse & Martens 2016).

The layer computes the gradient (with respect to its input) of a convolution C from its output
grid to its input grid with the same stride s, dilation d and padding, so input location q of x
reaches output location p = q·s + a·d − P through kernel offset a = (a1, a2), elementwise over
the two axes, where P is the zeros before the input of C on each axis: 0 for "valid",
⌊max((Q − 1)·s + (k − 1)·d + 1 − Z, 0)/2⌋ for "same" (Q input, Z output size of the layer;
TensorFlow's rule, Z includes any `output_padding`).  The pre-activation at output location p is

    z_p = Σ_a K[a]·x[(p + P − a·d)/s] (+ b) = Wᵀ ā_p (+ b),

the sum over the offsets a for which (p + P − a·d)/s is an integer inside the input, where the
kernel K has Keras' layout (kh, kw, c_out, c_in) (c_out = filters) and K[a] is its (c_out, c_in)
slice.  So ā_p = [x[(p + P − a·d)/s] for a over the kernel offsets, row-major] (+ [1]), each x[·]
a c_in vector, zero for the offsets that reach no input location; W is K transposed to
(kh, kw, c_in, c_out) and reshaped to (kh·kw·c_in (+1), c_out) (`to_matrix`; `from_matrix`
transposes back).  The ā_p are the stride-1 patches, with flipped offsets, of the input spread
over the output grid (stride − 1 zeros between neighbours) and padded with (k − 1)·d − P zeros
before.  As for every convolution (see `keras_kfac.blocks.convolution`):

    A = mean over examples and output locations p of ā_p ā_pᵀ     (size kh·kw·c_in (+1))
    G = (1/m) Σ_examples Σ_p g_p g_pᵀ                               (size c_out)

with g_p the example's loss gradient with respect to z_p.
"""

from __future__ import annotations

import math

import tensorflow as tf
from keras import ops

from keras_kfac.blocks.convolution import (
    ConvolutionBlock,
    conv_geometry,
    gather_patches,
    nonnegative,
    static_dims,
    upsample,
)


def transpose_output_size(
    size, kernel: int, stride: int, dilation: int, padding: str, output_padding
) -> int | tf.Tensor:
    """The layer's output size along one axis (Keras' rule)."""
    span = (kernel - 1) * dilation + 1
    if padding == "valid":
        extra = max(span, stride) - span if output_padding is None else output_padding
        return (size - 1) * stride + span + extra
    if output_padding is None:
        return size * stride
    return (size - 1) * stride + span % 2 + output_padding


class Conv2DTransposeBlock(ConvolutionBlock):
    kind = "Conv2DTransposeBlock"

    def __init__(self, layer, options=None):
        super().__init__(layer, options)
        # KroneckerBlock read the kernel as (..., in, out); here it is (..., c_out, c_in).
        *spatial, filters, channels = (int(d) for d in self.kernel.shape)
        self.in_features = math.prod(spatial) * channels
        self.out_features = filters
        self.size_sides()
        self._permutation = list(range(len(spatial))) + [len(spatial) + 1, len(spatial)]

    def convolve(self, inputs):
        layer = self.layer
        return ops.conv_transpose(
            inputs,
            layer.kernel,
            strides=list(layer.strides),
            padding=layer.padding,
            output_padding=layer.output_padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )

    def patches(self, inputs):
        layer = self.layer
        rank = len(layer.kernel_size)
        output_padding = layer.output_padding or (None,) * rank
        spread = upsample(inputs, layer.strides)
        pads, out_sizes = [], []
        axes = zip(static_dims(inputs)[1:-1], static_dims(spread)[1:-1], layer.kernel_size, layer.strides)
        for (size, spread_size, k, s), d, extra in zip(axes, layer.dilation_rate, output_padding):
            out = transpose_output_size(size, k, s, d, layer.padding, extra)
            _, before, _ = conv_geometry(out, k, s, d, layer.padding)
            pads.append(((k - 1) * d - before, nonnegative(out + before - spread_size)))
            out_sizes.append(out)
        return gather_patches(spread, layer.kernel_size, (1,) * rank, layer.dilation_rate, pads, out_sizes, flip=True)

    def to_matrix(self, grads):
        kernel = tf.transpose(tf.cast(grads[0], tf.float32), self._permutation)
        return super().to_matrix([kernel, *grads[1:]])

    def from_matrix(self, matrix):
        *spatial, filters, channels = self.kernel.shape
        kernel = tf.reshape(matrix[: self.in_features], (*spatial, channels, filters))
        kernel = tf.transpose(kernel, self._permutation)
        if self.bias is None:
            return [kernel]
        return [kernel, tf.reshape(matrix[self.in_features], self.bias.shape)]
