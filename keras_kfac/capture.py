"""Records, during one forward pass, what each block needs of its layer's calls.

While the context is open, every block's layer has its instance attribute `call` replaced by
the block's `recording_call`, which computes the layer's output and hands (inputs, target) to
the recording; gradients with respect to the recorded targets then come from the same
`tf.GradientTape`.  Every call of a layer is recorded, so a shared layer gives several records.

A layer called inside a loop or a branch (`tf.while_loop`, a `keras.layers.RNN` cell,
`tf.cond`) runs in a nested graph whose tensors cannot be read from outside.  Such calls are
not recorded: the recording lists the layer in `nested`, and `layers_in_nested_graphs` finds
those layers before training (their variables then go to the fallback optimizer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import tensorflow as tf

_MISSING = object()


def _current_graph():
    return None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()


class Recording:
    """Per block: the recorded inputs and targets (one entry per call of its layer)."""

    def __init__(self, blocks):
        self.blocks = list(blocks)
        self.inputs = [[] for _ in self.blocks]
        self.targets = [[] for _ in self.blocks]
        self.nested = set()  # indices of blocks whose layer was called in a nested graph
        self.graph = _current_graph()

    def recorder(self, index: int):
        def record(inputs, target):
            if _current_graph() is not self.graph:
                self.nested.add(index)
                return
            self.inputs[index].append(inputs)
            self.targets[index].append(target)

        return record

    def flat_targets(self) -> list:
        return [t for per_block in self.targets for t in per_block]

    def unflatten(self, flat: list) -> list:
        """Splits a flat list shaped like `flat_targets()` back into per-block lists."""
        out, start = [], 0
        for per_block in self.targets:
            out.append(list(flat[start : start + len(per_block)]))
            start += len(per_block)
        return out


@contextlib.contextmanager
def capture(blocks: list) -> Iterator[Recording]:
    """Context manager yielding a `Recording` of every block layer called inside it."""
    recording = Recording(blocks)
    saved = []
    try:
        for index, block in enumerate(recording.blocks):
            layer = block.layer
            original = layer.__dict__.get("call", _MISSING)
            saved.append((layer, original))
            call = layer.call
            object.__setattr__(layer, "call", block.recording_call(call, recording.recorder(index)))
        yield recording
    finally:
        for layer, previous in reversed(saved):
            if previous is _MISSING:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", previous)


def layers_in_nested_graphs(call_model, blocks, input_spec) -> set:
    """ids of the block layers that `call_model(inputs)` calls inside a nested graph, found
    by tracing it once (nothing runs) on inputs of `input_spec`."""
    found = set()

    def probe(inputs):
        with capture(blocks) as recording:
            outputs = call_model(inputs)
        found.update(id(recording.blocks[i].layer) for i in recording.nested)
        return tf.nest.map_structure(lambda t: tf.convert_to_tensor(t), tf.nest.flatten(outputs))

    tf.function(probe, autograph=False).get_concrete_function(input_spec)
    return found
