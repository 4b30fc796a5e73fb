"""How a Kronecker block applies its damped inverse: chosen once per block.

Convention: a block's gradient is a matrix V of shape (dim_a, dim_g) (rows: the input side ā,
columns: the output side g) and its curvature A ⊗ G acts on the row-major vectorisation of V,
(A ⊗ G) vec(V) = vec(A V G).

- `EigenInversion` ("eigen"): with A = Q_A diag(a) Q_Aᵀ and G = Q_G diag(g) Q_Gᵀ stored at each
  inversion, U = Q_A [(Q_Aᵀ V Q_G) / (a gᵀ + λ)] Q_Gᵀ solves (A ⊗ G + λI) vec(U) = vec(V)
  exactly, with the λ of the current step.
- `EigenbasisAdamInversion` ("eigen_adam"): the eigenbases of "eigen", but the scaling of
  each coordinate of R = Q_Aᵀ V Q_G is Adam's: s ← β₂ s + (1 − β₂) R², updated at every step
  from the gradient, and U = Q_A [R / (√(s / (1 − β₂ᵗ)) + ε)] Q_Gᵀ (t counts the updates of s;
  β₂ = 0.999, ε = 1e-7 as `keras.optimizers.Adam`).  That is Adam run in the Kronecker
  eigenbasis (SOAP, Vyas et al. 2024, with K-FAC's basis in place of Shampoo's); λ is not used.
  Before the first inversion Q = I and the step is Adam's direction.  Blocks that hold no
  moment state (per-channel depthwise blocks) apply it as "eigen".
- `EigenvalueCorrectedInversion` ("ekfac", George et al. 2018): the eigenbases of "eigen", but
  each coordinate of R is divided by S + λ, where S (dim_a × dim_g) is the second moment of the
  per-example gradients in that basis, S = mean_n (Q_Aᵀ ∇_n Q_G)² (∇_n = Σ_rows ā gᵀ of example
  n), re-estimated at every statistics step.  At each inversion S restarts from a gᵀ (so that
  until the next statistics step the step is "eigen"'s) and then averages the estimates made in
  the new basis (weight min(1 − 1/k, stats_decay) on the old value after k of them).  Blocks
  whose gradients are not sums of per-row outer products (per-channel depthwise blocks,
  Embedding) apply it as "eigen".
- `FactoredInversion` ("factored"): stores (A + π√λ I)⁻¹ and (G + √λ/π I)⁻¹ (Cholesky) at each
  inversion, π = sqrt((tr A / dim A) / (tr G / dim G)), and applies U = Ã⁻¹ V G̃⁻¹.

A diagonal factor (`keras_kfac.factors.DiagonalFactor`) is its own eigendecomposition (Q = I),
so both strategies work with any mix of dense and diagonal sides.  Each strategy creates the
variables it needs, computes their new values from the factors (`compute`, returning the values
and whether they are finite) and applies them (`apply`).
"""

from __future__ import annotations

import tensorflow as tf


def pi_factor(mean_a: tf.Tensor, mean_g: tf.Tensor) -> tf.Tensor:
    """π = sqrt(mean_a / mean_g), or 1 when either mean eigenvalue is not positive."""
    valid = tf.logical_and(mean_a > 0.0, mean_g > 0.0)
    return tf.sqrt(tf.where(valid, mean_a / tf.where(valid, mean_g, 1.0), 1.0))


def all_finite(tensors) -> tf.Tensor:
    ok = tf.constant(True)
    for t in tensors:
        if t is not None:
            ok = tf.logical_and(ok, tf.reduce_all(tf.math.is_finite(t)))
    return ok


