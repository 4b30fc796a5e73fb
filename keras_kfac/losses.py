"""Output losses for K-FAC: sampling Fisher gradients, output-space curvature products, and the
per-example coefficients with which Keras' compiled loss weighs each example.

Keras minimises (per replica) L = Σ_o w_o L_o, one term per model output o, with loss weight w_o
and L_o = reduce_i(s_i ℓ_i) (`keras.losses.Loss.__call__`). Written as L = Σ_i c_i ℓ_i:

    reduction                     c_i (s_i the sample weight, 1 when none; μ_i the Keras mask, 1 when none)
    "sum_over_batch_size", "mean" w · s_i μ_i / (Σ_j μ_j) / R     (Σ_j μ_j = m without a mask)
    "mean_with_sample_weight"     w · s_i μ_i / (Σ_j s_j μ_j) / R (= w/(m R) with neither weights nor mask)
    "sum", None, "none"           w · s_i μ_i                     (a tape sums an unreduced loss)

where R is the number of replicas in sync (Keras' `scale_loss_for_distribution` divides the mean
reductions by it; gradients are then summed over replicas, so the global loss is the sum of the
replicas' L) and a zero denominator gives c = 0 (`divide_no_nan`). The only mask a supported loss
makes is SparseCategoricalCrossentropy's `ignore_class` (μ_i = 0 where y_true == ignore_class).
`fit(class_weight=...)` reaches `train_step` as `sample_weight` (Keras' data adapters call
`class_weight_to_sample_weights`), so class weights need nothing more.

With M = R·m the global batch size and H_i the Hessian (generalized Gauss–Newton) of ℓ_i in the
output, every method below uses the per-example coefficients k_i = M c_i, chosen so that the
K-FAC factor G = (1/M) Σ_i g_i g_iᵀ (per replica (1/m) Σ, averaged over replicas) estimates the
Hessian of the loss Keras actually minimises, whatever the weights, reduction and loss weights:

- sampled Fisher: g_i = √k_i · s_i with E[s_i s_iᵀ] = H_i, so E[g_i g_iᵀ] = M c_i H_i;
- empirical Fisher: g_i = √k_i ∇ℓ_i = (∂L/∂ŷ_i) · M / √k_i (zero where k_i = 0);
- quadratic model: `fisher_product` returns k_i H_i u_i per example; Σ_i of that / M is H·u.

API for the train step (one `OutputLoss` per flat output, in `keras.tree.flatten(y_pred)` order;
`y_true`, `sample_weight` are that output's, see `per_output`):

    output_losses = resolve_losses(loss, loss_weights, output_names)      # compile()'s loss, loss_weights
    g = output_losses[o].sample_output_gradients(y_pred, y_true, sample_weight, seed)      # sampled
    g = output_losses[o].empirical_output_gradients(dL_dy_pred, y_true, sample_weight)     # empirical
    k = output_losses[o].example_coefficients(y_true, sample_weight, batch_size)           # k_i = M c_i
    h = output_losses[o].fisher_product(y_pred, y_true, sample_weight, u)                  # k_i H_i u_i

Each of the first, second and fourth accepts `coefficients=k` instead of recomputing them, e.g.
`k[:n]` of the whole batch when the statistics use only its first n examples (G then stays an
unbiased estimate of the whole batch's Hessian). `dL_dy_pred` is the gradient of the unscaled
replica loss L (the one `model.compute_loss` returns, before any loss scaling) with respect to
this output. Outputs of any rank work: every leading axis is a position (a token of a sequence,
a pixel), each position is drawn independently and has its own coefficient, as Keras reduces
the loss values; a Keras mask on the output (`output_mask`, padded positions) enters the
coefficients as `ignore_class` does.

Custom losses: subclass `OutputLoss` (implement `draw`, `unit_gradients`, `hessian_product`) and
`register_loss(my_keras_loss_function_or_class, MyOutputLoss)`.
"""

from __future__ import annotations

import copy

import keras
import tensorflow as tf

