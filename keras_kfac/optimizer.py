"""The K-FAC optimizer: factor statistics, periodic eigendecompositions and the damped step.

Per block (one Dense or Conv2D layer, kernel and bias together) the gradient matrix V is
preconditioned with the damped inverse of A ⊗ G (see `keras_kfac.linalg`) giving U; the step
is δ = −lr · U with heavy-ball momentum, U optionally rescaled by a KL clip or grafted to the
norm of an Adam/SGD step.  Statistics are exponential moving averages with weight
ε_k = min(1 − 1/k, stats_decay) on the old value after k updates.  Variables without a block
are updated by the `fallback` optimizer.

The statistics and the preconditioned update run as XLA-compiled functions; the
eigendecompositions run in their own function, XLA-compiled on GPU/TPU and plain on CPU
(`inverse_jit="auto"`), because XLA's CPU `eigh` is far slower than LAPACK's.
"""

from __future__ import annotations

import copy
import weakref

import keras
import numpy as np
import tensorflow as tf
from keras.optimizers.schedules import LearningRateSchedule

from keras_kfac import damping as damping_lib
from keras_kfac import distributed, linalg, quadratic, tridiagonal

FISHER_TYPES = ("sampled", "empirical")
GRAFT_TYPES = (None, "adam", "sgd")
_ADAM_BETA_2 = 0.999
_ADAM_EPSILON = 1e-7


