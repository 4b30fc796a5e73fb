"""K-FAC block of a `keras.layers.Dense` layer (Martens & Grosse 2015).

Inputs of rank > 2 (e.g. (batch, time, features)) have positions shared by the weights. With
KFAC-expand (the default; Eschenhagen et al. 2023) they are treated like convolution locations:
A averages over examples and positions, G sums over positions and averages over examples. With
KFAC-reduce (`KFAC(weight_sharing="reduce")`, or `DenseReduceBlock`) each example gives one row:
ā the mean of its positions' inputs, g the sum of its positions' output gradients. On rank-2
inputs both are plain K-FAC. (`keras_kfac.blocks.weight_sharing`.)
"""

from __future__ import annotations

import tensorflow as tf
from keras import ops

from keras_kfac.blocks.kronecker import KroneckerBlock
from keras_kfac.blocks.weight_sharing import choose_sharing, input_rank, shared_rows, sharing_summary


class DenseBlock(KroneckerBlock):
    kind = "DenseBlock"

    def preactivation(self, inputs):
        pre = ops.matmul(inputs, self.layer.kernel)
        if self.bias is not None:
            pre = ops.add(pre, self.layer.bias)
        return pre

    weight_sharing = "expand"

    def __init__(self, layer, options=None, weight_sharing: str | None = None):
        super().__init__(layer, options)
        self.weight_sharing = choose_sharing(self, weight_sharing)

    def input_rows(self, inputs, locations=None, seed=None):
        per_example = tf.reshape(inputs, (tf.shape(inputs)[0], -1, self.in_features))
        return shared_rows(per_example, self.weight_sharing, "a")

    def output_rows(self, preact_grads):
        per_example = tf.reshape(preact_grads, (tf.shape(preact_grads)[0], -1, self.out_features))
        return shared_rows(per_example, self.weight_sharing, "g")

    def summary(self) -> dict:
        info = super().summary()
        rank = input_rank(self.layer)
        return info if rank == 2 else sharing_summary(info, self.weight_sharing)  # named where positions may be shared
