"""Output-side gradients for the Fisher statistics: sampled targets per loss, or the real labels.

With `fisher="sampled"` each example's output gradient is ∂ℓ/∂ŷ for a target ŷ* drawn from
the model's predictive distribution, scaled so that E[g gᵀ] equals the Hessian of Keras' loss
with respect to its natural parameter (the generalized Gauss-Newton matrix, which is the Fisher
for these losses):

- (sparse) categorical cross-entropy: y* ~ Categorical(softmax(z)); g = ∂ℓ/∂ŷ.
- binary cross-entropy: y*_j ~ Bernoulli(p_j); Keras averages over the d outputs, so g = √d ∂ℓ/∂ŷ.
- mean squared error, ℓ = (1/d)‖ŷ − y‖²: g = sqrt(2/d) ε with ε ~ N(0, I) (a unit-variance
  Gaussian draw in the loss's own scale; E[g gᵀ] = (2/d) I, the loss's Hessian).

A per-output loss weight w multiplies g by √w.  Sampling uses stateless random ops, so a
given seed (the optimizer's seed and step counter) always draws the same targets, also
under XLA.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

SUPPORTED_LOSSES = (
    "sparse_categorical_crossentropy",
    "categorical_crossentropy",
    "binary_crossentropy",
    "mean_squared_error",
)
_EPSILON = 1e-7


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What the sampler needs to know of one output's loss."""

    kind: str  # "categorical", "binary" or "mse"
    from_logits: bool = False
    weight: float = 1.0


def _unsupported(loss) -> ValueError:
    return ValueError(
        f"fisher='sampled' does not know how to sample targets for the loss {loss!r}. "
        f"Supported losses: {', '.join(SUPPORTED_LOSSES)} (names, keras.losses classes or "
        "functions). Use fisher='empirical' for other losses."
    )


_FUNCTION_KINDS = {
    keras.losses.sparse_categorical_crossentropy: "categorical",
    keras.losses.categorical_crossentropy: "categorical",
    keras.losses.binary_crossentropy: "binary",
    keras.losses.mean_squared_error: "mse",
}


def loss_spec(loss, weight: float = 1.0) -> LossSpec:
    """Resolves a Keras loss (name, `Loss` object or function) to a `LossSpec`."""
    resolved = keras.losses.get(loss) if isinstance(loss, str) else loss
    fn = getattr(resolved, "fn", resolved)  # LossFunctionWrapper and its subclasses
    kind = _FUNCTION_KINDS.get(fn)
    if kind is None:
        raise _unsupported(loss)
    kwargs = getattr(resolved, "_fn_kwargs", None) or {}
    if isinstance(resolved, keras.losses.Loss) and hasattr(resolved, "get_config"):
        kwargs = {**kwargs, **resolved.get_config()}
    return LossSpec(kind=kind, from_logits=bool(kwargs.get("from_logits", False)), weight=float(weight))


def loss_specs(loss, loss_weights, output_names: list[str]) -> list[LossSpec]:
    """One `LossSpec` per model output, following Keras' compile conventions."""
    count = len(output_names)
    if isinstance(loss, dict):
        losses = [loss[name] for name in output_names]
    elif isinstance(loss, (list, tuple)):
        if len(loss) != count:
            raise ValueError(f"Got {len(loss)} losses for {count} outputs.")
        losses = list(loss)
    else:
        losses = [loss] * count
    if loss_weights is None:
        weights = [1.0] * count
    elif isinstance(loss_weights, dict):
        weights = [loss_weights.get(name, 1.0) for name in output_names]
    elif isinstance(loss_weights, (list, tuple)):
        weights = list(loss_weights)
    else:
        weights = [loss_weights] * count
    return [loss_spec(item, w) for item, w in zip(losses, weights)]


def sampled_output_grads(spec: LossSpec, y_pred: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Per-example ∂ℓ/∂ŷ at sampled targets (see module doc), float32, shape of `y_pred`."""
    y_pred = tf.cast(y_pred, tf.float32)
    if y_pred.shape.rank != 2:
        raise ValueError(
            "fisher='sampled' supports outputs of shape (batch, units); got an output of rank "
            f"{y_pred.shape.rank}. Use fisher='empirical' for this model."
        )
    units = tf.cast(tf.shape(y_pred)[-1], tf.float32)
    if spec.kind == "categorical":
        if spec.from_logits:
            logits = y_pred
        else:
            probs = y_pred / tf.reduce_sum(y_pred, axis=-1, keepdims=True)
            logits = tf.math.log(tf.clip_by_value(probs, _EPSILON, 1.0))
        index = tf.random.stateless_categorical(logits, 1, seed=seed)[:, 0]
        onehot = tf.one_hot(index, tf.shape(y_pred)[-1], dtype=tf.float32)
        if spec.from_logits:
            grad = tf.nn.softmax(logits) - onehot
        else:
            # ℓ = −log(p_y / Σp): ∂ℓ/∂p = −onehot / p_y + 1 / Σp.
            total = tf.reduce_sum(y_pred, axis=-1, keepdims=True)
            grad = -onehot / tf.maximum(y_pred, _EPSILON) + 1.0 / total
    elif spec.kind == "binary":
        probs = tf.sigmoid(y_pred) if spec.from_logits else tf.clip_by_value(y_pred, _EPSILON, 1.0 - _EPSILON)
        target = tf.cast(tf.random.stateless_uniform(tf.shape(probs), seed=seed) < probs, tf.float32)
        if spec.from_logits:
            grad = (probs - target) / units
        else:
            grad = (probs - target) / (probs * (1.0 - probs)) / units
        grad = grad * tf.sqrt(units)
    elif spec.kind == "mse":
        grad = tf.sqrt(2.0 / units) * tf.random.stateless_normal(tf.shape(y_pred), seed=seed)
    else:  # pragma: no cover - LossSpec is only built by loss_spec
        raise ValueError(f"Unknown loss kind {spec.kind!r}")
    if spec.weight != 1.0:
        grad = grad * (spec.weight**0.5)
    return grad
