"""K-FAC blocks of `keras.layers.EinsumDense` and of `Dense` over sequences, with the two
weight-sharing approximations of Eschenhagen et al. (NeurIPS 2023, "Kronecker-Factored
Approximate Curvature for Modern Neural Network Architectures").

An EinsumDense equation "input,kernel->output" (an ellipsis is resolved from the input's rank)
is read as follows.  The first input axis is the batch.  Kernel axes that are also input axes
are the input features (contracted), kernel axes that are output axes are the output
features; the kernel gradient, its axes ordered (input features, output features) as they
appear in the kernel, is the (dim_a, dim_g) matrix of `keras_kfac.blocks.kronecker` (plus the
bias row when the bias covers exactly the output-feature axes).  The other input axes (neither
batch nor contracted; they are also output axes) are the shared positions p = 1..P, over which
the same kernel is applied: MultiHeadAttention's "abc,cde->abde" (q/k/v: input feature c,
output features (d, e), positions b) and "abcd,cde->abe" (output: input features (c, d),
output feature e, positions b); "ab,bc->ac" has no positions.  `Dense` on an input of rank > 2
is the equation "...i,io->...o".

With ā_{n,p} the input features of example n at position p (and a 1 appended for the bias),
g_{n,p} the gradient of example n's own loss with respect to the pre-activation at p, and m
examples:

- KFAC-expand (`weight_sharing="expand"`, the default of `EinsumDenseBlock` and `DenseBlock`,
  chosen by the ViT benchmark of BENCHMARKS.md): every position is a row, as a convolution
  location is:
      A = 1/(m P) Σ_n Σ_p ā_{n,p} ā_{n,p}ᵀ,    G = (1/m) Σ_n Σ_p g_{n,p} g_{n,p}ᵀ.
- KFAC-reduce (`weight_sharing="reduce"`, `EinsumDenseReduceBlock`, `DenseReduceBlock`): one row
  per example, the inputs averaged and the output gradients summed over the positions before the
  outer products (the paper's
  K-FAC-reduce; as there, A is normalised by the number of examples, and G by m as in every
  block of this package, i.e. for a loss that is a mean over examples):
      ā_n = (1/P) Σ_p ā_{n,p},  A = (1/m) Σ_n ā_n ā_nᵀ,
      ĝ_n = Σ_p g_{n,p},        G = (1/m) Σ_n ĝ_n ĝ_nᵀ.
  (The bias coordinate of ā_n stays 1.)  Both are plain K-FAC when P = 1.  Masked positions
  (a Keras mask over the sequence) count like the others in A; their g is zero when the loss
  and the layers after honour the mask.

A layer called several times contributes one set of rows per call (A averages over all rows,
G sums over the calls).  `stats_locations` is ignored (as for `DenseBlock`).  The choice is the
block's `weight_sharing` (constructor argument, else `KFAC(weight_sharing=...)`, else the class
attribute; `keras_kfac.blocks.weight_sharing`).
"""

from __future__ import annotations

import math

import tensorflow as tf
from keras import ops

from keras_kfac.blocks.base import BlockOptions
from keras_kfac.blocks.dense import DenseBlock
from keras_kfac.blocks.kronecker import KroneckerBlock
from keras_kfac.blocks.weight_sharing import choose_sharing, input_rank, shared_rows, sharing_summary


# ------------------------------------------------------------------------------- Dense
class DenseReduceBlock(DenseBlock):
    """`DenseBlock` with KFAC-reduce as its class default (`keras_kfac.blocks.weight_sharing`),
    e.g. `register_block(keras.layers.Dense, DenseReduceBlock)`; identical to `DenseBlock` on
    rank-2 inputs."""

    kind = "DenseReduceBlock"
    weight_sharing = "reduce"


class DenseExpandBlock(DenseBlock):
    """`DenseBlock` with KFAC-expand as its class default, which is `DenseBlock`'s own again; kept
    so that registrations naming it go on working."""

    kind = "DenseExpandBlock"
    weight_sharing = "expand"