def _check_number(name: str, value, low=None, high=None, low_open=False, high_open=False, integer=False):
    """Raises ValueError naming `name` unless low (<|<=) value (<|<=) high."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"`{name}` must be {kind}; received {name}={value!r}.")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"`{name}` must be in {left}{lo}, {hi}{right}; received {name}={value!r}.")


def _has_accelerator() -> bool:
    return any(d.device_type in ("GPU", "TPU") for d in tf.config.list_physical_devices())


class _Untracked:
    """Plain holder for Python-side state (blocks, lookup tables, compiled functions), kept out
    of Keras/TF attribute tracking; every variable is tracked through `add_variable`."""

    def __init__(self):
        self.blocks = []
        self.block_keys = set()
        self.factors = []
        self.inverses = []  # per block: eigendecompositions (eigen) or damped inverses (factored)
        self.velocity = {}
        self.graft_second_moment = {}
        self.compiled = {}
        self.loss_scaler = None  # weakref to a LossScaleOptimizer wrapping the KFAC optimizer
        self.kl_clip_factor = None  # last step's KL-clip factor ν (a diagnostic, not saved)
        self.tridiagonal = None  # tridiagonal.TridiagonalState with approximation="block_tridiagonal"


@keras.saving.register_keras_serializable(package="keras_kfac")
class KFAC(keras.optimizers.Optimizer):
    """Kronecker-factored approximate curvature (Martens & Grosse 2015; KFC for Conv2D).

    Use it with a `keras_kfac.Model`, `keras_kfac.Sequential` or `keras_kfac.wrap(model)`:
    their `train_step` records the layer inputs and pre-activation gradients K-FAC needs.

    Args:
        learning_rate: float or `LearningRateSchedule`; the step is −learning_rate · U.  None:
            α is chosen each step by minimizing the quadratic model (see `keras_kfac.quadratic`).
        momentum: heavy-ball momentum on the step, in [0, 1).  None: μ is chosen each step with α
            from the 2×2 system of the quadratic model over δ = −αU + μδ₀.
        damping: λ > 0, float or `LearningRateSchedule` (evaluated at the step counter).
        stats_decay: upper bound of the moving-average weight ε_k = min(1 − 1/k, stats_decay).
        stats_every: update the factor statistics every this many steps.
        inverse_every: recompute the eigendecompositions every this many steps.
        fisher: "sampled" (targets drawn from the model's predictive distribution, the true
            Fisher) or "empirical" (the real labels).
        damping_mode: "eigen" solves (A ⊗ G + λI) U = V exactly through eigendecompositions
            (four small products per block and step); "factored" applies the inverse of
            (A + π√λ I) ⊗ (G + √λ/π I), π = sqrt((tr A / dim A) / (tr G / dim G)), stored as two
            explicit inverses computed by Cholesky at each inversion (two products per step; a
            damping schedule takes effect at the inversions).
        kl_clip: if set, U is scaled by min(1, sqrt(kl_clip / (lr² Σ U·∇))).
        adapt_damping: Levenberg–Marquardt damping: every `damping_every` steps λ is multiplied
            by ω = (19/20)^damping_every if ρ > 3/4 and divided by it if ρ < 1/4 (see
            `keras_kfac.damping`), then clipped to [min_damping, max_damping].
        damping_every: steps between two damping adaptations.
        adapt_every: with learning_rate=None and/or momentum=None, steps between two choices of
            α, μ (each costs two F·v products); the last choice is reused in between, with
            α ≥ 0 and 0 ≤ μ ≤ 0.99 (a μ above 1 repeated over several steps makes the step grow
            geometrically; the choosing step itself applies the 2×2 solution as it is).
        min_damping, max_damping: bounds of the adapted λ.
        graft: None, "adam" or "sgd": keep each block's K-FAC direction, rescaled to the norm
            of the Adam (g / (√v̂ + ε)) or SGD (g) direction for that block.
        stats_batch_size: compute the statistics from the first k examples of each batch
            (with the sampled Fisher, through a forward and backward pass of those k
            examples alone on statistics steps, unless the model has moving statistics such
            as BatchNormalization's, which a second forward pass would update twice).
        stats_locations: convolutions: A averages ā āᵀ over at most this many randomly chosen
            output locations per example (None: all of them); G always uses all.
        fallback: Keras optimizer (instance, name or config) for variables without a block;
            default SGD with this optimizer's learning rate and momentum.
        inverse_jit: "auto" (XLA on GPU/TPU, plain on CPU), True or False.
        inverse_dtype: dtype of the eigendecompositions/inverses, "float32" or "float64".
        statistics_jit: "auto" (XLA on GPU/TPU, plain on CPU, where XLA's patch extraction
            is about 3x slower), True or False.
        seed: integer mixed with the step counter to seed the sampled targets.
        approximation: "block_diagonal" (one block per layer) or "block_tridiagonal": chains of
            Dense layers also keep the cross-layer factors of consecutive layers and apply
            F̂⁻¹ = Ξᵀ Λ Ξ (Martens & Grosse 2015, section 4.3; see `keras_kfac.tridiagonal`);
            needs damping_mode="factored".  Other layers stay block-diagonal.
        distribute_inverses: under a tf.distribute strategy, each block is inverted by one
            replica and shared (True), or every replica inverts every block (False).
        **kwargs: the usual Keras optimizer arguments (weight_decay, clipnorm, ...).
    """

    def __init__(
        self,
        learning_rate=1e-3,
        momentum=0.9,
        damping=1e-4,
        stats_decay=0.95,
        stats_every=10,
        inverse_every=50,
        fisher="sampled",
        damping_mode="factored",
        kl_clip=None,
        adapt_damping=False,
        graft="adam",
        stats_batch_size=32,
        stats_locations=None,
        fallback=None,
        inverse_jit="auto",
        inverse_dtype="float32",
        statistics_jit="auto",
        seed=0,
        approximation="block_diagonal",
        distribute_inverses=True,
        damping_every=5,
        adapt_every=1,
        min_damping=1e-8,
        max_damping=1e8,
        name="kfac",
        **kwargs,
    ):
        auto_learning_rate, auto_momentum = learning_rate is None, momentum is None
        if auto_learning_rate:
            learning_rate = 1.0  # a variable that holds the chosen α
        if auto_momentum:
            momentum = 0.0
        if not isinstance(learning_rate, LearningRateSchedule) and not callable(learning_rate):
            _check_number("learning_rate", learning_rate, low=0.0)
            learning_rate = float(learning_rate)
        if not isinstance(damping, LearningRateSchedule):
            _check_number("damping", damping, low=0.0, low_open=True)
            damping = float(damping)
        _check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
        _check_number("stats_decay", stats_decay, low=0.0, high=1.0, high_open=True)
        _check_number("stats_every", stats_every, low=1, integer=True)
        _check_number("inverse_every", inverse_every, low=1, integer=True)
        if fisher not in FISHER_TYPES:
            raise ValueError(f"`fisher` must be one of {FISHER_TYPES}; received fisher={fisher!r}.")
        if damping_mode not in linalg.DAMPING_MODES:
            raise ValueError(
                f"`damping_mode` must be one of {linalg.DAMPING_MODES}; received damping_mode={damping_mode!r}."
            )
        if kl_clip is not None:
            _check_number("kl_clip", kl_clip, low=0.0, low_open=True)
        if not isinstance(adapt_damping, bool):
            raise ValueError(f"`adapt_damping` must be True or False; received adapt_damping={adapt_damping!r}.")
        if adapt_damping and isinstance(damping, LearningRateSchedule):
            raise ValueError("`adapt_damping=True` adapts a float `damping`; a damping schedule cannot be adapted.")
        _check_number("damping_every", damping_every, low=1, integer=True)
        _check_number("adapt_every", adapt_every, low=1, integer=True)
        _check_number("min_damping", min_damping, low=0.0, low_open=True)
        _check_number("max_damping", max_damping, low=0.0, low_open=True)
        if min_damping > max_damping:
            raise ValueError(f"`min_damping` ({min_damping}) must not exceed `max_damping` ({max_damping}).")
        if graft not in GRAFT_TYPES:
            raise ValueError(f"`graft` must be one of {GRAFT_TYPES}; received graft={graft!r}.")
        if stats_batch_size is not None:
            _check_number("stats_batch_size", stats_batch_size, low=1, integer=True)
        if stats_locations is not None:
            _check_number("stats_locations", stats_locations, low=1, integer=True)
        if inverse_jit not in ("auto", True, False):
            raise ValueError(f"`inverse_jit` must be 'auto', True or False; received inverse_jit={inverse_jit!r}.")
        if statistics_jit not in ("auto", True, False):
            raise ValueError(
                f"`statistics_jit` must be 'auto', True or False; received statistics_jit={statistics_jit!r}."
            )
        if inverse_dtype not in ("float32", "float64"):
            raise ValueError(f"`inverse_dtype` must be 'float32' or 'float64'; received {inverse_dtype!r}.")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"`seed` must be an integer; received seed={seed!r}.")
        if approximation not in tridiagonal.APPROXIMATIONS:
            raise ValueError(
                f"`approximation` must be one of {tridiagonal.APPROXIMATIONS}; "
                f"received approximation={approximation!r}."
            )
        if approximation == "block_tridiagonal" and damping_mode != "factored":
            raise ValueError(
                "`approximation='block_tridiagonal'` needs `damping_mode='factored'` (the damped diagonal "
                f"blocks must be Kronecker products); received damping_mode={damping_mode!r}."
            )
        if not isinstance(distribute_inverses, bool):
            raise ValueError(
                f"`distribute_inverses` must be True or False; received distribute_inverses={distribute_inverses!r}."
            )
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = float(momentum)
        self.auto_learning_rate = auto_learning_rate
        self.auto_momentum = auto_momentum
        self.stats_decay = float(stats_decay)
        self.stats_every = stats_every
        self.inverse_every = inverse_every
        self.fisher = fisher
        self.damping_mode = damping_mode
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.adapt_damping = bool(adapt_damping)
        self.graft = graft
        self.stats_batch_size = stats_batch_size
        self.stats_locations = stats_locations
        self.fallback = fallback
        self.inverse_jit = inverse_jit
        self.inverse_dtype = inverse_dtype
        self.statistics_jit = statistics_jit
        self.seed = seed
        self.approximation = approximation
        self.distribute_inverses = distribute_inverses
        self.damping_every = damping_every
        self.adapt_every = adapt_every
        self.min_damping = float(min_damping)
        self.max_damping = float(max_damping)
        if isinstance(damping, LearningRateSchedule):
            self._damping = damping
        else:
            with keras.name_scope(self.name, caller=self):
                self._damping = keras.Variable(damping, name="damping", dtype="float32", trainable=False)
            self._track_variable(self._damping)
        self._model_ref = None
        self._state = _Untracked()
        self._fallback_optimizer = None
        self._kfac_active = False
        self._directions_given = False

    @property
    def uses_quadratic(self) -> bool:
        """True when steps need the quadratic model (automatic α/μ or adaptive damping)."""
        return self.auto_learning_rate or self.auto_momentum or self.adapt_damping

    # ----------------------------------------------------------------------------- setup
    def attach_model(self, model) -> None:
        """Called by `keras_kfac.Model.compile`: where `build` finds the layers' blocks."""
        self._model_ref = weakref.ref(model)
        outer = getattr(model, "optimizer", None)
        wrapped = outer is not self and getattr(outer, "inner_optimizer", None) is self
        self._state.loss_scaler = weakref.ref(outer) if wrapped else None

    @property
    def loss_scaler(self):
        """The `keras.optimizers.LossScaleOptimizer` wrapping this optimizer (mixed_float16), or None."""
        ref = self._state.loss_scaler
        return ref() if ref is not None else None

    @property
    def blocks(self) -> list:
        return self._state.blocks

    def factors(self) -> dict:
        """{layer name: (A, G)} moving-average factor variables."""
        return {b.name: f for b, f in zip(self._state.blocks, self._state.factors)}

    @property
    def damping(self):
        """The current λ (a schedule is evaluated at the step counter)."""
        if isinstance(self._damping, LearningRateSchedule):
            return tf.cast(self._damping(self.iterations), tf.float32)
        return self._damping

    @property
    def inverse_in_xla(self) -> bool:
        if self.inverse_jit == "auto":
            return _has_accelerator()
        return bool(self.inverse_jit)

    @property
    def statistics_in_xla(self) -> bool:
        if self.statistics_jit == "auto":
            return _has_accelerator()
        return bool(self.statistics_jit)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        from keras_kfac.model import discover_blocks  # model.py imports this module

        model = self._model_ref() if self._model_ref is not None else None
        keys = {self._var_key(v) for v in variables}
        blocks = []
        if model is not None:
            blocks = [b for b in discover_blocks(model)[0] if all(self._var_key(v) in keys for v in b.variables)]
        state = self._state
        state.blocks = blocks
        state.block_keys = {self._var_key(v) for b in blocks for v in b.variables}
        self._stats_updates = self.add_variable((), initializer="zeros", dtype="int64", name="stats_updates")
        self._skipped_steps = self.add_variable((), initializer="zeros", dtype="int64", name="skipped_steps")
        if self.auto_momentum:
            self._chosen_momentum = self.add_variable((), initializer="zeros", dtype="float32", name="chosen_momentum")
        if self.adapt_damping:
            self._rho = self.add_variable((), initializer="zeros", dtype="float32", name="rho")
        if self.kl_clip is not None:
            with keras.name_scope(self.name, caller=self):
                state.kl_clip_factor = keras.Variable(1.0, dtype="float32", trainable=False, name="kl_clip_factor")
        for block in blocks:
            prefix = block.name
            a = self.add_variable((block.dim_a, block.dim_a), "zeros", "float32", name=f"{prefix}_factor_a")
            g = self.add_variable((block.dim_g, block.dim_g), "zeros", "float32", name=f"{prefix}_factor_g")
            state.factors.append((a, g))
            if self.damping_mode == "eigen":
                state.inverses.append(
                    (
                        self.add_variable((block.dim_a,), "zeros", "float32", name=f"{prefix}_eigenvalues_a"),
                        self.add_variable(
                            (block.dim_a, block.dim_a), "identity", "float32", name=f"{prefix}_eigenvectors_a"
                        ),
                        self.add_variable((block.dim_g,), "zeros", "float32", name=f"{prefix}_eigenvalues_g"),
                        self.add_variable(
                            (block.dim_g, block.dim_g), "identity", "float32", name=f"{prefix}_eigenvectors_g"
                        ),
                    )
                )
            else:
                state.inverses.append(
                    (
                        self.add_variable(
                            (block.dim_a, block.dim_a), "identity", "float32", name=f"{prefix}_inverse_a"
                        ),
                        self.add_variable(
                            (block.dim_g, block.dim_g), "identity", "float32", name=f"{prefix}_inverse_g"
                        ),
                    )
                )
        if self.approximation == "block_tridiagonal":
            if tf.distribute.has_strategy():
                raise NotImplementedError(
                    "approximation='block_tridiagonal' under a tf.distribute strategy is not supported yet "
                    "(its cross-layer statistics and link inverses are not all-reduced); use "
                    "approximation='block_diagonal' there."
                )
            state.tridiagonal = tridiagonal.TridiagonalState(tridiagonal.find_chains(model, blocks) if model else [])
            state.tridiagonal.build(self, blocks)
        block_vars = [v for v in variables if self._var_key(v) in state.block_keys]
        if self.momentum > 0 or self.auto_momentum:
            for v in block_vars:
                state.velocity[self._var_key(v)] = self.add_variable_from_reference(v, "velocity")
        if self.graft == "adam":
            for v in block_vars:
                state.graft_second_moment[self._var_key(v)] = self.add_variable_from_reference(v, "graft_v")
        other_vars = [v for v in variables if self._var_key(v) not in state.block_keys]
        if other_vars:
            self._fallback_optimizer = self._make_fallback()
            self._fallback_optimizer.build(other_vars)
            for v in self._fallback_optimizer.variables:
                self._track_variable(v)

    def _make_fallback(self):
        if self.fallback is None:
            return keras.optimizers.SGD(
                learning_rate=lambda: self.learning_rate,
                momentum=self.momentum,  # 0 with momentum=None
                weight_decay=self.weight_decay,
                name=f"{self.name}_fallback",
            )
        if isinstance(self.fallback, keras.optimizers.Optimizer):
            return self.fallback
        return keras.optimizers.get(self.fallback)

    @property
    def fallback_optimizer(self):
        """The optimizer that updates the variables without a block (None when all have one)."""
        return self._fallback_optimizer

    @property
    def skipped_steps(self):
        return self._skipped_steps

    def diagnostics(self) -> dict:
        """Scalars for the fit logs: the learning rate and damping at the step counter (schedules
        applied), the last step's KL-clip factor (with `kl_clip`) and the skipped-step count."""
        logs = {
            "learning_rate": tf.identity(keras.ops.convert_to_tensor(self.learning_rate, "float32")),
            "damping": tf.identity(keras.ops.convert_to_tensor(self.damping, "float32")),
        }
        if self._state.kl_clip_factor is not None:
            logs["kl_clip_factor"] = tf.identity(self._state.kl_clip_factor.value)
        if self.auto_momentum and self.built:
            logs["momentum"] = tf.identity(self._chosen_momentum.value)
        if self.adapt_damping and self.built:
            logs["rho"] = tf.identity(self._rho.value)
        logs["skipped_steps"] = tf.identity(self._skipped_steps.value)
        return logs

    # ------------------------------------------------------------------- loss scaling
    def loss_scale(self) -> tf.Tensor:
        """The factor the loss is multiplied by before differentiation (float32): the static
        `loss_scale_factor`, under a `LossScaleOptimizer` its dynamic scale, and under a
        strategy Keras' 1 / num_replicas."""
        scale = tf.constant(float(self.loss_scale_factor or 1.0) / distributed.num_replicas(), tf.float32)
        scaler = self.loss_scaler
        if scaler is not None and scaler.built:
            scale = scale * tf.cast(scaler.dynamic_scale, tf.float32)
        return scale

    def scale_loss(self, loss):
        loss = super().scale_loss(loss)
        scaler = self.loss_scaler
        return loss if scaler is None else scaler.scale_loss(loss)

    def update_loss_scale(self, applied) -> None:
        """Dynamic loss scaling as `LossScaleOptimizer` does it: halve the scale after a skipped
        step, double it after `dynamic_growth_steps` applied ones. No-op without a scaler."""
        scaler = self.loss_scaler
        if scaler is None:
            return

        def upscale():
            scaler.step_counter.assign(0)
            scaler.dynamic_scale.assign(scaler.dynamic_scale.value * 2.0)
            return tf.constant(True)

        def increment():
            scaler.step_counter.assign_add(1)
            return tf.constant(True)

        def grow():
            at_end = tf.equal(scaler.step_counter.value, scaler.dynamic_growth_steps - 1)
            return tf.cond(at_end, upscale, increment)

        def shrink():
            scaler.step_counter.assign(0)
            scaler.dynamic_scale.assign(scaler.dynamic_scale.value * 0.5)
            return tf.constant(False)

        tf.cond(applied, grow, shrink)

    # ------------------------------------------------------------------ compiled pieces
    def _function(self, key, fn, jit: bool):
        """Caches `fn` as a tf.function (XLA when `jit`); runs it as is when eager."""
        if tf.executing_eagerly():
            return fn
        compiled = self._state.compiled
        if key not in compiled:
            compiled[key] = tf.function(fn, jit_compile=jit, reduce_retracing=True, autograph=False)
        return compiled[key]

    def due(self, every: int) -> tf.Tensor:
        return tf.equal(tf.math.floormod(self.iterations, every), 0)

    def sampling_seed(self) -> tf.Tensor:
        """Stateless seed for this step's sampled targets (under a strategy, one per replica)."""
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(self.iterations, tf.int64)])
        return distributed.replica_seed(seed)

    def _update_statistics(self, inputs, preact_grads, num_examples):
        """Moving-average update of every factor; returns False (and changes nothing) if the
        batch estimates are not finite."""
        if self.stats_batch_size is not None:
            k = self.stats_batch_size
            inputs = [[x[:k] for x in per_block] for per_block in inputs]
            preact_grads = [[g[:k] for g in per_block] for per_block in preact_grads]
            num_examples = tf.minimum(num_examples, k)
        batch, ok = [], tf.constant(True)
        # Location subsets use their own stream: the sampled targets use fold_in(seed, output).
        seed = tf.random.experimental.stateless_fold_in(self.sampling_seed(), 1_000_003)
        for index, (block, xs, gs) in enumerate(zip(self.blocks, inputs, preact_grads)):
            if not xs:
                batch.append(None)
                continue
            factor_a, factor_g = block.factors(
                xs, gs, num_examples, self.stats_locations, tf.random.experimental.stateless_fold_in(seed, index)
            )
            ok = tf.logical_and(ok, tf.reduce_all(tf.math.is_finite(factor_a)))
            ok = tf.logical_and(ok, tf.reduce_all(tf.math.is_finite(factor_g)))
            batch.append((factor_a, factor_g))
        batch, ok = distributed.reduce_statistics(batch, ok)  # replica average under a strategy
        if self._state.tridiagonal is not None:
            cross_batch, cross_ok = self._state.tridiagonal.batch_statistics(
                self.blocks, inputs, preact_grads, num_examples
            )
            ok = tf.logical_and(ok, cross_ok)

        def assign():
            count = self._stats_updates + 1
            k = tf.cast(count, tf.float32)
            decay = tf.minimum(1.0 - 1.0 / k, self.stats_decay)
            for (a, g), new in zip(self._state.factors, batch):
                if new is None:
                    continue
                a.assign(decay * a + (1.0 - decay) * new[0])
                g.assign(decay * g + (1.0 - decay) * new[1])
            if self._state.tridiagonal is not None:
                self._state.tridiagonal.assign_statistics(decay, cross_batch)
            self._stats_updates.assign(count)
            return tf.constant(True)

        return tf.cond(ok, assign, lambda: tf.constant(False))

    def _update_inverses(self):
        dtype = tf.as_dtype(self.inverse_dtype)
        damping = self.damping
        for (a, g), state in zip(self._state.factors, self._state.inverses):
            if self.damping_mode == "eigen":
                for factor, eigenvalues, eigenvectors in ((a, *state[:2]), (g, *state[2:])):
                    values, vectors = linalg.symmetric_eigh(factor, dtype)
                    eigenvalues.assign(values)
                    eigenvectors.assign(vectors)
            else:
                inv_a, inv_g = state
                new_a, new_g, ok = linalg.factored_inverses(a, g, damping, dtype)
                # A failed factorization keeps the previous inverses rather than ending training.
                inv_a.assign(tf.where(ok, new_a, inv_a))
                inv_g.assign(tf.where(ok, new_g, inv_g))
        if self._state.tridiagonal is not None:  # after the inverses of the blocks it reads
            self._state.tridiagonal.update_inverses(self._state.factors, self._state.inverses, damping, dtype)
        return tf.constant(True)

    def update_inverses(self):
        """Recomputes every eigendecomposition (or damped inverse) now; also usable outside `fit`."""
        return self._function("inverses", self._update_inverses, self.inverse_in_xla)()

    # ---------------------------------------------------------------------- the step
    def kfac_step(self, grads, variables, loss, statistics_fn, batch=None):
        """One K-FAC step, called from `keras_kfac.Model.train_step`.

        `statistics_fn()` returns (inputs, preact_grads, num_examples): per block, the recorded
        layer inputs and the matching per-example pre-activation gradients, and the number of
        examples they come from (it runs only on statistics steps).
        A step whose loss, gradients or statistics are not finite changes nothing but the
        `skipped_steps` counter.  `batch` (a `quadratic.BatchQuadratic`) is needed when
        `uses_quadratic`: see `_quadratic_apply`.
        """
        if distributed.replicated():
            if self.uses_quadratic:
                raise NotImplementedError(
                    "learning_rate=None, momentum=None and adapt_damping=True are not supported under a "
                    "tf.distribute strategy yet; give learning_rate and momentum and keep adapt_damping=False there."
                )
            return distributed.kfac_step(self, grads, variables, loss, statistics_fn)
        finite = tf.reduce_all(tf.math.is_finite(tf.cast(loss, tf.float32)))
        for g in grads:
            if g is not None:
                finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(g)))
        update_stats = self._function("statistics", self._update_statistics, jit=self.statistics_in_xla)

        def collect():
            return update_stats(*statistics_fn())

        stats_ok = tf.cond(tf.logical_and(finite, self.due(self.stats_every)), collect, lambda: tf.constant(True))
        ok = tf.logical_and(finite, stats_ok)
        tf.cond(tf.logical_and(ok, self.due(self.inverse_every)), self.update_inverses, lambda: tf.constant(False))

        present = tuple(i for i, g in enumerate(grads) if g is not None)
        present_grads = [grads[i] for i in present]
        present_vars = [variables[i] for i in present]

        def apply_fn(gs):
            self._kfac_active = True
            try:
                self.apply(gs, present_vars)
            finally:
                self._kfac_active = False
            return tf.constant(True)

        apply_compiled = self._function(("apply", present, len(variables)), apply_fn, jit=True)

        def skip():
            self._skipped_steps.assign_add(1)
            return tf.constant(False)

        if self.uses_quadratic:
            if batch is None:
                raise ValueError(
                    "KFAC with learning_rate=None, momentum=None or adapt_damping needs the batch's model."
                )
            return tf.cond(ok, lambda: self._quadratic_apply(present_grads, present_vars, loss, batch, apply_fn), skip)
        return tf.cond(ok, lambda: apply_compiled(present_grads), skip)

    def _quadratic_apply(self, grads, variables, loss, batch, apply_fn):
        """Chooses α, μ on the quadratic model M over δ = αΔ + μδ₀ (Δ = −U, δ₀ the previous
        step), applies δ, and on damping steps adapts λ from ρ = (h(θ+δ) − h(θ)) / M(δ)."""
        if self.loss_scaler is not None or self.loss_scale_factor is not None:
            raise ValueError("learning_rate=None, momentum=None and adapt_damping do not support loss scaling.")
        directions = self.precondition(grads, variables, self.learning_rate)
        delta = [-tf.cast(u, tf.float32) for u in directions]
        previous = []
        for v in variables:
            velocity = self._state.velocity.get(self._var_key(v))
            previous.append(tf.zeros(v.shape, tf.float32) if velocity is None else tf.cast(velocity.value, tf.float32))
        g32 = [tf.cast(g, tf.float32) for g in grads]

        def dot(a, b):
            return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(a, b)])

        lam = tf.cast(self.damping, tf.float32)
        b = tf.stack([dot(g32, delta), dot(g32, previous)])
        plain = tf.stack(
            [
                tf.stack([dot(delta, delta), dot(delta, previous)]),
                tf.stack([dot(previous, delta), dot(previous, previous)]),
            ]
        )

        def damped_gram():
            return batch.gram([delta, previous]) + lam * plain

        automatic = self.auto_learning_rate or self.auto_momentum
        due = self.due(self.damping_every) if self.adapt_damping else tf.constant(False)
        # The F·v products are paid only on the steps that choose α, μ or adapt λ; in between
        # the last chosen α, μ are reused (adapt_every > 1).
        choose = tf.logical_or(due, self.due(self.adapt_every)) if automatic else due
        gram = tf.cond(choose, damped_gram, lambda: tf.zeros((2, 2), tf.float32))
        alpha, mu = quadratic.solve_step(
            gram,
            b,
            learning_rate=None if self.auto_learning_rate else self.learning_rate,
            momentum=None if self.auto_momentum else self.momentum,
        )
        if automatic:
            last_alpha = tf.cast(self.learning_rate, tf.float32)
            last_mu = tf.cast(self._chosen_momentum if self.auto_momentum else self.momentum, tf.float32)
            reused_alpha, reused_mu = quadratic.reusable_step(last_alpha, last_mu)
            alpha = tf.where(choose, alpha, reused_alpha)
            mu = tf.where(choose, mu, reused_mu)
        if self.auto_learning_rate:
            self.learning_rate.assign(alpha)
        if self.auto_momentum:
            self._chosen_momentum.assign(mu)
        model_change = quadratic.quadratic_value(tf.stack([alpha, mu]), gram, b, lam)
        self._directions_given = True
        try:
            apply_fn(directions)
        finally:
            self._directions_given = False
        if self.adapt_damping:

            def adapt():
                rho = damping_lib.reduction_ratio(loss, batch.loss(), model_change)
                self._rho.assign(rho)
                new = damping_lib.lm_update(self._damping, rho, self.damping_every, self.min_damping, self.max_damping)
                self._damping.assign(new)
                return tf.constant(True)

            # iterations already advanced by apply: adapt on the step that was due before it.
            tf.cond(due, adapt, lambda: tf.constant(False))
        return tf.constant(True)

    def apply(self, grads, trainable_variables=None):
        if not self._kfac_active:
            raise RuntimeError(
                "KFAC needs each layer's inputs and pre-activation gradients, which only the "
                "train_step of keras_kfac models collects. Build the model with "
                "keras_kfac.Model / keras_kfac.Sequential, or call `model = keras_kfac.wrap(model)` "
                "and compile that model with KFAC."
            )
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        scaler = self.loss_scaler
        if scaler is not None and scaler.built:  # undo the dynamic loss scale (mixed_float16)
            scale = tf.cast(scaler.dynamic_scale, tf.float32)
            grads = [None if g is None else g / tf.cast(scale, g.dtype) for g in grads]
        pairs = list(zip(grads, trainable_variables))
        block_pairs = [(g, v) for g, v in pairs if self._var_key(v) in self._state.block_keys]
        other_pairs = [(g, v) for g, v in pairs if self._var_key(v) not in self._state.block_keys]
        if other_pairs:
            other_grads = [g for g, _ in other_pairs]
            if self.loss_scale_factor is not None:  # super().apply undoes it for the block variables only
                other_grads = [g / self.loss_scale_factor for g in other_grads]
            # Before our own update: a learning-rate schedule sees the same step counter.
            self._fallback_optimizer.apply(other_grads, [v for _, v in other_pairs])
        if block_pairs:
            super().apply([g for g, _ in block_pairs], [v for _, v in block_pairs])
        else:
            self._iterations.assign_add(1)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if self._directions_given:  # _quadratic_apply already preconditioned them
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        if distributed.replicated():  # precondition the all-reduced gradients, then update as Keras does
            pairs = self._all_reduce_sum_gradients(list(zip(grads, trainable_variables)))
            directions = self.precondition([g for g, _ in pairs], trainable_variables, learning_rate)
            pairs = [
                (d, v.value if isinstance(v, keras.Variable) else v) for d, v in zip(directions, trainable_variables)
            ]
            tf.__internal__.distribute.interim.maybe_merge_call(
                self._distributed_tf_update_step, self._distribution_strategy, pairs, learning_rate
            )
            return
        directions = self.precondition(grads, trainable_variables, learning_rate)
        super()._backend_update_step(directions, trainable_variables, learning_rate)

    def precondition(self, grads, variables, learning_rate):
        """Maps gradients to K-FAC directions U (block by block; KL clip and grafting applied)."""
        by_key = {self._var_key(v): g for g, v in zip(grads, variables)}
        damping = self.damping
        present = {}  # block index -> (keys, float32 gradients, gradient matrix)
        for index, block in enumerate(self.blocks):
            keys = [self._var_key(v) for v in block.variables]
            if all(k in by_key for k in keys):
                block_grads = [tf.cast(by_key[k], tf.float32) for k in keys]
                matrix = block.to_matrix(block_grads[0], block_grads[1] if len(keys) > 1 else None)
                present[index] = (keys, block_grads, matrix)
        chained = {}  # block index -> its slice of F̂⁻¹∇ (approximation="block_tridiagonal")
        if self._state.tridiagonal is not None:
            matrices = {i: p[2] for i, p in present.items()}
            chained = self._state.tridiagonal.directions(matrices, self._state.inverses)
        results = []
        for index, (block, inverse) in enumerate(zip(self.blocks, self._state.inverses)):
            if index not in present:
                continue
            keys, block_grads, matrix = present[index]
            if index in chained:
                direction = chained[index]
            elif self.damping_mode == "eigen":
                direction = linalg.precondition(matrix, *inverse, damping, "eigen")
            else:
                direction = tf.matmul(tf.matmul(inverse[0], matrix), inverse[1])
            if self.graft is not None:
                target = self._graft_norm(block.variables, block_grads)
                norm = tf.norm(direction)
                direction = direction * tf.where(norm > 0, target / tf.where(norm > 0, norm, 1.0), 0.0)
            results.append((block, keys, matrix, direction))
        if self.kl_clip is not None and results:
            lr = tf.cast(learning_rate, tf.float32)
            inner = tf.add_n([tf.reduce_sum(u * v) for _, _, v, u in results])
            ratio = self.kl_clip / tf.maximum(lr * lr * inner, 1e-30)
            nu = tf.minimum(1.0, tf.sqrt(ratio))
            if self._state.kl_clip_factor is not None:
                self._state.kl_clip_factor.assign(nu)
            results = [(b, k, v, u * nu) for b, k, v, u in results]
        for block, keys, _, direction in results:
            for key, part in zip(keys, block.from_matrix(direction)):
                by_key[key] = part
        return [tf.cast(by_key[self._var_key(v)], v.dtype) for v in variables]

    def _graft_norm(self, variables, grads):
        """Norm of the first-order direction the block is grafted to."""
        if self.graft == "sgd":
            return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads]))
        step = tf.cast(self.iterations + 1, tf.float32)
        correction = 1.0 - tf.pow(_ADAM_BETA_2, step)
        total = []
        for v, g in zip(variables, grads):
            second = self._state.graft_second_moment[self._var_key(v)]
            second.assign(_ADAM_BETA_2 * second + (1.0 - _ADAM_BETA_2) * tf.square(g))
            adam = g / (tf.sqrt(second / correction) + _ADAM_EPSILON)
            total.append(tf.reduce_sum(tf.square(adam)))
        return tf.sqrt(tf.add_n(total))

    def update_step(self, gradient, variable, learning_rate):
        """Heavy-ball step on one variable; `gradient` is already the K-FAC direction U."""
        lr = tf.cast(learning_rate, variable.dtype)
        velocity = self._state.velocity.get(self._var_key(variable))
        if velocity is None:
            self.assign_sub(variable, lr * gradient)
            return
        momentum = self._chosen_momentum if self.auto_momentum else self.momentum
        self.assign(velocity, tf.cast(momentum, variable.dtype) * velocity - lr * gradient)
        self.assign_add(variable, velocity)

    # ------------------------------------------------------------------- saving
    def _variable_owner(self, variable) -> str:
        """'layer NAME' for the state of a block's layer, else the variable's path."""
        state = self._state
        for block, factors, inverses in zip(state.blocks, state.factors, state.inverses):
            owned = list(factors) + list(inverses)
            for v in block.variables:
                key = self._var_key(v)
                owned += [t[key] for t in (state.velocity, state.graft_second_moment) if key in t]
            if any(v is variable for v in owned):
                return f"layer '{block.name}'"
        return f"'{variable.path}'"

    def load_own_variables(self, store):
        """Restores the state saved by `save_own_variables` (`.keras`, `.weights.h5`,
        BackupAndRestore); a state saved for other layers or settings raises a ValueError
        naming the first layer that does not match (Keras would only warn and skip it)."""
        model = self._model_ref() if self._model_ref is not None else None
        if not self.built and model is not None and model.built:
            self.build(model.trainable_variables)  # so that load_weights right after compile restores the state
        if not self.built:
            return super().load_own_variables(store)
        ours = self.variables
        saved = [tuple(np.shape(store[str(i)])) for i in range(len(store.keys()))]
        for i in range(max(len(ours), len(saved))):
            here = tuple(ours[i].shape) if i < len(ours) else None
            there = saved[i] if i < len(saved) else None
            if here != there:
                where = self._variable_owner(ours[i]) if i < len(ours) else "only in the saved state"
                raise ValueError(
                    f"The saved state of optimizer '{self.name}' does not match this model and its KFAC "
                    f"settings: the saved state has {len(saved)} variables, this optimizer {len(ours)}; variable {i} "
                    f"({where}) has shape {here} here and {there} in the saved state. Load a checkpoint "
                    "of the same architecture and KFAC settings (`load_weights(..., skip_mismatch=True)` "
                    "skips what does not match)."
                )
        for variable, i in zip(ours, range(len(saved))):
            variable.assign(store[str(i)])

    # ------------------------------------------------------------------------ config
    def get_config(self):
        config = super().get_config()
        if isinstance(self._damping, LearningRateSchedule):
            damping = keras.optimizers.schedules.serialize(self._damping)
        else:
            damping = float(self._damping.numpy())
        fallback = self.fallback
        if isinstance(fallback, keras.optimizers.Optimizer):
            fallback = keras.optimizers.serialize(fallback)
        config.update(
            {
                "momentum": self.momentum,
                "damping": damping,
                "stats_decay": self.stats_decay,
                "stats_every": self.stats_every,
                "inverse_every": self.inverse_every,
                "fisher": self.fisher,
                "damping_mode": self.damping_mode,
                "kl_clip": self.kl_clip,
                "adapt_damping": self.adapt_damping,
                "graft": self.graft,
                "stats_batch_size": self.stats_batch_size,
                "stats_locations": self.stats_locations,
                "fallback": fallback,
                "inverse_jit": self.inverse_jit,
                "inverse_dtype": self.inverse_dtype,
                "statistics_jit": self.statistics_jit,
                "seed": self.seed,
                "approximation": self.approximation,
                "distribute_inverses": self.distribute_inverses,
                "damping_every": self.damping_every,
                "adapt_every": self.adapt_every,
                "min_damping": self.min_damping,
                "max_damping": self.max_damping,
            }
        )
        if self.auto_learning_rate:
            config["learning_rate"] = None
        if self.auto_momentum:
            config["momentum"] = None
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = copy.deepcopy(config)  # Keras' deserializers edit nested dicts in place
        if isinstance(config.get("damping"), dict):
            config["damping"] = keras.optimizers.schedules.deserialize(config["damping"], custom_objects=custom_objects)
        if isinstance(config.get("fallback"), dict):
            config["fallback"] = keras.optimizers.deserialize(config["fallback"], custom_objects=custom_objects)
        return super().from_config(config, custom_objects=custom_objects)
