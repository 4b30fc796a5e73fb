"""Per-feature blocks, and the scale-and-shift blocks of the normalisation layers.

`FeatureBlock` (generic): a block whose k ≤ 2 variables have the same number P of elements
("features") and whose curvature couples the variables of one feature and nothing else.  With
r_ij ∈ R^k the gradients of the k variables' feature j for row i (one example in one call of
the layer),

    F_j = (1 / m) Σ_rows r_ij r_ijᵀ        (m the number of examples)

stored as the P-vectors of its upper triangle, [F_11, F_12, F_22] (k = 2) or [F_11] (k = 1, a
diagonal).  A layer called several times adds one row per example and call (the cross-call
terms are dropped, as in the Kronecker blocks).  Each inversion keeps a copy F̄ of F; the
direction of feature j is u_j = (F̄_j + λI)⁻¹ ∇_j with the λ of the current step, in closed form:

    u_1 = ((F_22 + λ) ∇_1 − F_12 ∇_2) / D,   u_2 = ((F_11 + λ) ∇_2 − F_12 ∇_1) / D,
    D = max(F_11 F_22 − F_12², 0) + λ (F_11 + F_22) + λ²      (k = 2; D > 0 for λ > 0)

and u = ∇ / (F̄ + λ) for k = 1.  The inversion strategy (`damping_mode`, "eigen" or "factored")
does not apply: a 2x2 system per feature is damped exactly.  The arithmetic runs in
`inverse_dtype`.

`ScaleShiftBlock`: layers computing y = γ ⊙ x̂ + β, x̂ the normalised input and γ, β (either may
be absent) spanning some "feature" axes of x̂, broadcast over the others.  Example i's
gradients are

    a_ij = ∂ℓ_i/∂γ_j = Σ_positions g ⊙ x̂,      b_ij = ∂ℓ_i/∂β_j = Σ_positions g

(positions: the axes other than the batch and feature axes; g = ∂ℓ_i/∂y, the per-example
gradient of the recorded target y), so r_ij = (a_ij, b_ij), or a_ij or b_ij alone.  The
recording runs the layer's own `call` unchanged (so its output, and BatchNormalization's
moving-statistics update, are exactly the layer's) and computes x̂ alongside from the layer's
formulas (the same moments); it records x̂ as the input and the output y as the target.

LayerNormalization (any `axis`, `rms_scaling`, `center`, `scale`), BatchNormalization
(`training` and `mask` as the layer sees them, `renorm`, `synchronized`) and GroupNormalization
are thin subclasses.  Examples are treated as independent, as in every block: for
BatchNormalization in training mode the coupling through the batch moments is ignored.
"""

from __future__ import annotations

import inspect
import math

import tensorflow as tf
from keras import backend, ops

from keras_kfac import _private
from keras_kfac.blocks.base import BlockOptions, CurvatureBlock
from keras_kfac.inversion import all_finite


