"""Block-tridiagonal K-FAC (Martens & Grosse 2015, section 4.3) for chains of Dense layers.

A *chain* is a run of Dense layers l_1 → l_2 → … → l_k in which the output of l_i (after its
activation) is the only input of l_{i+1} and goes nowhere else.  Layer i's gradient matrix V_i
has shape (dim_a_i, dim_g_i) (see `keras_kfac.blocks.base`); the input of layer i+1 is
ā_i = [φ(s_i), 1], so the Fisher block between layers i and i+1 is approximated by

    F_{i,i+1} = Ā_{i,i+1} ⊗ G_{i,i+1},   Ā_{i,i+1} = E[ā_{i−1} ā_iᵀ],   G_{i,i+1} = E[g_i g_{i+1}ᵀ]

(Ā_{i,i+1} is (dim_a_i, dim_a_{i+1}), G_{i,i+1} is (dim_g_i, dim_g_{i+1}); with the row-major
vectorisation, (P ⊗ Q) vec(V) = vec(P V Qᵀ)).  The diagonal blocks are the factored-Tikhonov
damped F̃_{i,i} = Ã_i ⊗ G̃_i, Ã_i = A_i + π_i√λ I, G̃_i = G_i + √λ/π_i I; the cross factors are
not damped.  With

    Ψ_{i,i+1} = F_{i,i+1} F̃_{i+1,i+1}⁻¹ = (Ā_{i,i+1} Ã_{i+1}⁻¹) ⊗ (G_{i,i+1} G̃_{i+1}⁻¹) = Ψᴬ_i ⊗ Ψᴳ_i,
    Σ_{i|i+1} = F̃_{i,i} − Ψ_{i,i+1} F̃_{i+1,i+1} Ψ_{i,i+1}ᵀ = Ã_i ⊗ G̃_i − C_i ⊗ D_i,
    C_i = Ψᴬ_i Ā_{i,i+1}ᵀ,   D_i = Ψᴳ_i G_{i,i+1}ᵀ,

the step applies F̂⁻¹ = Ξᵀ Λ Ξ: Ξ is block upper-bidiagonal with I on the diagonal and −Ψ_{i,i+1}
above it, Λ = diag(Σ_{1|2}⁻¹, …, Σ_{k−1|k}⁻¹, F̃_{k,k}⁻¹).  F̂ agrees with the damped Fisher on the
diagonal and first off-diagonal blocks and F̂⁻¹ is block tridiagonal.

Σ⁻¹ for Σ = A ⊗ B − C ⊗ D (A, B SPD) uses two symmetric eigendecompositions (the seed's formula
(8)): with A = L_A L_Aᵀ (Cholesky), L_A⁻¹ C L_A⁻ᵀ = E_1 diag(s_1) E_1ᵀ, K_1 = L_A⁻ᵀ E_1 (so
K_1ᵀ A K_1 = I, K_1ᵀ C K_1 = diag(s_1)), and likewise K_2, s_2 for (B, D),

    Σ⁻¹ vec(V) = vec( K_1 [ (K_1ᵀ V K_2) / (1 − s_1 s_2ᵀ) ] K_2ᵀ ),

elementwise division, no Kronecker product formed.  (L_A⁻¹ plays the part of A^{-1/2}: any
square root gives the same Σ⁻¹.)
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_kfac import _private
from keras_kfac.blocks.dense import DenseBlock
from keras_kfac.blocks.kronecker import first_examples
from keras_kfac.inversion import FactoredInversion, pi_factor

Functional = _private.Functional

APPROXIMATIONS = ("block_diagonal", "block_tridiagonal")
# Floor of 1 − s_1 s_2 (positive in exact arithmetic because the damped blocks make Σ positive definite).
_MIN_DENOMINATOR = 1e-6


# ----------------------------------------------------------------------------- chains
def _graph_nodes(model) -> tuple[list, Functional] | None:
    """(every node of the graph, the graph) of a Functional or built Sequential model; None for
    other models."""
    graph = model
    if isinstance(model, keras.Sequential):
        graph = getattr(model, "_functional", None)
    if not isinstance(graph, Functional):
        return None
    seen, order, stack = set(), [], []
    for tensor in graph.outputs:
        stack.append(_private.output_node(tensor))
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        order.append(node)
        stack.extend(node.parent_nodes)
    return order, graph


def chainable(block) -> bool:
    """Dense blocks with two dense factors and factored damping can be links of a chain."""
    return (
        isinstance(block, DenseBlock)
        and isinstance(block.inversion, FactoredInversion)
        and not (block.side_a.diagonal or block.side_g.diagonal)
    )


def find_chains(model, blocks: list) -> list[list[int]]:
    """Chains of Dense blocks in `model`'s graph, as lists (length ≥ 2) of indices into `blocks`.

    Layer j follows layer i in a chain when both are Dense blocks called exactly once in the
    graph, j's only input is i's output, and that output feeds nothing else (and is not a model
    output).  Any layer in between (Dropout, Flatten, Activation, …) or a shared layer breaks
    the chain.  Subclassed models (no Keras graph) have no chains.
    """
    found = _graph_nodes(model)
    if found is None:
        return []
    nodes, graph = found
    index_of = {id(b.layer): i for i, b in enumerate(blocks) if chainable(b)}
    calls = {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
    consumers = {}  # id(tensor) -> number of uses in the graph (model outputs included)
    for node in nodes:
        for tensor in node.input_tensors:
            consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
    for tensor in graph.outputs:
        consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
    next_of, has_previous = {}, set()
    for node in nodes:
        j = index_of.get(id(node.operation))
        if j is None or calls[id(node.operation)] != 1 or len(node.input_tensors) != 1:
            continue
        (tensor,) = node.input_tensors
        producer = _private.output_node(tensor).operation
        i = index_of.get(id(producer))
        if i is None or calls[id(producer)] != 1 or consumers[id(tensor)] != 1:
            continue
        next_of[i] = j
        has_previous.add(j)
    chains = []
    for start in sorted(next_of):
        if start in has_previous:
            continue
        chain = [start]
        while chain[-1] in next_of:
            chain.append(next_of[chain[-1]])
        chains.append(chain)
    return chains


def chain_bytes(blocks: list, chain: list[int]) -> int:
    """float32 bytes a chain adds to the block-diagonal state: per link the cross factors and
    (Ψᴬ, Ψᴳ, K_1, s_1, K_2, s_2)."""
    total = 0
    for i, j in zip(chain[:-1], chain[1:]):
        da, dg, na, ng = blocks[i].dim_a, blocks[i].dim_g, blocks[j].dim_a, blocks[j].dim_g
        total += 4 * (2 * (da * na + dg * ng) + da * da + da + dg * dg + dg)
    return total


# ------------------------------------------------------------------------ statistics
def cross_gram(rows_x: tf.Tensor, ones_x: bool, rows_y: tf.Tensor, ones_y: bool) -> tf.Tensor:
    """Σ_rows x̄ ȳᵀ for x̄ = [x, 1] (if `ones_x`) and ȳ = [y, 1] (if `ones_y`)."""
    if ones_x:
        rows_x = tf.concat([rows_x, tf.ones_like(rows_x[:, :1])], axis=1)
    if ones_y:
        rows_y = tf.concat([rows_y, tf.ones_like(rows_y[:, :1])], axis=1)
    return tf.matmul(rows_x, rows_y, transpose_a=True)


def cross_factors(
    first, second, inputs_first, inputs_second, grads_first, grads_second, num_examples
) -> tuple[tf.Tensor, tf.Tensor]:
    """Batch estimates (Ā_{i,i+1}, G_{i,i+1}) of two consecutive Dense blocks, each called once:
    Ā_{i,i+1} = mean over rows of ā_{i−1} ā_iᵀ, G_{i,i+1} = (1/m) Σ_rows g_i g_{i+1}ᵀ.  Under the
    blocks' `input_stats_batch_size` k, Ā_{i,i+1} averages over the first k examples only, the
    rows their own A use; G_{i,i+1} always uses all of them."""
    subset = first.options.input_stats_batch_size
    if subset is not None:
        inputs_first = first_examples(inputs_first, subset, num_examples)
        inputs_second = first_examples(inputs_second, subset, num_examples)
    rows_a1 = first.input_rows(tf.cast(inputs_first, tf.float32))
    rows_a2 = second.input_rows(tf.cast(inputs_second, tf.float32))
    n_rows = tf.cast(tf.shape(rows_a1)[0], tf.float32)
    cross_a = cross_gram(rows_a1, first.bias is not None, rows_a2, second.bias is not None) / n_rows
    rows_g1 = first.output_rows(tf.cast(grads_first, tf.float32))
    rows_g2 = second.output_rows(tf.cast(grads_second, tf.float32))
    cross_g = tf.matmul(rows_g1, rows_g2, transpose_a=True) / tf.cast(num_examples, tf.float32)
    return cross_a, cross_g


# ------------------------------------------------------------------------ inversions
def damped_factors(factor_a: tf.Tensor, factor_g: tf.Tensor, damping) -> tuple[tf.Tensor, tf.Tensor]:
    """(A + π√λ I, G + √λ/π I), π = sqrt((tr A / dim A) / (tr G / dim G)) (1 if a trace is 0)."""
    pi = pi_factor(tf.reduce_mean(tf.linalg.diag_part(factor_a)), tf.reduce_mean(tf.linalg.diag_part(factor_g)))
    root = tf.sqrt(tf.cast(damping, factor_a.dtype))
    a = 0.5 * (factor_a + tf.transpose(factor_a)) + pi * root * tf.eye(tf.shape(factor_a)[0], dtype=factor_a.dtype)
    g = 0.5 * (factor_g + tf.transpose(factor_g)) + root / pi * tf.eye(tf.shape(factor_g)[0], dtype=factor_g.dtype)
    return a, g


def _joint_basis(spd: tf.Tensor, other: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(K, s) with Kᵀ spd K = I and Kᵀ other K = diag(s) (s clipped at 0: `other` is PSD)."""
    chol = tf.linalg.cholesky(spd)
    half = tf.linalg.triangular_solve(chol, other, lower=True)  # L⁻¹ C
    whitened = tf.linalg.triangular_solve(chol, tf.transpose(half), lower=True)  # L⁻¹ C L⁻ᵀ
    values, vectors = tf.linalg.eigh(0.5 * (whitened + tf.transpose(whitened)))
    basis = tf.linalg.triangular_solve(chol, vectors, lower=True, adjoint=True)  # L⁻ᵀ E
    return basis, tf.maximum(values, 0.0)


