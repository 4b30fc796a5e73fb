"""Independent float64 NumPy references: forward/backward passes, K-FAC factors, dense solves.

Nothing here imports keras_kfac; gradients are derived by hand, patches by explicit loops.
"""

from __future__ import annotations

import math

import numpy as np


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def with_ones(rows):
    return np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)


def same_padding(size, kernel, stride, dilation):
    out = math.ceil(size / stride)
    span = (kernel - 1) * dilation + 1
    total = max((out - 1) * stride + span - size, 0)
    return out, total // 2, total - total // 2


def patches(x, kernel_size, strides, padding, dilation):
    """(m, H', W', kh*kw*c) input patches in (kh, kw, c) order, zero padding as TF does."""
    m, h, w, c = x.shape
    kh, kw = kernel_size
    sh, sw = strides
    dh, dw = dilation
    if padding == "same":
        oh, top, bottom = same_padding(h, kh, sh, dh)
        ow, left, right = same_padding(w, kw, sw, dw)
    else:
        oh = (h - ((kh - 1) * dh + 1)) // sh + 1
        ow = (w - ((kw - 1) * dw + 1)) // sw + 1
        top = bottom = left = right = 0
    padded = np.zeros((m, h + top + bottom, w + left + right, c))
    padded[:, top : top + h, left : left + w, :] = x
    out = np.zeros((m, oh, ow, kh * kw * c))
    for i in range(oh):
        for j in range(ow):
            cols = []
            for a in range(kh):
                for b in range(kw):
                    cols.append(padded[:, i * sh + a * dh, j * sw + b * dw, :])
            out[:, i, j, :] = np.concatenate(cols, axis=-1)
    return out


def kron_solve(factor_a, factor_g, grad_matrix, damping, mode):
    """Solves the damped Kronecker system densely: (F + damping terms) vec(U) = vec(V)."""
    da, dg = factor_a.shape[0], factor_g.shape[0]
    if mode == "eigen":
        matrix = np.kron(factor_a, factor_g) + damping * np.eye(da * dg)
    else:
        pi = math.sqrt((np.trace(factor_a) / da) / (np.trace(factor_g) / dg))
        root = math.sqrt(damping)
        matrix = np.kron(factor_a + pi * root * np.eye(da), factor_g + root / pi * np.eye(dg))
    return np.linalg.solve(matrix, grad_matrix.reshape(-1)).reshape(grad_matrix.shape)


def mlp_step(x, y, layers, lr, damping, mode):
    """One empirical-Fisher K-FAC step (stats_decay=0, momentum=0) for Dense layers.

    `layers`: list of (kernel, bias or None, activation in {"tanh", "relu", "softmax"});
    the last must be softmax with sparse categorical cross-entropy.  Returns the new
    (kernel, bias) list, the factors and the gradient matrices.
    """
    m = x.shape[0]
    acts, pres = [x], []
    for kernel, bias, act in layers:
        z = acts[-1] @ kernel + (0 if bias is None else bias)
        pres.append(z)
        acts.append({"tanh": np.tanh, "relu": lambda v: np.maximum(v, 0), "softmax": softmax}[act](z))
    onehot = np.eye(layers[-1][0].shape[1])[y]
    dz = (acts[-1] - onehot) / m  # gradient of the mean loss
    results = [None] * len(layers)
    for i in reversed(range(len(layers))):
        kernel, bias, act = layers[i]
        a = acts[i]
        rows_a = a if bias is None else with_ones(a)
        factor_a = rows_a.T @ rows_a / m
        g = dz * m
        factor_g = g.T @ g / m
        grad = rows_a.T @ dz
        update = kron_solve(factor_a, factor_g, grad, damping, mode)
        new_kernel = kernel - lr * update[: kernel.shape[0]]
        new_bias = None if bias is None else bias - lr * update[-1]
        results[i] = dict(kernel=new_kernel, bias=new_bias, A=factor_a, G=factor_g, grad=grad, update=update)
        if i > 0:
            dh = dz @ kernel.T
            prev_act = layers[i - 1][2]
            if prev_act == "tanh":
                dz = dh * (1 - acts[i] ** 2)
            elif prev_act == "relu":
                dz = dh * (pres[i - 1] > 0)
            else:
                raise ValueError(prev_act)
    return results


def conv_step(x, y, conv, dense, conv_args, lr, damping, mode):
    """One empirical K-FAC step for Conv2D(relu) → Flatten → Dense(softmax)."""
    kernel, bias = conv
    w2, b2 = dense
    m = x.shape[0]
    kh, kw, cin, cout = kernel.shape
    p = patches(x, (kh, kw), conv_args["strides"], conv_args["padding"], conv_args["dilation_rate"])
    flat_p = p.reshape(-1, kh * kw * cin)
    z1 = p @ kernel.reshape(-1, cout) + bias
    h1 = np.maximum(z1, 0).reshape(m, -1)
    probs = softmax(h1 @ w2 + b2)
    dz2 = (probs - np.eye(w2.shape[1])[y]) / m
    out = {}
    rows_a2 = with_ones(h1)
    grad2 = rows_a2.T @ dz2
    factor_a2 = rows_a2.T @ rows_a2 / m
    factor_g2 = (m * dz2).T @ (m * dz2) / m
    out["dense"] = dict(A=factor_a2, G=factor_g2, update=kron_solve(factor_a2, factor_g2, grad2, damping, mode))
    dz1 = ((dz2 @ w2.T).reshape(z1.shape)) * (z1 > 0)
    flat_dz1 = dz1.reshape(-1, cout)
    rows_a1 = with_ones(flat_p)
    grad1 = rows_a1.T @ flat_dz1
    factor_a1 = rows_a1.T @ rows_a1 / rows_a1.shape[0]
    factor_g1 = (m * flat_dz1).T @ (m * flat_dz1) / m
    out["conv"] = dict(A=factor_a1, G=factor_g1, update=kron_solve(factor_a1, factor_g1, grad1, damping, mode))
    upd1, upd2 = out["conv"]["update"], out["dense"]["update"]
    out["conv"]["kernel"] = kernel - lr * upd1[:-1].reshape(kernel.shape)
    out["conv"]["bias"] = bias - lr * upd1[-1]
    out["dense"]["kernel"] = w2 - lr * upd2[:-1]
    out["dense"]["bias"] = b2 - lr * upd2[-1]
    return out


