"""The K-FAC optimizer: one step as named phases over curvature blocks.

Per block (one layer's kernel and bias, see `keras_kfac.blocks`) the gradient is multiplied by
the block's damped inverse curvature, giving the direction U; the step is −lr · U averaged with
momentum (or heavy-ball, `momentum_form`), U optionally rescaled by a KL clip or grafted to the
norm of an Adam/SGD step.  Statistics are exponential moving averages with weight ε_k = min(1 − 1/k, stats_decay)
on the old value after k updates.  Variables without a block are updated by the `fallback`
optimizer.

A step (`kfac_step`) runs these phases, each over all blocks:

1. statistics: every `stats_every` steps, batch estimates from the recorded layer inputs and
   output gradients, averaged over replicas, folded into the moving averages;
2. inverses: every `inverse_every` steps, each block's damped inverse (shared over replicas);
3. directions: the raw gradients, clipped as Keras clips them, multiplied by the inverses;
4. graft / KL clip: each direction rescaled to a first-order norm, then all by the KL bound;
5. update: momentum (with `learning_rate=None`/`momentum=None`, α and μ minimise the
   quadratic model, `keras_kfac.quadratic`), and the fallback optimizer's step for the rest.

`tf.distribute` enters through a reducer (`keras_kfac.distributed`) that phases 1, 2 and the
update call.  Phase 1 runs XLA-compiled on GPU/TPU, phase 2 too (plain on CPU, where XLA's
`eigh` is far slower than LAPACK's), phases 3-5 always.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref

import keras
import numpy as np
import tensorflow as tf
from keras.optimizers.schedules import LearningRateSchedule

from keras_kfac import _private, distributed, graft, quadratic, tridiagonal
from keras_kfac import arguments as args
from keras_kfac import damping as damping_lib
from keras_kfac.blocks.base import BlockOptions
from keras_kfac.discovery import discover_blocks, input_spec_of
from keras_kfac.inversion import INVERSIONS, all_finite

FISHER_TYPES = ("sampled", "empirical")
GRAFT_TYPES = tuple(graft.GRAFTS)
DEFAULT_MAX_FACTOR_SIZE = 4096
MOMENTUM_FORMS = ("average", "heavy_ball")
QUADRATIC_GRADIENTS = ("batch", "halves")
DEFAULT_DAMPING = 1e-4  # λ of a fixed damping given as None (the seed-task study, BENCHMARKS.md)
# η of polynomial_averaging="auto" (BENCHMARKS.md, "Timed: 128-example statistics, ...")
DEFAULT_POLYNOMIAL_AVERAGING = 8.0
# learning_rate="auto": lr_t = PEAK_LEARNING_RATE / (1 + t / (DECAY_STEPS · max(b, 1))) at step t,
# b = B / REFERENCE_BATCH for the global batch B of the first step: a 1/t decay whose horizon grows
# with the batch above the reference (the gradient noise it averages out falls as 1/B), with the
# step bounded by the KL clip AUTO_KL_CLIP unless `kl_clip` is given (the seed-task studies at
# batches 128 and 1024, and tests/test_coverage.py at batch 16, where the clip is what keeps a 3e-3
# start from setting back keras.applications.MobileNetV2; BENCHMARKS.md).
PEAK_LEARNING_RATE = 3e-3
DECAY_STEPS = 400
REFERENCE_BATCH = 128
AUTO_KL_CLIP = 1e-3
BASE_LEARNING_RATE = 1e-3  # the variable's unit: it holds BASE_LEARNING_RATE · √b (see below)


def _has_accelerator() -> bool:
    return any(d.device_type in ("GPU", "TPU") for d in tf.config.list_physical_devices())


class _Untracked:
    """Plain holder for Python-side state (blocks, lookup tables, compiled functions), kept out
    of Keras/TF attribute tracking; every variable is tracked through `add_variable`."""

    def __init__(self):
        self.blocks = []
        self.others = []  # (layer, reason) of the layers left to the fallback optimizer
        self.block_keys = set()
        self.velocity = {}
        self.graft = None
        self.compiled = {}
        self.loss_scaler = None  # weakref to a LossScaleOptimizer wrapping the KFAC optimizer
        self.kl_clip_factor = None  # last step's KL-clip factor ν (a diagnostic, not saved)
        self.tridiagonal = None  # tridiagonal.TridiagonalState with approximation="block_tridiagonal"
        self.input_spec = None  # inputs of the model, to find layers called in nested graphs
        self.step = None  # what the update phase needs of the step in flight (see kfac_step)
        self.trained_weights = {}  # var key → the weights training reached, kept when `fit` ends (use_ema)


# Per thread (a MirroredStrategy traces its replicas in threads): ids of the KFAC optimizers
# whose block update is inside Keras' `apply` just now.
_IN_KERAS_APPLY = threading.local()


@contextlib.contextmanager
def _keras_apply_in_progress(optimizer):
    ids = _IN_KERAS_APPLY.__dict__.setdefault("ids", set())
    ids.add(id(optimizer))
    try:
        yield
    finally:
        ids.discard(id(optimizer))


def _in_keras_apply(optimizer) -> bool:
    return id(optimizer) in getattr(_IN_KERAS_APPLY, "ids", ())


@keras.saving.register_keras_serializable(package="keras_kfac")
class KFAC(keras.optimizers.Optimizer):
    """Kronecker-factored approximate curvature (Martens & Grosse 2015; KFC for Conv2D).

    Use it with a `keras_kfac.Model`, `keras_kfac.Sequential` or `keras_kfac.wrap(model)`:
    their `train_step` records the layer inputs and pre-activation gradients K-FAC needs.

    Args:
        learning_rate: float or `LearningRateSchedule`; the step is −learning_rate · U.  "auto"
            (the default): 3e-3 / (1 + t / (400 · max(b, 1))) at step t, with b = B / 128 for
            B the global batch of the first step (examples per replica × replicas ×
            gradient_accumulation_steps), read once at that step (b = 1 until then): a 1/t
            decay from 3e-3, 1.5e-3 at step 400 at batch 128 and below, slower above 128; with
            kl_clip="auto" the step is also KL-clipped at 1e-3.  None: α is chosen each step by
            minimizing the quadratic model (see `keras_kfac.quadratic`).
        momentum: momentum μ on the step, in [0, 1), in the form `momentum_form` says.  None: μ
            is chosen each step with α from the 2×2 system of the quadratic model over
            δ = −αU + μδ₀ (heavy-ball), kept in [0, 0.99].
        damping: λ > 0, float or `LearningRateSchedule` (evaluated at the step counter).  None:
            `DEFAULT_DAMPING` (1e-4), or with adapt_damping=True the largest block curvature
            at the first statistics (the maximum over blocks of ‖A‖_F·‖G‖_F, an upper bound on
            the largest eigenvalue of A ⊗ G), so that the first steps stay close to gradient
            descent until the Levenberg–Marquardt rule lowers λ.
        stats_decay: upper bound of the moving-average weight ε_k = min(1 − 1/k, stats_decay).
        stats_every: update the factor statistics every this many steps.
        inverse_every: recompute the blocks' damped inverses (eigendecompositions with
            damping_mode="eigen", Cholesky inverses with "factored") every this many steps.
        fisher: "sampled" (targets drawn from the model's predictive distribution, the true
            Fisher) or "empirical" (the real labels).
        damping_mode: "eigen" solves (A ⊗ G + λI) U = V exactly through eigendecompositions
            (four small products per block and step); "factored" applies the inverse of
            (A + π√λ I) ⊗ (G + √λ/π I), π = sqrt((tr A / dim A) / (tr G / dim G)), stored as two
            explicit inverses computed by Cholesky at each inversion (two products per step; a
            damping schedule takes effect at the inversions); "eigen_adam" keeps the eigenbases
            of "eigen" and scales each coordinate of the rotated gradient by Adam's second
            moment there instead of 1 / (a gᵀ + λ) (SOAP-like; λ unused); "ekfac" keeps them
            too and divides by S + λ, S the per-example gradients' second moment in that basis,
            re-estimated at every statistics step (George et al. 2018).  See
            `keras_kfac.inversion`.
        kl_clip: if set, the step is scaled by min(1, sqrt(kl_clip / (lr² Σ U·∇))) (with an
            automatic α, by the same bound with α as lr); the sum runs over the blocks'
            variables.  "auto" (the default): 1e-3 with learning_rate="auto" (it bounds the first
            steps of deep BatchNorm networks at small batches), None otherwise.
        adapt_damping: Levenberg–Marquardt damping: every `damping_every` steps λ is multiplied
            by ω = (19/20)^damping_every if ρ > 3/4 and divided by it if ρ < 1/4 (see
            `keras_kfac.damping`), then clipped to [min_damping, max_damping].
        damping_every: steps between two damping adaptations.
        adapt_every: with learning_rate=None and/or momentum=None, steps between two choices of
            α, μ (each costs two F·v products); the last choice is reused in between, with
            α ≥ 0 and 0 ≤ μ ≤ 0.99.
        min_damping, max_damping: bounds of the adapted λ.
        graft: None, "adam" or "sgd": keep each block's K-FAC direction, rescaled to the norm
            of the Adam (g / (√v̂ + ε)) or SGD (g) direction for that block; None keeps the
            natural-gradient length lr·U.  "auto" (the default): None when the step is KL-clipped
            (kl_clip set, learning_rate not None), so that the clip alone bounds its length, and
            "adam" otherwise (a given rate then means an Adam-length step).  The default fallback
            stays Adam at the rate, so with a natural-gradient-sized rate (0.1, say) and a KL clip,
            give graft=None (an SGD fallback) or a `fallback`.
        stats_batch_size: compute the statistics from a forward and backward pass of the first
            k examples of each batch alone, on statistics steps (None: from the whole batch).
        curvature_batch_size: with learning_rate=None, momentum=None or adapt_damping=True, the
            Fisher products of the quadratic model (two forward-mode passes whenever α, μ are
            chosen) use only the first k examples of each batch (None: the whole batch); its
            gradient and the losses of ρ stay the whole batch's.
        quadratic_gradient: with learning_rate=None, the gradient term ∇ᵀΔ of the quadratic model
            that chooses α (and μ): "batch" (the batch gradient g = ḡ + ξ, as ρ's model uses it;
            −gᵀPg carries the batch's noise as ξᵀPξ > 0) or "halves" (−Σ s·g₁ᵀK⁻¹g₂ over the
            blocks, g₁, g₂ the gradients of the batch's two halves, K⁻¹ the block's damped
            inverse, s the graft's scale: its mean is −ḡᵀPḡ; costs a forward and a backward
            pass of the batch on the steps that choose α).  "halves" chose far shorter steps
            and trained far more slowly on the seed task (BENCHMARKS.md, "The untuned mode: α
            from the two halves of the batch").
        stats_locations: convolutions: A averages ā āᵀ over at most this many randomly chosen
            output locations per example (None: all of them); G always uses all.
        input_stats_batch_size: Kronecker blocks (Dense, EinsumDense, convolutions) compute A from
            the first k examples of the statistics sample only (their rows, where a layer folds
            time into the batch axis), while G uses all of it (None: A from all of it too).  A's Gram
            matrices are most of a statistics step's arithmetic; the sampled-target pass that G
            needs is the same either way.  Other blocks ignore it; under
            approximation="block_tridiagonal" the cross factors Ā_{i,i+1} use the same k examples.
        fallback: Keras optimizer (instance, name or config) for variables without a block.
            Default: Adam at this optimizer's learning rate with graft="adam" or "auto", else SGD with
            its learning rate and momentum; either gets this optimizer's weight decay (and
            `exclude_from_weight_decay`) and gradient accumulation.  Clipping applies to all
            raw gradients together before either optimizer sees them.
        exclude: layers kept out of K-FAC (trained by the fallback): a layer name, a list of
            names, or a callable taking a layer and returning True to exclude it.
        max_factor_size: a factor side larger than this keeps only its diagonal (None: no limit).
        diagonal_fisher: layers that no block models (custom layers, bare weights) get a
            diagonal Fisher block (`keras_kfac.blocks.DiagonalFisherBlock`, u = ∇ / (F̂ + λ) with
            F̂ estimated from batch gradients of the sampled loss) instead of the fallback
            optimizer.  Layers excluded by `exclude` or called in nested graphs keep the fallback.
        momentum_form: "average" (v ← μv + (1 − μ)U, step −lr·v/(1 − μᵗ): Adam's bias-corrected
            first moment, so that with graft="adam" the step is as long as Adam's at the same
            learning rate) or "heavy_ball" (v ← μv − lr·U, step v: Martens & Grosse, about
            1/(1 − μ) times longer).  None: "average", or "heavy_ball" with the quadratic model
            (learning_rate=None, momentum=None or adapt_damping=True), which needs it.
        polynomial_averaging: η ≥ 0 keeps the polynomial-decay average of the weights (Shamir &
            Zhang 2013), x_t = x_{t−1} + (η + 1)/(t + η)·(w_t − x_{t−1}) from x_1 = w_1, i.e. w_s
            weighted ∝ Γ(s + η)/Γ(s) ≈ s^η (η = 0: the plain mean), and puts it in place of the
            weights when `fit` ends, as Keras' `use_ema` does (which it turns on, in place of
            the exponential average).  None: no such average.  "auto" (default): η = 8, unless
            `use_ema` is given (then Keras' meaning: the exponential average with True, no
            average with False).  With either average the next
            `fit` trains on from the weights the last one reached (kept in the optimizer's
            state and saved with it), unless the weights were changed in between.
        weight_sharing: layers applied over shared positions (Dense on sequences, EinsumDense):
            "expand" (every position a row) or "reduce" (per example, inputs averaged and output
            gradients summed over the positions; Eschenhagen et al. 2023). None: each block's
            default, "expand" for Dense and EinsumDense (the ViT benchmark, BENCHMARKS.md).
        inverse_jit: "auto" (XLA on GPU/TPU, plain on CPU), True or False.
        inverse_dtype: dtype of the eigendecompositions/inverses, "float32" or "float64".
        statistics_jit: "auto" (XLA on GPU/TPU, plain on CPU), True or False.
        seed: integer mixed with the step counter to seed the sampled targets.
        approximation: "block_diagonal" (one block per layer) or "block_tridiagonal": chains of
            Dense layers also keep the cross-layer factors of consecutive layers (Martens &
            Grosse 2015, section 4.3; see `keras_kfac.tridiagonal`); needs damping_mode="factored".
        distribute_inverses: under a tf.distribute strategy, each block is inverted by one
            replica and shared (True), or every replica inverts every block (False).
        **kwargs: the usual Keras optimizer arguments (weight_decay, clipnorm, ...).
    """

    def __init__(
        self,
        learning_rate="auto",
        momentum=0.9,
        damping=None,
        stats_decay=0.95,
        stats_every=10,
        inverse_every=50,
        fisher="sampled",
        damping_mode="factored",
        kl_clip="auto",
        adapt_damping=False,
        graft="auto",
        stats_batch_size=128,
        curvature_batch_size=None,
        quadratic_gradient="batch",
        stats_locations=16,
        input_stats_batch_size=32,
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
        exclude=None,
        max_factor_size=DEFAULT_MAX_FACTOR_SIZE,
        diagonal_fisher=False,
        weight_sharing=None,
        momentum_form=None,
        polynomial_averaging="auto",
        name=None,
        **kwargs,
    ):
        auto_learning_rate, auto_momentum = learning_rate is None, momentum is None
        rate_kinds = "a number, a LearningRateSchedule, None"
        learning_rate_from_batch = args.is_auto("learning_rate", learning_rate, rate_kinds)
        if learning_rate_from_batch:
            learning_rate = BASE_LEARNING_RATE  # until the first step sets it from the batch
        if auto_learning_rate:
            learning_rate = 1.0  # a variable that holds the chosen α
        if auto_momentum:
            momentum = 0.0
        if not isinstance(learning_rate, LearningRateSchedule) and not callable(learning_rate):
            args.check_number("learning_rate", learning_rate, low=0.0)
            learning_rate = float(learning_rate)
        damping_from_factors = damping is None and bool(adapt_damping)
        if damping is None:
            damping = DEFAULT_DAMPING
        if not isinstance(damping, LearningRateSchedule):
            args.check_number("damping", damping, low=0.0, low_open=True)
            damping = float(damping)
        args.check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
        args.check_number("stats_decay", stats_decay, low=0.0, high=1.0, high_open=True)
        args.check_number("stats_every", stats_every, low=1, integer=True)
        args.check_number("inverse_every", inverse_every, low=1, integer=True)
        args.check_choice("fisher", fisher, FISHER_TYPES)
        args.check_choice("damping_mode", damping_mode, tuple(INVERSIONS))
        kl_clip_from_rate = args.is_auto("kl_clip", kl_clip, "a positive number, None")
        if kl_clip_from_rate:
            kl_clip = AUTO_KL_CLIP if learning_rate_from_batch else None
        if kl_clip is not None:
            args.check_number("kl_clip", kl_clip, low=0.0, low_open=True)
        args.check_bool("adapt_damping", adapt_damping)
        if adapt_damping and isinstance(damping, LearningRateSchedule):
            raise ValueError("`adapt_damping=True` adapts a float `damping`; a damping schedule cannot be adapted.")
        args.check_number("damping_every", damping_every, low=1, integer=True)
        args.check_number("adapt_every", adapt_every, low=1, integer=True)
        args.check_number("min_damping", min_damping, low=0.0, low_open=True)
        args.check_number("max_damping", max_damping, low=0.0, low_open=True)
        if min_damping > max_damping:
            raise ValueError(f"`min_damping` ({min_damping}) must not exceed `max_damping` ({max_damping}).")
        graft_auto = graft == "auto"
        if graft_auto:
            graft = None if kl_clip is not None and not auto_learning_rate else "adam"
        args.check_choice("graft", graft, GRAFT_TYPES + ("auto",))
        if stats_batch_size is not None:
            args.check_number("stats_batch_size", stats_batch_size, low=1, integer=True)
        if curvature_batch_size is not None:
            args.check_number("curvature_batch_size", curvature_batch_size, low=1, integer=True)
        args.check_choice("quadratic_gradient", quadratic_gradient, QUADRATIC_GRADIENTS)
        if stats_locations is not None:
            args.check_number("stats_locations", stats_locations, low=1, integer=True)
        if input_stats_batch_size is not None:
            args.check_number("input_stats_batch_size", input_stats_batch_size, low=1, integer=True)
        args.check_choice("inverse_jit", inverse_jit, ("auto", True, False))
        args.check_choice("statistics_jit", statistics_jit, ("auto", True, False))
        args.check_choice("inverse_dtype", inverse_dtype, ("float32", "float64"))
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"`seed` must be an integer; received seed={seed!r}.")
        args.check_choice("approximation", approximation, tridiagonal.APPROXIMATIONS)
        if approximation == "block_tridiagonal" and damping_mode != "factored":
            raise ValueError(
                "`approximation='block_tridiagonal'` needs `damping_mode='factored'` (the damped diagonal "
                f"blocks must be Kronecker products); received damping_mode={damping_mode!r}."
            )
        args.check_bool("distribute_inverses", distribute_inverses)
        args.check_fallback(fallback)
        args.check_exclude(exclude)
        args.check_bool("diagonal_fisher", diagonal_fisher)
        if max_factor_size is not None:
            args.check_number("max_factor_size", max_factor_size, low=1, integer=True)
        args.check_choice("weight_sharing", weight_sharing, (None, "expand", "reduce"))
        args.check_choice("momentum_form", momentum_form, (None,) + MOMENTUM_FORMS)
        if args.is_auto("polynomial_averaging", polynomial_averaging, "a number ≥ 0, None"):
            # Keras' `use_ema` given: its own meaning (the exponential average, or none).
            polynomial_averaging = DEFAULT_POLYNOMIAL_AVERAGING if "use_ema" not in kwargs else None
        if polynomial_averaging is not None:
            args.check_number("polynomial_averaging", polynomial_averaging, low=0.0)
            if not kwargs.get("use_ema", True):
                raise ValueError(
                    "`polynomial_averaging` keeps an average of the weights (Keras' `use_ema` machinery); "
                    "it cannot be combined with use_ema=False."
                )
            kwargs["use_ema"] = True
        uses_quadratic = auto_learning_rate or auto_momentum or adapt_damping
        if uses_quadratic and momentum_form == "average":
            raise ValueError(
                "learning_rate=None, momentum=None and adapt_damping=True model the heavy-ball step "
                "δ = −αU + μδ₀; they need momentum_form='heavy_ball' (or None)."
            )
        if uses_quadratic and kwargs.get("gradient_accumulation_steps"):
            raise ValueError(
                "learning_rate=None, momentum=None and adapt_damping=True do not support "
                "`gradient_accumulation_steps` (the quadratic model is of one batch)."
            )
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = float(momentum)
        self.auto_learning_rate = auto_learning_rate
        self.learning_rate_from_batch = learning_rate_from_batch
        self.auto_momentum = auto_momentum
        self.stats_decay = float(stats_decay)
        self.stats_every = stats_every
        self.inverse_every = inverse_every
        self.fisher = fisher
        self.damping_mode = damping_mode
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.kl_clip_from_rate = kl_clip_from_rate
        self.adapt_damping = bool(adapt_damping)
        self.damping_from_factors = damping_from_factors
        self.graft = graft
        self.graft_auto = graft_auto
        self.stats_batch_size = stats_batch_size
        self.curvature_batch_size = curvature_batch_size
        self.quadratic_gradient = quadratic_gradient
        self.stats_locations = stats_locations
        self.input_stats_batch_size = input_stats_batch_size
        self.fallback = fallback
        self.exclude = exclude
        self.max_factor_size = max_factor_size
        self.diagonal_fisher = bool(diagonal_fisher)
        self.weight_sharing = weight_sharing
        self.momentum_form = momentum_form
        self.polynomial_averaging = None if polynomial_averaging is None else float(polynomial_averaging)
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
            _private.track_variable(self, self._damping)
        self._model_ref = None
        self._state = _Untracked()
        self._fallback_optimizer = None
        self._kfac_active = False

    @property
    def step_momentum_form(self) -> str:
        """The momentum in effect: "heavy_ball" with the quadratic model, else `momentum_form`
        ("average" when None)."""
        if self.momentum_form is not None:
            return self.momentum_form
        return "heavy_ball" if self.uses_quadratic else "average"

    @property
    def uses_quadratic(self) -> bool:
        """True when steps need the quadratic model (automatic α/μ or adaptive damping)."""
        return self.auto_learning_rate or self.auto_momentum or self.adapt_damping

    @property
    def block_options(self) -> BlockOptions:
        return BlockOptions(
            damping_mode=self.damping_mode,
            max_factor_size=self.max_factor_size,
            stats_locations=self.stats_locations,
            input_stats_batch_size=self.input_stats_batch_size,
            inverse_dtype=self.inverse_dtype,
            weight_sharing=self.weight_sharing,
            diagonal_fisher=self.diagonal_fisher,
        )

    # ----------------------------------------------------------------------------- setup
    def attach_model(self, model, input_spec=None) -> None:
        """Called by `keras_kfac.Model.compile` (and its first train step, with the inputs'
        spec): where `build` finds the layers' blocks."""
        self._model_ref = weakref.ref(model)
        if input_spec is not None:
            self._state.input_spec = input_spec
        outer = getattr(model, "optimizer", None)
        wrapped = outer is not self and getattr(outer, "inner_optimizer", None) is self
        self._state.loss_scaler = weakref.ref(outer) if wrapped else None

    def _attached_model(self):
        # Not a property: Keras' saving walks the optimizer's attributes and would recurse
        # into the model (whose optimizer is this one).
        return self._model_ref() if self._model_ref is not None else None

    @property
    def loss_scaler(self):
        """The `keras.optimizers.LossScaleOptimizer` wrapping this optimizer (mixed_float16), or None."""
        ref = self._state.loss_scaler
        return ref() if ref is not None else None

    @property
    def blocks(self) -> list:
        """The curvature blocks (each with its `layer` and its `variables`), once built."""
        return self._state.blocks

    @property
    def fallback_layers(self) -> list:
        """(layer, reason) for every layer with trainable weights that has no block."""
        return self._state.others

    def factors(self) -> dict:
        """{layer name: (A, G)} moving-average factor variables (a diagonal factor is a vector)."""
        return {b.name: tuple(b.statistics_variables) for b in self._state.blocks}

    @property
    def damping(self):
        """The current λ (a schedule is evaluated at the step counter)."""
        if isinstance(self._damping, LearningRateSchedule):
            return tf.cast(self._damping(self.iterations), tf.float32)
        return self._damping

    # Keras' `apply` unscales the gradients by `loss_scale_factor` and averages the weights when
    # `use_ema`; for the block update K-FAC has done the first already and does the second after
    # the fallback's step, so within that call (and that thread) both read as off.  (Switching
    # the attributes off around the call raced between a MirroredStrategy's replica threads.)
    @property
    def use_ema(self) -> bool:
        return False if _in_keras_apply(self) else self.__dict__.get("_use_ema_setting", False)

    @use_ema.setter
    def use_ema(self, value) -> None:
        self.__dict__["_use_ema_setting"] = value

    @property
    def loss_scale_factor(self):
        return None if _in_keras_apply(self) else self.__dict__.get("_loss_scale_factor_setting")

    @loss_scale_factor.setter
    def loss_scale_factor(self, value) -> None:
        self.__dict__["_loss_scale_factor_setting"] = value

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
        state = self._state
        model = self._attached_model()
        keys = {self._var_key(v) for v in variables}
        blocks, others = [], []
        if model is not None:
            spec = state.input_spec if state.input_spec is not None else input_spec_of(model)
            found, others = discover_blocks(model, self.block_options, self.exclude, spec)
            for block in found:
                if all(self._var_key(v) in keys for v in block.variables):
                    blocks.append(block)
                else:
                    others.append((block.layer, "variables not given to the optimizer"))
        state.blocks, state.others = blocks, others
        state.block_keys = {self._var_key(v) for b in blocks for v in b.variables}
        self._stats_updates = self.add_variable((), initializer="zeros", dtype="int64", name="stats_updates")
        self._skipped_steps = self.add_variable((), initializer="zeros", dtype="int64", name="skipped_steps")
        if self.use_ema:
            # Where training was when `fit` put the average in place of the weights (see
            # finalize_variable_values); 1 in `average_in_place` while the weights hold it.
            self._average_in_place = self.add_variable((), initializer="zeros", dtype="int64", name="average_in_place")
            for v in variables:
                state.trained_weights[self._var_key(v)] = self.add_variable_from_reference(v, "trained_weights")
        if self.auto_momentum:
            self._chosen_momentum = self.add_variable((), initializer="zeros", dtype="float32", name="chosen_momentum")
        if self.adapt_damping:
            self._rho = self.add_variable((), initializer="zeros", dtype="float32", name="rho")
        if self.kl_clip is not None:
            with keras.name_scope(self.name, caller=self):
                state.kl_clip_factor = keras.Variable(1.0, dtype="float32", trainable=False, name="kl_clip_factor")
        for block in blocks:

            def add(shape, initializer, name, prefix=block.name):
                return self.add_variable(tuple(shape), initializer, "float32", name=f"{prefix}_{name}")

            block.build(add)
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
        if self.graft is not None:
            state.graft = graft.GRAFTS[self.graft]()
            state.graft.build(self.add_variable_from_reference, block_vars)
        other_vars = [v for v in variables if self._var_key(v) not in state.block_keys]
        if other_vars:
            self._fallback_optimizer = self._make_fallback(other_vars)
            self._fallback_optimizer.build(other_vars)
            for v in self._fallback_optimizer.variables:
                _private.track_variable(self, v)

    def _make_fallback(self, variables):
        """The optimizer of the variables without a block (see the `fallback` argument)."""
        if isinstance(self.fallback, keras.optimizers.Optimizer):
            return self.fallback
        if self.fallback is not None:
            return keras.optimizers.get(copy.deepcopy(self.fallback))
        shared = dict(
            learning_rate=lambda: self.learning_rate,
            weight_decay=self.weight_decay,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            name=f"{self.name}_fallback",
        )
        if self.graft == "adam" or self.graft_auto:
            fallback = keras.optimizers.Adam(beta_1=0.9, beta_2=graft.ADAM_BETA_2, epsilon=graft.ADAM_EPSILON, **shared)
        else:
            fallback = keras.optimizers.SGD(momentum=self.momentum, **shared)  # 0 with momentum=None
        if self.weight_decay:
            kept = [v for v in variables if not _private.uses_weight_decay(self, v)]
            fallback.exclude_from_weight_decay(var_list=kept)
        return fallback

    @property
    def learning_rate(self):
        return self._get_current_learning_rate()

    def _get_current_learning_rate(self):
        """learning_rate="auto": the decay of the module constants at the step counter t (the
        fallback reads it too).  The learning-rate variable holds 1e-3 · √b, set from the first
        batch (1e-3, so b = 1, until then), so b is saved and restored with the optimizer."""
        if self.learning_rate_from_batch:
            t = keras.ops.cast(self._iterations, self._learning_rate.dtype)
            b = keras.ops.square(self._learning_rate / BASE_LEARNING_RATE)
            return PEAK_LEARNING_RATE / (1.0 + t / (DECAY_STEPS * keras.ops.maximum(b, 1.0)))
        return super()._get_current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, value):
        """Setting the rate (a user, `keras.callbacks.LearningRateScheduler`) ends "auto": the
        first step must not overwrite it."""
        self.learning_rate_from_batch = False
        keras.optimizers.Optimizer.learning_rate.fset(self, value)

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

    # ---------------------------------------------------------------------- the step
    def kfac_step(self, grads, variables, loss, statistics_fn, batch=None, num_examples=None):
        """One K-FAC step, called from `keras_kfac.Model.train_step`; returns whether it applied.

        `statistics_fn()` returns (inputs, target_grads, num_examples): per block, the recorded
        layer inputs and the matching per-example output gradients, and the number of examples
        they come from (it runs only on statistics steps).  A step whose loss, gradients or
        statistics are not finite changes nothing but the `skipped_steps` counter.  `batch`
        (a `quadratic.BatchQuadratic`) is needed when `uses_quadratic`; `num_examples`, this
        replica's batch size, with learning_rate="auto".
        """
        reducer = distributed.reducer(self.distribute_inverses)
        if reducer.replicated and self.uses_quadratic:
            raise NotImplementedError(
                "learning_rate=None, momentum=None and adapt_damping=True are not supported under a "
                "tf.distribute strategy yet; give learning_rate and momentum and keep adapt_damping=False there."
            )
        if self.uses_quadratic and batch is None:
            raise ValueError("KFAC with learning_rate=None, momentum=None or adapt_damping needs the batch's model.")
        finite = reducer.all_true(all_finite([tf.cast(loss, tf.float32)] + [g for g in grads if g is not None]))

        def statistics():
            return self._statistics_phase(statistics_fn, reducer)

        stats_ok = tf.cond(tf.logical_and(finite, self.due(self.stats_every)), statistics, lambda: tf.constant(True))
        ok = tf.logical_and(finite, stats_ok)

        def inverses():
            return self._inverse_phase(reducer)

        if self.learning_rate_from_batch:
            if num_examples is None:
                raise ValueError('KFAC(learning_rate="auto") needs the batch size of the first step.')
            self._batch_learning_rate_phase(num_examples)
        if self.damping_from_factors:
            first = tf.logical_and(ok, tf.equal(self.iterations, 0))
            tf.cond(first, self._initial_damping_phase, lambda: tf.constant(False))
        tf.cond(tf.logical_and(ok, self.due(self.inverse_every)), inverses, lambda: tf.constant(False))

        present = tuple(i for i, g in enumerate(grads) if g is not None)
        present_vars = [variables[i] for i in present]
        adapt_due = self.due(self.damping_every) if self.adapt_damping else None

        def apply(gs):
            self._kfac_active = True
            if self.uses_quadratic:
                self._state.step = {"loss": loss, "batch": batch, "adapt_due": adapt_due}
            try:
                self.apply(list(gs), present_vars)
                if self.adapt_damping:
                    self._adapt_damping_phase()
            finally:
                self._kfac_active = False
                self._state.step = None
            return tf.constant(True)

        if not (reducer.replicated or self.uses_quadratic):
            apply = self._function(("apply", present, len(variables)), apply, jit=True)

        def skip():
            self._skipped_steps.assign_add(1)
            return tf.constant(False)

        return reducer.apply_if(ok, apply, skip, [grads[i] for i in present])

    # -- phase 1: statistics -------------------------------------------------------------
    def _statistics_phase(self, statistics_fn, reducer):
        inputs, target_grads, num_examples = statistics_fn()
        if reducer.replicated:
            return self._update_statistics(inputs, target_grads, num_examples, reducer)
        update = self._function("statistics", self._update_statistics, jit=self.statistics_in_xla)
        return update(inputs, target_grads, num_examples)

    def _update_statistics(self, inputs, target_grads, num_examples, reducer=None):
        """Moving-average update of every block's statistics; returns False (and changes
        nothing) if the batch estimates are not finite."""
        reducer = reducer or distributed.LocalReducer()
        # Location subsets use their own stream: the sampled targets use fold_in(seed, output).
        seed = tf.random.experimental.stateless_fold_in(self.sampling_seed(), 1_000_003)
        batch = []
        for index, (block, xs, gs) in enumerate(zip(self.blocks, inputs, target_grads)):
            if not xs:
                batch.append(None)
                continue
            block_seed = tf.random.experimental.stateless_fold_in(seed, index)
            batch.append(block.batch_statistics(xs, gs, num_examples, block_seed))
        flat = reducer.mean([t for estimates in batch if estimates is not None for t in estimates])
        ok = all_finite(flat)
        reduced, position = [], 0
        for estimates in batch:
            if estimates is None:
                reduced.append(None)
                continue
            reduced.append(flat[position : position + len(estimates)])
            position += len(estimates)
        chains = self._state.tridiagonal
        if chains is not None:
            cross_batch, cross_ok = chains.batch_statistics(self.blocks, inputs, target_grads, num_examples)
            ok = tf.logical_and(ok, cross_ok)

        def assign():
            count = self._stats_updates + 1
            decay = tf.minimum(1.0 - 1.0 / tf.cast(count, tf.float32), self.stats_decay)
            for block, estimates in zip(self.blocks, reduced):
                if estimates is not None:
                    block.update_statistics(estimates, decay)
            if chains is not None:
                chains.assign_statistics(decay, cross_batch)
            self._stats_updates.assign(count)
            return tf.constant(True)

        return tf.cond(ok, assign, lambda: tf.constant(False))

    def _batch_learning_rate_phase(self, num_examples) -> tf.Tensor:
        """learning_rate="auto": at the first step, the variable 1e-3 · √b, b = B / 128 for the
        global batch B, which sets the horizon of the decay (`_get_current_learning_rate`).
        An unconditional assign (of the same value after the first step): under a strategy, the
        learning-rate variable's cross-replica assign may not sit in a tf.cond."""
        accumulation = self.gradient_accumulation_steps or 1
        batch = tf.cast(num_examples, tf.float64) * float(distributed.num_replicas() * accumulation)
        scale = tf.sqrt(batch / float(REFERENCE_BATCH))
        chosen = tf.cast(BASE_LEARNING_RATE * scale, self._learning_rate.dtype)
        first = tf.equal(self.iterations, 0)
        self._learning_rate.assign(tf.where(first, chosen, self._learning_rate))
        return first

    def _initial_damping_phase(self) -> tf.Tensor:
        """damping=None with adapt_damping: λ₀ = the largest block curvature bound of the first
        statistics, clipped to [min_damping, max_damping]; unchanged if no block gives one."""
        bounds = [b for b in (block.largest_curvature() for block in self.blocks) if b is not None]
        if not bounds:
            return tf.constant(False)
        largest = tf.reduce_max(tf.stack([tf.cast(b, tf.float32) for b in bounds]))
        usable = tf.logical_and(tf.math.is_finite(largest), largest > 0.0)
        start = tf.clip_by_value(largest, self.min_damping, self.max_damping)
        self._damping.assign(tf.where(usable, start, self._damping))
        return usable

    # -- phase 2: inverses ---------------------------------------------------------------
    def _inverse_phase(self, reducer):
        if reducer.replicated:
            return self._update_inverses(reducer)
        return self.update_inverses()

    def _update_inverses(self, reducer=None):
        reducer = reducer or distributed.LocalReducer()
        damping = self.damping
        reducer.update_inverses(self.blocks, damping)
        if self._state.tridiagonal is not None:  # after the inverses of the blocks it reads
            self._state.tridiagonal.update_inverses(self.blocks, damping, tf.as_dtype(self.inverse_dtype))
        return tf.constant(True)

    def update_inverses(self):
        """Recomputes every block's damped inverse now; also usable outside `fit`."""
        return self._function("inverses", self._update_inverses, self.inverse_in_xla)()

    # -- phases 3 and 4: directions, graft and KL clip -----------------------------------
    def precondition(self, grads, variables, learning_rate, kl_clip: bool = True) -> list:
        """Maps gradients to K-FAC directions U (per variable; grafting and, unless `kl_clip` is
        False, the KL clip applied); variables without a block keep their gradient."""
        by_key = {self._var_key(v): g for g, v in zip(grads, variables)}
        directions = self._directions_phase(by_key)
        directions = self._graft_phase(directions, by_key)
        if kl_clip:
            directions = self._kl_clip_phase(directions, by_key, learning_rate)
        for block, parts in directions.items():
            for v, part in zip(block.variables, parts):
                by_key[self._var_key(v)] = part
        return [tf.cast(by_key[self._var_key(v)], v.dtype) for v in variables]

    def _directions_phase(self, by_key: dict) -> dict:
        """{block: [U per variable]} for every block whose variables all have gradients."""
        damping = self.damping
        present = [b for b in self.blocks if all(self._var_key(v) in by_key for v in b.variables)]
        grads = {b: [tf.cast(by_key[self._var_key(v)], tf.float32) for v in b.variables] for b in present}
        chained = {}
        if self._state.tridiagonal is not None:
            index = {id(b): i for i, b in enumerate(self.blocks)}
            matrices = {index[id(b)]: b.to_matrix(grads[b]) for b in present if tridiagonal.chainable(b)}
            chained = self._state.tridiagonal.directions(matrices, self.blocks)
            chained = {self.blocks[i]: self.blocks[i].from_matrix(u) for i, u in chained.items()}
        return {b: chained[b] if b in chained else b.multiply_inverse(grads[b], damping) for b in present}

    def _graft_phase(self, directions: dict, by_key: dict) -> dict:
        rule = self._state.graft
        if rule is None:
            return directions
        step = self.iterations + 1
        out = {}
        for block, direction in directions.items():
            grads = [tf.cast(by_key[self._var_key(v)], tf.float32) for v in block.variables]
            out[block] = graft.rescale(direction, rule.target_norm(block.variables, grads, step))
        return out

    def _kl_clip_phase(self, directions: dict, by_key: dict, learning_rate) -> dict:
        if self.kl_clip is None or not directions:
            return directions
        nu = self.kl_clip_factor(directions, by_key, learning_rate)
        return {b: [u * nu for u in d] for b, d in directions.items()}

    def kl_clip_factor(self, directions: dict, by_key: dict, learning_rate) -> tf.Tensor:
        """ν = min(1, sqrt(kl_clip / (lr² Σ U·∇))), stored for the logs."""
        inner = tf.add_n(
            [
                tf.reduce_sum(u * tf.cast(by_key[self._var_key(v)], tf.float32))
                for b, d in directions.items()
                for v, u in zip(b.variables, d)
            ]
        )
        lr = tf.cast(learning_rate, tf.float32)
        nu = tf.minimum(1.0, tf.sqrt(self.kl_clip / tf.maximum(lr * lr * inner, 1e-30)))
        if self._state.kl_clip_factor is not None:
            self._state.kl_clip_factor.assign(nu)
        return nu

    # -- phase 5: the update -------------------------------------------------------------
    def _clip_gradients(self, grads):
        # Clipping is done once, on all raw gradients, in `apply` (before the fallback
        # optimizer and the preconditioning see them), not again by Keras on the blocks' part.
        return grads

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
        grads = list(grads)
        scaler = self.loss_scaler
        if scaler is not None and scaler.built:  # undo the dynamic loss scale (mixed_float16)
            scale = tf.cast(scaler.dynamic_scale, tf.float32)
            grads = [None if g is None else g / tf.cast(scale, g.dtype) for g in grads]
        if self.loss_scale_factor is not None:
            grads = [None if g is None else g / self.loss_scale_factor for g in grads]
        if self.uses_quadratic and self._state.step is not None:
            self._state.step["raw_grads"] = {self._var_key(v): g for g, v in zip(grads, trainable_variables)}
        grads = super()._clip_gradients(grads)
        pairs = list(zip(grads, trainable_variables))
        block_pairs = [(g, v) for g, v in pairs if self._var_key(v) in self._state.block_keys]
        other_pairs = [(g, v) for g, v in pairs if self._var_key(v) not in self._state.block_keys]
        fallback_step = []
        if other_pairs:
            # Before our own update: a learning-rate schedule sees the same step counter.
            other_vars = [v for _, v in other_pairs]
            measure = self.uses_quadratic and self._state.step is not None
            before = [tf.identity(v.value) for v in other_vars] if measure else None
            self._fallback_optimizer.apply([g for g, _ in other_pairs], other_vars)
            if measure:  # the quadratic model sees this step as fixed: measured, then undone for now
                fallback_step = [(v, v.value - b) for v, b in zip(other_vars, before)]
                for v, b in zip(other_vars, before):
                    v.assign(b)
                self._state.step["fallback_step"] = {self._var_key(v): s for v, s in fallback_step}
        # Inside Keras' apply the loss scale (undone above) and the average (taken below, once
        # the fallback's step is back) read as off.
        with _keras_apply_in_progress(self):
            if block_pairs:
                super().apply([g for g, _ in block_pairs], [v for _, v in block_pairs])
            else:
                self._iterations.assign_add(1)
        for v, s in fallback_step:
            v.assign_add(s)
        if self.use_ema:
            self._weight_average_phase()

    def _weight_average_phase(self) -> None:
        """Keras' `use_ema`, once the whole step (blocks and fallback) has moved the weights:
        x ← x + r_t (w − x) for every trainable w, with r_t = 1 − β (β = `ema_momentum`; r_1 = 1,
        so x = w after the first step) or, with `polynomial_averaging` η, r_t = (η + 1) / (t + η)
        (t = 1, 2, ... the step); and w ← x every `ema_overwrite_frequency` steps."""
        step = tf.cast(self.iterations, tf.float32)  # the counter already includes this step
        if self.polynomial_averaging is None:
            rate = tf.where(tf.equal(step, 1.0), 1.0, 1.0 - tf.cast(self.ema_momentum, tf.float32))
        else:
            power = self.polynomial_averaging
            rate = (power + 1.0) / (step + power)
        for variable, average in zip(self._trainable_variables, self._model_variables_moving_average):
            if average is not None:
                r = tf.cast(rate, variable.dtype)
                self.assign(average, average + r * (variable - average))
        if self.ema_overwrite_frequency:
            tf.cond(
                tf.equal(self.iterations % self.ema_overwrite_frequency, 0),
                lambda: self._overwrite_model_variables_with_average_value(self._trainable_variables),
                lambda: None,
            )

    def finalize_variable_values(self, var_list) -> None:
        """End of `fit` with `use_ema`: the weights become the average (as in Keras) and the
        weights training reached are kept, so that the next `fit` continues from them
        (`restore_trained_weights`): a run split into several `fit` calls, or saved and resumed
        between them, takes the steps of one uninterrupted run."""
        triples = self._weights_average_kept(var_list)
        for variable, _, kept in triples:
            kept.assign(variable)
        if triples:
            self._average_in_place.assign(1)
        super().finalize_variable_values(var_list)

    def restore_trained_weights(self, var_list):
        """Puts back the weights training reached if the last `fit` left the average in their
        place and they all still hold it (weights set since then, by `set_weights`,
        `load_weights` of other weights or more training, are kept); either way the average is
        then no longer in place.  Eager (at the start of `fit`) or in a traced train step (the
        check is one scalar read while nothing is pending).  Returns whether the weights were
        put back (a bool tensor)."""
        triples = self._weights_average_kept(var_list)

        def put_back():
            unchanged = tf.reduce_all(tf.stack([tf.reduce_all(tf.equal(v.value, a.value)) for v, a, _ in triples]))

            def assign_kept():
                for variable, _, kept in triples:
                    variable.assign(kept.value)
                return tf.constant(True)

            done = tf.cond(unchanged, assign_kept, lambda: tf.constant(False))
            with tf.control_dependencies([done]):
                self._average_in_place.assign(0)
            return tf.identity(done)

        if not triples:
            return tf.constant(False)
        return tf.cond(tf.equal(self._average_in_place.value, 1), put_back, lambda: tf.constant(False))

    def put_average_back(self, var_list, when) -> None:
        """Undoes `restore_trained_weights` where `when` (a bool tensor): a step skipped for a
        non-finite batch leaves the weights, the average among them, as they were."""
        triples = self._weights_average_kept(var_list)
        if not triples:
            return

        def undo():
            for variable, average, _ in triples:
                variable.assign(average.value)
            self._average_in_place.assign(1)
            return tf.constant(True)

        tf.cond(when, undo, lambda: tf.constant(False))

    def _weights_average_kept(self, var_list) -> list:
        """(weight, its average, its kept value) for every weight of `var_list` that has them."""
        if not (self.use_ema and self.built):
            return []
        keys = [self._var_key(v) for v in self._trainable_variables]
        averages = dict(zip(keys, self._model_variables_moving_average))
        triples = []
        for variable in var_list:
            key = self._var_key(variable)
            average, kept = averages.get(key), self._state.trained_weights.get(key)
            if average is not None and kept is not None:
                triples.append((variable, average, kept))
        return triples

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        values = [v.value if isinstance(v, keras.Variable) else v for v in trainable_variables]
        pairs = _private.all_reduce_sum_gradients(self, list(zip(grads, values)))
        reduced = [g for g, _ in pairs]
        if self.uses_quadratic and self._state.step is not None:
            directions, learning_rate = self._quadratic_phase(reduced, trainable_variables)
        else:
            directions = self.precondition(reduced, trainable_variables, learning_rate)
        _private.distributed_update(self, list(zip(directions, [v for _, v in pairs])), learning_rate)

    def update_step(self, gradient, variable, learning_rate):
        """The step on one variable; `gradient` is already the K-FAC direction U.

        "heavy_ball": v ← μv − lr·U, θ ← θ + v.  "average": v ← μv + (1 − μ)U, θ ← θ − lr·v/(1 − μᵗ)
        (t the step number; Adam's bias-corrected first moment, so with graft="adam" a step is
        as long as Adam's at the same learning rate)."""
        lr = tf.cast(learning_rate, variable.dtype)
        velocity = self._state.velocity.get(self._var_key(variable))
        if velocity is None:
            self.assign_sub(variable, lr * gradient)
            return
        momentum = tf.cast(self._chosen_momentum if self.auto_momentum else self.momentum, variable.dtype)
        if self.step_momentum_form == "average":
            self.assign(velocity, momentum * velocity + (1.0 - momentum) * gradient)
            step = tf.cast(self.iterations + 1, variable.dtype)
            self.assign_sub(variable, lr * velocity / (1.0 - tf.pow(momentum, step)))
            return
        self.assign(velocity, momentum * velocity - lr * gradient)
        self.assign_add(variable, velocity)

    # -- the quadratic model (learning_rate=None, momentum=None, adapt_damping) ---------
    def _quadratic_phase(self, grads, variables):
        """Directions, then α, μ chosen on the quadratic model M over the step actually taken,
        δ = αΔ + μδ₀ + δ_f (Δ = −U on the blocks' variables, δ₀ their previous step, δ_f the
        fallback optimizer's step on the others, fixed).  Returns (directions, α)."""
        step = self._state.step
        batch = step["batch"]
        # With an automatic α the KL bound applies to the chosen step, below.
        directions = self.precondition(grads, variables, self.learning_rate, kl_clip=not self.auto_learning_rate)
        raw = step["raw_grads"]
        fallback = step.get("fallback_step", {})
        by_key = {self._var_key(v): tf.cast(d, tf.float32) for v, d in zip(variables, directions)}
        model_vars = batch.variables

        def over_model(values: dict) -> list:
            return [values.get(self._var_key(v), tf.zeros(v.shape, tf.float32)) for v in model_vars]

        delta = over_model({k: -d for k, d in by_key.items()})
        previous = over_model({k: tf.cast(vel.value, tf.float32) for k, vel in self._state.velocity.items()})
        tangents = [delta, previous]
        if fallback:
            tangents.append(over_model({k: tf.cast(s, tf.float32) for k, s in fallback.items()}))
        gradient = over_model({k: tf.cast(g, tf.float32) for k, g in raw.items() if g is not None})

        def dot(a, b):
            return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(a, b)])

        n = len(tangents)
        lam = tf.cast(self.damping, tf.float32)
        b = tf.stack([dot(gradient, t) for t in tangents])
        plain = tf.stack([tf.stack([dot(tangents[i], tangents[j]) for j in range(n)]) for i in range(n)])

        automatic = self.auto_learning_rate or self.auto_momentum
        due = step["adapt_due"] if self.adapt_damping else tf.constant(False)
        # The F·v products are paid only on the steps that choose α, μ or adapt λ; in between
        # the last chosen α, μ are reused (adapt_every > 1).
        choose = tf.logical_or(due, self.due(self.adapt_every)) if automatic else due
        gram = tf.cond(choose, lambda: batch.gram(tangents) + lam * plain, lambda: tf.zeros((n, n), tf.float32))
        # With the fallback's fixed step, M(α, μ) has the linear term b + C[:2, 2].
        linear = b[:2] + (gram[:2, 2] if fallback else 0.0)
        if self.quadratic_gradient == "halves" and self.auto_learning_rate:
            halves = tf.cond(choose, lambda: self._halves_gradient_term(batch, raw, by_key), lambda: b[0])
            # A batch of one example has no two halves: the batch's term.
            usable = tf.logical_and(tf.math.is_finite(halves), batch.num_examples >= 2.0)
            halves = tf.where(usable, halves, b[0])
            linear = tf.stack([linear[0] - b[0] + halves, linear[1]])
        alpha, mu = quadratic.solve_step(
            gram[:2, :2],
            linear,
            learning_rate=None if self.auto_learning_rate else self.learning_rate,
            momentum=None if self.auto_momentum else self.momentum,
        )
        if automatic:
            last_alpha = tf.cast(self.learning_rate, tf.float32)
            last_mu = tf.cast(self._chosen_momentum if self.auto_momentum else self.momentum, tf.float32)
            reused_alpha, reused_mu = quadratic.reusable_step(last_alpha, last_mu)
            alpha = tf.where(choose, alpha, reused_alpha)
            mu = tf.where(choose, mu, reused_mu)
        if self.kl_clip is not None and self.auto_learning_rate:
            # The KL bound on the chosen step (with a fixed lr it already scaled U).
            blocks = {blk: [by_key[self._var_key(v)] for v in blk.variables] for blk in self.blocks}
            blocks = {blk: d for blk, d in blocks.items() if all(self._var_key(v) in by_key for v in blk.variables)}
            nu = self.kl_clip_factor(blocks, raw, alpha)
            alpha, mu = alpha * nu, mu * nu
        if self.auto_learning_rate:
            self.learning_rate.assign(alpha)
        if self.auto_momentum:
            self._chosen_momentum.assign(mu)
        coefficients = [alpha, mu] + ([tf.constant(1.0)] if fallback else [])
        step["model_change"] = quadratic.quadratic_value(tf.stack(coefficients), gram, b, lam)
        return directions, alpha if self.auto_learning_rate else self.learning_rate

    def _halves_gradient_term(self, batch, raw: dict, directions: dict) -> tf.Tensor:
        """−Σ_blocks s g₁ᵀK⁻¹g₂ (see `quadratic_gradient`): the batch's ∇ᵀΔ without its noise.

        g₁, g₂ are the gradients of the two halves of the batch, K⁻¹ a block's damped inverse and
        s = ‖U‖ / ‖K⁻¹g‖ the scale the graft gave the block's direction U (1 without a graft)."""
        first, second = batch.half_gradients()
        keys = [self._var_key(v) for v in batch.variables]
        by_key = lambda grads: {k: g for k, g in zip(keys, grads) if g is not None}  # noqa: E731
        full = {k: g for k, g in raw.items() if g is not None}
        present = [b for b in self.blocks if all(self._var_key(v) in directions for v in b.variables)]
        unscaled = self._directions_phase(full)
        first_dirs = self._directions_phase(by_key(first))
        second_by_key = by_key(second)
        total = tf.constant(0.0)
        for block in present:
            if block not in unscaled or block not in first_dirs:
                continue
            keys_b = [self._var_key(v) for v in block.variables]
            grafted = tf.add_n([tf.reduce_sum(tf.square(directions[k])) for k in keys_b])
            plain = tf.add_n([tf.reduce_sum(tf.square(tf.cast(u, tf.float32))) for u in unscaled[block]])
            scale = tf.sqrt(grafted / tf.maximum(plain, 1e-30))
            cross = tf.add_n(
                [
                    tf.reduce_sum(tf.cast(u, tf.float32) * tf.cast(second_by_key[k], tf.float32))
                    for k, u in zip(keys_b, first_dirs[block])
                ]
            )
            total += scale * cross
        return -total

    def _adapt_damping_phase(self) -> None:
        """Levenberg–Marquardt: on damping steps, λ from ρ = (h(θ+δ) − h(θ)) / M(δ)."""
        step = self._state.step

        def adapt():
            rho = damping_lib.reduction_ratio(step["loss"], step["batch"].loss(), step["model_change"])
            self._rho.assign(rho)
            self._damping.assign(
                damping_lib.lm_update(self._damping, rho, self.damping_every, self.min_damping, self.max_damping)
            )
            return tf.constant(True)

        tf.cond(step["adapt_due"], adapt, lambda: tf.constant(False))

    # ------------------------------------------------------------------- saving
    def _variable_owner(self, variable) -> str:
        """'layer NAME' for the state of a block's layer, else the variable's path."""
        state = self._state
        for block in state.blocks:
            owned = list(block.state_variables)
            for v in block.variables:
                key = self._var_key(v)
                if key in state.velocity:
                    owned.append(state.velocity[key])
                if isinstance(state.graft, graft.AdamGraft) and key in state.graft.second_moments:
                    owned.append(state.graft.second_moments[key])
            if any(v is variable for v in owned):
                return f"layer '{block.name}'"
        return f"'{variable.path}'"

    def load_own_variables(self, store):
        """Restores the state saved by `save_own_variables` (`.keras`, `.weights.h5`,
        BackupAndRestore); a state saved for other layers or settings raises a ValueError
        naming the first layer that does not match (Keras would only warn and skip it)."""
        model = self._attached_model()
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
        elif self.damping_from_factors and int(self.iterations.numpy()) == 0:
            damping = None  # still to be chosen from the factors at the first step
        else:
            damping = float(self._damping.numpy())
        fallback = self.fallback
        if isinstance(fallback, keras.optimizers.Optimizer):
            fallback = keras.optimizers.serialize(fallback)
        exclude = self.exclude
        if callable(exclude):
            exclude = keras.saving.serialize_keras_object(exclude)
        elif isinstance(exclude, (tuple, set, frozenset)):
            exclude = sorted(exclude)
        config.update(
            {
                "momentum": self.momentum,
                "damping": damping,
                "stats_decay": self.stats_decay,
                "stats_every": self.stats_every,
                "inverse_every": self.inverse_every,
                "fisher": self.fisher,
                "damping_mode": self.damping_mode,
                # "auto" only while it still resolves to the same clip (a set rate ends "auto")
                "kl_clip": "auto" if self.kl_clip_from_rate and self.learning_rate_from_batch else self.kl_clip,
                "adapt_damping": self.adapt_damping,
                "graft": "auto" if self.graft_auto else self.graft,  # resolves alike from the rest
                "stats_batch_size": self.stats_batch_size,
                "curvature_batch_size": self.curvature_batch_size,
                "quadratic_gradient": self.quadratic_gradient,
                "stats_locations": self.stats_locations,
                "input_stats_batch_size": self.input_stats_batch_size,
                "fallback": fallback,
                "exclude": exclude,
                "max_factor_size": self.max_factor_size,
                "diagonal_fisher": self.diagonal_fisher,
                "weight_sharing": self.weight_sharing,
                "momentum_form": self.momentum_form,
                "polynomial_averaging": self.polynomial_averaging,
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
        elif self.learning_rate_from_batch:
            config["learning_rate"] = "auto"  # b lives in the learning-rate variable, saved and restored with it
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
        if isinstance(config.get("exclude"), dict):
            config["exclude"] = keras.saving.deserialize_keras_object(config["exclude"], custom_objects=custom_objects)
        return super().from_config(config, custom_objects=custom_objects)