def link_state(
    factor_a, factor_g, inverse_a_next, inverse_g_next, cross_a, cross_g, damping, dtype=tf.float32
) -> tuple:
    """What the step needs for the link (i, i+1), computed in `dtype`, returned in float32:
    (Ψᴬ, Ψᴳ, K_1, s_1, K_2, s_2, ok) for Σ_{i|i+1} = Ã_i ⊗ G̃_i − C ⊗ D (module docstring).

    `inverse_a_next`, `inverse_g_next` are Ã_{i+1}⁻¹ and G̃_{i+1}⁻¹; `ok` is False when a
    result is not finite (a failed factorization)."""
    cast = lambda t: tf.cast(t, dtype)  # noqa: E731
    damped_a, damped_g = damped_factors(cast(factor_a), cast(factor_g), damping)
    psi_a = tf.matmul(cast(cross_a), cast(inverse_a_next))
    psi_g = tf.matmul(cast(cross_g), cast(inverse_g_next))
    c = tf.matmul(psi_a, cast(cross_a), transpose_b=True)
    d = tf.matmul(psi_g, cast(cross_g), transpose_b=True)
    basis_a, values_a = _joint_basis(damped_a, 0.5 * (c + tf.transpose(c)))
    basis_g, values_g = _joint_basis(damped_g, 0.5 * (d + tf.transpose(d)))
    out = [tf.cast(t, tf.float32) for t in (psi_a, psi_g, basis_a, values_a, basis_g, values_g)]
    ok = tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in out])
    return (*out, ok)