class FeatureBlock(CurvatureBlock):
    """Generic per-feature block (see module doc).  Subclasses give `parameters(layer)`,
    `recording_call` and `example_gradients`."""

    kind = "FeatureBlock"

    def __init__(self, layer, options: BlockOptions | None = None):
        super().__init__(layer, options)
        self.parts = self.trainable_parts(layer)
        if not 1 <= len(self.parts) <= 2:
            raise ValueError(f"{type(self).__name__} needs one or two variables; found {len(self.parts)}.")
        self.size = int(math.prod(self.parts[0][1].shape))
        if any(int(math.prod(v.shape)) != self.size for _, v in self.parts):
            raise ValueError(f"{type(self).__name__}: the variables must have the same number of elements.")
        self.fisher = self.fisher_at_inversion = None

    @classmethod
    def parameters(cls, layer) -> list:
        """The layer's variables in a fixed order of roles, None for an absent one."""
        raise NotImplementedError  # pragma: no cover - abstract

    @classmethod
    def trainable_parts(cls, layer) -> list:
        """(role index, variable) of the present, trainable variables."""
        return [(i, v) for i, v in enumerate(cls.parameters(layer)) if v is not None and v.trainable]

    @classmethod
    def unsupported_reason(cls, layer) -> str | None:
        reason = super().unsupported_reason(layer)
        if reason:
            return reason
        if not cls.trainable_parts(layer):
            return "no trainable parameters"
        return None

    @property
    def variables(self) -> list:
        return [v for _, v in self.parts]

    @property
    def entries(self) -> int:
        """Stored entries of one feature's k×k matrix (its upper triangle)."""
        k = len(self.parts)
        return k * (k + 1) // 2

    def example_gradients(self, inputs, target_grads) -> list:
        """Per variable, the (rows, P) per-row gradients of one recorded call."""
        raise NotImplementedError  # pragma: no cover - abstract

    # -- state ---------------------------------------------------------------------------
    def build(self, add_variable) -> None:
        shape = (self.entries, self.size)
        self.fisher = add_variable(shape, "zeros", "feature_fisher")
        self.fisher_at_inversion = add_variable(shape, "zeros", "feature_fisher_at_inversion")
        self.state_variables = [self.fisher, self.fisher_at_inversion]

    @property
    def statistics_variables(self) -> list:
        return [self.fisher]

    @property
    def inverse_variables(self) -> list:
        return [self.fisher_at_inversion]

    # -- math ----------------------------------------------------------------------------
    def batch_statistics(self, inputs, targets_grads, num_examples, seed=None) -> list:
        del seed
        per_call = [self.example_gradients(x, g) for x, g in zip(inputs, targets_grads)]
        rows = [tf.concat([call[p] for call in per_call], axis=0) for p in range(len(self.parts))]
        m = tf.cast(num_examples, tf.float32)
        products = [rows[0] * rows[0]]
        if len(rows) == 2:
            products += [rows[0] * rows[1], rows[1] * rows[1]]
        return [tf.stack([tf.reduce_sum(p, axis=0) for p in products]) / m]

    def compute_inverse(self, damping) -> tuple[list, tf.Tensor]:
        del damping  # applied at every step instead (see module doc)
        value = tf.identity(self.fisher)
        return [value], all_finite([value])

    def inverse_cost(self) -> int:
        return self.size

    def largest_curvature(self) -> tf.Tensor:
        """The largest trace of a feature's 1×1 or 2×2 matrix (≥ its largest eigenvalue)."""
        trace = self.fisher[0] if len(self.parts) == 1 else self.fisher[0] + self.fisher[2]
        return tf.reduce_max(trace)

    def multiply_inverse(self, grads: list, damping) -> list:
        dtype = tf.as_dtype(self.options.inverse_dtype)
        lam = tf.cast(damping, dtype)
        fisher = tf.cast(self.fisher_at_inversion, dtype)
        flat = [tf.cast(tf.reshape(g, (-1,)), dtype) for g in grads]
        if len(flat) == 1:
            directions = [flat[0] / (fisher[0] + lam)]
        else:
            f11, f12, f22 = fisher[0], fisher[1], fisher[2]
            det = tf.maximum(f11 * f22 - f12 * f12, 0.0) + lam * (f11 + f22) + lam * lam
            g1, g2 = flat
            directions = [((f22 + lam) * g1 - f12 * g2) / det, ((f11 + lam) * g2 - f12 * g1) / det]
        return [tf.reshape(tf.cast(u, tf.float32), v.shape) for u, v in zip(directions, self.variables)]

    # -- reporting -----------------------------------------------------------------------
    def role_names(self) -> list:
        return [f"w{i}" for i, _ in self.parts]

    def summary(self) -> dict:
        names = self.role_names()
        if len(names) == 1:
            curvature = f"diagonal ({names[0]}) × {self.size}, exact damping"
        else:
            curvature = f"2x2 ({', '.join(names)}) per feature × {self.size}, exact damping"
        return {"block": self.kind, "curvature": curvature, "state_bytes": self.memory_bytes()}

    def memory_bytes(self) -> int:
        return 2 * 4 * self.entries * self.size


class ScaleShiftBlock(FeatureBlock):
    """y = γ ⊙ x̂ + β (see module doc).  Subclasses give `feature_axes(rank)` and
    `normalized(inputs, training, mask)`; `parameters(layer)` returns [γ, β]."""

    kind = "ScaleShiftBlock"

    @classmethod
    def parameters(cls, layer) -> list:
        return [getattr(layer, "gamma", None), getattr(layer, "beta", None)]

    def role_names(self) -> list:
        return ["γ" if i == 0 else "β" for i, _ in self.parts]

    def feature_axes(self, rank: int) -> list:
        """The axes of x̂ (non-negative, increasing) that γ and β span; their elements, in this
        order, are those of γ and β flattened.  Default: the layer's single `axis` (Batch- and
        GroupNormalization)."""
        return [self.layer.axis % rank]

    def normalized(self, inputs, training=None, mask=None):
        """x̂ as the layer's call computes it (at least float32)."""
        raise NotImplementedError  # pragma: no cover - abstract

    @staticmethod
    def compute_dtype(inputs):
        return backend.result_type(inputs.dtype, "float32")

    def recording_call(self, call, record):
        signature = inspect.signature(call)
        first = next(iter(signature.parameters))

        def recorded(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs).arguments
            normalized = self.normalized(arguments[first], arguments.get("training"), arguments.get("mask"))
            # Before `call`: BatchNormalization's renorm correction reads the variables `call` updates.
            normalized = tf.stop_gradient(normalized)
            outputs = call(*args, **kwargs)
            record(normalized, outputs)
            return outputs

        return recorded

    def example_gradients(self, inputs, target_grads) -> list:
        normalized = tf.cast(inputs, tf.float32)
        grads = tf.cast(target_grads, tf.float32)
        rank = normalized.shape.rank
        features = self.feature_axes(rank)
        if 0 in features:
            raise ValueError(f"{self.name}: the parameters span the batch axis, which a block cannot model.")
        positions = [d for d in range(1, rank) if d not in features]
        out = []
        for role, _ in self.parts:
            per_position = grads * normalized if role == 0 else grads
            summed = tf.reduce_sum(per_position, axis=positions) if positions else per_position
            out.append(tf.reshape(summed, (-1, self.size)))
        return out


