"""Blocks of `keras.layers.DepthwiseConv2D` and `keras.layers.SeparableConv2D`, channels_last.

Depthwise part.  A depthwise kernel W of shape (kh, kw, C, dm) maps each input channel c on its
own: output channel c·dm + j at location l is Σ_t p_c(l)_t W[t, c, j] (+ b[c·dm + j]), where
p_c(l) is the (kh·kw)-tap patch of channel c feeding location l (taps t in (kh, kw) order; zero
padding, strides and dilation as in the layer).  Seen from channel c alone this is a small
convolution with a (kh·kw [+1]) × dm weight matrix W_c, and its Fisher block gets the KFC
approximation of a Conv2D layer (Grosse & Martens 2016).  Channels are taken as independent,
so the curvature is block-diagonal over channels, one Kronecker product per channel:

    F ≈ blockdiag_c (A_c ⊗ G_c),
    A_c = mean over examples and output locations of ā_c ā_cᵀ,  ā_c = [p_c(l); 1]  ((k+1)×(k+1), k = kh·kw)
    G_c = (1/m) Σ_examples Σ_locations g_c g_cᵀ,  g_c = the loss gradient w.r.t. outputs c·dm … c·dm+dm−1

(the 1 only with a bias; V_c, the gradient matrix of channel c, has rows t (then the bias row)
and columns j; with dm = 1, G_c is a scalar per channel).

Why this form.  The depthwise kernel is not a dense (kh·kw·C) × (C·dm) matrix but C separate
(kh·kw) × dm matrices: weights of different channels read disjoint inputs and write disjoint
outputs.  One Kronecker product over the kernel embedded as a dense Conv2D kernel would cost
(kh·kw·C+1)² + (C·dm)² floats and its inverse would move the update onto weights that do not
exist.  Treating channels as an extra diagonal factor (one spatial A shared by all channels,
A ⊗ diag(d) ⊗ G) is cheaper but assumes every feature map has the same tap correlations up to
a scale, which fails when maps differ in scale or smoothness.  The per-channel form is what KFC
gives each channel seen as its own convolution; it drops only the cross-channel blocks of the
Fisher (as block-diagonal K-FAC already drops those between layers) and keeps the spatial
correlations of each map's taps and the correlations of a channel's dm outputs, for C·((k+1)² +
dm²) floats of statistics (as much again for the inverse) and batched inversions of sides k+1
and dm.  `max_factor_size` does not apply to these sides: they are small and kept dense.

The damped inverse, per channel, follows `keras_kfac.inversion` with a leading channel axis:
"eigen" stores batched eigendecompositions A_c = Q diag(a) Qᵀ, G_c = R diag(g) Rᵀ and applies
U_c = Q [(Qᵀ V_c R) / (a gᵀ + λ)] Rᵀ, the exact solution of (A_c ⊗ G_c + λI) vec U_c = vec V_c;
"factored" stores (A_c + π_c√λ I)⁻¹ and (G_c + √λ/π_c I)⁻¹ from batched Cholesky factorisations,
π_c = sqrt((tr A_c / dim A_c) / (tr G_c / dim G_c)) for each channel (1 when a trace is 0).

SeparableConv2D = a depthwise convolution (kernel (kh, kw, C, dm), no bias) producing z, then a
1×1 convolution (kernel (1, 1, C·dm, F)) plus the bias.  Its block preconditions all three
variables with a block-diagonal approximation over the two parts:
- pointwise kernel and bias: a Kronecker block like a 1×1 Conv2D, A = mean over examples and
  locations of [z; 1][z; 1]ᵀ ((C·dm+1)², dense or diagonal as `max_factor_size` says), G = (1/m)
  Σ_examples Σ_locations g gᵀ with g the gradient w.r.t. the pre-activation (F²); inverted by the
  block's `keras_kfac.inversion` strategy;
- depthwise kernel: the per-channel blocks above (no bias row), with G_c from the gradient of
  the loss w.r.t. the depthwise output z (= Wₚ g at each location).

Recording.  `record(inputs, target)` gives one target per call, and the optimizer differentiates
the loss w.r.t. every recorded target, in the order recorded, keeping them per block.  The
SeparableConv2D block therefore records twice per call of its layer: first (x, z), then (z, p),
p being the pre-activation; `batch_statistics` receives the lists [x₁, z₁, x₂, z₂, …] and
[∂z₁, ∂p₁, ∂z₂, ∂p₂, …] and reads them pairwise (even entries: depthwise, odd: pointwise).
With `stats_locations`, each A averages over the same random subset of the locations of a call.
"""

