"""K-FAC block of a `keras.layers.Embedding` layer.

An embedding lookup E[t] (E of shape (vocabulary, d)) is a Dense layer without bias applied to
the one-hot vector e_t, so its gradient is already the (dim_a, dim_g) = (vocabulary, d) matrix
of `keras_kfac.blocks.kronecker`, and its factors are, with one row per looked-up id t_{n,p}
(example n, position p of an input of any rank; n_rows of them), g_{n,p} the gradient of
example n's own loss with respect to the looked-up vector and m examples:

    A = (1/n_rows) Σ_{n,p} e_t e_tᵀ = diag(count of each id / n_rows)   (token frequencies)
    G = (1/m) Σ_n Σ_p g_{n,p} g_{n,p}ᵀ                                    (d×d)

(KFAC-expand over the positions, as `DenseBlock` by default, whatever `weight_sharing` says: the
mean of one-hot rows that KFAC-reduce would take is not diagonal).  A is diagonal exactly, so it is always
kept as a `DiagonalFactor` (O(vocabulary) memory, whatever `max_factor_size` says); G is dense
unless d exceeds `max_factor_size`.  With `mask_zero=True` the padding id 0 is still looked up
by the layer, so its positions count in A like any other id (their g is zero whenever the
layers after the embedding honour the mask).  Ids an example batch never uses have A = 0: their
rows of the direction are the gradient (zero on that batch) over the damping alone.

TensorFlow gives the gradient of a lookup as `tf.IndexedSlices`; `multiply_inverse` accepts it
(summing duplicate ids into the dense (vocabulary, d) matrix).  Quantized and LoRA embeddings,
and a `sparse=True` embedding, are left to the fallback optimizer.
"""

from __future__ import annotations

import tensorflow as tf

from keras_kfac.blocks.base import BlockOptions, CurvatureBlock
from keras_kfac.blocks.kronecker import KroneckerBlock
from keras_kfac.factors import DiagonalFactor


class EmbeddingBlock(KroneckerBlock):
    kind = "EmbeddingBlock"
    per_example_gradients = False  # its batch statistics are ids, not rows: "ekfac" runs as "eigen"

    def __init__(self, layer, options: BlockOptions | None = None):
        # Not KroneckerBlock.__init__: an Embedding has no `kernel`, and its A side is diagonal.
        CurvatureBlock.__init__(self, layer, options)
        self.kernel = layer.embeddings
        self.bias = None
        self.in_features = int(layer.input_dim)
        self.out_features = int(layer.output_dim)
        self.size_sides(side_a=DiagonalFactor(self.in_features))
        self.factor_a = self.factor_g = None
        self._inverse = []

    @classmethod
    def unsupported_reason(cls, layer) -> str | None:
        reason = cls.adapted_reason(layer)
        if reason:
            return reason
        if getattr(layer, "sparse", False):
            return "sparse=True is not supported"
        if not layer.trainable or not layer.embeddings.trainable:
            return "not trainable"
        return None

    # -- capture -------------------------------------------------------------------------
    def recording_call(self, call, record):
        def recorded(inputs, *args, **kwargs):
            outputs = call(inputs, *args, **kwargs)
            record(inputs, outputs)
            return outputs

        return recorded

    def output_rows(self, preact_grads):
        return tf.reshape(preact_grads, (-1, self.out_features))

    # -- math ----------------------------------------------------------------------------
    def batch_statistics(self, inputs, targets_grads, num_examples, seed=None) -> list:
        """[A (the id frequencies, a vector), G] of the batch (see module doc)."""
        del seed
        ids = tf.concat([tf.reshape(tf.cast(x, tf.int32), (-1,)) for x in inputs], axis=0)
        counts = tf.math.unsorted_segment_sum(tf.ones_like(ids, tf.float32), ids, self.in_features)
        n_rows = tf.cast(tf.size(ids), tf.float32)
        factor_a = counts / tf.maximum(n_rows, 1.0)
        rows_g = tf.concat([self.output_rows(tf.cast(g, tf.float32)) for g in targets_grads], axis=0)
        factor_g = self.side_g.gram(rows_g) / tf.cast(num_examples, tf.float32)
        return [factor_a, factor_g]

    def to_matrix(self, grads: list) -> tf.Tensor:
        """The (vocabulary, d) gradient, dense (an `IndexedSlices` gradient is summed per id)."""
        grad = grads[0]
        if isinstance(grad, tf.IndexedSlices):
            values = tf.reshape(tf.cast(grad.values, tf.float32), (-1, self.out_features))
            return tf.math.unsorted_segment_sum(values, tf.cast(grad.indices, tf.int32), self.in_features)
        return tf.reshape(tf.cast(grad, tf.float32), (self.in_features, self.out_features))

    def from_matrix(self, matrix: tf.Tensor) -> list:
        return [tf.reshape(matrix, self.kernel.shape)]
