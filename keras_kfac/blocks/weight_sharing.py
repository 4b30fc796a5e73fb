"""KFAC-expand and KFAC-reduce (Eschenhagen et al., NeurIPS 2023) for weights shared over positions.

A layer applied at P positions per example (a Dense layer on a sequence, an EinsumDense
projection) sees per example a (P, features) block of inputs and of output gradients:

- "expand": every (example, position) is a row, as a convolution location is:
  A = 1/(m P) Σ_n Σ_p ā ā ᵀ, G = (1/m) Σ_n Σ_p g gᵀ;
- "reduce": one row per example, the inputs averaged and the output gradients summed over the
  positions: A = (1/m) Σ_n ā_n ā_nᵀ with ā_n the mean, G = (1/m) Σ_n ĝ_n ĝ_nᵀ with ĝ_n the sum.

A block's mode is its constructor argument, else `KFAC(weight_sharing=...)` (the block options),
else the block class's default: "expand" for `DenseBlock` and `EinsumDenseBlock` (chosen by the
ViT benchmark, BENCHMARKS.md "Vision Transformer on Fashion-MNIST": with the default step, higher
test accuracy on each of three seeds at the same step time), "reduce" for
`DenseReduceBlock`/`EinsumDenseReduceBlock`.
Both are plain K-FAC for a layer without shared positions.
"""

from __future__ import annotations

import tensorflow as tf

WEIGHT_SHARING = ("expand", "reduce")


def choose_sharing(block, weight_sharing=None) -> str:
    mode = weight_sharing
    if mode is None:
        mode = getattr(block.options, "weight_sharing", None)
    if mode is None:
        mode = type(block).weight_sharing
    if mode not in WEIGHT_SHARING:
        raise ValueError(f"weight_sharing must be one of {WEIGHT_SHARING}; received {mode!r}.")
    return mode


def shared_rows(per_example: tf.Tensor, weight_sharing: str, side: str) -> tf.Tensor:
    """Rows from a (batch, P, features) tensor: every (example, position) for "expand"; for
    "reduce" the mean over positions (side "a") or the sum over positions (side "g")."""
    if weight_sharing == "expand":
        return tf.reshape(per_example, (-1, tf.shape(per_example)[-1]))
    if side == "a":
        return tf.reduce_mean(per_example, axis=1)
    return tf.reduce_sum(per_example, axis=1)


def input_rank(layer) -> int | None:
    """Rank of the layer's input: its input spec's `ndim` (set by EinsumDense's build), else the
    model graph's input (a layer called once), else None."""
    spec = getattr(layer, "input_spec", None)
    ndim = getattr(spec, "ndim", None) if spec is not None and not isinstance(spec, (list, tuple)) else None
    if ndim is not None:
        return ndim
    try:
        return len(layer.input.shape)
    except (AttributeError, ValueError, RuntimeError, TypeError):
        return None


def sharing_summary(info: dict, weight_sharing: str) -> dict:
    info = dict(info)
    info["curvature"] = f"{info['curvature']}, KFAC-{weight_sharing}"
    return info