from __future__ import annotations

import math

import tensorflow as tf
from keras import ops

from keras_kfac.blocks import convolution
from keras_kfac.blocks.base import BlockOptions, CurvatureBlock
from keras_kfac.blocks.kronecker import KroneckerBlock
from keras_kfac.factors import factor_for
from keras_kfac.inversion import INVERSIONS, all_finite, pi_factor


def _batched_identity(shape, dtype=None):
    """Initializer: a stack of identity matrices, shape (batch, d, d)."""
    batch, size, _ = (int(d) for d in shape)
    return tf.eye(size, batch_shape=[batch], dtype=dtype or "float32")


def _symmetric(matrices: tf.Tensor) -> tf.Tensor:
    return 0.5 * (matrices + tf.linalg.matrix_transpose(matrices))


def channel_gram(rows: tf.Tensor, with_ones: bool = False) -> tf.Tensor:
    """Σ_rows r rᵀ per channel for rows of shape (C, n, d), r = [row, 1] when `with_ones`."""
    gram = tf.matmul(rows, rows, transpose_a=True)
    if not with_ones:
        return gram
    col = tf.reduce_sum(rows, axis=1)[:, :, None]
    count = tf.cast(tf.shape(rows)[1], rows.dtype) * tf.ones_like(col[:, :1, :])
    top = tf.concat([gram, col], axis=2)
    bottom = tf.concat([tf.linalg.matrix_transpose(col), count], axis=2)
    return tf.concat([top, bottom], axis=1)


class ChannelKroneckerInversion:
    """The damped inverse of blockdiag_c (A_c ⊗ G_c), stacked on a leading channel axis
    (eigen or factored damping, see the module doc).  Gradients are (C, dim_a, dim_g)."""

    def __init__(self, mode: str, channels: int, dim_a: int, dim_g: int, dtype: str = "float32"):
        if mode in ("eigen_adam", "ekfac"):
            mode = "eigen"  # no per-step moments or scaling per channel (see keras_kfac.inversion)
        if mode not in ("eigen", "factored"):
            raise ValueError(f"Unknown damping_mode {mode!r}.")
        self.name = mode
        self.channels, self.dim_a, self.dim_g = int(channels), int(dim_a), int(dim_g)
        self.dtype = tf.as_dtype(dtype)

    def state_specs(self) -> list:
        c, da, dg = self.channels, self.dim_a, self.dim_g
        if self.name == "eigen":
            return [
                ((c, da), "zeros", "eigenvalues_a"),
                ((c, da, da), _batched_identity, "eigenvectors_a"),
                ((c, dg), "zeros", "eigenvalues_g"),
                ((c, dg, dg), _batched_identity, "eigenvectors_g"),
            ]
        return [((c, da, da), _batched_identity, "inverse_a"), ((c, dg, dg), _batched_identity, "inverse_g")]

    def cost(self) -> int:
        return self.channels * (self.dim_a**3 + self.dim_g**3)

    def _eigh(self, factor):
        values, vectors = tf.linalg.eigh(_symmetric(tf.cast(factor, self.dtype)))
        return tf.cast(tf.maximum(values, 0.0), tf.float32), tf.cast(vectors, tf.float32)

    def _shifted_inverse(self, factor, shift):
        m = _symmetric(tf.cast(factor, self.dtype))
        eye = tf.eye(int(m.shape[-1]), batch_shape=[self.channels], dtype=self.dtype)
        damped = m + tf.cast(shift, self.dtype)[:, None, None] * eye
        inverse = tf.linalg.cholesky_solve(tf.linalg.cholesky(damped), eye)
        return tf.cast(_symmetric(inverse), tf.float32)

    def shifts(self, factor_a, factor_g, damping) -> tuple[tf.Tensor, tf.Tensor]:
        """Per channel (π_c√λ, √λ/π_c)."""
        pi = pi_factor(tf.linalg.trace(factor_a) / self.dim_a, tf.linalg.trace(factor_g) / self.dim_g)
        root = tf.sqrt(tf.cast(damping, tf.float32))
        return pi * root, root / pi

    def compute(self, factor_a, factor_g, damping) -> tuple[list, tf.Tensor]:
        if self.name == "eigen":
            values = [*self._eigh(factor_a), *self._eigh(factor_g)]
        else:
            shift_a, shift_g = self.shifts(factor_a, factor_g, damping)
            values = [self._shifted_inverse(factor_a, shift_a), self._shifted_inverse(factor_g, shift_g)]
        return values, all_finite(values)

    def apply(self, state, matrices: tf.Tensor, damping) -> tf.Tensor:
        if self.name == "eigen":
            eig_a, vec_a, eig_g, vec_g = state
            rotated = tf.matmul(tf.matmul(vec_a, matrices, transpose_a=True), vec_g)
            scaled = rotated / (eig_a[:, :, None] * eig_g[:, None, :] + tf.cast(damping, tf.float32))
            return tf.matmul(tf.matmul(vec_a, scaled), vec_g, transpose_b=True)
        inverse_a, inverse_g = state
        return tf.matmul(tf.matmul(inverse_a, matrices), inverse_g)