class EigenInversion:
    """Exact damping through the eigendecompositions of both factors (see module doc)."""

    name = "eigen"
    per_example_scaling = False  # whether the block feeds it per-example gradient estimates

    def __init__(self, side_a, side_g, dtype: str = "float32"):
        self.sides = (side_a, side_g)
        self.dtype = tf.as_dtype(dtype)

    def state_specs(self) -> list:
        """(shape, initializer, name) of each state variable."""
        specs = []
        for label, side in zip("ag", self.sides):
            specs.append(((side.size,), "zeros", f"eigenvalues_{label}"))
            if not side.diagonal:
                specs.append((side.shape, "identity", f"eigenvectors_{label}"))
        return specs

    def compute(self, factors, damping) -> tuple[list, tf.Tensor]:
        del damping  # applied at every step instead
        values = []
        for side, factor in zip(self.sides, factors):
            eigenvalues, eigenvectors = side.eigh(factor, self.dtype)
            values.append(eigenvalues)
            if eigenvectors is not None:
                values.append(eigenvectors)
        return values, all_finite(values)

    def after_inverse(self, state, moments, ok) -> None:
        """Called once the new `state` is stored (nothing to do here)."""
        del state, moments, ok

    def _split(self, state) -> tuple:
        state = list(state)
        out = []
        for side in self.sides:
            eigenvalues = state.pop(0)
            eigenvectors = None if side.diagonal else state.pop(0)
            out.append((eigenvalues, eigenvectors))
        return tuple(out)

    def moment_specs(self) -> list:
        """(shape, initializer, name) of state updated at every step by `apply` (none here)."""
        return []

    def apply(self, state, matrix: tf.Tensor, damping, moments=()) -> tf.Tensor:
        """U = Q_A [scale(Q_Aᵀ V Q_G)] Q_Gᵀ, `scale` that of the strategy (`moments`: the
        variables of `moment_specs`, which it may update)."""
        (eig_a, vec_a), (eig_g, vec_g) = self._split(state)
        side_a, side_g = self.sides
        rotated = side_g.multiply(side_a.multiply(matrix, vec_a, 0, transpose=True), vec_g, 1)
        scaled = self.scale(rotated, eig_a, eig_g, damping, moments)
        return side_g.multiply(side_a.multiply(scaled, vec_a, 0), vec_g, 1, transpose=True)

    def scale(self, rotated, eig_a, eig_g, damping, moments) -> tf.Tensor:
        del moments
        return rotated / (eig_a[:, None] * eig_g[None, :] + tf.cast(damping, tf.float32))


class EigenbasisAdamInversion(EigenInversion):
    """Adam's per-coordinate scaling in the Kronecker eigenbasis (see module doc)."""

    name = "eigen_adam"
    beta_2 = 0.999
    epsilon = 1e-7

    def moment_specs(self) -> list:
        """The second moment of the rotated gradient and the count of its updates."""
        side_a, side_g = self.sides
        return [((side_a.size, side_g.size), "zeros", "basis_second_moment"), ((), "zeros", "basis_moment_count")]

    def scale(self, rotated, eig_a, eig_g, damping, moments) -> tf.Tensor:
        """Updates the moments with R = `rotated` and returns R / (√ŝ + ε); without moments
        (a block that holds none) the "eigen" scaling."""
        if not moments:
            return super().scale(rotated, eig_a, eig_g, damping, moments)
        second, count = moments
        second.assign(self.beta_2 * second + (1.0 - self.beta_2) * tf.square(rotated))
        count.assign_add(1.0)
        correction = 1.0 - tf.pow(self.beta_2, count)
        return rotated / (tf.sqrt(second / correction) + self.epsilon)


