"""Keras models whose `train_step` collects what K-FAC needs.

`Model`, `Sequential` and `wrap(model)` change `train_step` only, and only when the compiled
optimizer is `keras_kfac.KFAC`; with any other optimizer they train exactly as `keras.Model`.

A K-FAC step is split into pieces so that the inversions can stay outside XLA on CPU while the
rest is compiled:

1. forward and backward pass (XLA when the model's `jit_compile` is on, as Keras would compile
   its own step);
2. on statistics steps, the statistics pass: the recorded layer inputs and the per-example
   output gradients, from a forward and backward pass of the first `stats_batch_size` examples
   alone (or of the whole batch when it is None), see `KFACTrainStep._kfac_statistics`;
3. the optimizer's phases (`KFAC.kfac_step`): statistics, inverses, directions, update.

Keras' own step function around them is therefore built without `jit_compile`.
"""

from __future__ import annotations

import inspect

import keras
import tensorflow as tf

from keras_kfac import _private, distributed
from keras_kfac import losses as losses_lib
from keras_kfac.capture import capture
from keras_kfac.discovery import discover_blocks, spec_of_batch
from keras_kfac.optimizer import KFAC
from keras_kfac.tridiagonal import chain_bytes, find_chains

__all__ = ["Model", "Sequential", "FunctionalModel", "WrappedModel", "wrap", "discover_blocks"]


def _float32_grads(grads, targets, scale=None) -> list:
    """float32 copies of the target gradients (zeros where a call did not reach the loss)."""
    out = []
    for g, t in zip(grads, targets):
        g = tf.zeros_like(t, tf.float32) if g is None else tf.cast(g, tf.float32)
        out.append(g if scale is None else g * scale)
    return out


def _examples(part: slice, x, y, sample_weight) -> tuple:
    """(x, y, sample_weight) of the batch's examples in `part` (None stays None)."""
    take = lambda t: None if t is None else t[part]  # noqa: E731
    return tuple(None if t is None else keras.tree.map_structure(take, t) for t in (x, y, sample_weight))


def _first_examples(k: int, x, y, sample_weight) -> tuple:
    """(x, y, sample_weight) of the batch's first k examples (None stays None)."""
    return _examples(slice(None, k), x, y, sample_weight)


def _kfac_optimizer(optimizer):
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner if isinstance(inner, KFAC) else None


def _fit_epochs(model, args, kwargs) -> int:
    """The `epochs` of a `fit(*args, **kwargs)` call."""
    bound = inspect.signature(keras.Model.fit).bind(model, *args, **kwargs)
    return bound.arguments.get("epochs", 1)


def _parameters(variables) -> int:
    total = 0
    for v in variables:
        count = 1
        for d in v.shape:
            count *= int(d)
        total += count
    return total