class DepthwisePart:
    """The per-channel Kronecker blocks of one depthwise kernel (kh, kw, C, dm) and optional
    bias (C·dm,) of a layer with `strides`, `padding` and `dilation_rate` (see module doc)."""

    def __init__(self, layer, kernel, bias, options: BlockOptions):
        kh, kw, channels, multiplier = (int(d) for d in kernel.shape)
        self.kernel, self.bias = kernel, bias
        self.kernel_size = (kh, kw)
        self.taps, self.channels, self.multiplier = kh * kw, channels, multiplier
        self.dim_a = self.taps + (1 if bias is not None else 0)
        self.dim_g = multiplier
        self._sizes = [1, kh, kw, 1]
        self._strides = [1, *layer.strides, 1]
        self._rates = [1, *layer.dilation_rate, 1]
        self._padding = layer.padding.upper()
        self.inversion = ChannelKroneckerInversion(
            options.damping_mode, channels, self.dim_a, self.dim_g, options.inverse_dtype
        )

    def factor_specs(self) -> list:
        c = self.channels
        return [((c, self.dim_a, self.dim_a), "zeros", "factor_a"), ((c, self.dim_g, self.dim_g), "zeros", "factor_g")]

    def input_rows(self, inputs, locations=None, seed=None) -> tf.Tensor:
        """(C, rows, kh·kw): each channel's input patches, one row per example and location."""
        patches = tf.image.extract_patches(
            inputs, sizes=self._sizes, strides=self._strides, rates=self._rates, padding=self._padding
        )
        per_example = tf.reshape(patches, (tf.shape(patches)[0], -1, self.taps, self.channels))
        per_example = convolution.sample_locations(per_example, locations, seed)
        return tf.transpose(tf.reshape(per_example, (-1, self.taps, self.channels)), (2, 0, 1))

    def output_rows(self, grads) -> tf.Tensor:
        """(C, rows, dm): each channel's output gradients, one row per example and location."""
        return tf.transpose(tf.reshape(grads, (-1, self.channels, self.multiplier)), (1, 0, 2))

    def statistics(self, inputs: list, grads: list, num_examples, seeds: list, locations) -> list:
        rows_a = tf.concat(
            [self.input_rows(tf.cast(x, tf.float32), locations, s) for x, s in zip(inputs, seeds)], axis=1
        )
        rows_g = tf.concat([self.output_rows(tf.cast(g, tf.float32)) for g in grads], axis=1)
        n_rows = tf.cast(tf.shape(rows_a)[1], tf.float32)
        factor_a = channel_gram(rows_a, with_ones=self.bias is not None) / n_rows
        factor_g = channel_gram(rows_g) / tf.cast(num_examples, tf.float32)
        return [factor_a, factor_g]

    def to_matrices(self, kernel_grad, bias_grad=None) -> tf.Tensor:
        """(C, dim_a, dm): per channel, the kernel gradient's taps as rows (then the bias row)."""
        v = tf.reshape(tf.cast(kernel_grad, tf.float32), (self.taps, self.channels, self.multiplier))
        v = tf.transpose(v, (1, 0, 2))
        if bias_grad is not None:
            b = tf.reshape(tf.cast(bias_grad, tf.float32), (self.channels, 1, self.multiplier))
            v = tf.concat([v, b], axis=1)
        return v

    def from_matrices(self, matrices) -> list:
        kernel = tf.reshape(tf.transpose(matrices[:, : self.taps], (1, 0, 2)), self.kernel.shape)
        if self.bias is None:
            return [kernel]
        return [kernel, tf.reshape(matrices[:, self.taps], self.bias.shape)]

    def describe(self) -> str:
        return f"per channel A {self.dim_a}x{self.dim_a} ⊗ G {self.dim_g}x{self.dim_g} (×{self.channels})"


