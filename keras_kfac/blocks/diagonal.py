"""A diagonal Fisher block for a layer that no other block models (`KFAC(diagonal_fisher=True)`).

Any layer whose call returns one tensor y: its trainable variables θ (all of them, any shapes)
get the diagonal of their Fisher,

    F = (1/m) Σ_n E[∇_n ⊙ ∇_n],    ∇_n = J_nᵀ g_n = ∂ℓ_n/∂θ

(g_n the gradient of example n's own loss with respect to the recorded output y, as the other
blocks use it).  Per-example parameter gradients of an arbitrary layer would cost m backward
passes, so the block estimates F from their sum, one vector-Jacobian product of the recorded
call: with the sampled Fisher the ∇_n have mean zero and are independent across examples, so

    F̂ = (Σ_n ∇_n)² / m    has expectation F

(one draw per statistics step, averaged by the moving average like every statistic).  With
`fisher="empirical"` the ∇_n do not have mean zero and F̂ also holds the square of the batch
gradient: an approximation.  The direction is u = ∇ / (F̄ + λ), F̄ the copy of F taken at the
last inversion and λ the damping of the current step.

The recorded call is run once more inside the statistics phase to differentiate it, so a layer
whose call has side effects (updates its own variables, draws random numbers) repeats them
there; such layers are better excluded (`KFAC(exclude=...)`).
"""

from __future__ import annotations

import math

import tensorflow as tf

from keras_kfac.blocks.base import CurvatureBlock
from keras_kfac.inversion import all_finite


class DiagonalFisherBlock(CurvatureBlock):
    kind = "DiagonalFisherBlock"

    def __init__(self, layer, options=None):
        super().__init__(layer, options)
        self._variables = list(layer.trainable_variables)
        self._call = None  # the layer's own call, set while recording
        self.fisher, self.fisher_at_inversion = [], []

    @classmethod
    def unsupported_reason(cls, layer) -> str | None:
        reason = super().unsupported_reason(layer)
        if reason:
            return reason
        if not layer.trainable_variables:
            return "no trainable parameters"
        return None

    @property
    def variables(self) -> list:
        return list(self._variables)

    @property
    def size(self) -> int:
        return sum(int(math.prod(v.shape)) for v in self._variables)

    # -- capture -------------------------------------------------------------------------
    def recording_call(self, call, record):
        self._call = call

        def recorded(*args, **kwargs):
            outputs = call(*args, **kwargs)
            if not tf.is_tensor(outputs):
                raise ValueError(
                    f"{self.name}: KFAC(diagonal_fisher=True) needs a layer whose call returns one tensor; "
                    f"{type(self.layer).__name__} returns {type(outputs).__name__}. Exclude it with KFAC(exclude=...)."
                )
            record((args, kwargs), outputs)
            return outputs

        return recorded

    # -- state ---------------------------------------------------------------------------
    def build(self, add_variable) -> None:
        self.fisher = [add_variable(v.shape, "zeros", f"diagonal_fisher_{i}") for i, v in enumerate(self._variables)]
        self.fisher_at_inversion = [
            add_variable(v.shape, "zeros", f"diagonal_fisher_at_inversion_{i}") for i, v in enumerate(self._variables)
        ]
        self.state_variables = [*self.fisher, *self.fisher_at_inversion]

    @property
    def statistics_variables(self) -> list:
        return list(self.fisher)

    @property
    def inverse_variables(self) -> list:
        return list(self.fisher_at_inversion)

    # -- math ----------------------------------------------------------------------------
    def batch_statistics(self, inputs, targets_grads, num_examples, seed=None) -> list:
        """(Σ_n ∇_n)² / m per variable, Σ_n ∇_n the vector-Jacobian product of each recorded
        call with its per-example output gradients, summed over the calls."""
        del seed
        total = [tf.zeros(v.shape, tf.float32) for v in self._variables]
        for (args, kwargs), g in zip(inputs, targets_grads):
            with tf.GradientTape() as tape:
                outputs = self._call(*args, **kwargs)
            grads = tape.gradient(
                outputs, self._variables, output_gradients=tf.cast(g, outputs.dtype), unconnected_gradients="zero"
            )
            total = [t + tf.cast(tf.convert_to_tensor(d), tf.float32) for t, d in zip(total, grads)]
        m = tf.cast(num_examples, tf.float32)
        return [tf.square(t) / m for t in total]

    def compute_inverse(self, damping) -> tuple[list, tf.Tensor]:
        del damping  # applied at every step instead
        values = [tf.identity(f) for f in self.fisher]
        return values, all_finite(values)

    def inverse_cost(self) -> int:
        return self.size

    def largest_curvature(self) -> tf.Tensor:
        return tf.reduce_max(tf.stack([tf.reduce_max(f) for f in self.fisher]))

    def multiply_inverse(self, grads: list, damping) -> list:
        lam = tf.cast(damping, tf.float32)
        return [tf.cast(g, tf.float32) / (f + lam) for g, f in zip(grads, self.fisher_at_inversion)]

    # -- reporting -----------------------------------------------------------------------
    def summary(self) -> dict:
        return {
            "block": self.kind,
            "curvature": f"diagonal Fisher × {self.size} (from batch gradients)",
            "state_bytes": self.memory_bytes(),
        }

    def memory_bytes(self) -> int:
        return 2 * 4 * self.size
