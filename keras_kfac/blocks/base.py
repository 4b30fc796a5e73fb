"""The common part of a Kronecker-factored curvature block.

A block owns one layer's kernel (and bias).  Its gradient is laid out as a matrix of shape
(dim_a, dim_g): rows index the layer's input features (plus a homogeneous 1 when there is a
bias, which becomes the last row), columns its output features.  Its factors are

    A = (1 / n_rows) Σ_rows ā āᵀ        (mean over examples and locations/uses)
    G = (1 / m)      Σ_rows g gᵀ        (mean over examples, sum over locations/uses)

where a "row" is one example at one location (a spatial position of a convolution, a
position of a sequence, one call of a layer used several times) and m is the number of
examples.  g is the gradient of that example's own loss with respect to the pre-activation.
"""

from __future__ import annotations

import math

import tensorflow as tf


def gram_with_ones(rows: tf.Tensor, with_ones: bool) -> tf.Tensor:
    """Σ_rows ā āᵀ for ā = [a, 1] (or a alone), without forming the augmented rows."""
    gram = tf.matmul(rows, rows, transpose_a=True)
    if not with_ones:
        return gram
    count = tf.cast(tf.shape(rows)[0], rows.dtype)
    col = tf.reduce_sum(rows, axis=0)[:, None]
    top = tf.concat([gram, col], axis=1)
    bottom = tf.concat([tf.transpose(col), tf.reshape(count, (1, 1))], axis=1)
    return tf.concat([top, bottom], axis=0)


class KroneckerBlock:
    """Base class: subclasses say how to turn inputs and gradients into rows."""

    kind = "kronecker"

    def __init__(self, layer):
        self.layer = layer
        self.kernel = layer.kernel
        self.bias = layer.bias if getattr(layer, "use_bias", False) else None
        self.in_features = int(math.prod(self.kernel.shape[:-1]))
        self.out_features = int(self.kernel.shape[-1])

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def variables(self) -> list:
        return [self.kernel] + ([self.bias] if self.bias is not None else [])

    @property
    def dim_a(self) -> int:
        return self.in_features + (1 if self.bias is not None else 0)

    @property
    def dim_g(self) -> int:
        return self.out_features

    # -- what subclasses provide -------------------------------------------------------
    def preactivation(self, inputs: tf.Tensor) -> tf.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def input_rows(self, inputs: tf.Tensor, locations: int | None = None, seed=None) -> tf.Tensor:
        """The (n_rows, in_features) input vectors seen by the kernel.  Blocks with spatial
        locations keep at most `locations` of them (a uniform random subset drawn from the
        stateless `seed`, the same for every example); others ignore both arguments."""
        raise NotImplementedError  # pragma: no cover - abstract

    def output_rows(self, preact_grads: tf.Tensor) -> tf.Tensor:
        """The (n_rows, out_features) pre-activation gradients, one row per input row."""
        return tf.reshape(preact_grads, (-1, self.out_features))

    # -- shared -------------------------------------------------------------------------
    def factors(
        self, inputs: list, preact_grads: list, num_examples, locations: int | None = None, seed=None
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Batch estimates (A, G) from every recorded call of the layer (see module doc).

        With `locations`, A averages over a random subset of the spatial locations (an
        unbiased estimate of the same mean); G always sums over all of them.
        """
        rows_a = []
        for call, x in enumerate(inputs):
            call_seed = None if seed is None else tf.random.experimental.stateless_fold_in(seed, call)
            rows_a.append(self.input_rows(tf.cast(x, tf.float32), locations, call_seed))
        rows_a = tf.concat(rows_a, axis=0)
        rows_g = tf.concat([self.output_rows(tf.cast(g, tf.float32)) for g in preact_grads], axis=0)
        n_rows = tf.cast(tf.shape(rows_a)[0], tf.float32)
        factor_a = gram_with_ones(rows_a, self.bias is not None) / n_rows
        factor_g = tf.matmul(rows_g, rows_g, transpose_a=True) / tf.cast(num_examples, tf.float32)
        return factor_a, factor_g

    def to_matrix(self, kernel_grad: tf.Tensor, bias_grad: tf.Tensor | None) -> tf.Tensor:
        """Stacks the kernel gradient (reshaped) and the bias gradient as a (dim_a, dim_g) matrix."""
        matrix = tf.reshape(kernel_grad, (self.in_features, self.out_features))
        if self.bias is not None:
            matrix = tf.concat([matrix, tf.reshape(bias_grad, (1, self.out_features))], axis=0)
        return matrix

    def from_matrix(self, matrix: tf.Tensor) -> list:
        """Inverse of `to_matrix`: [kernel-shaped tensor] (+ [bias-shaped tensor])."""
        kernel = tf.reshape(matrix[: self.in_features], self.kernel.shape)
        if self.bias is None:
            return [kernel]
        return [kernel, tf.reshape(matrix[self.in_features], self.bias.shape)]

    def describe(self) -> str:
        return f"{self.kind}: A {self.dim_a}x{self.dim_a}, G {self.dim_g}x{self.dim_g}"
