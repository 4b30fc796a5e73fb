"""KFC block of a `keras.layers.Conv2D` layer, channels_last (Grosse & Martens 2016).

ā is the input patch feeding one output location, flattened in the kernel's (kh, kw, c_in)
order (with a 1 appended for the bias); A = mean over examples and output locations of ā āᵀ,
G = mean over examples of the sum over output locations of g gᵀ.  With `stats_locations` the
mean of A runs over a random subset of the locations (the Gram matrix of all patches costs
about as much as the convolution itself).  See `keras_kfac.blocks.convolution`.
"""

from __future__ import annotations

import tensorflow as tf

from keras_kfac.blocks.convolution import ConvolutionBlock, layer_geometry


class Conv2DBlock(ConvolutionBlock):
    kind = "Conv2DBlock"

    def __init__(self, layer, options=None):
        super().__init__(layer, options)
        kh, kw = layer.kernel_size
        sh, sw = layer.strides
        dh, dw = layer.dilation_rate
        self._sizes = [1, kh, kw, 1]
        self._strides = [1, sh, sw, 1]
        self._rates = [1, dh, dw, 1]
        self._padding = layer.padding.upper()

    def geometry(self, inputs) -> list:
        # extract_patches pads and strides as the convolution does: the sliced patches' layout.
        return layer_geometry(self.layer, inputs)

    def patches(self, inputs):
        patches = tf.image.extract_patches(
            inputs,
            sizes=self._sizes,
            strides=self._strides,
            rates=self._rates,
            padding=self._padding,
        )
        return tf.reshape(patches, (tf.shape(patches)[0], -1, self.in_features))