class LayerNormalizationBlock(ScaleShiftBlock):
    """`keras.layers.LayerNormalization`: x̂ = (x − mean) / √(var + ε) over `axis`, or
    x / √(var + ε) with `rms_scaling=True` (Keras's formula, which scales by the variance)."""

    kind = "LayerNormalizationBlock"

    @staticmethod
    def _axes(layer) -> list:
        return list(layer.axis) if isinstance(layer.axis, (list, tuple)) else [layer.axis]

    @classmethod
    def unsupported_reason(cls, layer) -> str | None:
        if 0 in cls._axes(layer):
            return "normalises over the batch axis"
        return super().unsupported_reason(layer)

    def feature_axes(self, rank):
        return sorted({a % rank for a in self._axes(self.layer)})

    def normalized(self, inputs, training=None, mask=None):
        x = ops.cast(inputs, self.compute_dtype(inputs))
        axes = self._axes(self.layer)
        if self.layer.rms_scaling:
            variance = ops.var(x, axis=axes, keepdims=True)
            return x * ops.rsqrt(variance + self.layer.epsilon)
        mean, variance = ops.moments(x, axes=axes, keepdims=True)
        return (x - mean) * ops.rsqrt(variance + self.layer.epsilon)


class BatchNormalizationBlock(ScaleShiftBlock):
    """`keras.layers.BatchNormalization`: x̂ from the batch moments (training, through the
    layer's own `_moments`, honouring `mask` and `synchronized`) or the moving ones; with
    `renorm` in training, x̂ = r x̂ + d (Keras's correction, y = γ (r x̂ + d) + β)."""

    kind = "BatchNormalizationBlock"

    @classmethod
    def parameters(cls, layer) -> list:
        return [layer.gamma if layer.scale else None, layer.beta if layer.center else None]

    @classmethod
    def unsupported_reason(cls, layer) -> str | None:
        if not _private.has_batch_norm_moments(layer):
            return "this Keras version's BatchNormalization is not modelled"
        return super().unsupported_reason(layer)

    def normalized(self, inputs, training=None, mask=None):
        layer = self.layer
        x = ops.cast(inputs, self.compute_dtype(inputs))
        correction = None
        if training and layer.trainable:
            mean, variance = _private.batch_norm_moments(layer, x, mask)
            if layer.renorm:
                r, d, mean, variance = _private.batch_renorm_correction(layer, mean, variance)
                correction = (r, d)
        else:
            mean = ops.cast(layer.moving_mean, x.dtype)
            variance = ops.cast(layer.moving_variance, x.dtype)
        normalized = ops.batch_normalization(x, mean, variance, axis=layer.axis, epsilon=layer.epsilon)
        if correction is not None:
            shape = [1] * len(x.shape)
            shape[layer.axis] = -1
            r, d = (ops.reshape(ops.cast(t, x.dtype), shape) for t in correction)
            normalized = normalized * r + d
        return normalized


class GroupNormalizationBlock(ScaleShiftBlock):
    """`keras.layers.GroupNormalization`: x̂ normalised over each group of channels (and all
    positions), through the layer's own grouping."""

    kind = "GroupNormalizationBlock"

    @classmethod
    def unsupported_reason(cls, layer) -> str | None:
        if not _private.has_group_reshape(layer):
            return "this Keras version's GroupNormalization is not modelled"
        return super().unsupported_reason(layer)

    def normalized(self, inputs, training=None, mask=None):
        layer = self.layer
        x = ops.cast(inputs, self.compute_dtype(inputs))
        grouped = _private.reshape_into_groups(layer, x)
        axes = list(range(1, len(grouped.shape)))
        axes.pop(-2 if layer.axis == -1 else layer.axis - 1)  # the group axis stays, as in the layer
        mean, variance = ops.moments(grouped, axes=axes, keepdims=True)
        return ops.reshape((grouped - mean) * ops.rsqrt(variance + layer.epsilon), ops.shape(x))
