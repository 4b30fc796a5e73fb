"""KFC block of a `keras.layers.Conv1D` layer, channels_last (Grosse & Martens 2016).

Kernel (k, c_in, c_out), reshaped to W of shape (k·c_in (+1), c_out).  For output position p,
ā_p = [x[p·s + a·d − P] for a = 0..k−1] (+ [1]), each x[·] a c_in vector and zero outside the
input, where s is the stride, d the dilation and P the zeros before the input: 0 for "valid",
⌊total/2⌋ for "same", (k − 1)·d for "causal" (Keras pads on the left only).  A = mean over
examples and positions of ā_p ā_pᵀ, G = (1/m) Σ_examples Σ_p g_p g_pᵀ with g_p the example's loss
gradient with respect to the pre-activation at p (see `keras_kfac.blocks.convolution`).
"""

from __future__ import annotations

from keras import ops

from keras_kfac.blocks.convolution import SlicedConvolutionBlock


class Conv1DBlock(SlicedConvolutionBlock):
    kind = "Conv1DBlock"

    def convolve(self, inputs):
        layer = self.layer
        padding = layer.padding
        if padding == "causal":
            inputs = ops.pad(inputs, [[0, 0], [(layer.kernel_size[0] - 1) * layer.dilation_rate[0], 0], [0, 0]])
            padding = "valid"
        return ops.conv(
            inputs,
            layer.kernel,
            strides=list(layer.strides),
            padding=padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