def rel_err(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def mlp_gradients(x, y, layers):
    """Forward and backward pass of a Dense MLP with softmax cross-entropy (mean over the batch).

    `layers` as in `mlp_step`.  Returns per layer: the input rows ā (with the homogeneous 1 when
    the layer has a bias), the per-example pre-activation gradients g (m × the gradient of the
    mean loss) and the gradient matrix ∇ = āᵀ (g / m) of shape (dim_a, dim_g).
    """
    m = x.shape[0]
    acts, pres = [x], []
    funcs = {"tanh": np.tanh, "relu": lambda v: np.maximum(v, 0), "sigmoid": lambda v: 1 / (1 + np.exp(-v))}
    for kernel, bias, act in layers:
        z = acts[-1] @ kernel + (0 if bias is None else bias)
        pres.append(z)
        acts.append(softmax(z) if act == "softmax" else funcs[act](z))
    dz = (acts[-1] - np.eye(layers[-1][0].shape[1])[y]) / m
    out = [None] * len(layers)
    for i in reversed(range(len(layers))):
        kernel, bias, _ = layers[i]
        rows_a = acts[i] if bias is None else with_ones(acts[i])
        out[i] = dict(rows_a=rows_a, g=dz * m, grad=rows_a.T @ dz)
        if i > 0:
            act = layers[i - 1][2]
            derivative = {
                "tanh": 1 - acts[i] ** 2,
                "relu": (pres[i - 1] > 0).astype(np.float64),
                "sigmoid": acts[i] * (1 - acts[i]),
            }[act]
            dz = (dz @ kernel.T) * derivative
    return out


def factored_damped_block(factor_a, factor_g, damping):
    """(A + π√λ I) ⊗ (G + √λ/π I), π = sqrt((tr A / dim A) / (tr G / dim G))."""
    da, dg = factor_a.shape[0], factor_g.shape[0]
    pi = math.sqrt((np.trace(factor_a) / da) / (np.trace(factor_g) / dg))
    root = math.sqrt(damping)
    return np.kron(factor_a + pi * root * np.eye(da), factor_g + root / pi * np.eye(dg))


def tridiagonal_inverse(factors, cross, damping):
    """Dense F̂⁻¹ = Ξᵀ Λ Ξ of block-tridiagonal K-FAC (Martens & Grosse 2015, section 4.3).

    `factors`: per layer (A_i, G_i); `cross`: per consecutive pair (Ā_{i,i+1}, G_{i,i+1}).  The
    diagonal blocks are the factored-Tikhonov damped F̃_{i,i}; F_{i,i+1} = Ā_{i,i+1} ⊗ G_{i,i+1}
    (row-major vec of the (dim_a, dim_g) gradient matrices), undamped.
    """
    diag = [factored_damped_block(a, g, damping) for a, g in factors]
    sizes = [d.shape[0] for d in diag]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    n = int(starts[-1])
    xi = np.eye(n)
    lam = np.zeros((n, n))
    for i in range(len(diag)):
        s = slice(starts[i], starts[i + 1])
        if i + 1 < len(diag):
            t = slice(starts[i + 1], starts[i + 2])
            psi = np.kron(*cross[i]) @ np.linalg.inv(diag[i + 1])
            sigma = diag[i] - psi @ diag[i + 1] @ psi.T
            xi[s, t] = -psi
            lam[s, s] = np.linalg.inv(sigma)
        else:
            lam[s, s] = np.linalg.inv(diag[i])
    return xi.T @ lam @ xi, starts


def step_coefficients(system, linear, max_momentum=0.99, grid=200001):
    """(α, μ) minimizing ½[α μ] S [α μ]ᵀ + [α μ]·linear with μ in [0, max_momentum], by brute force
    over μ (α in closed form for each μ), float64: the quadratic model's choice of step."""
    s, b = np.asarray(system, np.float64), np.asarray(linear, np.float64)
    mu = np.linspace(0.0, max_momentum, grid)
    alpha = -(b[0] + mu * s[0, 1]) / s[0, 0]
    values = 0.5 * (s[0, 0] * alpha**2 + 2 * s[0, 1] * alpha * mu + s[1, 1] * mu**2) + b[0] * alpha + b[1] * mu
    best = int(np.argmin(values))
    return np.array([alpha[best], mu[best]])
