"""Schedule-free AdamW (Defazio et al. 2024) as its paper defines it, for the benchmarks.

Keras' own `keras.optimizers.ScheduleFreeAdamW` (3.14, 3.15) does not train under the TensorFlow
backend's `fit`: its `build` copies the weights into z with an assignment that is lost when the
optimizer is built while `fit` traces its step, so z starts at zero and the first step pulls every
weight to about −lr·sign(g) (a Dense kernel of ones became 0.001 after one step at lr 1e-3); and it
reads the old z after assigning the new one, so the average x is off even when z starts right.
This subclass keeps Keras' arguments, variables and `get_config`, and replaces the update:

    v ← β₂ v + (1 − β₂) g²,            z₀ = y₀ (the weights at the first step),
    x ← (y − (1 − β₁) z) / β₁           (before z moves),
    z ← z − lr · g / (√(v / (1 − β₂ᵗ)) + ε),
    x ← (1 − 1/t) x + z / t,            y ← (1 − β₁) z + β₁ x,

with the gradient g taken at y (the model's weights) and lr warmed up linearly over
`warmup_steps`.  It is evaluated at x (`evaluation_point` in compare_optimizers.py).
"""

from __future__ import annotations

import keras
from keras import ops


class ScheduleFreeAdamW(keras.optimizers.ScheduleFreeAdamW):
    """`keras.optimizers.ScheduleFreeAdamW` with the update of the module docstring."""

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        gradient = ops.cast(gradient, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        rate = ops.cast(learning_rate, dtype)
        if self.warmup_steps > 0:
            rate = rate * ops.minimum(step / ops.cast(self.warmup_steps, dtype), 1.0)
        beta_1 = ops.cast(self.beta_1, dtype)
        beta_2 = ops.cast(self.beta_2, dtype)
        index = self._get_variable_index(variable)
        z_variable, velocity = self._momentums[index], self._velocities[index]

        y = ops.convert_to_tensor(variable)
        # Read z once, as a tensor, before it is assigned; at the first step it is y itself.
        z = ops.where(ops.equal(self.iterations, 0), y, ops.convert_to_tensor(z_variable))
        x = (y - (1.0 - beta_1) * z) / beta_1
        self.assign_add(velocity, (ops.square(gradient) - velocity) * (1.0 - beta_2))
        denominator = ops.sqrt(velocity / (1.0 - ops.power(beta_2, step))) + ops.cast(self.epsilon, dtype)
        z = z - rate * gradient / denominator
        x = (1.0 - 1.0 / step) * x + z / step
        self.assign(z_variable, z)
        self.assign(variable, (1.0 - beta_1) * z + beta_1 * x)
