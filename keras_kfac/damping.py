"""Levenberg–Marquardt adaptation of the damping λ.

ρ = (h(θ+δ) − h(θ)) / (M(δ) − M(0)), M(0) = 0, on the same mini-batch, every `every` steps;
λ ← ω λ if ρ > 3/4, λ ← λ / ω if ρ < 1/4, ω = (19/20)^every; then λ is clipped to
[min_damping, max_damping].
"""

from __future__ import annotations

import tensorflow as tf


def reduction_ratio(loss_before, loss_after, model_change) -> tf.Tensor:
    """ρ; a non-finite ρ or a model change that is not a decrease gives ρ = −∞ (λ rises)."""
    num = tf.cast(loss_after, tf.float32) - tf.cast(loss_before, tf.float32)
    den = tf.cast(model_change, tf.float32)
    rho = num / tf.where(den < 0.0, den, -1.0)
    return tf.where(tf.logical_and(den < 0.0, tf.math.is_finite(rho)), rho, -float("inf"))


def lm_update(damping, rho, every: int, min_damping: float, max_damping: float) -> tf.Tensor:
    """The new λ from ρ (see module doc)."""
    omega = (19.0 / 20.0) ** every
    lam = tf.cast(damping, tf.float32)
    lam = tf.where(rho > 0.75, lam * omega, tf.where(rho < 0.25, lam / omega, lam))
    return tf.clip_by_value(lam, min_damping, max_damping)
