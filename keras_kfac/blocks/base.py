"""What every curvature block provides to the optimizer.

A block owns the curvature of one layer's trainable variables: it says how the layer is
recorded during the forward pass (`recording_call`), creates its own state (`build`), turns a
recording into batch estimates (`batch_statistics`) and folds them into its moving averages
(`update_statistics`), computes and stores its damped inverse (`compute_inverse`,
`assign_inverse`), multiplies gradients by it (`multiply_inverse`) and describes itself for
`kfac_summary` (`summary`).  The optimizer runs these as phases over all blocks; it never
looks inside one.  Batch estimates and inverse values travel as flat lists of float32 tensors,
so that a `tf.distribute` reducer can average or share them without knowing their meaning.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    """Settings a block is created with (from the `KFAC` arguments of the same names)."""

    damping_mode: str = "factored"
    max_factor_size: int | None = 8192
    stats_locations: int | None = None
    input_stats_batch_size: int | None = None  # A from the first k examples of the statistics sample
    inverse_dtype: str = "float32"
    weight_sharing: str | None = None  # "expand" or "reduce" over shared positions (None: the block's default)
    diagonal_fisher: bool = False  # layers without a block get a `DiagonalFisherBlock`


class CurvatureBlock:
    """Base class of all blocks (see module doc).  `layer` is the Keras layer it serves."""

    kind = "curvature"

    def __init__(self, layer, options: BlockOptions | None = None):
        self.layer = layer
        self.options = options or BlockOptions()
        self.state_variables: list = []

    @classmethod
    def unsupported_reason(cls, layer) -> str | None:
        """Why this block cannot serve `layer` (e.g. a setting it does not model), or None."""
        if not layer.trainable:
            return "not trainable"
        return None

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def variables(self) -> list:
        """The layer variables whose gradients this block preconditions, in a fixed order."""
        raise NotImplementedError

    # -- capture -------------------------------------------------------------------------
    def recording_call(self, call, record):
        """A replacement for `layer.call` that computes the same output and calls
        `record(inputs, target)`: `target` is the tensor whose loss gradient the statistics
        need, `inputs` whatever else they need."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------
    def build(self, add_variable) -> None:
        """Creates the block's variables with `add_variable(shape, initializer, name)`."""
        raise NotImplementedError

    def update_statistics(self, batch: list, decay) -> None:
        """new = decay · old + (1 − decay) · batch, for every statistic of the block."""
        for variable, value in zip(self.statistics_variables, batch):
            variable.assign(decay * variable + (1.0 - decay) * value)

    @property
    def statistics_variables(self) -> list:
        raise NotImplementedError

    @property
    def inverse_variables(self) -> list:
        raise NotImplementedError

    def assign_inverse(self, values: list, ok) -> None:
        """Stores new inverse values, keeping the previous ones when `ok` is False."""
        for variable, value in zip(self.inverse_variables, values):
            variable.assign(tf.where(ok, value, variable))

    # -- what subclasses compute ---------------------------------------------------------
    def batch_statistics(self, inputs: list, targets_grads: list, num_examples, seed) -> list:
        """Batch estimates (float32 tensors shaped like `statistics_variables`) from every
        recorded call of the layer: `inputs[i]` and `targets_grads[i]` (the per-example loss
        gradients with respect to the recorded target) of call i."""
        raise NotImplementedError

    def compute_inverse(self, damping) -> tuple[list, tf.Tensor]:
        """New values of `inverse_variables` from the statistics and λ, and whether they are finite."""
        raise NotImplementedError

    def inverse_cost(self) -> int:
        """Flops of `compute_inverse` up to a constant (to balance replicas)."""
        raise NotImplementedError

    def largest_curvature(self) -> tf.Tensor | None:
        """An upper bound on the largest eigenvalue of the block's undamped curvature from its
        current statistics (the starting λ of adaptive damping is the largest over the blocks);
        None: the block gives no bound."""
        return None

    def multiply_inverse(self, grads: list, damping) -> list:
        """The damped inverse curvature times the gradients of `variables` (float32, same shapes)."""
        raise NotImplementedError

    # -- reporting -----------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes of the block's state variables."""
        total = 0
        for variable in self.state_variables:
            count = 1
            for d in variable.shape:
                count *= int(d)
            total += 4 * count
        return total

    def summary(self) -> dict:
        """Fields of the block's `kfac_summary` line."""
        return {"block": self.kind, "curvature": "", "state_bytes": self.memory_bytes()}
