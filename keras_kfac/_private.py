"""Every private Keras and TensorFlow API keras_kfac relies on, in one place.

Each entry says why no public API does the job, so that an upgrade of Keras or TensorFlow that
breaks one of them breaks here.  Elsewhere the package uses public APIs only, except the
private hooks it overrides in `keras_kfac.model.KFACTrainStep` (`_make_function`,
`_maybe_symbolic_build`) and `keras_kfac.optimizer.KFAC` (`_backend_update_step`,
`_clip_gradients`), whose bodies call the helpers below, and the members that Keras' own
optimizer subclasses use to find a variable's state and to count steps (`_var_key`,
`_trainable_variables`, `_iterations`), for which the optimizer API has no public form.
"""

from __future__ import annotations

import tensorflow as tf
from keras.src.losses.loss import unscale_loss_for_distribution as _unscale_loss
from keras.src.losses.losses import LossFunctionWrapper
from keras.src.models.functional import Functional
from keras.src.models.model import functional_init_arguments

__all__ = [
    "Functional",
    "LossFunctionWrapper",
    "loss_function_kwargs",
    "sublayers",
    "functional_init_arguments",
    "unscale_loss_for_distribution",
    "leaf_layers",
    "symbolic_build",
    "batch_spec",
    "compute_loss",
    "call_has_training_arg",
    "loss_tracker",
    "output_node",
    "all_reduce_sum_gradients",
    "distributed_update",
    "collective_all_reduce",
    "multiworker_symbolic_build",
    "multiworker_step_function",
    "uses_weight_decay",
    "track_variable",
    "loss_input",
    "keras_mask",
    "batch_norm_moments",
    "has_batch_norm_moments",
    "batch_renorm_correction",
    "has_group_reshape",
    "reshape_into_groups",
]

# `LossFunctionWrapper` (the class of Keras' built-in losses made from a function; not exported)
# tells which function a loss object computes, so that keras_kfac.losses can recognise it.
# `Functional` (the class of functional models) and `functional_init_arguments` (whether
# Model(...) was called with inputs/outputs) have no public alias; `keras_kfac.Model(inputs,
# outputs)` must return a functional model as `keras.Model` does.


def unscale_loss_for_distribution(loss):
    """Keras divides the training loss by the replica count before differentiation and undoes it
    for the logged value; the same for the loss K-FAC logs.  No public counterpart."""
    return _unscale_loss(loss)


def leaf_layers(model) -> list:
    """Every layer of `model` that has no sublayers, recursively (nested models and layers that
    hold layers as attributes included).  `model.layers` lists only direct children; Keras'
    own recursive walk `_flatten_layers` and the `_layers` list are private."""
    return [layer for layer in sublayers(model) if not layer._layers]


def symbolic_build(model, data_batch) -> None:
    """Builds the model, its metrics and its optimizer from one batch, as `fit` does before
    the first step (K-FAC needs its blocks before the first forward pass)."""
    model._symbolic_build(data_batch=data_batch)


def batch_spec(epoch_iterator):
    """The structure of `tf.TensorSpec`s of the batches a Keras TensorFlow epoch iterator will
    yield (its dataset's `element_spec`; nothing is consumed), or None if it has none.  Parts
    that are not tensors (a `tf.experimental.Optional` for an absent sample weight) are None."""
    dataset = getattr(epoch_iterator, "_distributed_dataset", None)
    spec = getattr(dataset, "element_spec", None)
    if spec is None:
        return None
    return tf.nest.map_structure(lambda s: s if isinstance(s, tf.TensorSpec) else None, spec)


def compute_loss(model, x, y, y_pred, sample_weight):
    """The compiled loss (and regularization losses) as `train_step` computes it; `compute_loss`
    is public but `_compute_loss` is what Keras' own train_step calls (it handles the
    `compute_loss` override protocol)."""
    return model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)


def call_has_training_arg(model) -> bool:
    """Whether `model.call` takes `training` (Keras' own check; calling with it otherwise fails)."""
    return model._call_has_training_arg


def loss_tracker(model):
    """The metric behind the `loss` entry of fit's logs, updated by Keras' own train_step."""
    return model._loss_tracker


def output_node(tensor):
    """The node of the graph that produced a symbolic `KerasTensor` (to follow a functional
    graph from outputs to inputs; Keras has no public graph walk)."""
    history = tensor._keras_history
    return history.operation._inbound_nodes[history.node_index]


def all_reduce_sum_gradients(optimizer, grads_and_vars) -> list:
    """Keras' own gradient all-reduce over replicas (identity without a strategy), which its
    TensorFlow optimizer runs at the start of `_backend_update_step`."""
    return optimizer._all_reduce_sum_gradients(grads_and_vars)


def distributed_update(optimizer, grads_and_vars, learning_rate) -> None:
    """The rest of Keras' `_backend_update_step`: `update_step` on every variable through the
    strategy (a merge call across replicas), as Keras' TensorFlow optimizer does it."""
    tf.__internal__.distribute.interim.maybe_merge_call(
        optimizer._distributed_tf_update_step, optimizer._distribution_strategy, grads_and_vars, learning_rate
    )


