"""Probe (not part of the package): an Embedding block whose diagonal A is each id's share of
the gradient energy, A_tt = tr F_t / tr G with F_t = (1/m) Σ_{rows of id t} g gᵀ, instead of its
share of the rows (count_t / n_rows); both sum to 1, and they agree when every row carries the
same energy.  Importing this module registers it for every `keras.layers.Embedding`:

    PYTHONPATH=benchmarks/results/study/vit_position_embedding python benchmarks/weight_averaging.py \
        --model vit_p7 --seed S --eval-every 93 --averages poly8 \
        --config "(__import__('energy_embedding'), KFAC())[1]" --data-dir ../shared/data/fashion_mnist
"""

import keras
import tensorflow as tf

import keras_kfac
from keras_kfac.blocks.embedding import EmbeddingBlock


class EnergyEmbeddingBlock(EmbeddingBlock):
    def batch_statistics(self, inputs, targets_grads, num_examples, seed=None):
        del seed
        ids = tf.concat([tf.reshape(tf.cast(x, tf.int32), (-1,)) for x in inputs], axis=0)
        rows_g = tf.concat([self.output_rows(tf.cast(g, tf.float32)) for g in targets_grads], axis=0)
        energy = tf.math.unsorted_segment_sum(tf.reduce_sum(tf.square(rows_g), axis=1), ids, self.in_features)
        counts = tf.math.unsorted_segment_sum(tf.ones_like(ids, tf.float32), ids, self.in_features)
        total = tf.reduce_sum(energy)
        share = tf.where(total > 0, energy / tf.maximum(total, 1e-30), counts / tf.maximum(tf.reduce_sum(counts), 1.0))
        factor_g = self.side_g.gram(rows_g) / tf.cast(num_examples, tf.float32)
        return [share, factor_g]


keras_kfac.register_block(keras.layers.Embedding, EnergyEmbeddingBlock)
