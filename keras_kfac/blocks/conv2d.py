"""KFC block of a `keras.layers.Conv2D` layer, channels_last (Grosse & Martens 2016).

ā is the input patch feeding one output location, flattened in the kernel's (kh, kw, c_in)
order (with a 1 appended for the bias); A = mean over examples and output locations of ā āᵀ,
G = mean over examples of the sum over output locations of g gᵀ.  With `stats_locations` the
mean of A runs over a random subset of the locations (the Gram matrix of all patches costs
about as much as the convolution itself).
"""

from __future__ import annotations

import tensorflow as tf
from keras import ops

from keras_kfac.blocks.kronecker import KroneckerBlock


class Conv2DBlock(KroneckerBlock):
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

    @classmethod
    def unsupported_reason(cls, layer):
        if layer.data_format != "channels_last":
            return "channels_first is not supported"
        if layer.groups != 1:
            return "grouped convolution is not supported"
        return super().unsupported_reason(layer)

    def preactivation(self, inputs):
        pre = self.layer.convolution_op(inputs, self.layer.kernel)
        if self.bias is not None:
            pre = ops.add(pre, ops.reshape(self.layer.bias, (1, 1, 1, self.out_features)))
        return pre

    def input_rows(self, inputs, locations=None, seed=None):
        patches = tf.image.extract_patches(
            inputs,
            sizes=self._sizes,
            strides=self._strides,
            rates=self._rates,
            padding=self._padding,
        )
        if locations is None:
            return tf.reshape(patches, (-1, self.in_features))
        per_example = tf.reshape(patches, (tf.shape(patches)[0], -1, self.in_features))
        # A uniform random subset of the output locations: the first `locations` of a random
        # permutation (all of them when there are fewer).
        scores = tf.random.stateless_uniform(tf.shape(per_example)[1:2], seed)
        chosen = tf.argsort(scores)[:locations]
        return tf.reshape(tf.gather(per_example, chosen, axis=1), (-1, self.in_features))