from keras_kfac._private import LossFunctionWrapper, loss_function_kwargs

__all__ = [
    "OutputLoss",
    "SparseCategoricalCrossentropyLoss",
    "CategoricalCrossentropyLoss",
    "BinaryCrossentropyLoss",
    "MeanSquaredErrorLoss",
    "NoLoss",
    "register_loss",
    "resolve_loss",
    "resolve_losses",
    "per_output",
    "SUPPORTED_LOSSES",
]

SUPPORTED_LOSSES = (
    "sparse_categorical_crossentropy",
    "categorical_crossentropy",
    "binary_crossentropy",
    "mean_squared_error",
)
REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight", "sum", "none", None)
_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")
_EPSILON = 1e-7


def _float(x) -> tf.Tensor:
    """float32, or float64 when given float64 (the references of the tests)."""
    x = tf.convert_to_tensor(x)
    return x if x.dtype == tf.float64 else tf.cast(x, tf.float32)


def _replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


class OutputLoss:
    """The output-space view of one Keras loss on one model output.

    A subclass implements, per example and in the output's own parameterization (logits or
    probabilities, as the Keras loss takes them):

    - `draw(y_pred, seed)`: the random part of one sample (a target from the model's predictive
      distribution, or noise);
    - `unit_gradients(y_pred, draw)`: s with E[s sᵀ] = H, the Hessian of the per-example loss ℓ in
      ŷ (its generalized Gauss–Newton matrix), e.g. ∂ℓ/∂ŷ at the sampled target;
    - `hessian_product(y_pred, u)`: H·u;

    and optionally `example_mask(y_true)` (Keras' loss mask: positions whose ℓ is zero and which
    do not count in the mean). All of them act on the last axis and treat every leading axis as a position,
    so that per-position sampling can be added for outputs of rank > 2.

    `options` names the Keras loss arguments (`get_config()` / `_fn_kwargs` entries) that
    `from_keras` passes to the constructor; any other argument of a wrapped function is an error.
    """

    options: tuple = ()

    def __init__(self, reduction="sum_over_batch_size", weight=1.0):
        if reduction not in REDUCTIONS:
            raise ValueError(f"Unknown reduction {reduction!r}; expected one of {REDUCTIONS}.")
        self.reduction = reduction
        self.weight = float(weight)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_keras(cls, loss) -> OutputLoss:
        """An instance for `loss`, a Keras `Loss` object or a plain loss function."""
        kwargs = loss_function_kwargs(loss)
        unknown = sorted(set(kwargs) - set(cls.options))
        if unknown:
            raise ValueError(f"{cls.__name__} does not support the argument(s) {unknown} of the loss {loss!r}.")
        if isinstance(loss, keras.losses.Loss):
            config = loss.get_config()
            kwargs.update({k: config[k] for k in cls.options if k in config})
            kwargs["reduction"] = loss.reduction
        return cls(**kwargs)

    def with_weight(self, weight) -> OutputLoss:
        """A copy whose loss weight (`compile(loss_weights=...)`) is `weight` (None: 1)."""
        out = copy.copy(self)
        out.weight = 1.0 if weight is None else float(weight)
        return out

    def __repr__(self):
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options if hasattr(self, k))
        return f"{type(self).__name__}({opts}{', ' if opts else ''}reduction={self.reduction!r}, weight={self.weight})"

    # ------------------------------------------------------------------ what a family defines
    def draw(self, y_pred, seed):
        raise NotImplementedError

    def unit_gradients(self, y_pred, draw):
        raise NotImplementedError

    def hessian_product(self, y_pred, u):
        raise NotImplementedError

    def example_mask(self, y_true):
        """None, or a 0/1 float tensor of the loss values' shape: Keras' mask of this loss."""
        del y_true
        return None

    # ------------------------------------------------------------------ coefficients
    def example_coefficients(
        self, y_true, sample_weight, batch_size, values_shape=None, dtype=tf.float32, output_mask=None
    ) -> tf.Tensor:
        """k_i = M c_i (see the module doc), shape (batch_size,) for outputs of rank 2 (in general
        `values_shape`, the shape of the loss values: the output's shape without its last axis,
        one coefficient per position); includes the loss weight and the reduction. `y_true` is
        used only by losses with a mask; `output_mask` is the Keras mask of the output (padded
        positions of a sequence), which Keras' loss applies as it applies `ignore_class`."""
        if values_shape is None:
            values_shape = tf.reshape(tf.cast(batch_size, tf.int32), [1])
        ones = tf.ones(values_shape, dtype)
        mask = self.example_mask(y_true)
        if output_mask is not None:
            output_mask = tf.reshape(tf.cast(output_mask, dtype), tf.shape(ones))
            mask = output_mask if mask is None else tf.reshape(tf.cast(mask, dtype), tf.shape(ones)) * output_mask
        weights = ones if sample_weight is None else _broadcast_weights(sample_weight, ones)
        if mask is not None:
            mask = tf.reshape(tf.cast(mask, dtype), tf.shape(ones))
            weights = weights * mask
        m = tf.cast(batch_size, dtype)
        if self.reduction in _MEAN_REDUCTIONS:
            if self.reduction == "mean_with_sample_weight" and (sample_weight is not None or mask is not None):
                denominator = tf.reduce_sum(weights)
            elif mask is not None:
                denominator = tf.reduce_sum(mask)
            else:
                denominator = tf.cast(tf.size(ones), dtype)
            # c_i = w s_i μ_i / (denominator R) and M = R m: the replica count cancels.
            k = tf.math.divide_no_nan(m * weights, denominator)
        else:
            k = float(_replicas()) * m * weights
        return k * self.weight

    def _coefficients(self, y_pred, y_true, sample_weight, coefficients, output_mask=None):
        shape = tf.shape(y_pred)[:-1]
        if coefficients is None:
            coefficients = self.example_coefficients(
                y_true, sample_weight, shape[0], shape, dtype=y_pred.dtype, output_mask=output_mask
            )
        k = tf.cast(coefficients, y_pred.dtype)
        return tf.reshape(k, tf.concat([shape, [1]], 0))

    # ------------------------------------------------------------------ the three statistics
    def sample_output_gradients(
        self, y_pred, y_true, sample_weight, seed, coefficients=None, output_mask=None
    ) -> tf.Tensor:
        """g = √k_i s_i per example (per position for outputs of rank > 2, each position drawn
        independently): E[g gᵀ] = M c_i H_i (float32, shape of `y_pred`).

        `seed` is a stateless-random seed (shape (2,) int): the same seed draws the same targets,
        also under XLA. `y_true` is needed by losses with a mask (ignore_class)."""
        y = _float(y_pred)
        k = self._coefficients(y, y_true, sample_weight, coefficients, output_mask)
        return self.unit_gradients(y, self.draw(y, seed)) * tf.sqrt(tf.maximum(k, 0.0))

    def fisher_product(self, y_pred, y_true, sample_weight, u, coefficients=None, output_mask=None) -> tf.Tensor:
        """k_i H_i u_i per example (float32, shape of `y_pred`); summed over examples and divided
        by M it is the output-space Hessian (GGN) of Keras' loss applied to u."""
        y = _float(y_pred)
        k = self._coefficients(y, y_true, sample_weight, coefficients, output_mask)
        return self.hessian_product(y, tf.cast(u, y.dtype)) * k

    def empirical_output_gradients(self, gradient, y_true, sample_weight, coefficients=None) -> tf.Tensor:
        """g_i = (∂L/∂ŷ_i) M / √k_i = √k_i ∇ℓ_i, zero where k_i = 0, from `gradient` = ∂L/∂ŷ of
        the (unscaled) replica loss with respect to this output."""
        gradient = _float(gradient)
        k = self._coefficients(gradient, y_true, sample_weight, coefficients)
        global_batch = tf.cast(tf.shape(gradient)[0] * _replicas(), gradient.dtype)
        factor = tf.math.divide_no_nan(global_batch, tf.sqrt(tf.maximum(k, 0.0)))
        return gradient * factor


