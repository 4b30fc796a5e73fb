"""K-FAC block of a `keras.layers.Dense` layer (Martens & Grosse 2015).

Inputs of rank > 2 (e.g. (batch, time, features)) are treated like convolution locations:
A averages over examples and positions, G sums over positions and averages over examples.
"""

from __future__ import annotations

import tensorflow as tf
from keras import ops

from keras_kfac.blocks.kronecker import KroneckerBlock


class DenseBlock(KroneckerBlock):
    kind = "DenseBlock"

    def preactivation(self, inputs):
        pre = ops.matmul(inputs, self.layer.kernel)
        if self.bias is not None:
            pre = ops.add(pre, self.layer.bias)
        return pre

    def input_rows(self, inputs, locations=None, seed=None):
        return tf.reshape(inputs, (-1, self.in_features))
