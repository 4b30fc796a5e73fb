"""Output-side gradients for the Fisher statistics (thin wrappers over `keras_kfac.losses`).

The per-loss mathematics (what is sampled, the output-space curvature, and how sample weights,
loss weights and the loss's reduction scale each example) lives in `keras_kfac.losses`; these
names are kept for `keras_kfac.model`:

- `loss_specs(loss, loss_weights, output_names)`: one `keras_kfac.losses.OutputLoss` per output;
- `sampled_output_grads(spec, y_pred, seed, y_true=None, sample_weight=None)`: g for targets drawn
  from the model's predictive distribution, E[g gᵀ] = m c_i H_i (see `keras_kfac.losses`).

Without `y_true`/`sample_weight` every example has the weight 1 (the reduction and the loss
weight still apply), and a loss that needs the labels (`ignore_class`) is an error.
"""

from __future__ import annotations

import tensorflow as tf

from keras_kfac.losses import SUPPORTED_LOSSES, OutputLoss, resolve_loss, resolve_losses

__all__ = ["SUPPORTED_LOSSES", "loss_spec", "loss_specs", "sampled_output_grads"]


def loss_spec(loss, weight: float = 1.0) -> OutputLoss:
    """Resolves a Keras loss (name, `Loss` object or function) to its `OutputLoss`."""
    return resolve_loss(loss, weight)


def loss_specs(loss, loss_weights, output_names: list[str]) -> list[OutputLoss]:
    """One `OutputLoss` per model output, following Keras' compile conventions."""
    return resolve_losses(loss, loss_weights, output_names)


def sampled_output_grads(spec: OutputLoss, y_pred, seed, y_true=None, sample_weight=None) -> tf.Tensor:
    """Per-example √(m c_i) ∂ℓ/∂ŷ at sampled targets, float32, shape of `y_pred`."""
    return spec.sample_output_gradients(y_pred, y_true, sample_weight, seed)
