"""The local quadratic model of the loss on one mini-batch and exact Fisher-vector products.

M(δ) = ½ δᵀ(F + (λ+η)I)δ + ∇ᵀδ, with F = Jᵀ H J / m the mini-batch Fisher (generalized
Gauss-Newton matrix): J the Jacobian of the model outputs with respect to the parameters and
H the per-example Fisher of the loss in the output's own parameterization (the convention of
`keras_kfac.fisher`): diag(p) − ppᵀ for softmax logits, diag(1/p) − 11ᵀ for probabilities,
p(1−p)/d (logits) or 1/(p(1−p)d) (probabilities) for binary cross-entropy, 2/d for MSE, each
times the loss weight.  The Fisher is invariant to that parameterization, so an output layer
with activation="softmax" gives the same F as its logits would.  J·v comes from forward-mode
accumulators (one extra forward pass), Jᵀu from a backward pass; no dense matrix is built.
"""

from __future__ import annotations

import tensorflow as tf

from keras_kfac.fisher import LossSpec

_EPSILON = 1e-7


def output_fisher_product(spec: LossSpec, y_pred: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    """H·u per example (rows), H the output-space Fisher of `spec`'s loss at `y_pred` (not divided by m)."""
    y = tf.cast(y_pred, tf.float32)
    u = tf.cast(u, tf.float32)
    d = tf.cast(tf.shape(y)[-1], tf.float32)
    if spec.kind == "categorical":
        if spec.from_logits:
            p = tf.nn.softmax(y)
            out = p * u - p * tf.reduce_sum(p * u, axis=-1, keepdims=True)
        else:
            total = tf.reduce_sum(y, axis=-1, keepdims=True)
            p = tf.maximum(y, _EPSILON)
            out = u / (total * p) - tf.reduce_sum(u, axis=-1, keepdims=True) / (total * total)
    elif spec.kind == "binary":
        if spec.from_logits:
            p = tf.sigmoid(y)
            out = p * (1.0 - p) * u / d
        else:
            p = tf.clip_by_value(y, _EPSILON, 1.0 - _EPSILON)
            out = u / (p * (1.0 - p) * d)
    elif spec.kind == "mse":
        out = 2.0 * u / d
    else:  # pragma: no cover
        raise ValueError(f"Unknown loss kind {spec.kind!r}")
    return out * spec.weight


def _raw(variable):
    return getattr(variable, "_value", variable)  # the tf.Variable behind a Keras variable


class BatchQuadratic:
    """Fisher products and losses of one model on one batch (x, y, sample_weight).

    `forward()` returns the model outputs as a flat list; `specs` one `LossSpec` per output.
    """

    def __init__(self, forward, loss_fn, specs: list, variables: list, num_examples):
        self.forward = forward
        self.loss_fn = loss_fn
        self.specs = list(specs)
        self.variables = list(variables)
        self.num_examples = tf.cast(num_examples, tf.float32)

    def jvps(self, tangents: list) -> tuple[list, list]:
        """(outputs, [J·t for t in tangents]): one forward pass with a forward-mode accumulator per
        tangent (nested accumulators on the same variables are not supported by TensorFlow)."""
        primals = [_raw(v) for v in self.variables]
        outputs, jvps = None, []
        for t in tangents:
            with tf.autodiff.ForwardAccumulator(primals, [tf.cast(x, p.dtype) for x, p in zip(t, primals)]) as acc:
                outputs = self.forward()
            jvps.append([tf.cast(acc.jvp(o, unconnected_gradients="zero"), tf.float32) for o in outputs])
        return outputs, jvps

    def gram(self, tangents: list) -> tf.Tensor:
        """The matrix [tᵢᵀ F tⱼ] (float32) for the given tangent lists."""
        outputs, jvps = self.jvps(tangents)
        hj = [
            [output_fisher_product(s, tf.stop_gradient(o), j) for s, o, j in zip(self.specs, outputs, js)]
            for js in jvps
        ]
        n = len(tangents)
        rows = []
        for a in range(n):
            rows.append(tf.stack([tf.add_n([tf.reduce_sum(x * y) for x, y in zip(jvps[a], hj[b])]) for b in range(n)]))
        return tf.stack(rows) / self.num_examples

    def fisher_vector_product(self, vector: list) -> list:
        """F·v (per variable, float32): a Jacobian-vector product, H, then a vector-Jacobian product
        (two forward passes and one backward pass)."""
        outputs, (jv,) = self.jvps([vector])
        with tf.GradientTape() as tape:  # its own pass: a tape around the accumulators loses the variables
            outputs = self.forward()
        hjv = [tf.stop_gradient(output_fisher_product(s, o, j)) for s, o, j in zip(self.specs, outputs, jv)]
        grads = tape.gradient(
            outputs,
            self.variables,
            output_gradients=[tf.cast(h, o.dtype) for h, o in zip(hjv, outputs)],
            unconnected_gradients="zero",
        )
        return [tf.cast(g, tf.float32) / self.num_examples for g in grads]

    def loss(self) -> tf.Tensor:
        return tf.cast(self.loss_fn(), tf.float32)


def quadratic_value(coefficients, gram, gradient_dots, damping) -> tf.Tensor:
    """M(δ) for δ = Σ cᵢ tᵢ: ½ cᵀ(G + damping·D)c + cᵀb, `gram` = [tᵢᵀ(F + damping I)tⱼ] already damped."""
    del damping
    c = tf.reshape(tf.cast(coefficients, tf.float32), [-1, 1])
    return 0.5 * tf.reduce_sum(c * tf.matmul(gram, c)) + tf.reduce_sum(c[:, 0] * gradient_dots)


def solve_step(gram, gradient_dots, learning_rate=None, momentum=None) -> tuple[tf.Tensor, tf.Tensor]:
    """(α, μ) minimizing M(αΔ + μδ₀) = ½[α μ] C [α μ]ᵀ + [α μ]·b, C = `gram` (2×2, damped),
    b = `gradient_dots` = [∇ᵀΔ, ∇ᵀδ₀]; a given `learning_rate`/`momentum` is held fixed.

    A singular 2×2 (e.g. δ₀ = 0 at the first step) falls back to α alone with μ = 0; a
    non-descent Δ (∇ᵀΔ ≥ 0) or a non-finite solution gives α = 0.
    """
    c = tf.cast(gram, tf.float32)
    b = tf.cast(gradient_dots, tf.float32)
    c11, c12, c22 = c[0, 0], c[0, 1], c[1, 1]
    b1, b2 = b[0], b[1]
    tiny = 1e-30
    if learning_rate is None and momentum is None:
        det = c11 * c22 - c12 * c12
        ok = det > 1e-6 * tf.abs(c11 * c22)
        safe = tf.where(ok, det, 1.0)
        alpha2 = (-b1 * c22 + b2 * c12) / safe
        mu2 = (-b2 * c11 + b1 * c12) / safe
        alpha1 = -b1 / tf.maximum(c11, tiny)
        alpha = tf.where(ok, alpha2, alpha1)
        mu = tf.where(ok, mu2, 0.0)
    elif learning_rate is None:
        mu = tf.cast(momentum, tf.float32)
        alpha = -(b1 + mu * c12) / tf.maximum(c11, tiny)
    else:
        alpha = tf.cast(learning_rate, tf.float32)
        mu = tf.where(c22 > tiny, -(b2 + alpha * c12) / tf.maximum(c22, tiny), 0.0)
    good = tf.logical_and(tf.math.is_finite(alpha), tf.math.is_finite(mu))
    if learning_rate is None:
        good = tf.logical_and(good, b1 < 0.0)
    alpha = tf.where(good, alpha, 0.0 if learning_rate is None else alpha)
    mu = tf.where(good, mu, 0.0 if momentum is None else mu)
    return alpha, mu


MAX_REUSED_MOMENTUM = 0.99


def reusable_step(alpha, mu) -> tuple[tf.Tensor, tf.Tensor]:
    """(α, μ) to repeat on the steps between two choices (`adapt_every` > 1): α clipped to ≥ 0
    and μ to [0, MAX_REUSED_MOMENTUM], so that the velocity v ← μv + αΔ stays bounded."""
    alpha = tf.maximum(tf.cast(alpha, tf.float32), 0.0)
    mu = tf.clip_by_value(tf.cast(mu, tf.float32), 0.0, MAX_REUSED_MOMENTUM)
    return alpha, mu