def _broadcast_weights(sample_weight, ones):
    """Sample weights of shape (m,) or (m, 1) (or the loss values' shape) as Keras applies them."""
    w = tf.cast(sample_weight, ones.dtype)
    rank = ones.shape.rank
    if w.shape.rank is not None and rank is not None:
        if w.shape.rank == rank + 1 and w.shape[-1] == 1:
            w = tf.squeeze(w, -1)
        while w.shape.rank < rank:
            w = tf.expand_dims(w, -1)
        if w.shape.rank != rank:
            raise ValueError(f"sample_weight of shape {w.shape} does not match loss values of rank {rank}.")
    return w * ones


# ---------------------------------------------------------------------- the supported families
class _SoftmaxCrossEntropy(OutputLoss):
    """ℓ = −Σ_k t_k log softmax(z)_k, or −Σ_k t_k log(ŷ_k / Σŷ) from probabilities.

    From logits H = diag(p) − ppᵀ for targets that sum to 1 (labels, smoothed labels, soft
    labels; for others TensorFlow's own gradient of the loss, softmax − t, has this Jacobian
    too); s = p − e_y with y ~ Categorical(p). From probabilities the output-space Fisher is
    diag(1/(S ŷ)) − 11ᵀ/S² (S = Σŷ), the expected Hessian over the model's own labels;
    s = ∂ℓ/∂ŷ at y ~ Categorical(ŷ/S) = −e_y/ŷ_y + 1/S. Through a softmax output layer
    (ŷ = softmax(z)) it is exactly the logits' diag(p) − ppᵀ, the Hessian of Keras' loss in z.
    """

    options = ("from_logits", "axis")

    def __init__(self, from_logits=False, axis=-1, **kwargs):
        super().__init__(**kwargs)
        if axis != -1:
            raise ValueError(f"{type(self).__name__} supports axis=-1 only; got axis={axis}.")
        self.from_logits = bool(from_logits)
        self.axis = axis

    def _logits(self, y):
        if self.from_logits:
            return y
        probs = y / tf.reduce_sum(y, axis=-1, keepdims=True)
        return tf.math.log(tf.clip_by_value(probs, _EPSILON, 1.0))

    def draw(self, y_pred, seed):
        logits = tf.reshape(self._logits(y_pred), [-1, tf.shape(y_pred)[-1]])
        index = tf.random.stateless_categorical(tf.cast(logits, tf.float32), 1, seed=seed, dtype=tf.int32)[:, 0]
        return tf.reshape(index, tf.shape(y_pred)[:-1])

    def unit_gradients(self, y_pred, draw):
        onehot = tf.one_hot(draw, tf.shape(y_pred)[-1], dtype=y_pred.dtype)
        if self.from_logits:
            return tf.nn.softmax(y_pred) - onehot
        total = tf.reduce_sum(y_pred, axis=-1, keepdims=True)
        return -onehot / tf.maximum(y_pred, _EPSILON) + 1.0 / total

    def hessian_product(self, y_pred, u):
        if self.from_logits:
            p = tf.nn.softmax(y_pred)
            return p * u - p * tf.reduce_sum(p * u, axis=-1, keepdims=True)
        total = tf.reduce_sum(y_pred, axis=-1, keepdims=True)
        p = tf.maximum(y_pred, _EPSILON)
        return u / (total * p) - tf.reduce_sum(u, axis=-1, keepdims=True) / (total * total)