class EigenvalueCorrectedInversion(EigenInversion):
    """K-FAC's eigenbases with the per-example scaling S re-estimated in them (see module doc)."""

    name = "ekfac"
    per_example_scaling = True

    def moment_specs(self) -> list:
        """S and the number of its estimates since the last inversion."""
        side_a, side_g = self.sides
        return [((side_a.size, side_g.size), "zeros", "eigenvalue_scaling"), ((), "zeros", "scaling_updates")]

    def after_inverse(self, state, moments, ok) -> None:
        """A new basis: S restarts from the product of the new eigenvalues."""
        if not moments:
            return
        (eig_a, _), (eig_g, _) = self._split(state)
        scaling, count = moments
        scaling.assign(tf.where(ok, eig_a[:, None] * eig_g[None, :], scaling))
        count.assign(tf.where(ok, 0.0, count))

    def batch_scaling(self, state, per_example: list) -> tf.Tensor:
        """mean_n (Q_Aᵀ ∇_n Q_G)² from `per_example`, a list (one entry per call of the layer) of
        (rows_a, rows_g) of shapes (m, L, dim_a) and (m, L, dim_g): ∇_n = Σ_calls Σ_l ā gᵀ."""
        (_, vec_a), (_, vec_g) = self._split(state)

        def rotate(rows, vectors):  # each row r becomes Qᵀ r (diagonal side: Q = I)
            return rows if vectors is None else tf.einsum("mld,de->mle", rows, vectors)

        rotated = [(rotate(a, vec_a), rotate(g, vec_g)) for a, g in per_example]
        m = tf.cast(tf.shape(rotated[0][0])[0], tf.float32)
        if len(rotated) == 1 and rotated[0][0].shape[1] == 1:  # ∇_n = ā gᵀ: (Q_Aᵀā)² (Q_Gᵀg)²ᵀ
            a, g = rotated[0]
            return tf.matmul(tf.square(a[:, 0]), tf.square(g[:, 0]), transpose_a=True) / m

        def add_example(total, n):
            grad = tf.add_n([tf.matmul(a[n], g[n], transpose_a=True) for a, g in rotated])
            return total + tf.square(grad)

        side_a, side_g = self.sides
        zero = tf.zeros((side_a.size, side_g.size), tf.float32)
        total = tf.foldl(add_example, tf.range(tf.shape(rotated[0][0])[0]), initializer=zero)
        return total / m

    def update_scaling(self, moments, estimate, decay) -> None:
        """S ← d S + (1 − d) estimate, d = min(1 − 1/k, `decay`) for the k-th estimate in this basis."""
        scaling, count = moments
        count.assign_add(1.0)
        weight = tf.minimum(1.0 - 1.0 / count, tf.cast(decay, tf.float32))
        scaling.assign(weight * scaling + (1.0 - weight) * estimate)

    def scale(self, rotated, eig_a, eig_g, damping, moments) -> tf.Tensor:
        """R / (S + λ); without moments (a block that holds none) the "eigen" scaling."""
        if not moments:
            return super().scale(rotated, eig_a, eig_g, damping, moments)
        return rotated / (moments[0] + tf.cast(damping, tf.float32))


class FactoredInversion:
    """Factored Tikhonov damping with explicit inverses (see module doc)."""

    name = "factored"
    per_example_scaling = False

    def __init__(self, side_a, side_g, dtype: str = "float32"):
        self.sides = (side_a, side_g)
        self.dtype = tf.as_dtype(dtype)

    def state_specs(self) -> list:
        return [(side.shape, side.identity_initializer, f"inverse_{label}") for label, side in zip("ag", self.sides)]

    def shifts(self, factors, damping) -> tuple[tf.Tensor, tf.Tensor]:
        """(π√λ, √λ/π): the shifts added to A and G."""
        side_a, side_g = self.sides
        pi = pi_factor(side_a.mean_eigenvalue(factors[0]), side_g.mean_eigenvalue(factors[1]))
        root = tf.sqrt(tf.cast(damping, tf.float32))
        return pi * root, root / pi

    def compute(self, factors, damping) -> tuple[list, tf.Tensor]:
        shifts = self.shifts(factors, damping)
        values = [side.shifted_inverse(f, s, self.dtype) for side, f, s in zip(self.sides, factors, shifts)]
        return values, all_finite(values)

    def moment_specs(self) -> list:
        return []

    def after_inverse(self, state, moments, ok) -> None:
        del state, moments, ok

    def apply(self, state, matrix: tf.Tensor, damping, moments=()) -> tf.Tensor:
        del damping, moments  # λ is already inside the stored inverses; no per-step state
        side_a, side_g = self.sides
        inverse_a, inverse_g = state
        return side_g.multiply(side_a.multiply(matrix, inverse_a, 0), inverse_g, 1)


INVERSIONS = {
    cls.name: cls for cls in (EigenInversion, EigenbasisAdamInversion, EigenvalueCorrectedInversion, FactoredInversion)
}