# ------------------------------------------------------------------------- EinsumDense
def _split_equation(equation: str) -> tuple[str, str, str] | None:
    text = equation.replace(" ", "")
    if text.count("->") != 1:
        return None
    left, output = text.split("->")
    if left.count(",") != 1:
        return None
    inputs, kernel = left.split(",")
    return inputs, kernel, output


def _resolve(equation: str, rank: int | None) -> tuple[str, str, str]:
    """(input, kernel, output) specs with the ellipsis replaced by fresh letters for an input
    of `rank`.  Raises ValueError if not resolvable."""
    split = _split_equation(equation)
    if split is None:
        raise ValueError("not of the form input,kernel->output")
    inputs, kernel, output = split
    if "..." in kernel or inputs.count("...") > 1 or ("..." in inputs) != ("..." in output):
        raise ValueError("an ellipsis is supported only once in the input and the output")
    explicit = inputs.replace("...", "")
    used = set(inputs + kernel + output)
    fresh = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used]
    letters = ""
    if "..." in inputs:
        if rank is None:
            raise ValueError("an ellipsis needs the input rank (build the layer first)")
        if rank < len(explicit):
            raise ValueError("input rank smaller than the equation")
        letters = "".join(fresh[: rank - len(explicit)])
    inputs, output = inputs.replace("...", letters), output.replace("...", letters)
    for spec in (inputs, kernel, output):
        if not spec.isalpha():
            raise ValueError("axis labels must be letters")
    return inputs, kernel, output


def _perm(source: str, target: str) -> list:
    """The permutation that reorders axes labelled `source` into the order `target`."""
    return [source.index(c) for c in target]


class EinsumLayout:
    """Which axes of an EinsumDense equation are batch, positions, input and output features
    (see module doc), and the permutations that lay tensors out as rows."""

    def __init__(self, equation: str, bias_axes: str | None, rank: int | None):
        inputs, kernel, output = _resolve(equation, rank)
        for name, spec in (("input", inputs), ("kernel", kernel), ("output", output)):
            if len(set(spec)) != len(spec):
                raise ValueError(f"repeated axis in the {name} spec '{spec}'")
        self.inputs, self.kernel, self.output = inputs, kernel, output
        self.batch = inputs[0]
        if self.batch in kernel or self.batch not in output:
            raise ValueError(f"the first input axis '{self.batch}' must be the batch (in the output, not the kernel)")
        for c in kernel:
            if c in inputs and c in output:
                raise ValueError(f"kernel axis '{c}' is both an input and an output axis (elementwise weights)")
            if c not in inputs and c not in output:
                raise ValueError(f"kernel axis '{c}' is summed out")
        for c in inputs:
            if c not in kernel and c not in output:
                raise ValueError(f"input axis '{c}' is summed out without the kernel")
        self.in_chars = "".join(c for c in kernel if c in inputs)
        self.out_chars = "".join(c for c in kernel if c in output)
        if not self.in_chars or not self.out_chars:
            raise ValueError("the kernel needs input and output feature axes")
        self.positions = "".join(c for c in inputs[1:] if c not in kernel)
        self.bias_chars = None
        if bias_axes:
            if set(bias_axes) != set(self.out_chars) or len(bias_axes) != len(self.out_chars):
                raise ValueError(f"bias_axes '{bias_axes}' must be exactly the output feature axes '{self.out_chars}'")
            self.bias_chars = "".join(c for c in output if c in bias_axes)  # the bias's own axis order

    def input_perm(self) -> list:
        return _perm(self.inputs, self.batch + self.positions + self.in_chars)

    def output_perm(self) -> list:
        return _perm(self.output, self.batch + self.positions + self.out_chars)

    def kernel_perm(self) -> list:
        return _perm(self.kernel, self.in_chars + self.out_chars)