class KFACTrainStep:
    """Mixin holding the K-FAC `train_step`; put it before `keras.Model` in the bases."""

    def compile(self, optimizer="rmsprop", loss=None, loss_weights=None, **kwargs):
        super().compile(optimizer=optimizer, loss=loss, loss_weights=loss_weights, **kwargs)
        self._kfac_loss = (loss, loss_weights)
        self._kfac_specs = None
        self._kfac_forward_fn = None
        self._kfac_subset_fn = None
        kfac = _kfac_optimizer(self.optimizer)
        if kfac is not None:
            kfac.attach_model(self)

    def compile_from_config(self, config):
        # Keras skips compile_from_config for models that override compile(); this is the
        # same recipe as keras.Model's.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(self, *args, **kwargs):
        # With `use_ema` the last `fit` ended on the average of the weights: this one trains on
        # from the weights that one had reached (KFAC.restore_trained_weights), once the
        # optimizer is built and its state restored (see _maybe_symbolic_build); Keras puts the
        # average in place only when epochs > 0, and so this takes it out only then.
        self._kfac_restore_pending = _fit_epochs(self, args, kwargs) > 0
        try:
            return super().fit(*args, **kwargs)
        finally:
            self._kfac_restore_pending = False

    def make_train_function(self, force=False):
        if _kfac_optimizer(getattr(self, "optimizer", None)) is None or self.run_eagerly:
            return super().make_train_function(force)
        self._kfac_forward_jit = bool(self.jit_compile)
        saved = self.jit_compile
        self.jit_compile = False
        try:
            return super().make_train_function(force)
        finally:
            self.jit_compile = saved

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        result = _private.multiworker_symbolic_build(self, super()._maybe_symbolic_build, iterator, data_batch)
        # fit calls this before its first step (evaluate and train_on_batch call it too); an
        # optimizer still unbuilt here does the same in its train steps (see train_step).
        kfac = _kfac_optimizer(getattr(self, "optimizer", None))
        if kfac is not None and not kfac.built:
            # Without a strategy Keras leaves the build to the first traced step.  Built there,
            # every optimizer variable gets an initializer graph of its own and the variables
            # created make TensorFlow trace the whole step twice; so build here, eagerly, from the
            # shapes of the batches (as Keras does under a strategy).
            batch = data_batch if data_batch is not None else _private.batch_spec(iterator)
            if batch is not None:
                self._kfac_build(kfac, batch)
        if kfac is not None and kfac.built and getattr(self, "_kfac_restore_pending", False):
            self._kfac_restore_pending = False
            kfac.restore_trained_weights(self.trainable_weights)
        return result

    def _kfac_build(self, kfac, batch) -> None:
        """Builds the model, its metrics and the K-FAC optimizer from a batch (tensors or specs)."""
        x, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
        kfac.attach_model(self, input_spec=spec_of_batch(x))
        _private.symbolic_build(self, batch)

    def _make_function(self, step_function):
        return super()._make_function(_private.multiworker_step_function(self, step_function))

    def kfac_summary(self, print_fn=print) -> str:
        """Prints (and returns) which layer got which block, its curvature, the memory of its
        state, the layers left to the fallback optimizer (with why) and the share of the
        trainable parameters under curvature blocks."""
        kfac = _kfac_optimizer(getattr(self, "optimizer", None))
        if kfac is not None and kfac.built:
            blocks, others = kfac.blocks, kfac.fallback_layers
        else:
            options = kfac.block_options if kfac is not None else None
            blocks, others = discover_blocks(self, options, kfac.exclude if kfac is not None else None)
        rows = [("layer", "block", "curvature", "parameters", "state MiB")]
        total_state = block_params = 0
        for b in blocks:
            info = b.summary()
            params = _parameters(b.variables)
            total_state += info["state_bytes"]
            block_params += params
            rows.append((b.name, info["block"], info["curvature"], f"{params:,}", f"{info['state_bytes'] / 2**20:.3f}"))
        rows.append(("total", f"{len(blocks)} blocks", "", f"{block_params:,}", f"{total_state / 2**20:.3f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
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
                lines.append(
                    f"  {layer.name} ({type(layer).__name__}, {_parameters(layer.trainable_variables):,} "
                    f"parameters): {reason}"
                )
        total_params = _parameters(self.trainable_variables)
        share = 100.0 * block_params / total_params if total_params else 0.0
        lines.append(
            f"Trainable parameters under curvature blocks: {block_params:,} of {total_params:,} ({share:.1f}%)"
        )
        text = "\n".join(lines)
        if print_fn is not None:
            print_fn(text)
        return text

    # ------------------------------------------------------------------ the train step
    def _kfac_output_losses(self, y_pred) -> list:
        """One `keras_kfac.losses.OutputLoss` per output, in the order of `keras.tree.flatten(y_pred)`."""
        if self._kfac_specs is None:
            loss, loss_weights = self._kfac_loss
            count = len(keras.tree.flatten(y_pred))
            if isinstance(y_pred, dict):
                names = sorted(y_pred)  # keras.tree.flatten orders a dict by its keys
            else:
                names = list(getattr(self, "output_names", None) or [])
                if len(names) != count:
                    names = [f"output_{i}" for i in range(count)]
            self._kfac_specs = losses_lib.resolve_losses(loss, loss_weights, names)
        return self._kfac_specs

    def _kfac_call(self, x):
        return self(x, training=True) if _private.call_has_training_arg(self) else self(x)

    def _kfac_values(self) -> list:
        """Copies of the non-trainable variables that a forward pass may change (moving
        statistics, random-generator states)."""
        return [tf.identity(v.value) for v in self.non_trainable_variables]

    def _kfac_restore(self, values) -> None:
        for variable, value in zip(self.non_trainable_variables, values):
            variable.assign(value)

    def _kfac_coefficients(self, y_pred, y, sample_weight) -> list:
        """Per output, each example's weight k_i = m·c_i in the loss Keras minimises (sample
        weights, class weights, masks, reduction and loss weight; see `keras_kfac.losses`)."""
        output_losses = self._kfac_output_losses(y_pred)
        outputs = keras.tree.flatten(y_pred)
        ys = losses_lib.per_output(y, len(outputs))
        weights = losses_lib.per_output(sample_weight, len(outputs))
        return [
            loss.example_coefficients(
                y_o, w_o, tf.shape(out)[0], tf.shape(out)[:-1], output_mask=_private.keras_mask(out)
            )
            for loss, out, y_o, w_o in zip(output_losses, outputs, ys, weights)
        ]

    def _kfac_output_grads(self, opt, y_pred, y, sample_weight, loss, tape, targets, coefficients) -> list:
        """Per-example output gradients g_i with respect to the recorded targets: E[g gᵀ]
        (sampled) or g gᵀ (empirical) is k_i times the loss's Hessian in the output."""
        output_losses = self._kfac_output_losses(y_pred)
        outputs = keras.tree.flatten(y_pred)
        ys = losses_lib.per_output(y, len(outputs))
        weights = losses_lib.per_output(sample_weight, len(outputs))
        if opt.fisher == "empirical":
            # From ∂L/∂ŷ of the replica loss before loss scaling (`loss` is the scaled one):
            # g_i = (∂L/∂ŷ_i)·m/√k_i = √k_i ∇ℓ_i.
            # Keras' cross-entropies read a softmax/sigmoid output's logits: differentiate there
            # (the per-example factor m/√k_i is the same for either tensor).
            outputs = [_private.loss_input(out) for out in outputs]
            unscale = opt.loss_scale() * distributed.num_replicas()
            slopes = tape.gradient(loss, outputs)
            output_grads = []
            for output_loss, out, slope, y_o, w_o, k in zip(output_losses, outputs, slopes, ys, weights, coefficients):
                slope = tf.zeros_like(out, tf.float32) if slope is None else tf.cast(slope, tf.float32) / unscale
                output_grads.append(output_loss.empirical_output_gradients(slope, y_o, w_o, coefficients=k))
        else:
            seed = opt.sampling_seed()
            output_grads = []
            for i, (output_loss, out, y_o, w_o, k) in enumerate(zip(output_losses, outputs, ys, weights, coefficients)):
                draw_seed = tf.random.experimental.stateless_fold_in(seed, i)
                output_grads.append(output_loss.sample_output_gradients(out, y_o, w_o, draw_seed, coefficients=k))
        output_grads = [tf.cast(g, out.dtype) for g, out in zip(output_grads, outputs)]
        return _float32_grads(tape.gradient(outputs, targets, output_gradients=output_grads), targets)

    def _kfac_statistics_pass(self, x, y, sample_weight, coefficients):
        """(inputs, target gradients, examples) from a forward and backward pass of this batch
        alone; the non-trainable variables (moving statistics) are left as they were."""
        opt = _kfac_optimizer(self.optimizer)
        values = self._kfac_values()
        num_examples = tf.shape(keras.tree.flatten(x)[0])[0]
        with capture(opt.blocks) as record:
            with tf.GradientTape(persistent=True) as tape:
                y_pred = self._kfac_call(x)
                loss = None
                if opt.fisher == "empirical":
                    loss = opt.scale_loss(_private.compute_loss(self, x, y, y_pred, sample_weight))
        targets = record.flat_targets()
        grads = self._kfac_output_grads(opt, y_pred, y, sample_weight, loss, tape, targets, coefficients)
        self._kfac_restore(values)
        return record.inputs, record.unflatten(grads), num_examples

    def _kfac_statistics(self, x, y, sample_weight, y_pred):
        """The statistics of the first `stats_batch_size` examples (their own forward and
        backward pass, cheaper than a second backward pass through the whole batch).  Each
        example keeps its weight in the whole batch's loss (`_kfac_coefficients`)."""
        opt = _kfac_optimizer(self.optimizer)
        k = opt.stats_batch_size
        coefficients = [c[:k] for c in self._kfac_coefficients(y_pred, y, sample_weight)]
        x_k, y_k, w_k = _first_examples(k, x, y, sample_weight)
        if self._kfac_subset_fn is None:
            if getattr(self, "_kfac_forward_jit", False) and not tf.executing_eagerly():
                self._kfac_subset_fn = tf.function(self._kfac_statistics_pass, jit_compile=True, reduce_retracing=True)
            else:
                self._kfac_subset_fn = self._kfac_statistics_pass
        return self._kfac_subset_fn(x_k, y_k, w_k, coefficients)

    def _kfac_forward_backward(self, x, y, sample_weight):
        """Forward pass, loss and gradients; without `stats_batch_size`, also the statistics of
        the whole batch (computed on statistics steps only, zeros otherwise)."""
        opt = _kfac_optimizer(self.optimizer)
        whole = opt.stats_batch_size is None
        blocks = opt.blocks if whole else []
        with capture(blocks) as record:
            with tf.GradientTape(persistent=whole) as tape:
                y_pred = self._kfac_call(x)
                loss = _private.compute_loss(self, x, y, y_pred, sample_weight)
                scaled_loss = opt.scale_loss(loss)
        variables = self.trainable_weights
        targets = record.flat_targets()
        if not whole:
            return y_pred, loss, tape.gradient(scaled_loss, variables), None
        num_examples = tf.shape(keras.tree.flatten(x)[0])[0]
        grads = tape.gradient(scaled_loss, variables)
        g = []
        if targets:
            # Coefficients and output gradients on statistics steps only.
            output_grads = lambda: self._kfac_output_grads(  # noqa: E731
                opt, y_pred, y, sample_weight, scaled_loss, tape, targets,
                self._kfac_coefficients(y_pred, y, sample_weight),
            )  # fmt: skip
            zeros = lambda: [tf.zeros_like(t, tf.float32) for t in targets]  # noqa: E731
            g = tf.cond(opt.due(opt.stats_every), output_grads, zeros)
            g = list(g) if isinstance(g, (list, tuple)) else [g]
        return y_pred, loss, grads, (record.inputs, record.unflatten(g), num_examples)

    def _kfac_quadratic(self, x, y, sample_weight, y_pred, num_examples, before):
        """The quadratic model's view of this batch: outputs, Fisher products and the loss.

        Its extra forward passes start from the non-trainable values `before` the step, so
        that they draw the same dropout masks as the training pass and leave the moving
        statistics to that pass alone (`train_step` puts its values back afterwards)."""
        from keras_kfac.quadratic import BatchQuadratic

        def forward_of(inputs):
            def forward():
                self._kfac_restore(before)
                return keras.tree.flatten(self._kfac_call(inputs))

            return forward

        def loss_fn():
            self._kfac_restore(before)
            return _private.compute_loss(self, x, y, self._kfac_call(x), sample_weight)

        curvature = None
        k = _kfac_optimizer(self.optimizer).curvature_batch_size
        if k is not None:
            x_k, y_k, w_k = _first_examples(k, x, y, sample_weight)
            curvature = BatchQuadratic(
                forward_of(x_k),
                None,
                self._kfac_output_losses(y_pred),
                self.trainable_weights,
                tf.shape(keras.tree.flatten(x_k)[0])[0],
                targets=y_k,
                sample_weight=w_k,
            )
        halves = None
        if _kfac_optimizer(self.optimizer).quadratic_gradient == "halves":
            middle = tf.shape(keras.tree.flatten(x)[0])[0] // 2

            def half_loss(part):
                def loss_of_half():
                    self._kfac_restore(before)
                    x_h, y_h, w_h = _examples(part, x, y, sample_weight)
                    return _private.compute_loss(self, x_h, y_h, self._kfac_call(x_h), w_h)

                return loss_of_half

            halves = (half_loss(slice(None, middle)), half_loss(slice(middle, None)))
        return BatchQuadratic(
            forward_of(x),
            loss_fn,
            self._kfac_output_losses(y_pred),
            self.trainable_weights,
            num_examples,
            targets=y,
            sample_weight=sample_weight,
            curvature=curvature,
            halves=halves,
        )

    def _kfac_rollback(self, applied, snapshot) -> None:
        """Puts the snapshot back when the step was skipped, so that a non-finite batch leaves
        no NaN in, e.g., BatchNormalization's moving statistics."""
        if not snapshot:
            return

        def restore():
            self._kfac_restore(snapshot)
            return tf.constant(False)

        tf.cond(applied, lambda: tf.constant(True), restore)

    def train_step(self, data):
        opt = _kfac_optimizer(getattr(self, "optimizer", None))
        if opt is None:
            return super().train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if not opt.built:
            # Not built before the step (see _maybe_symbolic_build): K-FAC needs its blocks
            # (hence a built model) before the forward pass.
            self._kfac_build(opt, data)
        if opt.use_ema and not tf.distribute.has_strategy():
            # The same as at the start of fit (_maybe_symbolic_build), for an optimizer built
            # or restored after that (a tf.train.Checkpoint restored into an unbuilt one) and
            # for train_on_batch.  Under a strategy fit builds the optimizer before its first step.
            restored = opt.restore_trained_weights(self.trainable_weights)
        else:
            restored = None
        snapshot = self._kfac_values()
        if getattr(self, "_kfac_forward_jit", False) and not tf.executing_eagerly():
            if self._kfac_forward_fn is None:
                self._kfac_forward_fn = tf.function(
                    self._kfac_forward_backward, jit_compile=True, reduce_retracing=True
                )
            y_pred, loss, grads, statistics = self._kfac_forward_fn(x, y, sample_weight)
        else:
            y_pred, loss, grads, statistics = self._kfac_forward_backward(x, y, sample_weight)
        if statistics is None:
            statistics_fn = lambda: self._kfac_statistics(x, y, sample_weight, y_pred)  # noqa: E731
        else:
            statistics_fn = lambda: statistics  # noqa: E731
        num_examples = tf.shape(keras.tree.flatten(x)[0])[0]
        _private.loss_tracker(self).update_state(
            _private.unscale_loss_for_distribution(loss), sample_weight=num_examples
        )
        batch = None
        if opt.uses_quadratic:
            after = self._kfac_values()
            batch = self._kfac_quadratic(x, y, sample_weight, y_pred, num_examples, snapshot)
        applied = opt.kfac_step(
            grads, self.trainable_weights, loss, statistics_fn, batch=batch, num_examples=num_examples
        )
        if opt.uses_quadratic:
            self._kfac_restore(after)
        opt.update_loss_scale(applied)
        self._kfac_rollback(applied, snapshot)
        if restored is not None:
            skipped = tf.logical_not(tf.convert_to_tensor(applied, tf.bool))
            opt.put_average_back(self.trainable_weights, tf.logical_and(restored, skipped))
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        logs.update(opt.diagnostics())
        return logs


@keras.saving.register_keras_serializable(package="keras_kfac")
class Model(KFACTrainStep, keras.Model):
    """Drop-in `keras.Model` (functional or subclassed) whose train_step supports KFAC."""

    def __new__(cls, *args, **kwargs):
        if cls is Model and _private.functional_init_arguments(args, kwargs):
            return FunctionalModel.__new__(FunctionalModel, *args, **kwargs)
        return super().__new__(cls, *args, **kwargs)


@keras.saving.register_keras_serializable(package="keras_kfac")
class FunctionalModel(Model, _private.Functional):
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
        if _private.call_has_training_arg(self.model):
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
    if isinstance(model, _private.Functional):
        return FunctionalModel(model.inputs, model.outputs, name=model.name)
    if isinstance(model, keras.Model):
        return WrappedModel(model, name=f"{model.name}_kfac")
    raise TypeError(f"keras_kfac.wrap expects a keras.Model; received {type(model).__name__}.")
