"""KFC block of a `keras.layers.Conv3D` layer, channels_last (Grosse & Martens 2016).

Kernel (k1, k2, k3, c_in, c_out), reshaped to W of shape (k1·k2·k3·c_in (+1), c_out).  For output
location p = (p1, p2, p3), ā_p = [x[p·s + a·d − P] for a over the kernel offsets, row-major]
(+ [1]), elementwise over the three axes, each x[·] a c_in vector and zero outside the input, P
the zeros before the input on each axis (0 for "valid", ⌊total/2⌋ for "same").  A = mean over
examples and locations of ā_p ā_pᵀ, G = (1/m) Σ_examples Σ_p g_p g_pᵀ with g_p the example's loss
gradient with respect to the pre-activation at p (see `keras_kfac.blocks.convolution`).
"""

from __future__ import annotations

from keras_kfac.blocks.convolution import SlicedConvolutionBlock


class Conv3DBlock(SlicedConvolutionBlock):
    kind = "Conv3DBlock"