# ----------------------------------------------------------------------------- the step
def apply_sigma_inverse(matrix, basis_a, values_a, basis_g, values_g) -> tf.Tensor:
    """Σ⁻¹ vec(V) = vec(K_1 [(K_1ᵀ V K_2) / (1 − s_1 s_2ᵀ)] K_2ᵀ)."""
    rotated = tf.matmul(tf.matmul(basis_a, matrix, transpose_a=True), basis_g)
    denominator = tf.maximum(1.0 - values_a[:, None] * values_g[None, :], _MIN_DENOMINATOR)
    return tf.matmul(tf.matmul(basis_a, rotated / denominator), basis_g, transpose_b=True)


def chain_directions(matrices: list, links: list, last_inverse) -> list:
    """F̂⁻¹ ∇ = Ξᵀ Λ Ξ ∇ for one chain.

    `matrices`: the chain's gradient matrices V_1..V_k; `links`: per link (i, i+1) the tuple
    (Ψᴬ, Ψᴳ, K_1, s_1, K_2, s_2) (tensors or variables); `last_inverse`: (Ã_k⁻¹, G̃_k⁻¹).
    """
    k = len(matrices)
    # Ξ∇: y_i = V_i − Ψ_{i,i+1} V_{i+1}, y_k = V_k.
    ys = [
        matrices[i] - tf.matmul(tf.matmul(links[i][0], matrices[i + 1]), links[i][1], transpose_b=True)
        for i in range(k - 1)
    ]
    # Λ(Ξ∇)
    zs = [apply_sigma_inverse(y, *link[2:]) for y, link in zip(ys, links)]
    zs.append(tf.matmul(tf.matmul(last_inverse[0], matrices[-1]), last_inverse[1]))
    # Ξᵀ(ΛΞ∇): u_1 = z_1, u_{i+1} = z_{i+1} − Ψ_{i,i+1}ᵀ z_i.
    out = [zs[0]]
    for i in range(k - 1):
        out.append(zs[i + 1] - tf.matmul(tf.matmul(links[i][0], zs[i], transpose_a=True), links[i][1]))
    return out


