"""Grafting: keep each block's K-FAC direction, take the norm of a first-order step.

A graft owns its state (Adam's second moments) and gives, for a block's gradients, the norm of
the first-order direction the block's K-FAC direction U is rescaled to: ‖g‖ for "sgd",
‖g / (√v̂ + ε)‖ for "adam" (v̂ the bias-corrected moving average of g² with β₂ = 0.999,
ε = 1e-7, as `keras.optimizers.Adam`).
"""

from __future__ import annotations

import tensorflow as tf

ADAM_BETA_2 = 0.999
ADAM_EPSILON = 1e-7


class SGDGraft:
    name = "sgd"

    def build(self, add_variable_from_reference, variables: list) -> None:
        del add_variable_from_reference, variables

    def target_norm(self, variables: list, grads: list, step) -> tf.Tensor:
        return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads]))


class AdamGraft:
    name = "adam"

    def __init__(self):
        self.second_moments = {}

    def build(self, add_variable_from_reference, variables: list) -> None:
        for v in variables:
            self.second_moments[id(v)] = add_variable_from_reference(v, "graft_v")

    def target_norm(self, variables: list, grads: list, step) -> tf.Tensor:
        """Updates the second moments of `variables` with `grads` and returns the Adam norm."""
        correction = 1.0 - tf.pow(ADAM_BETA_2, tf.cast(step, tf.float32))
        total = []
        for v, g in zip(variables, grads):
            second = self.second_moments[id(v)]
            second.assign(ADAM_BETA_2 * second + (1.0 - ADAM_BETA_2) * tf.square(g))
            direction = g / (tf.sqrt(second / correction) + ADAM_EPSILON)
            total.append(tf.reduce_sum(tf.square(direction)))
        return tf.sqrt(tf.add_n(total))


GRAFTS = {None: None, "sgd": SGDGraft, "adam": AdamGraft}


def rescale(direction: list, target_norm) -> list:
    """`direction` scaled to `target_norm` (zero when the direction is zero)."""
    norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(d)) for d in direction]))
    factor = tf.where(norm > 0, target_norm / tf.where(norm > 0, norm, 1.0), 0.0)
    return [d * factor for d in direction]