class SparseCategoricalCrossentropyLoss(_SoftmaxCrossEntropy):
    """`sparse_categorical_crossentropy`: integer labels; `ignore_class` masks examples out.

    Keras zeroes ℓ where y_true == ignore_class and masks those positions, so that they also
    leave the mean's denominator: c_i = s_i μ_i / Σ_j μ_j for "sum_over_batch_size" (see the
    module doc). Their Hessian is zero, and so are their g."""

    options = ("from_logits", "ignore_class", "axis")

    def __init__(self, from_logits=False, ignore_class=None, axis=-1, **kwargs):
        super().__init__(from_logits=from_logits, axis=axis, **kwargs)
        self.ignore_class = ignore_class

    def _labels(self, y_true):
        labels = tf.convert_to_tensor(y_true)
        if labels.shape.rank is not None and labels.shape.rank >= 2 and labels.shape[-1] == 1:
            labels = tf.squeeze(labels, -1)
        return labels

    def example_mask(self, y_true):
        if self.ignore_class is None:
            return None
        if y_true is None:
            raise ValueError(
                "SparseCategoricalCrossentropy(ignore_class=...) needs the labels for its Fisher; "
                "pass y_true (or use fisher='empirical')."
            )
        labels = tf.cast(self._labels(y_true), tf.float32)
        return tf.cast(tf.not_equal(labels, float(self.ignore_class)), tf.float32)