class TridiagonalState:
    """The optimizer's chain state: per link the cross factors (moving averages) and the
    precomputed (Ψᴬ, Ψᴳ, K_1, s_1, K_2, s_2)."""

    def __init__(self, chains: list[list[int]]):
        self.chains = chains
        self.links = [(c[i], c[i + 1]) for c in chains for i in range(len(c) - 1)]
        self.cross = []  # per link: (Ā_{i,i+1}, G_{i,i+1}) variables
        self.state = []  # per link: (Ψᴬ, Ψᴳ, K_1, s_1, K_2, s_2) variables

    def build(self, optimizer, blocks: list) -> None:
        for i, j in self.links:
            first, second = blocks[i], blocks[j]
            prefix = f"{first.name}_{second.name}"
            da, dg, na, ng = first.dim_a, first.dim_g, second.dim_a, second.dim_g

            def var(shape, init, name, prefix=prefix):
                return optimizer.add_variable(shape, init, "float32", name=f"{prefix}_{name}")

            self.cross.append((var((da, na), "zeros", "cross_a"), var((dg, ng), "zeros", "cross_g")))
            self.state.append(
                (
                    var((da, na), "zeros", "psi_a"),
                    var((dg, ng), "zeros", "psi_g"),
                    var((da, da), "identity", "sigma_basis_a"),
                    var((da,), "zeros", "sigma_values_a"),
                    var((dg, dg), "identity", "sigma_basis_g"),
                    var((dg,), "zeros", "sigma_values_g"),
                )
            )

    def batch_statistics(self, blocks, inputs, preact_grads, num_examples):
        """Per link the batch (Ā_{i,i+1}, G_{i,i+1}) (None where a layer was not called once) and
        whether all are finite."""
        batch, ok = [], tf.constant(True)
        for i, j in self.links:
            if len(inputs[i]) != 1 or len(inputs[j]) != 1:
                batch.append(None)
                continue
            new = cross_factors(
                blocks[i], blocks[j], inputs[i][0], inputs[j][0], preact_grads[i][0], preact_grads[j][0], num_examples
            )
            ok = tf.logical_and(ok, tf.reduce_all(tf.math.is_finite(new[0])))
            ok = tf.logical_and(ok, tf.reduce_all(tf.math.is_finite(new[1])))
            batch.append(new)
        return batch, ok

    def assign_statistics(self, decay, batch) -> None:
        """new = decay · old + (1 − decay) · batch, as for the diagonal factors."""
        for (cross_a, cross_g), new in zip(self.cross, batch):
            if new is None:
                continue
            cross_a.assign(decay * cross_a + (1.0 - decay) * new[0])
            cross_g.assign(decay * cross_g + (1.0 - decay) * new[1])

    def update_inverses(self, blocks, damping, dtype) -> None:
        """Recomputes every link's state from the factors and the (already updated) factored
        inverses of the following block; a non-finite result keeps the previous state."""
        for (i, j), (cross_a, cross_g), state in zip(self.links, self.cross, self.state):
            a, g = blocks[i].statistics_variables
            inv_a_next, inv_g_next = blocks[j].inverse_variables
            *new, ok = link_state(a, g, inv_a_next, inv_g_next, cross_a, cross_g, damping, dtype)
            for variable, value in zip(state, new):
                variable.assign(tf.where(ok, value, variable))

    def directions(self, matrices: dict, blocks) -> dict:
        """{block index: F̂⁻¹∇ slice} for every chain whose blocks all have gradients."""
        out = {}
        link_of = {link: s for link, s in zip(self.links, self.state)}
        for chain in self.chains:
            if not all(i in matrices for i in chain):
                continue
            links = [link_of[(chain[n], chain[n + 1])] for n in range(len(chain) - 1)]
            last_inverse = blocks[chain[-1]].inverse_variables
            for i, u in zip(chain, chain_directions([matrices[i] for i in chain], links, last_inverse)):
                out[i] = u
        return out