def collective_all_reduce(values: list, reduce_op) -> list:
    """All-reduces tensors over the replicas from replica context, inside `tf.cond` too.

    `ReplicaContext.all_reduce` goes through `merge_call`, which TensorFlow forbids inside
    `tf.cond` in replica context; the strategy's `CollectiveAllReduce._all_reduce` is the path
    TensorFlow itself takes when merge_call is off."""
    strategy = tf.distribute.get_strategy()
    extended = strategy.extended
    ops = None
    for name in ("_collective_ops", "_cross_device_ops"):
        candidate = getattr(extended, name, None)
        if candidate is not None and hasattr(candidate, "_all_reduce") and hasattr(candidate, "_launchers"):
            ops = candidate
            break
    if ops is None:
        raise NotImplementedError(
            f"K-FAC needs collective all-reduce ops under {type(strategy).__name__}; use MirroredStrategy or "
            "MultiWorkerMirroredStrategy."
        )
    options = getattr(extended, "_communication_options", None) or tf.distribute.experimental.CommunicationOptions()
    replica_id = tf.distribute.get_replica_context()._replica_id
    return list(ops._all_reduce(reduce_op, list(values), replica_id, options))


def multiworker_symbolic_build(model, keras_build, iterator, data_batch):
    """Body of `KFACTrainStep._maybe_symbolic_build` (a private Keras hook).

    Keras builds from `strategy.reduce("MEAN", first_batch)`, which fails with several
    MultiWorkerMirroredStrategy workers (their reduce takes no (x, y) structure); the first
    local replica's batch has the same shapes and needs no communication."""
    import keras

    strategy = model._distribute_strategy
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or iterator is None:
        return keras_build(iterator=iterator, data_batch=data_batch)
    for _, _, it in iterator:
        batch = next(it)
        data_batch = keras.tree.map_structure(
            lambda t: (
                strategy.experimental_local_results(t)[0] if isinstance(t, tf.distribute.DistributedValues) else t
            ),
            batch,
        )
        break
    with strategy.scope():
        symbolic_build(model, data_batch)


def multiworker_step_function(model, step_function):
    """The step function `KFACTrainStep._make_function` (a private Keras hook) hands to Keras.

    With several MultiWorkerMirroredStrategy workers Keras reduces every log value with
    strategy.reduce("MEAN", v, axis=0), which fails for scalars; as shape-(1,) tensors they
    reduce to the same mean."""
    import keras

    if not isinstance(model._distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return step_function

    def step_with_vector_logs(data):
        logs = step_function(data)
        return keras.tree.map_structure(lambda t: tf.reshape(t, (1,)) if t.shape.rank == 0 else t, logs)

    return step_with_vector_logs


def uses_weight_decay(optimizer, variable) -> bool:
    """Whether a Keras optimizer decays `variable` (its `exclude_from_weight_decay` lists, which
    have no public reader)."""
    return optimizer._use_weight_decay(variable)


def track_variable(optimizer, variable) -> None:
    """Makes an optimizer save and restore a variable it did not create with `add_variable`
    (the damping variable, the fallback optimizer's state)."""
    optimizer._track_variable(variable)


def loss_input(output):
    """The tensor Keras' loss actually reads for a model output: a softmax or sigmoid output
    carries its logits as `_keras_logits`, and Keras' cross-entropies use those (so the loss has
    no gradient with respect to the probabilities themselves)."""
    return getattr(output, "_keras_logits", output)


def loss_function_kwargs(loss) -> dict:
    """The keyword arguments a `LossFunctionWrapper` passes to its function (`from_logits`,
    `label_smoothing`, ...); its `get_config` lists most of them, this attribute all."""
    return dict(getattr(loss, "_fn_kwargs", None) or {})


def sublayers(layer) -> list:
    """Every layer inside `layer`, recursively (Keras' `_flatten_layers`; no public walk)."""
    return list(layer._flatten_layers(include_self=False, recursive=True))


def keras_mask(tensor):
    """The Keras mask a layer attached to a tensor (padded sequence positions), or None; Keras'
    losses apply it (`keras.src.backend.get_keras_mask`, not exported)."""
    return getattr(tensor, "_keras_mask", None)


def has_batch_norm_moments(layer) -> bool:
    """Whether this Keras version's BatchNormalization has the moment helpers used below."""
    needed = ["_moments"] + (["_renorm_correction_and_moments"] if getattr(layer, "renorm", False) else [])
    return all(hasattr(layer, name) for name in needed)


def batch_norm_moments(layer, x, mask):
    """BatchNormalization's own batch moments (masks and `synchronized` as the layer does them),
    so that a block's x̂ is the layer's exactly; the layer exposes no public form."""
    return layer._moments(x, mask)


def batch_renorm_correction(layer, mean, variance):
    """BatchNormalization(renorm=True)'s (r, d, mean, variance) before its call updates them."""
    return layer._renorm_correction_and_moments(mean, variance)


def has_group_reshape(layer) -> bool:
    """Whether this Keras version's GroupNormalization has the grouping helper used below."""
    return hasattr(layer, "_reshape_into_groups")


def reshape_into_groups(layer, x):
    """GroupNormalization's own split of the channels into groups."""
    return layer._reshape_into_groups(x)
