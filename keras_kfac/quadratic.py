"""The local quadratic model of the loss on one mini-batch, from exact Fisher products.

M(δ) = ½ δᵀ(F + (λ+η)I)δ + ∇ᵀδ, with F = Σ_i c_i J_iᵀ H_i J_i the Fisher (generalized Gauss-Newton
matrix) of the loss L = Σ_i c_i ℓ_i that Keras minimises: J_i the Jacobian of example i's model
outputs with respect to the parameters, H_i the output-space curvature of its loss and c_i its
coefficient (sample weight, loss weight, reduction), both from `keras_kfac.losses`
(`OutputLoss.fisher_product` returns m c_i H_i u_i; the sum over examples is divided by m here).
The Fisher is invariant to the output's parameterization, so an output layer with
activation="softmax" gives the same F as its logits would. J·v comes from forward-mode
accumulators (one extra forward pass); no dense matrix is built.
"""

from __future__ import annotations

import tensorflow as tf

from keras_kfac._private import keras_mask
from keras_kfac.losses import per_output


def _raw(variable):
    return getattr(variable, "_value", variable)  # the tf.Variable behind a Keras variable


class BatchQuadratic:
    """Fisher products and losses of one model on one batch (x, y, sample_weight).

    `forward()` returns the model outputs as a flat list; `specs` one `keras_kfac.losses.OutputLoss`
    per output; `targets` and `sample_weight` the batch's y and sample weights (one entry per
    flat output, or anything `keras_kfac.losses.per_output` takes; None: no labels, weights 1).
    `curvature`: another `BatchQuadratic` (e.g. of the batch's first examples) whose Fisher
    products `gram` returns instead: F is then estimated on those examples alone, while the
    losses stay this batch's.  `halves`: two callables returning the loss of the batch's first
    and second half, for `half_gradients`.
    """

    def __init__(
        self,
        forward,
        loss_fn,
        specs: list,
        variables: list,
        num_examples,
        targets=None,
        sample_weight=None,
        curvature=None,
        halves=None,
    ):
        self.forward = forward
        self.loss_fn = loss_fn
        self.specs = list(specs)
        self.variables = list(variables)
        self.num_examples = tf.cast(num_examples, tf.float32)
        self.targets = per_output(targets, len(self.specs))
        self.sample_weights = per_output(sample_weight, len(self.specs))
        self.curvature = curvature
        self.halves = halves

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
        """The matrix [tᵢᵀ F tⱼ] (float32) for the given tangent lists (F the mean over the
        examples of `curvature` when given)."""
        if self.curvature is not None:
            return self.curvature.gram(tangents)
        outputs, jvps = self.jvps(tangents)
        hj = [
            [
                tf.cast(s.fisher_product(tf.stop_gradient(o), t, w, j, output_mask=keras_mask(o)), tf.float32)
                for s, o, t, w, j in zip(self.specs, outputs, self.targets, self.sample_weights, js)
            ]
            for js in jvps
        ]
        n = len(tangents)
        rows = []
        for a in range(n):
            rows.append(tf.stack([tf.add_n([tf.reduce_sum(x * y) for x, y in zip(jvps[a], hj[b])]) for b in range(n)]))
        return tf.stack(rows) / self.num_examples

    def loss(self) -> tf.Tensor:
        return tf.cast(self.loss_fn(), tf.float32)

    def half_gradients(self) -> list:
        """[g₁, g₂]: the gradients (float32, one per variable) of the two halves' losses."""
        out = []
        for half_loss in self.halves:
            with tf.GradientTape() as tape:
                loss = tf.cast(half_loss(), tf.float32)
            grads = tape.gradient(loss, [_raw(v) for v in self.variables], unconnected_gradients="zero")
            out.append([tf.cast(g, tf.float32) for g in grads])
        return out


def quadratic_value(coefficients, gram, gradient_dots, damping) -> tf.Tensor:
    """M(δ) for δ = Σ cᵢ tᵢ: ½ cᵀ(G + damping·D)c + cᵀb, `gram` = [tᵢᵀ(F + damping I)tⱼ] already damped."""
    del damping
    c = tf.reshape(tf.cast(coefficients, tf.float32), [-1, 1])
    return 0.5 * tf.reduce_sum(c * tf.matmul(gram, c)) + tf.reduce_sum(c[:, 0] * gradient_dots)


MAX_MOMENTUM = 0.99  # the largest μ the quadratic model chooses or reuses


def solve_step(gram, gradient_dots, learning_rate=None, momentum=None) -> tuple[tf.Tensor, tf.Tensor]:
    """(α, μ) minimizing M(αΔ + μδ₀) = ½[α μ] C [α μ]ᵀ + [α μ]·b, C = `gram` (2×2, damped),
    b = `gradient_dots` = [∇ᵀΔ, ∇ᵀδ₀]; a given `learning_rate`/`momentum` is held fixed.

    A chosen μ is kept in [0, MAX_MOMENTUM] (the minimum of M over that interval: M minimized
    over α is convex in μ, so an unconstrained μ outside it moves to the nearer end, and α is
    then the best α for that μ): the unconstrained 2×2 solution on small, noisy batches swings
    between μ < 0 and μ > 1 and, repeated, makes the run diverge (BENCHMARKS.md).
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
        mu = tf.where(ok, tf.clip_by_value(mu2, 0.0, MAX_MOMENTUM), 0.0)
        # The free solution where μ stayed, else the best α for the μ kept (μ = 0: α alone).
        alpha = tf.where(tf.logical_and(ok, tf.equal(mu, mu2)), alpha2, -(b1 + mu * c12) / tf.maximum(c11, tiny))
    elif learning_rate is None:
        mu = tf.cast(momentum, tf.float32)
        alpha = -(b1 + mu * c12) / tf.maximum(c11, tiny)
    else:
        alpha = tf.cast(learning_rate, tf.float32)
        mu = tf.where(c22 > tiny, -(b2 + alpha * c12) / tf.maximum(c22, tiny), 0.0)
        mu = tf.clip_by_value(mu, 0.0, MAX_MOMENTUM)
    good = tf.logical_and(tf.math.is_finite(alpha), tf.math.is_finite(mu))
    if learning_rate is None:
        good = tf.logical_and(good, b1 < 0.0)
    alpha = tf.where(good, alpha, 0.0 if learning_rate is None else alpha)
    mu = tf.where(good, mu, 0.0 if momentum is None else mu)
    return alpha, mu


def reusable_step(alpha, mu) -> tuple[tf.Tensor, tf.Tensor]:
    """(α, μ) to repeat on the steps between two choices (`adapt_every` > 1): α clipped to ≥ 0
    and μ to [0, MAX_MOMENTUM], so that the velocity v ← μv + αΔ stays bounded."""
    alpha = tf.maximum(tf.cast(alpha, tf.float32), 0.0)
    mu = tf.clip_by_value(tf.cast(mu, tf.float32), 0.0, MAX_MOMENTUM)
    return alpha, mu
