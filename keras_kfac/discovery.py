"""Which layers of a model get a curvature block, and why the others do not.

Every leaf layer with trainable weights is offered to the block registry
(`keras_kfac.blocks.registry`).  A layer gets no block when the registry has none for it, when
`KFAC(exclude=...)` names it, or when it is called inside a loop or a branch (a `keras.layers.RNN`
cell, `tf.while_loop`, `tf.cond`): its inputs live in a nested graph that the statistics cannot
read.  Those layers are trained by the fallback optimizer and `kfac_summary` lists them with
the reason.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_kfac import _private
from keras_kfac.blocks.base import BlockOptions
from keras_kfac.blocks.registry import block_for_layer
from keras_kfac.capture import layers_in_nested_graphs

NESTED_REASON = "called inside a loop or branch (nested graph)"


def excluded(layer, exclude) -> bool:
    """Whether `KFAC(exclude=...)` keeps `layer` out of K-FAC."""
    if exclude is None:
        return False
    if callable(exclude):
        return bool(exclude(layer))
    names = {exclude} if isinstance(exclude, str) else set(exclude)
    return layer.name in names


def _inside_rnn(model) -> set:
    """ids of the layers that a `keras.layers.RNN` (LSTM, GRU, custom cells) calls in its loop."""
    inside = set()
    for layer in _private.sublayers(model):
        if isinstance(layer, keras.layers.RNN):
            inside.update(id(sub) for sub in _private.sublayers(layer))
    return inside


def input_spec_of(model: keras.Model) -> tf.TensorSpec | list | None:
    """A `tf.TensorSpec` structure for the model's inputs (batch axis free), or None when the
    model has no symbolic inputs (a subclassed model)."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        return None
    specs = [tf.TensorSpec((None, *tuple(t.shape)[1:]), t.dtype) for t in inputs]
    return specs[0] if len(specs) == 1 else specs


def spec_of_batch(x) -> tf.TensorSpec | list | tuple | dict:
    """A `tf.TensorSpec` structure for a batch of inputs, batch axis free."""
    return tf.nest.map_structure(lambda t: tf.TensorSpec((None, *tuple(t.shape)[1:]), t.dtype), x)


def discover_blocks(model, options: BlockOptions | None = None, exclude=None, input_spec=None) -> tuple[list, list]:
    """Returns (blocks, others): a block for every layer that gets one, and (layer, reason) for
    every other layer that owns trainable weights (those go to the fallback optimizer).

    With `input_spec` (or symbolic model inputs), the model is traced once (nothing runs) to
    find the layers called in nested graphs."""
    candidates, others = [], []
    in_rnn = _inside_rnn(model)
    for layer in _private.leaf_layers(model):
        if not (layer.trainable_variables and layer.trainable):
            continue
        if excluded(layer, exclude):
            others.append((layer, "excluded by KFAC(exclude=...)"))
            continue
        if id(layer) in in_rnn:
            others.append((layer, f"{NESTED_REASON}: a keras.layers.RNN cell"))
            continue
        block, reason = block_for_layer(layer, options)
        if block is None:
            others.append((layer, reason))
        else:
            candidates.append(block)
    spec = input_spec if input_spec is not None else input_spec_of(model)
    nested = set()
    if candidates and spec is not None:

        def call_model(inputs):
            if _private.call_has_training_arg(model):
                return model(inputs, training=True)
            return model(inputs)

        nested = layers_in_nested_graphs(call_model, candidates, spec)
    blocks = []
    for block in candidates:
        if id(block.layer) in nested:
            others.append((block.layer, NESTED_REASON))
        else:
            blocks.append(block)
    return blocks, others