class CategoricalCrossentropyLoss(_SoftmaxCrossEntropy):
    """`categorical_crossentropy`: one-hot or soft targets, optional `label_smoothing`.

    Keras smooths t ← (1 − ε) t + ε/K, which keeps Σ_k t_k = 1, and the Hessian in the logits,
    diag(p) − ppᵀ, does not depend on targets that sum to 1: smoothing changes no curvature. For
    probability outputs the same holds in the logits of a softmax output layer."""

    options = ("from_logits", "label_smoothing", "axis")

    def __init__(self, from_logits=False, label_smoothing=0.0, axis=-1, **kwargs):
        super().__init__(from_logits=from_logits, axis=axis, **kwargs)
        self.label_smoothing = float(label_smoothing or 0.0)


class BinaryCrossentropyLoss(OutputLoss):
    """`binary_crossentropy`: ℓ = (1/d) Σ_j bce(t_j, ŷ_j), optional `label_smoothing`.

    From logits H = diag(p(1−p))/d whatever the targets (smoothed or soft), s_j = (p_j − b_j)/√d
    with b_j ~ Bernoulli(p_j). From probabilities the output-space Fisher is diag(1/(p(1−p)))/d,
    s = ∂ℓ/∂ŷ at b ~ Bernoulli(ŷ); through a sigmoid output layer it is exactly the logits' H, the
    Hessian of Keras' (smoothed or not) loss in z. Label smoothing therefore changes nothing."""

    options = ("from_logits", "label_smoothing", "axis")

    def __init__(self, from_logits=False, label_smoothing=0.0, axis=-1, **kwargs):
        super().__init__(**kwargs)
        if axis != -1:
            raise ValueError(f"BinaryCrossentropyLoss supports axis=-1 only; got axis={axis}.")
        self.from_logits = bool(from_logits)
        self.label_smoothing = float(label_smoothing or 0.0)
        self.axis = axis

    def _probs(self, y):
        return tf.sigmoid(y) if self.from_logits else tf.clip_by_value(y, _EPSILON, 1.0 - _EPSILON)

    def draw(self, y_pred, seed):
        uniform = tf.random.stateless_uniform(tf.shape(y_pred), seed=seed, dtype=y_pred.dtype)
        return tf.cast(uniform < self._probs(y_pred), y_pred.dtype)

    def unit_gradients(self, y_pred, draw):
        p = self._probs(y_pred)
        d = tf.cast(tf.shape(y_pred)[-1], y_pred.dtype)
        residual = p - draw
        if not self.from_logits:
            residual = residual / (p * (1.0 - p))
        return residual / tf.sqrt(d)

    def hessian_product(self, y_pred, u):
        p = self._probs(y_pred)
        d = tf.cast(tf.shape(y_pred)[-1], y_pred.dtype)
        if self.from_logits:
            return p * (1.0 - p) * u / d
        return u / (p * (1.0 - p) * d)