def _call_seeds(seed, calls: int) -> list:
    """One stateless seed per recorded call (None without a seed)."""
    return [None if seed is None else tf.random.experimental.stateless_fold_in(seed, i) for i in range(calls)]


def _spec_bytes(specs) -> int:
    return sum(4 * math.prod(shape) for shape, _, _ in specs)


def _depthwise(layer, inputs, kernel):
    """The layer's depthwise convolution of `inputs` with `kernel`, as its own call computes it."""
    return ops.depthwise_conv(
        inputs,
        kernel,
        strides=layer.strides,
        padding=layer.padding,
        dilation_rate=layer.dilation_rate,
        data_format=layer.data_format,
    )


def _unsupported(layer, kernels) -> str | None:
    reason = KroneckerBlock.adapted_reason(layer)
    if reason:
        return reason
    if layer.data_format != "channels_last":
        return "channels_first is not supported"
    if not layer.trainable or not all(k.trainable for k in kernels):
        return "not trainable"
    if layer.use_bias and getattr(layer, "bias", None) is not None and not layer.bias.trainable:
        return "bias not trainable"
    return None


def _largest_channel_curvature(factor_a, factor_g) -> tf.Tensor:
    """max over channels c of ‖A_c‖_F · ‖G_c‖_F (≥ the largest eigenvalue of every A_c ⊗ G_c);
    a factor is (C, n, n) dense or (C, n) diagonal per channel."""

    def norms(factor):
        return tf.norm(tf.reshape(tf.cast(factor, tf.float32), (tf.shape(factor)[0], -1)), axis=1)

    return tf.reduce_max(norms(factor_a) * norms(factor_g))


class DepthwiseConv2DBlock(CurvatureBlock):
    """Per-channel Kronecker blocks of a DepthwiseConv2D layer (see module doc)."""

    kind = "DepthwiseConv2DBlock"

    def __init__(self, layer, options: BlockOptions | None = None):
        super().__init__(layer, options)
        bias = layer.bias if layer.use_bias else None
        self.part = DepthwisePart(layer, layer.kernel, bias, self.options)
        self._statistics, self._inverse = [], []

    @classmethod
    def unsupported_reason(cls, layer) -> str | None:
        return _unsupported(layer, [layer.kernel])

    @property
    def variables(self) -> list:
        return [self.part.kernel] + ([self.part.bias] if self.part.bias is not None else [])

    def recording_call(self, call, record):
        layer = self.layer

        def recorded(inputs, *args, **kwargs):
            pre = _depthwise(layer, inputs, layer.kernel)
            if self.part.bias is not None:
                pre = ops.add(pre, ops.reshape(layer.bias, (1, 1, 1, -1)))
            record(inputs, pre)
            return layer.activation(pre) if layer.activation is not None else pre

        return recorded

    def build(self, add_variable) -> None:
        self._statistics = [add_variable(*spec) for spec in self.part.factor_specs()]
        self._inverse = [add_variable(*spec) for spec in self.part.inversion.state_specs()]
        self.state_variables = [*self._statistics, *self._inverse]

    @property
    def statistics_variables(self) -> list:
        return list(self._statistics)

    @property
    def inverse_variables(self) -> list:
        return list(self._inverse)

    def batch_statistics(self, inputs, targets_grads, num_examples, seed=None) -> list:
        """[A (C, k+1, k+1), G (C, dm, dm)] of the batch (see module doc)."""
        seeds = _call_seeds(seed, len(inputs))
        return self.part.statistics(inputs, targets_grads, num_examples, seeds, self.options.stats_locations)

    def compute_inverse(self, damping) -> tuple[list, tf.Tensor]:
        return self.part.inversion.compute(*self._statistics, damping)

    def inverse_cost(self) -> int:
        return self.part.inversion.cost()

    def largest_curvature(self) -> tf.Tensor:
        return _largest_channel_curvature(*self._statistics)

    def multiply_inverse(self, grads: list, damping) -> list:
        matrices = self.part.to_matrices(*grads)
        return self.part.from_matrices(self.part.inversion.apply(self._inverse, matrices, damping))

    def memory_bytes(self) -> int:
        if self.state_variables:
            return super().memory_bytes()
        return _spec_bytes(self.part.factor_specs() + self.part.inversion.state_specs())

    def summary(self) -> dict:
        return {
            "block": self.kind,
            "curvature": f"{self.part.describe()}, {self.part.inversion.name}",
            "state_bytes": self.memory_bytes(),
        }


