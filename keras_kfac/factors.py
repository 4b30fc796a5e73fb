"""The two shapes a Kronecker factor can take: a dense symmetric matrix or its diagonal.

A factor of side d summarises vectors r (rows of a (n, d) matrix) through Σ r rᵀ.  `DenseFactor`
keeps the whole d×d matrix; `DiagonalFactor` keeps only its diagonal Σ r², O(d) memory, for the
sides too large to store (see `KFAC(max_factor_size=...)`).  A block multiplies its gradient
matrix V (rows: input side, columns: output side) by functions of its factors on the left
(input side, axis 0) or on the right (output side, axis 1); each factor kind knows how.
"""

from __future__ import annotations

import tensorflow as tf


def _with_ones(rows: tf.Tensor) -> tf.Tensor:
    return tf.concat([rows, tf.ones_like(rows[:, :1])], axis=1)


# Side up to which `lower_triangular_inverse` solves directly instead of splitting in two.
TRIANGULAR_SOLVE_SIZE = 256


def lower_triangular_inverse(lower: tf.Tensor, solve_size: int = TRIANGULAR_SOLVE_SIZE) -> tf.Tensor:
    """L⁻¹ of a lower-triangular L (static side n) by 2x2 blocks, [[P, 0], [Q, R]]⁻¹ =
    [[P⁻¹, 0], [−R⁻¹ Q P⁻¹, R⁻¹]], down to sides ≤ `solve_size`, which a triangular solve inverts.

    Most of the work is then matrix products, which run several times faster on CPU than a
    triangular solve against the identity (the same O(n³) count; BENCHMARKS.md, "Inverses by
    blocks")."""
    size = lower.shape[0]
    if size <= solve_size:
        return tf.linalg.triangular_solve(lower, tf.eye(size, dtype=lower.dtype), lower=True)
    half = size // 2
    top = lower_triangular_inverse(lower[:half, :half], solve_size)
    bottom = lower_triangular_inverse(lower[half:, half:], solve_size)
    corner = -tf.matmul(bottom, tf.matmul(lower[half:, :half], top))
    return tf.concat(
        [
            tf.concat([top, tf.zeros((half, size - half), lower.dtype)], axis=1),
            tf.concat([corner, bottom], axis=1),
        ],
        axis=0,
    )


def spd_inverse(matrix: tf.Tensor, solve_size: int = TRIANGULAR_SOLVE_SIZE) -> tf.Tensor:
    """M⁻¹ of a symmetric positive-definite M (static side n): M = L Lᵀ (Cholesky), M⁻¹ = L⁻ᵀ L⁻¹.

    Sides ≤ `solve_size` use the Cholesky solve against the identity; larger ones
    `lower_triangular_inverse`.  A matrix that is not positive definite gives non-finite values
    either way, which the caller checks."""
    size = matrix.shape[0]
    lower = tf.linalg.cholesky(matrix)
    if size <= solve_size:
        return tf.linalg.cholesky_solve(lower, tf.eye(size, dtype=matrix.dtype))
    inverse_lower = lower_triangular_inverse(lower, solve_size)
    return tf.matmul(inverse_lower, inverse_lower, transpose_a=True)


class DenseFactor:
    """A full symmetric d×d factor."""

    diagonal = False

    def __init__(self, size: int):
        self.size = int(size)

    @property
    def shape(self) -> tuple:
        return (self.size, self.size)

    @property
    def identity_initializer(self) -> str:
        return "identity"

    def gram(self, rows: tf.Tensor, with_ones: bool = False) -> tf.Tensor:
        """Σ_rows r rᵀ for r = [row, 1] (with_ones) or r = row, without forming the augmented rows."""
        gram = tf.matmul(rows, rows, transpose_a=True)
        if not with_ones:
            return gram
        count = tf.cast(tf.shape(rows)[0], rows.dtype)
        col = tf.reduce_sum(rows, axis=0)[:, None]
        top = tf.concat([gram, col], axis=1)
        bottom = tf.concat([tf.transpose(col), tf.reshape(count, (1, 1))], axis=1)
        return tf.concat([top, bottom], axis=0)

    def mean_eigenvalue(self, value: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(tf.linalg.diag_part(value))

    def eigh(self, value: tf.Tensor, dtype: tf.DType) -> tuple[tf.Tensor, tf.Tensor]:
        """(eigenvalues ≥ 0, eigenvectors) of the symmetrised factor, computed in `dtype`, float32 out."""
        m = tf.cast(value, dtype)
        values, vectors = tf.linalg.eigh(0.5 * (m + tf.transpose(m)))
        return tf.cast(tf.maximum(values, 0.0), tf.float32), tf.cast(vectors, tf.float32)

    def shifted_inverse(self, value: tf.Tensor, shift, dtype: tf.DType) -> tf.Tensor:
        """(F + shift·I)⁻¹ by Cholesky in `dtype` (`spd_inverse`), symmetrised, float32 out."""
        m = tf.cast(value, dtype)
        damped = 0.5 * (m + tf.transpose(m)) + tf.cast(shift, dtype) * tf.eye(self.size, dtype=dtype)
        inverse = spd_inverse(damped)
        return tf.cast(0.5 * (inverse + tf.transpose(inverse)), tf.float32)

    def multiply(self, matrix: tf.Tensor, operand: tf.Tensor, axis: int, transpose: bool = False) -> tf.Tensor:
        """operand·V (axis 0) or V·operand (axis 1), with operandᵀ when `transpose`."""
        if axis == 0:
            return tf.matmul(operand, matrix, transpose_a=transpose)
        return tf.matmul(matrix, operand, transpose_b=transpose)


class DiagonalFactor:
    """Only the diagonal of the factor, stored as a vector of length d."""

    diagonal = True

    def __init__(self, size: int):
        self.size = int(size)

    @property
    def shape(self) -> tuple:
        return (self.size,)

    @property
    def identity_initializer(self) -> str:
        return "ones"

    def gram(self, rows: tf.Tensor, with_ones: bool = False) -> tf.Tensor:
        diag = tf.reduce_sum(tf.square(rows), axis=0)
        if not with_ones:
            return diag
        return tf.concat([diag, tf.cast(tf.shape(rows)[:1], rows.dtype)], axis=0)

    def mean_eigenvalue(self, value: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(value)

    def eigh(self, value: tf.Tensor, dtype: tf.DType) -> tuple[tf.Tensor, None]:
        return tf.maximum(tf.cast(value, tf.float32), 0.0), None

    def shifted_inverse(self, value: tf.Tensor, shift, dtype: tf.DType) -> tf.Tensor:
        return tf.cast(1.0 / (tf.cast(value, dtype) + tf.cast(shift, dtype)), tf.float32)

    def multiply(self, matrix: tf.Tensor, operand, axis: int, transpose: bool = False) -> tf.Tensor:
        """diag(operand)·V or V·diag(operand); an operand of None is the identity (an eigenbasis)."""
        if operand is None:
            return matrix
        return matrix * (operand[:, None] if axis == 0 else operand[None, :])


def factor_for(size: int, max_factor_size: int | None) -> DenseFactor | DiagonalFactor:
    """A dense factor up to `max_factor_size` (None: no limit), a diagonal one above it."""
    if max_factor_size is not None and size > max_factor_size:
        return DiagonalFactor(size)
    return DenseFactor(size)
