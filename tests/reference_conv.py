"""Independent float64 NumPy references for convolutions of any rank, transposed ones included.

Nothing here imports keras_kfac (or TensorFlow).  Patches are built by explicit loops over the
output locations and kernel offsets; the transposed convolution's forward pass is written as a
scatter (each input location adds K[a]·x[q] to output location q·s + a·d − P), independently of
its patches (each output location gathers the inputs that reach it).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from reference import kron_solve, same_padding, softmax, with_ones


def conv_layout(size, kernel, stride, dilation, padding):
    """(output size, zeros before the input) of one axis of a convolution, TensorFlow's rule."""
    span = (kernel - 1) * dilation + 1
    if padding == "valid":
        return (size - span) // stride + 1, 0
    if padding == "causal":
        return math.ceil(size / stride), span - 1
    out, before, _ = same_padding(size, kernel, stride, dilation)
    return out, before


def conv_patches(x, kernel_size, strides, padding, dilation):
    """(m, locations, prod(kernel_size)·c) input patches of a convolution: for output location p
    (row-major) and kernel offset a (row-major, channels innermost), x[p·s + a·d − P] or zeros."""
    m, *spatial, c = x.shape
    layout = [conv_layout(*args, padding) for args in zip(spatial, kernel_size, strides, dilation)]
    outs = [o for o, _ in layout]
    rows = np.zeros((m, math.prod(outs), math.prod(kernel_size) * c))
    for loc, p in enumerate(itertools.product(*(range(o) for o in outs))):
        for k, a in enumerate(itertools.product(*(range(n) for n in kernel_size))):
            index = [pi * s + ai * d - before for pi, ai, s, d, (_, before) in zip(p, a, strides, dilation, layout)]
            if all(0 <= i < n for i, n in zip(index, spatial)):
                rows[:, loc, k * c : (k + 1) * c] = x[(slice(None), *index)]
    return rows, outs


def transpose_before(size, out, kernel, stride, dilation, padding):
    """P: zeros before the input of the convolution (out → size) whose gradient the transposed
    convolution (size → out) is."""
    if padding == "valid":
        return 0
    span = (kernel - 1) * dilation + 1
    return max((size - 1) * stride + span - out, 0) // 2


def conv_transpose_patches(x, kernel_size, strides, padding, dilation, out_sizes):
    """(m, locations, prod(kernel_size)·c_in): for output location p and kernel offset a, the
    input x[q] with q·s + a·d − P = p on every axis, or zeros when there is none."""
    m, *spatial, c = x.shape
    befores = [transpose_before(*args, padding) for args in zip(spatial, out_sizes, kernel_size, strides, dilation)]
    rows = np.zeros((m, math.prod(out_sizes), math.prod(kernel_size) * c))
    for loc, p in enumerate(itertools.product(*(range(o) for o in out_sizes))):
        for k, a in enumerate(itertools.product(*(range(n) for n in kernel_size))):
            index = []
            for pi, ai, s, d, before, n in zip(p, a, strides, dilation, befores, spatial):
                shifted = pi + before - ai * d
                index.append(shifted // s if shifted % s == 0 and 0 <= shifted // s < n else None)
            if None not in index:
                rows[:, loc, k * c : (k + 1) * c] = x[(slice(None), *index)]
    return rows


def conv_transpose_forward(x, kernel, strides, padding, dilation, out_sizes):
    """The transposed convolution by scattering: kernel (*k, c_out, c_in); output (m, *out, c_out)."""
    m, *spatial, _ = x.shape
    *kernel_size, c_out, _ = kernel.shape
    befores = [transpose_before(*args, padding) for args in zip(spatial, out_sizes, kernel_size, strides, dilation)]
    z = np.zeros((m, *out_sizes, c_out))
    for q in itertools.product(*(range(n) for n in spatial)):
        for a in itertools.product(*(range(n) for n in kernel_size)):
            p = [qi * s + ai * d - before for qi, ai, s, d, before in zip(q, a, strides, dilation, befores)]
            if all(0 <= pi < o for pi, o in zip(p, out_sizes)):
                z[(slice(None), *p)] += x[(slice(None), *q)] @ kernel[a].T
    return z


def branches_step(y, branches, dense, lr, damping, mode="eigen"):
    """One empirical K-FAC step for a model whose convolution branches (tanh), each averaged over
    its output locations, are concatenated and fed to Dense(softmax) with sparse categorical
    cross-entropy.

    `branches`: dicts with `rows` (m, locations, dim) patches (no 1), `matrix` (dim, filters) the
    kernel as a matrix, `bias` or None.  Returns per branch the pre-activation `z`, the factors
    `A` and `G`, the gradient matrix `grad` (dim (+1), filters) and the solve `update`, and the
    same for the dense layer under the key "dense".
    """
    w2, b2 = dense
    m = y.shape[0]
    zs = [b["rows"] @ b["matrix"] + (0 if b["bias"] is None else b["bias"]) for b in branches]
    h = np.concatenate([np.tanh(z).mean(axis=1) for z in zs], axis=1)
    dz2 = (softmax(h @ w2 + b2) - np.eye(w2.shape[1])[y]) / m  # gradient of the mean loss
    rows2 = with_ones(h)
    factor_a2, factor_g2 = rows2.T @ rows2 / m, (m * dz2).T @ (m * dz2) / m
    dense_out = dict(A=factor_a2, G=factor_g2, update=kron_solve(factor_a2, factor_g2, rows2.T @ dz2, damping, mode))
    dh = dz2 @ w2.T
    out, start = [], 0
    for b, z in zip(branches, zs):
        size = z.shape[-1]
        dz = dh[:, None, start : start + size] / z.shape[1] * (1 - np.tanh(z) ** 2)
        start += size
        rows = b["rows"].reshape(-1, b["rows"].shape[-1])
        if b["bias"] is not None:
            rows = with_ones(rows)
        flat_dz = dz.reshape(-1, z.shape[-1])
        factor_a = rows.T @ rows / len(rows)
        factor_g = (m * flat_dz).T @ (m * flat_dz) / m  # per-example gradients are m·dz
        grad = rows.T @ flat_dz
        out.append(
            dict(z=z, A=factor_a, G=factor_g, grad=grad, update=kron_solve(factor_a, factor_g, grad, damping, mode))
        )
    out.append(dict(dense_out, dense=True))
    return out
