"""Records, during one forward pass, each block layer's inputs and pre-activation outputs.

While the context is open, every block's layer has its instance attribute `call` replaced by
a wrapper that computes the pre-activation with the block's own formula (the same arithmetic
as the layer's call), keeps (inputs, pre-activation), and returns activation(pre-activation).
Gradients with respect to the recorded pre-activations then come from the same
`tf.GradientTape`.  Every call of a layer is recorded, so a shared layer gives several records.
"""

from __future__ import annotations

import contextlib

_MISSING = object()


class Recording:
    """Per block: the list of recorded inputs and of pre-activations (one entry per call)."""

    def __init__(self, blocks):
        self.blocks = list(blocks)
        self.inputs = [[] for _ in self.blocks]
        self.preactivations = [[] for _ in self.blocks]

    def flat_preactivations(self) -> list:
        return [pre for per_block in self.preactivations for pre in per_block]

    def unflatten(self, flat: list) -> list:
        """Splits a flat list shaped like `flat_preactivations()` back into per-block lists."""
        out, start = [], 0
        for per_block in self.preactivations:
            out.append(list(flat[start : start + len(per_block)]))
            start += len(per_block)
        return out


def _recording_call(block, inputs_list, preact_list):
    layer = block.layer

    def call(inputs, *args, **kwargs):
        pre = block.preactivation(inputs)
        inputs_list.append(inputs)
        preact_list.append(pre)
        return layer.activation(pre) if layer.activation is not None else pre

    return call


@contextlib.contextmanager
def capture(blocks):
    """Context manager yielding a `Recording` of every block layer called inside it."""
    recording = Recording(blocks)
    saved = []
    try:
        for index, block in enumerate(recording.blocks):
            layer = block.layer
            saved.append((layer, layer.__dict__.get("call", _MISSING)))
            wrapper = _recording_call(block, recording.inputs[index], recording.preactivations[index])
            object.__setattr__(layer, "call", wrapper)
        yield recording
    finally:
        for layer, previous in saved:
            if previous is _MISSING:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", previous)
