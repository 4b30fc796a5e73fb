"""What the KFC blocks of convolutions share (Grosse & Martens 2016), channels_last, groups=1.

A convolution's pre-activation at output location p (one example) is z_p = Wᵀ ā_p (+ b), where
W is the kernel reshaped to a (dim_a, dim_g) matrix and ā_p the input vector paired with p (a
patch of the input, flattened in W's row order, with a 1 appended for the bias).  With g_p the
gradient of the example's own loss with respect to z_p:

    A = mean over examples and output locations p of ā_p ā_pᵀ
    G = (1/m) Σ_examples Σ_p g_p g_pᵀ

With `stats_locations`, A's mean runs over a uniform random subset of the output locations, the
same subset for every example of a call (an unbiased estimate of the same mean).

`ConvolutionBlock` holds the common part; a subclass gives `convolve(inputs)` (the layer's
linear map without bias and activation) and `patches(inputs)`, the (m, locations, in_features)
tensor of the ā_p without the 1.  `gather_patches` builds it for any number of spatial axes by
one strided slice per kernel offset, from explicit per-axis padding (`conv_geometry`);
`gather_patches_at` gathers only the patches of the locations `stats_locations` keeps (the same
rows, without forming the others), and `upsample` spreads the input of a transposed convolution
over its output grid.
"""

from __future__ import annotations

import itertools
import math

import tensorflow as tf
from keras import ops

from keras_kfac.blocks.kronecker import KroneckerBlock


def static_dims(x: tf.Tensor) -> list:
    """The shape of `x`: Python ints where static, scalar tensors where not."""
    dynamic = tf.shape(x)
    return [d if d is not None else dynamic[i] for i, d in enumerate(x.shape)]


def nonnegative(value: int | tf.Tensor) -> int | tf.Tensor:
    return max(value, 0) if isinstance(value, int) else tf.maximum(value, 0)