class MeanSquaredErrorLoss(OutputLoss):
    """`mean_squared_error`: ℓ = (1/d)‖ŷ − y‖², H = (2/d) I; s = √(2/d) ε with ε ~ N(0, I)."""

    def draw(self, y_pred, seed):
        return tf.random.stateless_normal(tf.shape(y_pred), seed=seed, dtype=y_pred.dtype)

    def unit_gradients(self, y_pred, draw):
        d = tf.cast(tf.shape(y_pred)[-1], y_pred.dtype)
        return tf.sqrt(2.0 / d) * draw

    def hessian_product(self, y_pred, u):
        d = tf.cast(tf.shape(y_pred)[-1], y_pred.dtype)
        return 2.0 * u / d


class NoLoss(OutputLoss):
    """An output that no loss reaches (`loss=None` for it, or missing from a loss dict)."""

    def draw(self, y_pred, seed):
        return tf.zeros_like(y_pred)

    def unit_gradients(self, y_pred, draw):
        return tf.zeros_like(y_pred)

    def hessian_product(self, y_pred, u):
        return tf.zeros_like(u)

    def example_coefficients(
        self, y_true, sample_weight, batch_size, values_shape=None, dtype=tf.float32, output_mask=None
    ):
        if values_shape is None:
            values_shape = tf.reshape(tf.cast(batch_size, tf.int32), [1])
        return tf.zeros(values_shape, dtype)

    def _coefficients(self, y_pred, y_true, sample_weight, coefficients, output_mask=None):
        return tf.zeros(tf.concat([tf.shape(y_pred)[:-1], [1]], 0), y_pred.dtype)


# ---------------------------------------------------------------------- registry and resolver
_REGISTRY: dict = {}


def register_loss(keras_loss, output_loss_class) -> None:
    """Tells K-FAC's sampled Fisher and quadratic model what a Keras loss is.

    `keras_loss`: a loss function (what `compile(loss=fn)` or a `LossFunctionWrapper` calls; a
    string is looked up with `keras.losses.get`) or a `keras.losses.Loss` subclass (its
    instances, and instances of subclasses that do not override `call`/`__call__`).
    `output_loss_class`: an `OutputLoss` subclass; `output_loss_class.from_keras(loss)` builds it
    from the compiled loss (override that classmethod to read more of the loss's configuration).
    Registering again replaces the earlier entry.

        class Scaled(keras_kfac.losses.MeanSquaredErrorLoss):   # ℓ = 3 · mse: H = 6/d I
            def hessian_product(self, y_pred, u):
                return 3.0 * super().hessian_product(y_pred, u)
            def unit_gradients(self, y_pred, draw):
                return 3.0**0.5 * super().unit_gradients(y_pred, draw)

        keras_kfac.losses.register_loss(my_three_times_mse, Scaled)
    """
    if not (isinstance(output_loss_class, type) and issubclass(output_loss_class, OutputLoss)):
        raise TypeError(
            f"output_loss_class must be a subclass of keras_kfac.losses.OutputLoss; got {output_loss_class!r}."
        )
    key = keras.losses.get(keras_loss) if isinstance(keras_loss, str) else keras_loss
    if isinstance(key, LossFunctionWrapper):
        key = key.fn
    elif isinstance(key, keras.losses.Loss):
        raise TypeError(f"Register the class of {keras_loss!r} ({type(key).__name__}), not an instance.")
    if not callable(key):
        raise TypeError(f"keras_loss must be a loss function or a keras.losses.Loss subclass; got {keras_loss!r}.")
    _REGISTRY[key] = output_loss_class


register_loss(keras.losses.sparse_categorical_crossentropy, SparseCategoricalCrossentropyLoss)
register_loss(keras.losses.categorical_crossentropy, CategoricalCrossentropyLoss)
register_loss(keras.losses.binary_crossentropy, BinaryCrossentropyLoss)
register_loss(keras.losses.mean_squared_error, MeanSquaredErrorLoss)


def _unsupported(loss, why="") -> ValueError:
    return ValueError(
        f"K-FAC does not know the curvature of the loss {loss!r}{why}, which fisher='sampled' and the "
        f"quadratic model (learning_rate=None, momentum=None or adapt_damping) need. Supported losses: "
        f"{', '.join(SUPPORTED_LOSSES)} (names, keras.losses classes or functions). Use fisher='empirical' "
        "(with a fixed learning_rate and momentum) for other losses, or describe it with an OutputLoss "
        "subclass and keras_kfac.losses.register_loss."
    )


