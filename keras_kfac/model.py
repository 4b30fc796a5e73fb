"""Keras models whose `train_step` collects what K-FAC needs.

`Model`, `Sequential` and `wrap(model)` change `train_step` only, and only when the compiled
optimizer is `keras_kfac.KFAC`; with any other optimizer they train exactly as `keras.Model`.

A K-FAC step is split into four pieces so that the eigendecompositions can stay outside XLA
on CPU while the rest is compiled:

1. forward and backward pass, with the statistics gradients (XLA when the model's
   `jit_compile` is on, as Keras would compile its own step);
2. factor statistics (XLA);
3. eigendecompositions every `inverse_every` steps (XLA on GPU/TPU, plain on CPU);
4. preconditioning and the weight update (XLA).

Keras' own step function around them is therefore built without `jit_compile`.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras.src.losses.loss import unscale_loss_for_distribution
from keras.src.models.functional import Functional
from keras.src.models.model import functional_init_arguments
from keras.src.saving import serialization_lib

from keras_kfac import fisher as fisher_lib
from keras_kfac.blocks import block_for_layer
from keras_kfac.capture import capture
from keras_kfac.optimizer import KFAC
from keras_kfac.tridiagonal import chain_bytes, find_chains

__all__ = ["Model", "Sequential", "wrap", "discover_blocks"]


def discover_blocks(model) -> tuple[list, list]:
    """Returns (blocks, others): a block for every supported layer, and (layer, reason) for
    every other layer that owns trainable weights (those go to the fallback optimizer)."""
    blocks, others = [], []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if layer._layers:  # a container: its sublayers are visited on their own
            continue
        block, reason = block_for_layer(layer)
        if block is not None:
            blocks.append(block)
        elif layer._trainable_variables and layer.trainable:
            others.append((layer, reason))
    return blocks, others


def _float32_grads(grads, preacts, scale=None) -> list:
    """float32 copies of the pre-activation gradients (zeros where a call did not reach the loss)."""
    out = []
    for g, p in zip(grads, preacts):
        g = tf.zeros_like(p, tf.float32) if g is None else tf.cast(g, tf.float32)
        out.append(g if scale is None else g * scale)
    return out


def _kfac_optimizer(optimizer):
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner if isinstance(inner, KFAC) else None


class KFACTrainStep:
    """Mixin holding the K-FAC `train_step`; put it before `keras.Model` in the bases."""

    def compile(self, optimizer="rmsprop", loss=None, loss_weights=None, **kwargs):
        super().compile(optimizer=optimizer, loss=loss, loss_weights=loss_weights, **kwargs)
        self._kfac_loss = (loss, loss_weights)
        self._kfac_specs = None
        self._kfac_forward_fn = None
        kfac = _kfac_optimizer(self.optimizer)
        if kfac is not None:
            kfac.attach_model(self)

    def compile_from_config(self, config):
        # Keras skips compile_from_config for models that override compile(); this is the
        # same recipe as keras.Model's.
        config = serialization_lib.deserialize_keras_object(config)
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def make_train_function(self, force=False):
        if _kfac_optimizer(getattr(self, "optimizer", None)) is None or self.run_eagerly:
            return super().make_train_function(force)
        self._kfac_forward_jit = bool(self.jit_compile)
        saved = self._jit_compile
        self._jit_compile = False
        try:
            return super().make_train_function(force)
        finally:
            self._jit_compile = saved

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras builds from `strategy.reduce("MEAN", first_batch)`, which fails with several
        # MultiWorkerMirroredStrategy workers (their reduce takes no (x, y) structure); the first
        # local replica's batch has the same shapes and needs no communication.
        strategy = self._distribute_strategy
        if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or iterator is None:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
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
            self._symbolic_build(data_batch=data_batch)

    def _make_function(self, step_function):
        # With several MultiWorkerMirroredStrategy workers Keras reduces every log value with
        # strategy.reduce("MEAN", v, axis=0), which fails for scalars; as shape-(1,) tensors they
        # reduce to the same mean.
        strategy = self._distribute_strategy
        if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return super()._make_function(step_function)

        def step_with_vector_logs(data):
            logs = step_function(data)
            return keras.tree.map_structure(lambda t: tf.reshape(t, (1,)) if t.shape.rank == 0 else t, logs)

        return super()._make_function(step_with_vector_logs)

    def kfac_summary(self, print_fn=print) -> str:
        """Prints (and returns) which layer got which block, its factor shapes and memory."""
        blocks, others = discover_blocks(self)
        rows = [("layer", "block", "A", "G", "factor MiB", "eig MiB", "weights MiB")]
        total_factors = total_eig = total_weights = 0
        for b in blocks:
            factors = 4 * (b.dim_a**2 + b.dim_g**2)
            eig = 4 * (b.dim_a**2 + b.dim_a + b.dim_g**2 + b.dim_g)
            weights = 4 * b.dim_a * b.dim_g
            total_factors, total_eig, total_weights = total_factors + factors, total_eig + eig, total_weights + weights
            rows.append(
                (
                    b.name,
                    b.kind,
                    f"{b.dim_a}x{b.dim_a}",
                    f"{b.dim_g}x{b.dim_g}",
                    f"{factors / 2**20:.3f}",
                    f"{eig / 2**20:.3f}",
                    f"{weights / 2**20:.3f}",
                )
            )
        rows.append(
            (
                "total",
                f"{len(blocks)} blocks",
                "",
                "",
                f"{total_factors / 2**20:.3f}",
                f"{total_eig / 2**20:.3f}",
                f"{total_weights / 2**20:.3f}",
            )
        )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
        chains = find_chains(self, blocks)
        if chains:
            lines.append(
                "Chains of Dense layers (block-tridiagonal with approximation='block_tridiagonal'; extra state):"
            )
            lines += [
                f"  {' → '.join(blocks[i].name for i in chain)} (+{chain_bytes(blocks, chain) / 2**20:.3f} MiB)"
                for chain in chains
            ]
        if others:
            lines.append("Updated by the fallback optimizer (no K-FAC block):")
            for layer, reason in others:
                count = sum(int(v.numpy().size) for v in layer._trainable_variables)
                lines.append(f"  {layer.name} ({type(layer).__name__}, {count} parameters): {reason}")
        text = "\n".join(lines)
        if print_fn is not None:
            print_fn(text)
        return text

    # ------------------------------------------------------------------ the train step
    def _kfac_loss_specs(self, y_pred) -> list:
        """One `fisher.LossSpec` per output, in the order of `keras.tree.flatten(y_pred)`."""
        if self._kfac_specs is None:
            loss, loss_weights = self._kfac_loss
            count = len(keras.tree.flatten(y_pred))
            if isinstance(y_pred, dict):
                names = sorted(y_pred)  # keras.tree.flatten orders a dict by its keys
            else:
                names = list(getattr(self, "output_names", None) or [])
                if len(names) != count:
                    names = [f"output_{i}" for i in range(count)]
            self._kfac_specs = fisher_lib.loss_specs(loss, loss_weights, names)
        return self._kfac_specs

    def _kfac_call(self, x):
        return self(x, training=True) if self._call_has_training_arg else self(x)

    def _kfac_sampled_grads(self, y_pred, preacts, tape, specs) -> list:
        """g for targets drawn from the model's predictive distribution (the true Fisher)."""
        opt = _kfac_optimizer(self.optimizer)
        outputs = keras.tree.flatten(y_pred)
        seed = opt.sampling_seed()
        output_grads = [
            tf.cast(
                fisher_lib.sampled_output_grads(spec, out, tf.random.experimental.stateless_fold_in(seed, i)),
                out.dtype,
            )
            for i, (spec, out) in enumerate(zip(specs, outputs))
        ]
        return _float32_grads(tape.gradient(outputs, preacts, output_gradients=output_grads), preacts)

    def _kfac_subset_statistics(self, x, specs):
        """Statistics from a forward and backward pass of the first `stats_batch_size` examples
        alone: cheaper than a sampled-target backward pass through the whole batch."""
        opt = _kfac_optimizer(self.optimizer)
        k = opt.stats_batch_size
        x_k = keras.tree.map_structure(lambda t: t[:k], x)
        with capture(opt.blocks) as record:
            with tf.GradientTape() as tape:
                y_k = self._kfac_call(x_k)
        preacts = record.flat_preactivations()
        grads = self._kfac_sampled_grads(y_k, preacts, tape, specs)
        return record.inputs, record.unflatten(grads), tf.shape(keras.tree.flatten(x_k)[0])[0]

    def _kfac_forward_backward(self, x, y, sample_weight, deferred=False):
        """Forward pass, loss, gradients, and the statistics (layer inputs, g, example count).

        With `deferred` (not inside an XLA-compiled forward) the statistics are returned as a
        function that the optimizer calls on statistics steps only; otherwise the
        sampled-target backward pass runs under `tf.cond` here and other steps return zeros.
        """
        opt = _kfac_optimizer(self.optimizer)
        sampled = opt.fisher == "sampled"
        # A separate small forward pass for the statistics, when it is cheaper and harmless.
        subset = sampled and deferred and opt.stats_batch_size is not None and not self.non_trainable_weights
        with capture(opt.blocks) as record:
            with tf.GradientTape(persistent=sampled and not subset) as tape:
                y_pred = self._kfac_call(x)
                loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
                scaled_loss = opt.scale_loss(loss)
        variables = self.trainable_weights
        preacts = record.flat_preactivations()
        num_examples = tf.shape(keras.tree.flatten(x)[0])[0]
        if not sampled:
            both = tape.gradient(scaled_loss, variables + preacts)
            grads = both[: len(variables)]
            scale = tf.cast(num_examples, tf.float32) / opt.loss_scale()

            def empirical_statistics():  # per-example g: m × ∂(batch loss)/∂(pre-activation)
                g = _float32_grads(both[len(variables) :], preacts, scale)
                return record.inputs, record.unflatten(g), num_examples

            if deferred:
                return y_pred, loss, grads, empirical_statistics
            statistics = empirical_statistics()
        else:
            grads = tape.gradient(scaled_loss, variables)
            specs = self._kfac_loss_specs(y_pred)  # an unsupported loss fails here, at the first step

            def sampled_statistics():
                if subset:
                    return self._kfac_subset_statistics(x, specs)
                g = self._kfac_sampled_grads(y_pred, preacts, tape, specs)
                return record.inputs, record.unflatten(g), num_examples

            if deferred:
                return y_pred, loss, grads, sampled_statistics
            if preacts:
                zeros = lambda: [tf.zeros_like(p, tf.float32) for p in preacts]  # noqa: E731
                due = opt.due(opt.stats_every)
                g = tf.cond(due, lambda: self._kfac_sampled_grads(y_pred, preacts, tape, specs), zeros)
                g = list(g) if isinstance(g, (list, tuple)) else [g]
            else:
                g = []
            statistics = (record.inputs, record.unflatten(g), num_examples)
        return y_pred, loss, grads, statistics

    def _kfac_quadratic(self, x, y, sample_weight, y_pred, num_examples):
        """The quadratic model's view of this batch: outputs, Fisher products and the loss."""
        from keras_kfac.quadratic import BatchQuadratic

        def loss_fn():
            return self._compute_loss(x=x, y=y, y_pred=self._kfac_call(x), sample_weight=sample_weight, training=True)

        return BatchQuadratic(
            lambda: keras.tree.flatten(self._kfac_call(x)),
            loss_fn,
            self._kfac_loss_specs(y_pred),
            self.trainable_weights,
            num_examples,
        )

    def _kfac_snapshot(self) -> list:
        """Copies of the non-trainable variables that a forward pass may change (moving
        statistics, RNG states), taken before it."""
        return [tf.identity(v.value) for v in self.non_trainable_variables]

    def _kfac_rollback(self, applied, snapshot) -> None:
        """Puts the snapshot back when the step was skipped, so that a non-finite batch leaves
        no NaN in, e.g., BatchNormalization's moving statistics."""
        if not snapshot:
            return

        def restore():
            for variable, value in zip(self.non_trainable_variables, snapshot):
                variable.assign(value)
            return tf.constant(False)

        tf.cond(applied, lambda: tf.constant(True), restore)

    def train_step(self, data):
        opt = _kfac_optimizer(getattr(self, "optimizer", None))
        if opt is None:
            return super().train_step(data)
        if not opt.built:
            # Without a distribution strategy Keras builds optimizers lazily inside the first
            # step; K-FAC needs its blocks (hence a built model) before the forward pass.
            self._symbolic_build(data_batch=data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        snapshot = self._kfac_snapshot()
        if getattr(self, "_kfac_forward_jit", False) and not tf.executing_eagerly():
            if self._kfac_forward_fn is None:
                self._kfac_forward_fn = tf.function(
                    self._kfac_forward_backward, jit_compile=True, reduce_retracing=True
                )
            y_pred, loss, grads, statistics = self._kfac_forward_fn(x, y, sample_weight)
        else:
            y_pred, loss, grads, statistics = self._kfac_forward_backward(x, y, sample_weight, deferred=True)
        statistics_fn = statistics if callable(statistics) else (lambda: statistics)
        num_examples = tf.shape(keras.tree.flatten(x)[0])[0]
        self._loss_tracker.update_state(unscale_loss_for_distribution(loss), sample_weight=num_examples)
        batch = self._kfac_quadratic(x, y, sample_weight, y_pred, num_examples) if opt.uses_quadratic else None
        applied = opt.kfac_step(grads, self.trainable_weights, loss, statistics_fn, batch=batch)
        opt.update_loss_scale(applied)
        self._kfac_rollback(applied, snapshot)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        logs.update(opt.diagnostics())
        return logs


@keras.saving.register_keras_serializable(package="keras_kfac")
class Model(KFACTrainStep, keras.Model):
    """Drop-in `keras.Model` (functional or subclassed) whose train_step supports KFAC."""

    def __new__(cls, *args, **kwargs):
        if cls is Model and functional_init_arguments(args, kwargs):
            return FunctionalModel.__new__(FunctionalModel, *args, **kwargs)
        return super().__new__(cls, *args, **kwargs)


@keras.saving.register_keras_serializable(package="keras_kfac")
class FunctionalModel(Model, Functional):
    """What `keras_kfac.Model(inputs, outputs)` returns (as `keras.Model` returns Functional)."""


@keras.saving.register_keras_serializable(package="keras_kfac")
class Sequential(KFACTrainStep, keras.Sequential):
    """Drop-in `keras.Sequential` whose train_step supports KFAC."""


@keras.saving.register_keras_serializable(package="keras_kfac")
class WrappedModel(Model):
    """A `keras_kfac.Model` that calls a subclassed model, sharing its layers and weights."""

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.model = model

    def call(self, inputs, training=None):
        if self.model._call_has_training_arg:
            return self.model(inputs, training=training)
        return self.model(inputs)

    def get_config(self):
        return {"name": self.name, "model": keras.saving.serialize_keras_object(self.model)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"], custom_objects=custom_objects)
        return cls(**config)


def wrap(model: keras.Model) -> keras.Model:
    """Returns a keras_kfac model that shares `model`'s layers and weights.

    Sequential → `keras_kfac.Sequential`, functional → `keras_kfac.Model`, subclassed →
    a `WrappedModel` calling it.  A keras_kfac model is returned unchanged.
    """
    if isinstance(model, KFACTrainStep):
        return model
    if isinstance(model, keras.Sequential):
        layers = list(model.layers)
        if model.built and getattr(model, "_functional", None) is not None:
            spec = model.inputs[0]
            layers = [keras.Input(batch_shape=spec.shape, dtype=spec.dtype)] + layers
        return Sequential(layers, name=model.name)
    if isinstance(model, Functional):
        return FunctionalModel(model.inputs, model.outputs, name=model.name)
    if isinstance(model, keras.Model):
        return WrappedModel(model, name=f"{model.name}_kfac")
    raise TypeError(f"keras_kfac.wrap expects a keras.Model; received {type(model).__name__}.")