def conv_geometry(size, kernel: int, stride: int, dilation: int, padding: str) -> tuple:
    """(output size, zeros before, zeros after) of one spatial axis of a convolution, as
    TensorFlow pads it: "valid" none; "same" ⌈size/stride⌉ outputs with the total padding split
    as evenly as possible, the extra zero after; "causal" (Conv1D) span − 1 zeros before."""
    span = (kernel - 1) * dilation + 1
    if padding == "valid":
        return (size - span) // stride + 1, 0, 0
    out = -(-size // stride)
    if padding == "causal":
        return out, span - 1, 0
    total = nonnegative((out - 1) * stride + span - size)
    return out, total // 2, total - total // 2


def gather_patches(x, kernel_size, strides, dilations, pads, out_sizes, flip: bool = False) -> tf.Tensor:
    """(m, locations, prod(kernel_size)·c) patches of x (m, *spatial, c).

    Every spatial axis i is padded with pads[i] = (before, after) zeros; the patch of output
    location p (row-major over out_sizes) holds, for each kernel offset a (row-major over
    kernel_size, channels innermost), the padded input at p·stride + a·dilation, or at
    p·stride + (k − 1 − a)·dilation when `flip`."""
    padded = tf.pad(x, [[0, 0], *[list(p) for p in pads], [0, 0]])
    pieces = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        index = [slice(None)]
        for a, k, s, d, o in zip(offset, kernel_size, strides, dilations, out_sizes):
            start = ((k - 1 - a) if flip else a) * d
            index.append(slice(start, start + (o - 1) * s + 1, s))
        pieces.append(padded[tuple(index)])
    patches = tf.concat(pieces, axis=-1)
    return tf.reshape(patches, (static_dims(x)[0], -1, patches.shape[-1]))


def gather_patches_at(x, kernel_size, strides, dilations, pads, out_sizes, chosen) -> tf.Tensor:
    """(m, len(chosen), prod(kernel_size)·c): the rows of `gather_patches` (no flip) at the output
    locations `chosen` (flat, row-major over out_sizes), gathered from the padded input without
    forming the patches of the other locations."""
    padded = tf.pad(x, [[0, 0], *[list(p) for p in pads], [0, 0]])
    dims = static_dims(padded)
    coords, rest = [], chosen  # row-major coordinates (tf.unravel_index has no XLA kernel)
    for size in reversed(out_sizes[1:]):
        size = tf.cast(size, chosen.dtype)
        coords.insert(0, rest % size)
        rest = rest // size
    coords.insert(0, rest)
    offsets = list(itertools.product(*(range(k) for k in kernel_size)))
    index = tf.zeros([tf.size(chosen), len(offsets)], chosen.dtype)
    for axis, (s, d) in enumerate(zip(strides, dilations)):
        starts = tf.constant([offset[axis] * d for offset in offsets], chosen.dtype)
        position = coords[axis][:, None] * s + starts[None, :]
        index = index * tf.cast(dims[1 + axis], chosen.dtype) + position
    flat = tf.reshape(padded, (dims[0], -1, dims[-1]))
    rows = tf.gather(flat, tf.reshape(index, [-1]), axis=1)
    return tf.reshape(rows, (dims[0], -1, len(offsets) * x.shape[-1]))


def upsample(x: tf.Tensor, strides) -> tf.Tensor:
    """x (m, *spatial, c) with stride − 1 zeros after every element of each spatial axis:
    the result u has u[..., q·stride, ...] = x[..., q, ...] and zeros elsewhere."""
    for axis, stride in enumerate(strides, start=1):
        if stride == 1:
            continue
        dims = static_dims(x)
        x = tf.stack([x] + [tf.zeros_like(x)] * (stride - 1), axis=axis + 1)
        x = tf.reshape(x, dims[:axis] + [dims[axis] * stride] + dims[axis + 1 :])
    return x


def choose_locations(count, locations: int, seed) -> tf.Tensor:
    """The first `locations` of a random permutation of range(count) (drawn from the stateless
    `seed`); all of them when fewer."""
    scores = tf.random.stateless_uniform(tf.reshape(tf.cast(count, tf.int32), [1]), seed)
    return tf.argsort(scores)[:locations]


def sample_locations(per_example: tf.Tensor, locations: int | None, seed) -> tf.Tensor:
    """The locations (axis 1) of `per_example` at `choose_locations`, the same for every example;
    all of them, as they are, when `locations` is None."""
    if locations is None:
        return per_example
    return tf.gather(per_example, choose_locations(tf.shape(per_example)[1], locations, seed), axis=1)


class ConvolutionBlock(KroneckerBlock):
    """KFC block of a channels_last convolution (see module doc)."""

    kind = "ConvolutionBlock"

    @classmethod
    def unsupported_reason(cls, layer):
        if layer.data_format != "channels_last":
            return "channels_first is not supported"
        if getattr(layer, "groups", 1) != 1:
            return "grouped convolution is not supported"
        return super().unsupported_reason(layer)

    def convolve(self, inputs):
        """The layer's convolution of `inputs` by its kernel (no bias, no activation)."""
        return self.layer.convolution_op(inputs, self.layer.kernel)

    def patches(self, inputs) -> tf.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def preactivation(self, inputs):
        pre = self.convolve(inputs)
        if self.bias is not None:
            pre = ops.add(pre, ops.reshape(self.layer.bias, (1,) * (len(pre.shape) - 1) + (self.out_features,)))
        return pre

    def geometry(self, inputs) -> list | None:
        """(output size, zeros before, zeros after) per spatial axis when ā_p is the padded input
        at p·stride + a·dilation (see `gather_patches`), so that the sampled locations' patches
        can be gathered alone; None (the default, for any other `patches`): all patches are
        formed and the locations sampled from them.  A subclass that changes `patches` changes
        this too."""
        del inputs
        return None

    def input_rows(self, inputs, locations=None, seed=None):
        geometry = None if locations is None else self.geometry(inputs)
        if geometry is None:  # every patch formed; a sample of their locations when `locations` is set
            per_example = sample_locations(self.patches(inputs), locations, seed)
        else:  # only the sampled locations' patches: the same rows as sampling all of them
            layer = self.layer
            out_sizes = [out for out, _, _ in geometry]
            per_example = gather_patches_at(
                inputs,
                layer.kernel_size,
                layer.strides,
                layer.dilation_rate,
                [(before, after) for _, before, after in geometry],
                out_sizes,
                choose_locations(math.prod(out_sizes), locations, seed),
            )
        return tf.reshape(per_example, (-1, self.in_features))


def layer_geometry(layer, inputs) -> list:
    """`conv_geometry` of each spatial axis of a Conv1D/2D/3D layer for `inputs`."""
    return [
        conv_geometry(size, k, s, d, layer.padding)
        for size, k, s, d in zip(static_dims(inputs)[1:-1], layer.kernel_size, layer.strides, layer.dilation_rate)
    ]


class SlicedConvolutionBlock(ConvolutionBlock):
    """A convolution (Conv1D, Conv3D, ...) whose patches come from `gather_patches`: ā_p is the
    input at p·stride + a·dilation − (zeros before) for every kernel offset a, in the kernel's
    (*kernel_size, c_in) order, so the kernel reshapes to W as it is."""

    def geometry(self, inputs) -> list:
        return layer_geometry(self.layer, inputs)

    def patches(self, inputs):
        layer = self.layer
        geometry = self.geometry(inputs)
        return gather_patches(
            inputs,
            layer.kernel_size,
            layer.strides,
            layer.dilation_rate,
            [(before, after) for _, before, after in geometry],
            [out for out, _, _ in geometry],
        )
