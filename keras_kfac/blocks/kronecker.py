"""The common part of Kronecker-factored blocks (Dense, Conv2D, ...): F ≈ A ⊗ G.

A block's kernel (and bias) gradient is laid out as a matrix of shape (dim_a, dim_g): rows
index the layer's input features (plus a homogeneous 1 when there is a bias, which becomes the
last row), columns its output features.  Its factors are

    A = (1 / n_rows) Σ_rows ā āᵀ        (mean over examples and locations/uses)
    G = (1 / m)      Σ_rows g gᵀ        (mean over examples, sum over locations/uses)

where a "row" is one example at one location (a spatial position of a convolution, a position
of a sequence, one call of a layer used several times), m is the number of examples and g is
the gradient of that example's own loss with respect to the pre-activation.  A side larger than
`max_factor_size` keeps only the diagonal of its factor.  The damped inverse is applied by the
block's inversion strategy (`keras_kfac.inversion`), chosen once when the block is made.
"""

from __future__ import annotations

import math

import tensorflow as tf

from keras_kfac.blocks.base import BlockOptions, CurvatureBlock
from keras_kfac.factors import factor_for
from keras_kfac.inversion import INVERSIONS


def first_examples(recorded: tf.Tensor, k: int, num_examples) -> tf.Tensor:
    """The rows of `recorded` that belong to the first k of the `num_examples` examples: its first
    k·r rows, r = rows / num_examples (r = 1 unless a layer folds time into the batch axis, example
    by example)."""
    rows = tf.shape(recorded)[0]
    examples = tf.cast(num_examples, rows.dtype)
    return recorded[: rows * tf.minimum(tf.constant(k, rows.dtype), examples) // tf.maximum(examples, 1)]


class KroneckerBlock(CurvatureBlock):
    """Subclasses give `preactivation(inputs)` and `input_rows(inputs, locations, seed)`."""

    kind = "kronecker"
    # Whether example n's gradient is Σ ā gᵀ over its rows of `input_rows`/`output_rows` (all
    # locations), which damping_mode="ekfac" needs; a subclass for which it is not sets False.
    per_example_gradients = True

    def __init__(self, layer, options: BlockOptions | None = None):
        super().__init__(layer, options)
        self.kernel = layer.kernel
        bias = getattr(layer, "bias", None)
        self.bias = bias if getattr(layer, "use_bias", True) and bias is not None else None
        self.in_features = int(math.prod(self.kernel.shape[:-1]))
        self.out_features = int(self.kernel.shape[-1])
        self.size_sides()
        self.factor_a = self.factor_g = None
        self._inverse = []
        self._moments = []

    def size_sides(self, side_a=None, side_g=None) -> None:
        """(Re)makes the factor sides for `dim_a`, `dim_g` (dense up to `max_factor_size`, else
        diagonal; or the sides given) and the inversion strategy over them.  Subclasses whose
        kernel is not laid out (..., in, out) call it again once they set their feature sizes."""
        limit = self.options.max_factor_size
        self.side_a = side_a or factor_for(self.dim_a, limit)
        self.side_g = side_g or factor_for(self.dim_g, limit)
        mode = self.options.damping_mode
        if mode == "ekfac" and not self.per_example_gradients:
            mode = "eigen"  # no per-example gradients to re-estimate the scaling from
        self.inversion = INVERSIONS[mode](self.side_a, self.side_g, self.options.inverse_dtype)

    @staticmethod
    def adapted_reason(layer) -> str | None:
        """Why a layer whose weights are adapted (quantized, LoRA) gets no block, or None."""
        if getattr(layer, "quantization_mode", None):
            return "quantized layer"
        if getattr(layer, "lora_enabled", False):
            return "LoRA is enabled"
        return None

    @classmethod
    def unsupported_reason(cls, layer) -> str | None:
        reason = cls.adapted_reason(layer)
        if reason:
            return reason
        if not layer.trainable or not layer.kernel.trainable:
            return "not trainable"
        if getattr(layer, "use_bias", True) and getattr(layer, "bias", None) is not None and not layer.bias.trainable:
            return "bias not trainable"
        return None

    @property
    def variables(self) -> list:
        return [self.kernel] + ([self.bias] if self.bias is not None else [])

    @property
    def dim_a(self) -> int:
        return self.in_features + (1 if self.bias is not None else 0)

    @property
    def dim_g(self) -> int:
        return self.out_features

    # -- capture -------------------------------------------------------------------------
    def preactivation(self, inputs: tf.Tensor) -> tf.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def recording_call(self, call, record):
        layer = self.layer

        def recorded(inputs, *args, **kwargs):
            pre = self.preactivation(inputs)
            record(inputs, pre)
            activation = getattr(layer, "activation", None)
            return activation(pre) if activation is not None else pre

        return recorded

    def input_rows(self, inputs: tf.Tensor, locations: int | None = None, seed=None) -> tf.Tensor:
        """The (n_rows, in_features) input vectors seen by the kernel.  Blocks with spatial
        locations keep at most `locations` of them (a uniform random subset drawn from the
        stateless `seed`, the same for every example); others ignore both arguments."""
        raise NotImplementedError  # pragma: no cover - abstract

    def output_rows(self, preact_grads: tf.Tensor) -> tf.Tensor:
        """The (n_rows, out_features) pre-activation gradients, one row per input row."""
        return tf.reshape(preact_grads, (-1, self.out_features))

    # -- state ---------------------------------------------------------------------------
    def build(self, add_variable) -> None:
        self.factor_a = add_variable(self.side_a.shape, "zeros", "factor_a")
        self.factor_g = add_variable(self.side_g.shape, "zeros", "factor_g")
        self._inverse = [add_variable(shape, init, name) for shape, init, name in self.inversion.state_specs()]
        self._moments = [add_variable(shape, init, name) for shape, init, name in self.inversion.moment_specs()]
        self.state_variables = [self.factor_a, self.factor_g, *self._inverse, *self._moments]

    @property
    def statistics_variables(self) -> list:
        return [self.factor_a, self.factor_g]

    @property
    def inverse_variables(self) -> list:
        return list(self._inverse)

    # -- math ----------------------------------------------------------------------------
    def batch_statistics(self, inputs, targets_grads, num_examples, seed=None) -> list:
        """[A, G] of the batch (see module doc).  With `stats_locations`, A averages over a
        random subset of the spatial locations (an unbiased estimate of the same mean); with
        `input_stats_batch_size` k, over the rows of the first k examples only (G: all of them)."""
        locations = self.options.stats_locations
        first = self.options.input_stats_batch_size
        inputs_a = inputs if first is None else [first_examples(x, first, num_examples) for x in inputs]
        calls_a = []
        for call, x in enumerate(inputs_a):
            call_seed = None if seed is None else tf.random.experimental.stateless_fold_in(seed, call)
            calls_a.append(self.input_rows(tf.cast(x, tf.float32), locations, call_seed))
        calls_g = [self.output_rows(tf.cast(g, tf.float32)) for g in targets_grads]
        rows_a = tf.concat(calls_a, axis=0)
        n_rows = tf.cast(tf.shape(rows_a)[0], tf.float32)
        factor_a = self.side_a.gram(rows_a, with_ones=self.bias is not None) / n_rows
        factor_g = self.side_g.gram(tf.concat(calls_g, axis=0)) / tf.cast(num_examples, tf.float32)
        if not (self.inversion.per_example_scaling and self._moments):
            return [factor_a, factor_g]
        if locations is not None or first is not None:  # S needs every row: those of A are a subset
            calls_a = [self.input_rows(tf.cast(x, tf.float32)) for x in inputs]
        return [factor_a, factor_g, self.batch_scaling(inputs, calls_a, calls_g)]

    def batch_scaling(self, inputs, calls_a, calls_g) -> tf.Tensor:
        """damping_mode="ekfac": the batch estimate of S in the current eigenbases from each
        call's input and output rows at all locations (`inputs` give the examples per call)."""
        per_example = []
        for x, rows_a, rows_g in zip(inputs, calls_a, calls_g):
            examples = tf.shape(x)[0]
            if self.bias is not None:
                rows_a = tf.concat([rows_a, tf.ones_like(rows_a[:, :1])], axis=1)
            per_example.append(
                (tf.reshape(rows_a, (examples, -1, self.dim_a)), tf.reshape(rows_g, (examples, -1, self.dim_g)))
            )
        return self.inversion.batch_scaling(self._inverse, per_example)

    def update_statistics(self, batch: list, decay) -> None:
        super().update_statistics(batch[:2], decay)
        if len(batch) > 2:
            self.inversion.update_scaling(self._moments, batch[2], decay)

    def assign_inverse(self, values: list, ok) -> None:
        super().assign_inverse(values, ok)
        self.inversion.after_inverse(self._inverse, self._moments, ok)

    def compute_inverse(self, damping) -> tuple[list, tf.Tensor]:
        return self.inversion.compute([self.factor_a, self.factor_g], damping)

    def largest_curvature(self) -> tf.Tensor:
        """‖A‖_F · ‖G‖_F ≥ λ_max(A) λ_max(G) = λ_max(A ⊗ G) (a diagonal side: the norm of its vector)."""
        return tf.norm(self.factor_a) * tf.norm(self.factor_g)

    def inverse_cost(self) -> int:
        return sum(side.size ** (1 if side.diagonal else 3) for side in (self.side_a, self.side_g))

    def to_matrix(self, grads: list) -> tf.Tensor:
        """Stacks the kernel gradient (reshaped) and the bias gradient as a (dim_a, dim_g) matrix."""
        matrix = tf.reshape(tf.cast(grads[0], tf.float32), (self.in_features, self.out_features))
        if self.bias is not None:
            bias = tf.reshape(tf.cast(grads[1], tf.float32), (1, self.out_features))
            matrix = tf.concat([matrix, bias], axis=0)
        return matrix

    def from_matrix(self, matrix: tf.Tensor) -> list:
        """Inverse of `to_matrix`: [kernel-shaped tensor] (+ [bias-shaped tensor])."""
        kernel = tf.reshape(matrix[: self.in_features], self.kernel.shape)
        if self.bias is None:
            return [kernel]
        return [kernel, tf.reshape(matrix[self.in_features], self.bias.shape)]

    def multiply_matrix(self, matrix: tf.Tensor, damping) -> tf.Tensor:
        """The block's direction for the gradient `matrix`; with "eigen_adam" this also updates
        the block's per-step moments, so it runs once per step (the directions phase)."""
        return self.inversion.apply(self._inverse, matrix, damping, self._moments)

    def multiply_inverse(self, grads: list, damping) -> list:
        return self.from_matrix(self.multiply_matrix(self.to_matrix(grads), damping))

    # -- reporting -----------------------------------------------------------------------
    def summary(self) -> dict:
        def side(s) -> str:
            return f"{s.size} (diagonal)" if s.diagonal else f"{s.size}x{s.size}"

        return {
            "block": self.kind,
            "curvature": f"A {side(self.side_a)} ⊗ G {side(self.side_g)}, {self.inversion.name}",
            "state_bytes": self.memory_bytes(),
        }

    def memory_bytes(self) -> int:
        if self.state_variables:
            return super().memory_bytes()
        state = self.inversion.state_specs() + self.inversion.moment_specs()
        specs = [self.side_a.shape, self.side_g.shape] + [s for s, _, _ in state]
        return sum(4 * math.prod(s) for s in specs)