class SeparableConv2DBlock(CurvatureBlock):
    """Depthwise per-channel blocks ⊕ a pointwise Kronecker block (see module doc).
    Variables: [depthwise_kernel, pointwise_kernel] (+ [bias])."""

    kind = "SeparableConv2DBlock"

    def __init__(self, layer, options: BlockOptions | None = None):
        super().__init__(layer, options)
        self.depthwise = DepthwisePart(layer, layer.depthwise_kernel, None, self.options)
        self.pointwise_kernel = layer.pointwise_kernel
        self.bias = layer.bias if layer.use_bias else None
        self.in_features = int(self.pointwise_kernel.shape[-2])
        self.out_features = int(self.pointwise_kernel.shape[-1])
        limit = self.options.max_factor_size
        self.side_a = factor_for(self.in_features + (1 if self.bias is not None else 0), limit)
        self.side_g = factor_for(self.out_features, limit)
        self.inversion = INVERSIONS[self.options.damping_mode](self.side_a, self.side_g, self.options.inverse_dtype)
        self._depthwise_stats, self._depthwise_inverse = [], []
        self._pointwise_stats, self._pointwise_inverse = [], []

    @classmethod
    def unsupported_reason(cls, layer) -> str | None:
        return _unsupported(layer, [layer.depthwise_kernel, layer.pointwise_kernel])

    @property
    def variables(self) -> list:
        return [self.depthwise.kernel, self.pointwise_kernel] + ([self.bias] if self.bias is not None else [])

    def recording_call(self, call, record):
        layer = self.layer

        def recorded(inputs, *args, **kwargs):
            z = _depthwise(layer, inputs, layer.depthwise_kernel)
            record(inputs, z)  # even entries: the depthwise part
            pre = ops.conv(z, layer.pointwise_kernel, strides=1, padding="valid", data_format=layer.data_format)
            if self.bias is not None:
                pre = ops.add(pre, ops.reshape(layer.bias, (1, 1, 1, -1)))
            record(z, pre)  # odd entries: the pointwise part
            return layer.activation(pre) if layer.activation is not None else pre

        return recorded

    def _pointwise_specs(self) -> list:
        return [(self.side_a.shape, "zeros", "pointwise_factor_a"), (self.side_g.shape, "zeros", "pointwise_factor_g")]

    def _inverse_specs(self) -> list:
        depthwise = [(s, i, f"depthwise_{n}") for s, i, n in self.depthwise.inversion.state_specs()]
        pointwise = [(s, i, f"pointwise_{n}") for s, i, n in self.inversion.state_specs()]
        return depthwise, pointwise

    def build(self, add_variable) -> None:
        self._depthwise_stats = [add_variable(s, i, f"depthwise_{n}") for s, i, n in self.depthwise.factor_specs()]
        self._pointwise_stats = [add_variable(*spec) for spec in self._pointwise_specs()]
        depthwise, pointwise = self._inverse_specs()
        self._depthwise_inverse = [add_variable(*spec) for spec in depthwise]
        self._pointwise_inverse = [add_variable(*spec) for spec in pointwise]
        self.state_variables = self.statistics_variables + self.inverse_variables

    @property
    def statistics_variables(self) -> list:
        """[depthwise A (C, k, k), depthwise G (C, dm, dm), pointwise A, pointwise G]."""
        return [*self._depthwise_stats, *self._pointwise_stats]

    @property
    def inverse_variables(self) -> list:
        return [*self._depthwise_inverse, *self._pointwise_inverse]

    def batch_statistics(self, inputs, targets_grads, num_examples, seed=None) -> list:
        """Each call of the layer recorded (x, z) then (z, p): entries 2i and 2i+1 (module doc)."""
        if len(inputs) % 2 or len(targets_grads) != len(inputs):
            raise ValueError(f"{self.name}: expected two records per call, received {len(inputs)}.")
        calls = len(inputs) // 2
        seeds = _call_seeds(seed, calls)
        locations = self.options.stats_locations
        depthwise = self.depthwise.statistics(inputs[0::2], targets_grads[0::2], num_examples, seeds, locations)
        rows_a = []
        for z, s in zip(inputs[1::2], seeds):
            z = tf.cast(z, tf.float32)
            per_example = tf.reshape(z, (tf.shape(z)[0], -1, self.in_features))
            rows_a.append(tf.reshape(convolution.sample_locations(per_example, locations, s), (-1, self.in_features)))
        rows_a = tf.concat(rows_a, axis=0)
        rows_g = tf.concat(
            [tf.reshape(tf.cast(g, tf.float32), (-1, self.out_features)) for g in targets_grads[1::2]],
            axis=0,
        )
        n_rows = tf.cast(tf.shape(rows_a)[0], tf.float32)
        factor_a = self.side_a.gram(rows_a, with_ones=self.bias is not None) / n_rows
        factor_g = self.side_g.gram(rows_g) / tf.cast(num_examples, tf.float32)
        return [*depthwise, factor_a, factor_g]

    def compute_inverse(self, damping) -> tuple[list, tf.Tensor]:
        depthwise, ok_d = self.depthwise.inversion.compute(*self._depthwise_stats, damping)
        pointwise, ok_p = self.inversion.compute(self._pointwise_stats, damping)
        return [*depthwise, *pointwise], tf.logical_and(ok_d, ok_p)

    def largest_curvature(self) -> tf.Tensor:
        """The larger of the depthwise channels' bound and the pointwise ‖A‖_F · ‖G‖_F."""
        pointwise_a, pointwise_g = self._pointwise_stats
        return tf.maximum(
            _largest_channel_curvature(*self._depthwise_stats), tf.norm(pointwise_a) * tf.norm(pointwise_g)
        )

    def inverse_cost(self) -> int:
        pointwise = sum(side.size ** (1 if side.diagonal else 3) for side in (self.side_a, self.side_g))
        return self.depthwise.inversion.cost() + pointwise

    def multiply_inverse(self, grads: list, damping) -> list:
        depthwise = self.depthwise.from_matrices(
            self.depthwise.inversion.apply(self._depthwise_inverse, self.depthwise.to_matrices(grads[0]), damping)
        )
        matrix = tf.reshape(tf.cast(grads[1], tf.float32), (self.in_features, self.out_features))
        if self.bias is not None:
            matrix = tf.concat([matrix, tf.reshape(tf.cast(grads[2], tf.float32), (1, self.out_features))], axis=0)
        u = self.inversion.apply(self._pointwise_inverse, matrix, damping)
        pointwise = [tf.reshape(u[: self.in_features], self.pointwise_kernel.shape)]
        if self.bias is not None:
            pointwise.append(tf.reshape(u[self.in_features], self.bias.shape))
        return [*depthwise, *pointwise]

    def memory_bytes(self) -> int:
        if self.state_variables:
            return super().memory_bytes()
        depthwise, pointwise = self._inverse_specs()
        return _spec_bytes(self.depthwise.factor_specs() + self._pointwise_specs() + depthwise + pointwise)

    def summary(self) -> dict:
        def side(s) -> str:
            return f"{s.size} (diagonal)" if s.diagonal else f"{s.size}x{s.size}"

        return {
            "block": self.kind,
            "curvature": (
                f"depthwise: {self.depthwise.describe()}; pointwise: A {side(self.side_a)} ⊗ G {side(self.side_g)}"
                f", {self.inversion.name}"
            ),
            "state_bytes": self.memory_bytes(),
        }