def _overrides(klass) -> list:
    return [name for name in ("call", "__call__") if name in vars(klass)]


def _class_for_loss_object(loss) -> type:
    mro = type(loss).__mro__
    for klass in mro:
        if klass in _REGISTRY:
            found, what = _REGISTRY[klass], klass.__name__
            break
        if klass is LossFunctionWrapper:
            found, what = _REGISTRY.get(loss.fn), f"{klass.__name__}({getattr(loss.fn, '__name__', loss.fn)})"
            if found is None:
                raise _unsupported(loss, f" (its function {loss.fn!r} is not registered)")
            break
        if klass is keras.losses.Loss:
            raise _unsupported(loss)
    else:  # pragma: no cover - every Loss has keras.losses.Loss in its MRO
        raise _unsupported(loss)
    for sub in mro[: mro.index(klass)]:
        names = _overrides(sub)
        if names:
            raise _unsupported(
                loss,
                f" ({sub.__name__} overrides {' and '.join(names)} of {what}, so its value is unknown to the "
                "sampler: it would be sampled as the plain loss)",
            )
    if any(name in vars(loss) for name in ("call", "__call__")):
        raise _unsupported(loss, " (its call is replaced on the instance)")
    return found


def resolve_loss(loss, weight=1.0) -> OutputLoss:
    """The `OutputLoss` of one compiled loss: a name, a `keras.losses.Loss` object, a function,
    an `OutputLoss` (used as it is), or None (no loss for this output). Raises a ValueError naming
    fisher='empirical' and `register_loss` for anything else."""
    if loss is None:
        return NoLoss(weight=0.0)
    if isinstance(loss, OutputLoss):
        return loss.with_weight(weight) if weight is not None else loss
    resolved = loss
    if isinstance(loss, str):
        if loss.lower() in ("crossentropy", "ce"):
            raise _unsupported(loss, " (Keras picks its cross-entropy from the labels' shape; name it explicitly)")
        try:
            resolved = keras.losses.get(loss)
        except ValueError as error:
            raise _unsupported(loss) from error
    if isinstance(resolved, keras.losses.Loss):
        found = _class_for_loss_object(resolved)
    elif callable(resolved) and not isinstance(resolved, type):
        found = _REGISTRY.get(resolved)
        if found is None:
            raise _unsupported(loss)
    else:
        raise _unsupported(loss)
    return found.from_keras(resolved).with_weight(weight)


def resolve_losses(loss, loss_weights, output_names: list) -> list:
    """One `OutputLoss` per model output (in the order of `output_names`, which must be the order
    of `keras.tree.flatten(y_pred)`), following Keras' compile conventions: `loss` a single loss
    for every output, a list/tuple per output, or a dict by output name (missing names: no loss);
    `loss_weights` None, a number, a list/tuple or a dict."""
    count = len(output_names)
    if isinstance(loss, dict):
        losses = [loss.get(name) for name in output_names]
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
        if len(loss_weights) != count:
            raise ValueError(f"Got {len(loss_weights)} loss weights for {count} outputs.")
        weights = list(loss_weights)
    else:
        weights = [loss_weights] * count
    return [resolve_loss(item, 1.0 if w is None else w) for item, w in zip(losses, weights)]


def per_output(value, count: int) -> list:
    """`y` or `sample_weight` as one entry per flat output: None → [None] * count; a nested
    structure → `keras.tree.flatten` (dicts by sorted key, as `y_pred`); a single tensor → shared
    by all outputs (Keras applies an unnested sample_weight to every output)."""
    if value is None:
        return [None] * count
    if keras.tree.is_nested(value):
        flat = keras.tree.flatten(value)
        if len(flat) != count:
            raise ValueError(f"Got {len(flat)} entries for {count} outputs.")
        return flat
    return [value] * count