class EinsumDenseBlock(KroneckerBlock):
    """K-FAC block of `keras.layers.EinsumDense` (module doc), KFAC-expand by default."""

    kind = "EinsumDenseBlock"
    weight_sharing = "expand"

    def __init__(self, layer, options: BlockOptions | None = None, weight_sharing: str | None = None):
        super().__init__(layer, options)
        self.weight_sharing = choose_sharing(self, weight_sharing)
        bias_axes = layer.bias_axes if self.bias is not None else None
        self.layout = EinsumLayout(layer.equation, bias_axes, input_rank(layer))
        kernel_shape = [int(d) for d in self.kernel.shape]
        layout = self.layout
        self._kernel_dims = [kernel_shape[i] for i in layout.kernel_perm()]
        self.in_features = math.prod(self._kernel_dims[: len(layout.in_chars)])
        self.out_features = math.prod(self._kernel_dims[len(layout.in_chars) :])
        if self.bias is not None:
            out_dims = dict(zip(layout.out_chars, self._kernel_dims[len(layout.in_chars) :]))
            self._bias_dims = [out_dims[c] for c in layout.bias_chars]
        # The sides and the inversion of the right sizes (KroneckerBlock sized them from the
        # kernel's last axis).
        self.size_sides()

    @classmethod
    def unsupported_reason(cls, layer) -> str | None:
        reason = cls.adapted_reason(layer)
        if reason:
            return reason
        has_bias = getattr(layer, "bias", None) is not None
        try:
            EinsumLayout(layer.equation, layer.bias_axes if has_bias else None, input_rank(layer))
        except ValueError as error:
            return f"equation '{layer.equation}' (bias_axes={layer.bias_axes!r}) is not supported: {error}"
        return super().unsupported_reason(layer)

    # -- capture -------------------------------------------------------------------------
    def preactivation(self, inputs):
        pre = ops.einsum(self.layer.equation, inputs, self.layer.kernel)
        if self.bias is not None:
            pre = ops.add(pre, self.layer.bias)
        return pre

    def input_rows(self, inputs, locations=None, seed=None):
        layout = self.layout
        per_example = tf.reshape(tf.transpose(inputs, layout.input_perm()), (tf.shape(inputs)[0], -1, self.in_features))
        return shared_rows(per_example, self.weight_sharing, "a")

    def output_rows(self, preact_grads):
        layout = self.layout
        per_example = tf.reshape(
            tf.transpose(preact_grads, layout.output_perm()), (tf.shape(preact_grads)[0], -1, self.out_features)
        )
        return shared_rows(per_example, self.weight_sharing, "g")

    # -- gradient matrix -----------------------------------------------------------------
    def to_matrix(self, grads: list) -> tf.Tensor:
        kernel = tf.transpose(tf.cast(grads[0], tf.float32), self.layout.kernel_perm())
        matrix = tf.reshape(kernel, (self.in_features, self.out_features))
        if self.bias is not None:
            bias = tf.reshape(tf.cast(grads[1], tf.float32), self._bias_dims)
            bias = tf.transpose(bias, _perm(self.layout.bias_chars, self.layout.out_chars))
            matrix = tf.concat([matrix, tf.reshape(bias, (1, self.out_features))], axis=0)
        return matrix

    def from_matrix(self, matrix: tf.Tensor) -> list:
        layout = self.layout
        kernel = tf.reshape(matrix[: self.in_features], self._kernel_dims)
        kernel = tf.transpose(kernel, _perm(layout.in_chars + layout.out_chars, layout.kernel))
        if self.bias is None:
            return [kernel]
        out_dims = self._kernel_dims[len(layout.in_chars) :]
        bias = tf.reshape(matrix[self.in_features], out_dims)
        bias = tf.transpose(bias, _perm(layout.out_chars, layout.bias_chars))
        return [kernel, tf.reshape(bias, self.bias.shape)]

    def summary(self) -> dict:
        return sharing_summary(super().summary(), self.weight_sharing)


class EinsumDenseReduceBlock(EinsumDenseBlock):
    """`EinsumDenseBlock` with KFAC-reduce as its class default (module doc)."""

    kind = "EinsumDenseReduceBlock"
    weight_sharing = "reduce"


class EinsumDenseExpandBlock(EinsumDenseBlock):
    """`EinsumDenseBlock` with KFAC-expand as its class default, which is `EinsumDenseBlock`'s own
    again; kept so that registrations naming it go on working."""

    kind = "EinsumDenseExpandBlock"
    weight_sharing = "expand"
