"""Damped Kronecker-factored inverses, applied through eigendecompositions.

Convention: a block's gradient is a matrix V of shape (dim_a, dim_g) (rows follow the input
side ā, columns the output side g) and the curvature is A ⊗ G acting on the row-major
vectorisation of V, so (A ⊗ G) vec(V) = vec(A V G).  With A = Q_A diag(a) Q_Aᵀ and
G = Q_G diag(g) Q_Gᵀ every damped inverse used here is

    U = Q_A [ (Q_Aᵀ V Q_G) / D ] Q_Gᵀ,

with D_ij = a_i g_j + λ for exact ("eigen") damping, or
D_ij = (a_i + π√λ)(g_j + √λ/π) for factored Tikhonov damping.
"""

from __future__ import annotations

import tensorflow as tf

DAMPING_MODES = ("eigen", "factored")


def symmetric_eigh(matrix: tf.Tensor, dtype: tf.DType = tf.float32) -> tuple[tf.Tensor, tf.Tensor]:
    """Eigendecomposition of a symmetric PSD factor, computed in `dtype`.

    The input is symmetrised first and eigenvalues below zero (round-off) are clipped to 0.
    Returns (eigenvalues, eigenvectors) in the input's dtype.
    """
    out_dtype = matrix.dtype
    m = tf.cast(matrix, dtype)
    m = 0.5 * (m + tf.transpose(m))
    values, vectors = tf.linalg.eigh(m)
    values = tf.maximum(values, tf.zeros_like(values))
    return tf.cast(values, out_dtype), tf.cast(vectors, out_dtype)


def pi_factor(eig_a: tf.Tensor, eig_g: tf.Tensor) -> tf.Tensor:
    """π = sqrt((tr A / dim A) / (tr G / dim G)), or 1 when either trace is not positive."""
    mean_a = tf.reduce_mean(eig_a)
    mean_g = tf.reduce_mean(eig_g)
    valid = tf.logical_and(mean_a > 0.0, mean_g > 0.0)
    safe_ratio = tf.where(valid, mean_a / tf.where(valid, mean_g, 1.0), 1.0)
    return tf.sqrt(safe_ratio)


def damped_denominator(eig_a: tf.Tensor, eig_g: tf.Tensor, damping, mode: str) -> tf.Tensor:
    """The matrix D of the module docstring, of shape (dim_a, dim_g)."""
    damping = tf.cast(damping, eig_a.dtype)
    if mode == "eigen":
        return eig_a[:, None] * eig_g[None, :] + damping
    if mode == "factored":
        pi = pi_factor(eig_a, eig_g)
        root = tf.sqrt(damping)
        return (eig_a[:, None] + pi * root) * (eig_g[None, :] + root / pi)
    raise ValueError(f"Unknown damping mode {mode!r}; expected one of {DAMPING_MODES}.")


def precondition(
    grad: tf.Tensor,
    eig_a: tf.Tensor,
    vec_a: tf.Tensor,
    eig_g: tf.Tensor,
    vec_g: tf.Tensor,
    damping,
    mode: str,
) -> tf.Tensor:
    """Applies the damped inverse of A ⊗ G to the gradient matrix `grad` (dim_a, dim_g)."""
    rotated = tf.matmul(tf.matmul(vec_a, grad, transpose_a=True), vec_g)
    scaled = rotated / damped_denominator(eig_a, eig_g, damping, mode)
    return tf.matmul(tf.matmul(vec_a, scaled), vec_g, transpose_b=True)


def factored_inverses(
    factor_a: tf.Tensor, factor_g: tf.Tensor, damping, dtype: tf.DType = tf.float32
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(A + π√λ I)⁻¹ and (G + √λ/π I)⁻¹ through Cholesky factorizations, computed in `dtype`.

    π = sqrt((tr A / dim A) / (tr G / dim G)) (1 if a trace is not positive).  Returns the two
    inverses in the factors' dtype and a boolean that is False when either is not finite.
    """
    out_dtype = factor_a.dtype
    a = tf.cast(factor_a, dtype)
    g = tf.cast(factor_g, dtype)
    pi = tf.cast(pi_factor(tf.linalg.diag_part(a), tf.linalg.diag_part(g)), dtype)
    root = tf.sqrt(tf.cast(damping, dtype))
    inverses = []
    for matrix, shift in ((a, pi * root), (g, root / pi)):
        size = tf.shape(matrix)[0]
        eye = tf.eye(size, dtype=dtype)
        damped = 0.5 * (matrix + tf.transpose(matrix)) + shift * eye
        inverse = tf.linalg.cholesky_solve(tf.linalg.cholesky(damped), eye)
        inverses.append(0.5 * (inverse + tf.transpose(inverse)))
    ok = tf.logical_and(tf.reduce_all(tf.math.is_finite(inverses[0])), tf.reduce_all(tf.math.is_finite(inverses[1])))
    return tf.cast(inverses[0], out_dtype), tf.cast(inverses[1], out_dtype), ok
