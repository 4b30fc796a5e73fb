"""K-FAC against the first-order optimizers Keras ships, on Fashion-MNIST with the AlexNet-style CNN.

    python benchmarks/compare_optimizers.py [--batch-sizes 128,1024] [--epochs 5] [--seeds 0,1,2]
                                            [--kinds kfac,adam,...] [--sweep-steps 0] [--sweep-only]
                                            [--data-dir DIR] [--out benchmarks/results] [--resume]
                                            [--kfac-args "name=value, ..."]

Rows: `KFAC()` (the package defaults, not tuned here), `kfac_adaptive` (the "no tuning" automatic
step size, momentum and damping), and Adam, AdamW (Keras' weight decay 0.004), Muon (Keras':
Newton-Schulz orthogonalized momentum for the 2-D kernels fc1 and fc2, its AdamW step for the
convolutions, the biases and the softmax layer, which `exclude_layers` leaves to AdamW),
ScheduleFreeAdamW (`sf_adamw`, evaluated at its averaged point x, as its authors prescribe;
benchmarks/schedule_free.py, because Keras' own does not train under `fit` with TensorFlow) and
SGD with momentum 0.9.  For each batch size:

1. **Sweep** (seed 0) of the first-order optimizers: each of `LEARNING_RATES[kind]` (four or
   five rates over at least 30x), each constant and with a linear warm-up over the first 5% of the run
   followed by a cosine decay to zero ("cosine"; ScheduleFreeAdamW, which replaces schedules,
   takes the warm-up alone), trains on the training set minus its last 5,000 examples for
   `--sweep-steps` steps (default: `--epochs` epochs of it, so that a schedule is judged at the
   end of a run as long as the real one; a one-epoch sweep favoured large rates that end worse)
   and is scored by its accuracy on those 5,000 held-out examples; the test set is never looked
   at.  A schedule spans its own run (the sweep's steps there, the full run's afterwards).  The
   best candidate of each is kept.  K-FAC rows are not swept.  `--sweep-only` stops after the
   sweep (its scores do not depend on timings, so it may run on a busy machine; the timed runs
   should run alone).
2. **Runs**: every row trains on the full training set for `--epochs` epochs from the same
   initial weights (per seed) and the same batches.  Train loss every step, test accuracy
   `--evals-per-epoch` times an epoch (all 10,000 test images), wall-clock of the training steps
   alone (evaluation excluded).

It writes `<out>/compare_b<batch>.json` after every run (`--resume` keeps the sweep and the
finished runs when the run settings are unchanged; with other keras_kfac sources the K-FAC rows
named in `--kinds` are trained again, every other row is kept, and the table names the sources of
each row;
`--rerun-kinds a,b` trains those rows again; `--kfac-args` adds keyword arguments to every K-FAC
row, whose saved runs with other settings are then trained again), three PNG plots per batch size (train loss vs
steps, test accuracy vs steps and vs seconds; mean and min-max band over seeds) and prints a
table: steps and seconds to the **best first-order optimizer's** final test accuracy (mean over
seeds; "—" when a seed never gets there), final test accuracy, final train loss (50-step moving
average), mean step time and its ratio to Adam's.  `--max-steps N` (with a small
`--sweep-steps`) is a smoke run.  `benchmarks/vit.py` runs the same protocol on a ViT.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import json
import os
import statistics
import sys
import textwrap
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from schedule_free import ScheduleFreeAdamW  # noqa: E402

import keras_kfac  # noqa: E402
from keras_kfac.datasets import load_arrays  # noqa: E402
from keras_kfac.models import alexnet  # noqa: E402

VALIDATION_SIZE = 5000
EVAL_BATCH = 2000
SMOOTHING = 50  # steps in the moving average used to compare training losses

# Each first-order optimizer's grid: at least four rates over >= 30x around Keras' default, grown
# at the top while the best batch-1024 candidate sat there (Adam 3e-3, then 1e-2; ScheduleFreeAdamW
# 1e-2; SGD 0.1).
LEARNING_RATES = {
    "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "adamw": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "muon": (1e-3, 3e-3, 1e-2, 3e-2),
    "sf_adamw": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "sgd": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
}
SCHEDULES = ("constant", "cosine")
WARMUP_FRACTION = 0.05  # of a run's steps, before the cosine decay
# K-FAC rows, not swept: the package defaults, and the "no tuning" configuration (automatic step
# size and momentum, Levenberg-Marquardt damping starting from the largest block curvature).
KFAC_SETTINGS = {
    "kfac": {},
    "kfac_adaptive": {"learning_rate": None, "momentum": None, "adapt_damping": True},
}
FIRST_ORDER = tuple(LEARNING_RATES)
KINDS = (*KFAC_SETTINGS, *FIRST_ORDER)
COLORS = {
    "kfac": "tab:red",
    "kfac_adaptive": "tab:purple",
    "adam": "tab:blue",
    "adamw": "tab:cyan",
    "muon": "tab:green",
    "sf_adamw": "tab:olive",
    "sgd": "tab:gray",
}


def sweep_table(kfac_settings: dict, learning_rates: dict) -> dict:
    """kind -> candidate settings: every learning rate with each schedule for the first-order
    optimizers, the one setting of each K-FAC row (kept untrained)."""
    table = {kind: [settings] for kind, settings in kfac_settings.items()}
    for kind, rates in learning_rates.items():
        table[kind] = [{"learning_rate": lr, "schedule": s} for lr in rates for s in SCHEDULES]
    return table


def warmup_steps(total_steps: int) -> int:
    return max(1, round(WARMUP_FRACTION * total_steps))


def learning_rate(settings: dict, total_steps: int):
    """A constant rate, or linear warm-up over `WARMUP_FRACTION` of `total_steps` to it followed by a
    cosine decay to zero at `total_steps`."""
    rate = settings["learning_rate"]
    if settings.get("schedule", "constant") == "constant":
        return rate
    warmup = warmup_steps(total_steps)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, total_steps - warmup), warmup_target=rate, warmup_steps=warmup
    )


def make_optimizer(kind: str, settings: dict, total_steps: int) -> keras.optimizers.Optimizer:
    """The optimizer of a row: `KFAC(**settings)` for a K-FAC row (any kind starting "kfac"), else
    the first-order optimizer with its schedule over `total_steps`."""
    if kind.startswith("kfac"):
        return keras_kfac.KFAC(**settings)
    if kind == "sf_adamw":  # schedule-free: "cosine" means its own warm-up, no decay
        cosine = settings.get("schedule", "constant") != "constant"
        return ScheduleFreeAdamW(settings["learning_rate"], warmup_steps=warmup_steps(total_steps) if cosine else 0)
    rate = learning_rate(settings, total_steps)
    if kind == "adam":
        return keras.optimizers.Adam(rate)
    if kind == "adamw":
        return keras.optimizers.AdamW(rate)
    if kind == "muon":
        return keras.optimizers.Muon(rate, exclude_layers=["predictions"])
    if kind == "sgd":
        return keras.optimizers.SGD(rate, momentum=0.9)
    raise ValueError(f"unknown kind {kind!r}")


def label(kind: str, settings: dict) -> str:
    """Short description of a row's settings for the table."""
    if kind.startswith("kfac"):
        arguments = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        return f"KFAC({arguments})"
    return f"lr {settings['learning_rate']:g}, {settings.get('schedule', 'constant')}"


def batches(x, y, batch_size: int, seed: int) -> tf.data.Dataset:
    """Shuffled (seeded, reshuffled each epoch), scaled, full batches only."""
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=True).map(lambda a, b: (tf.cast(a, tf.float32) / 255.0, b))
    return ds.prefetch(tf.data.AUTOTUNE)


def training_seconds(step_seconds, step: int) -> float:
    """Training time up to `step`, without the first step (one-time tracing and compilation)."""
    return float(np.sum(step_seconds[1:step]))


@contextlib.contextmanager
def evaluation_point(model):
    """Inside: the weights a model is evaluated at.  For ScheduleFreeAdamW that is its averaged
    point x = (y − (1 − β₁) z) / β₁ (the model holds the interpolation y; z is the optimizer's
    "momentum" variable); for an optimizer that keeps an average of the weights (`use_ema`, which
    `KFAC(polynomial_averaging=η)` turns on) that average, which `fit` puts in place of the
    weights when it ends; for every other optimizer the weights as they are.  Yields whether the
    weights were replaced."""
    optimizer = getattr(model, "optimizer", None)
    pairs = []
    if optimizer is not None and optimizer.built and int(optimizer.iterations.numpy()) > 0:
        if getattr(optimizer, "use_ema", False):
            averages = zip(optimizer._trainable_variables, optimizer._model_variables_moving_average)
            pairs = [(variable, average.value) for variable, average in averages if average is not None]
        elif isinstance(optimizer, keras.optimizers.ScheduleFreeAdamW):
            beta_1 = float(optimizer.beta_1)
            for variable in model.trainable_variables:
                z = optimizer._momentums[optimizer._get_variable_index(variable)]
                pairs.append((variable, (variable.value - (1.0 - beta_1) * z.value) / beta_1))
    with weights_replaced(pairs):
        yield bool(pairs)


@contextlib.contextmanager
def weights_replaced(pairs):
    """Inside: each variable of the (variable, value) `pairs` holds its value; restored after."""
    saved = []
    for variable, value in pairs:
        saved.append((variable, variable.numpy()))
        variable.assign(value)
    try:
        yield
    finally:
        for variable, value in saved:
            variable.assign(value)


def keyword_arguments(text: str) -> dict:
    """{name: value} of keyword arguments written as in a call, "a=1, b='x'" (literals only): the
    --kfac-args of the K-FAC rows."""
    if not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        if call.args or any(k.arg is None for k in call.keywords):
            raise ValueError("only name=value pairs")
        return {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not name=value, ... with literal values ({error})") from None


def class_predictor(model) -> tf.types.experimental.GenericFunction:
    """A compiled images -> predicted class function of `model` (inference mode)."""
    return tf.function(lambda x: tf.argmax(model(x, training=False), axis=-1, output_type=tf.int32))


def accuracy(predict, images, labels, batch: int = EVAL_BATCH) -> float:
    """Share of `labels` that `predict` (from `class_predictor`) gets right, `batch` images at a time."""
    correct = sum(
        int(np.sum(predict(images[i : i + batch]).numpy() == labels[i : i + batch]))
        for i in range(0, len(labels), batch)
    )
    return correct / len(labels)


def batch_loss(batch: int, epoch_mean: float, previous_mean: float) -> float:
    """The loss of batch `batch` (0-based) of an epoch, from Keras' running means over the epoch
    after it (`epoch_mean`) and before it (`previous_mean`)."""
    return (batch + 1) * epoch_mean - batch * previous_mean


class Recorder(keras.callbacks.Callback):
    """Per-step train loss (recovered from Keras' running mean), step time, periodic evaluation
    (at `evaluation_point`; where that is an average, of the weights as well)."""

    def __init__(self, eval_every: int, eval_data, max_steps: int | None = None):
        super().__init__()
        self.eval_every = eval_every
        self.eval_data = eval_data
        self.max_steps = max_steps
        self.losses, self.step_seconds, self.evals = [], [], []
        self._predict = None
        self._running = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._running = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        mean = float(logs["loss"])  # forces the step to finish
        self.step_seconds.append(time.perf_counter() - self._start)
        self.losses.append(batch_loss(batch, mean, self._running))
        self._running = mean
        step = len(self.losses)
        if self.eval_data is not None and step % self.eval_every == 0:
            self.evaluate(step)
        if self.max_steps is not None and step >= self.max_steps:
            self.model.stop_training = True

    def evaluate(self, step):
        # A plain inference function over fixed tensors: cheaper than `model.evaluate`, which
        # also builds a data pipeline per call and resets the metrics `fit` is accumulating.
        if self._predict is None:
            self._predict = class_predictor(self.model)
        with evaluation_point(self.model) as replaced:
            share = accuracy(self._predict, *self.eval_data)
        entry = {"step": step, "seconds": training_seconds(self.step_seconds, step), "accuracy": share}
        if replaced:  # evaluated at an average: the weights themselves too (not in the tables)
            entry["weights_accuracy"] = accuracy(self._predict, *self.eval_data)
        self.evals.append(entry)


def train(
    kind,
    settings,
    weights,
    data,
    batch_size,
    seed,
    epochs,
    eval_every,
    eval_data,
    max_steps=None,
    build=alexnet,
    make=make_optimizer,
):
    """One run from `weights`: the model of `build()` with the optimizer `make(kind, settings,
    total_steps)` (the run's number of steps, which a schedule spans)."""
    keras.utils.set_random_seed(seed)
    model = build()
    model.set_weights(weights)
    total_steps = epochs * (len(data[1]) // batch_size)
    if max_steps:
        total_steps = min(total_steps, max_steps)
    optimizer = make(kind, settings, total_steps)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    recorder = Recorder(eval_every, eval_data, max_steps)
    x, y = data
    model.fit(batches(x, y, batch_size, seed), epochs=epochs, verbose=0, callbacks=[recorder])
    if eval_data is not None and (not recorder.evals or recorder.evals[-1]["step"] != len(recorder.losses)):
        recorder.evaluate(len(recorder.losses))
    skipped = int(model.optimizer.skipped_steps.numpy()) if hasattr(model.optimizer, "skipped_steps") else 0
    return {
        "kind": kind,
        "settings": settings,
        "seed": seed,
        "losses": recorder.losses,
        "step_seconds": recorder.step_seconds,
        "evals": recorder.evals,
        "skipped_steps": skipped,
        "source_digest": source_digest(),
    }


@functools.cache
def source_digest() -> str:
    """Digest of the keras_kfac sources at the first call: a resumed benchmark must run the
    same code."""
    import hashlib

    root = os.path.dirname(keras_kfac.__file__)
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    digest.update(name.encode() + f.read())
    return digest.hexdigest()[:16]


def load_saved(path: str, other_sources: bool = False):
    """The results saved at `path` (None when there are none), for --resume: refuses results
    written by other keras_kfac sources unless `other_sources` (--rerun-kinds), in which case
    every run keeps the digest of the sources that trained it."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    for done in saved["runs"].values():
        for run in done:
            run.setdefault("source_digest", saved.get("source_digest"))
    if saved.get("source_digest") != source_digest() and not other_sources:
        raise SystemExit(f"{path} was written by other keras_kfac sources; rerun without --resume.")
    return saved


def unswept(settings: dict) -> dict:
    """The sweep record of an optimizer with a single candidate (kept without training)."""
    return {"candidates": [{"settings": settings}], "best": settings}


def saved_sweep_and_runs(path: str, table: dict, resume: bool, rerun: list, seeds: list):
    """(sweep, runs) saved at `path` for --resume / --rerun-kinds, or (None, {}) without them:
    the runs of `seeds`, none for the kinds in `rerun`; an unswept kind in `rerun` takes its
    current settings from `table`."""
    saved = load_saved(path, other_sources=bool(rerun)) if resume or rerun else None
    if saved is None:
        return None, {}
    chosen = saved["sweep"]
    for kind in rerun:
        if len(table[kind]) == 1:
            chosen[kind] = unswept(table[kind][0])
    runs = {
        kind: [] if kind in rerun else [r for r in done if r["seed"] in seeds] for kind, done in saved["runs"].items()
    }
    return chosen, runs


def sources_note(runs: dict) -> str:
    """'' when one version of keras_kfac trained every run, else which rows came from which."""
    digests = {kind: sorted({r.get("source_digest") or "?" for r in done}) for kind, done in runs.items() if done}
    if len({d for ds in digests.values() for d in ds}) <= 1:
        return ""
    rows = "; ".join(f"{kind}: {', '.join(ds)}" for kind, ds in digests.items())
    return f"Rows trained by different keras_kfac sources (digest of keras_kfac/*.py): {rows}."


def initial_weights(seed: int, build=alexnet):
    keras.utils.set_random_seed(seed)
    return build().get_weights()


def run_sweep(table: dict, score, key: str, minimize: bool = False) -> dict:
    """Scores every candidate of `table` (kind -> list of settings) with `score(kind, settings)`
    -> (value, skipped steps) and keeps the best per kind; a lone candidate is kept untrained."""
    results = {}
    for kind, candidates in table.items():
        if len(candidates) == 1:
            results[kind] = unswept(candidates[0])
            continue
        scored = []
        for settings in candidates:
            value, skipped = score(kind, settings)
            scored.append({"settings": settings, key: value, "skipped_steps": skipped})
            print(f"  sweep {kind} {settings}: {key} {value:.5f}", flush=True)
        finite = [s for s in scored if np.isfinite(s[key])] or scored
        best = (min if minimize else max)(finite, key=lambda s: s[key])
        results[kind] = {"candidates": scored, "best": best["settings"]}
    return results


def candidate_key(kind: str, settings: dict) -> str:
    return f"{kind} {json.dumps(settings, sort_keys=True)}"


def sweep(
    table: dict, train_arrays, batch_size: int, steps: int, build=alexnet, scores: dict | None = None, on_score=None
) -> dict:
    """Validation sweep of `table` (seed 0): candidates train on the training set minus its last
    `VALIDATION_SIZE` examples and are scored by their accuracy there.  `scores` (candidate_key ->
    [accuracy, skipped steps]) holds candidates already scored, and gains each new one, after
    which `on_score()` is called (so that an interrupted sweep resumes where it stopped)."""
    x, y = train_arrays
    fit_data = (x[:-VALIDATION_SIZE], y[:-VALIDATION_SIZE])
    val = (tf.constant(x[-VALIDATION_SIZE:].astype("float32") / 255.0), y[-VALIDATION_SIZE:])
    weights = initial_weights(0, build)
    scores = {} if scores is None else scores

    def score(kind, settings):
        key = candidate_key(kind, settings)
        if key not in scores:
            run = train(kind, settings, weights, fit_data, batch_size, 0, 1000, steps, val, steps, build=build)
            scores[key] = [run["evals"][-1]["accuracy"], run["skipped_steps"]]
            if on_score is not None:
                on_score()
        return tuple(scores[key])

    return run_sweep(table, score, "val_accuracy")


def window_for(count: int) -> int:
    return max(1, min(SMOOTHING, count // 5))


def smoothed(values):
    """Moving average; entry i covers steps i+1 .. i+window."""
    values = np.asarray(values, dtype=np.float64)
    window = window_for(len(values))
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def first_step(curve_steps, curve_values, target):
    for step, value in zip(curve_steps, curve_values):
        if value >= target:
            return step
    return None


def mean_step_seconds(result: dict) -> float:
    """Mean step time without the first five steps (fewer in smoke runs)."""
    seconds = result["step_seconds"]
    return statistics.fmean(seconds[5:] or seconds[1:] or seconds)


def summarize(runs: dict, first_order=FIRST_ORDER, reference: str = "adam") -> dict:
    """Per kind: the table's entries, means over seeds (None when a seed never got there).  The
    target is the best final test accuracy among the `first_order` rows; step times are given
    as ratios to the `reference` row's."""
    finals = {kind: statistics.fmean(r["evals"][-1]["accuracy"] for r in results) for kind, results in runs.items()}
    candidates = [kind for kind in first_order if kind in runs]
    best = max(candidates, key=finals.get) if candidates else None
    target = finals[best] if best else None
    reference_step = statistics.fmean(map(mean_step_seconds, runs[reference])) if reference in runs else None
    table = {"_best_first_order": best, "_target_accuracy": target, "_reference": reference}
    for kind, results in runs.items():
        steps, seconds = [], []
        for r in results:
            evals = r["evals"]
            step = (
                None
                if target is None
                else first_step([e["step"] for e in evals], [e["accuracy"] for e in evals], target - 1e-9)
            )
            steps.append(step)
            seconds.append(None if step is None else next(e["seconds"] for e in evals if e["step"] == step))
        step_ms = 1e3 * statistics.fmean(map(mean_step_seconds, results))
        table[kind] = {
            "settings": results[0]["settings"],
            "steps_to_target": None if None in steps else statistics.fmean(steps),
            "seconds_to_target": None if None in seconds else statistics.fmean(seconds),
            "seeds_reaching_target": sum(s is not None for s in steps),
            "final_test_accuracy": finals[kind],
            "final_train_loss": statistics.fmean(smoothed(r["losses"])[-1] for r in results),
            "mean_step_ms": step_ms,
            "step_ratio": None if reference_step is None else step_ms / (1e3 * reference_step),
            "skipped_steps": sum(r["skipped_steps"] for r in results),
            "seeds": [r["seed"] for r in results],
        }
    return table


def markdown(title: str, table: dict, seeds: list, kinds=KINDS) -> str:
    """The table as markdown; `title` names the model and batch size."""
    best, target, reference = table["_best_first_order"], table["_target_accuracy"], table["_reference"]
    goal = f"{best}'s final acc. ({target:.4f})" if best else "best first-order final acc. (none run)"
    lines = [
        f"### {title} ({len(seeds)} seed(s): {', '.join(map(str, seeds))}; mean over seeds)",
        "",
        f"| optimizer | settings | steps to {goal} | s to it | final test acc. | final train loss "
        f"| step ms | x {reference} |",
        "|---|" + "---|" * 7,
    ]
    for kind in (k for k in kinds if k in table):
        r = table[kind]
        reached = (
            "" if r["seeds_reaching_target"] in (0, len(r["seeds"])) else f" ({r['seeds_reaching_target']} reach it)"
        )
        lines.append(
            f"| {kind} | {label(kind, r['settings'])} | {fmt(r['steps_to_target'])}{reached} "
            f"| {fmt(r['seconds_to_target'])} | {r['final_test_accuracy']:.4f} | {r['final_train_loss']:.4f} "
            f"| {r['mean_step_ms']:.1f} | {fmt(r['step_ratio'], 2)} |"
        )
    return "\n".join(lines)


def fmt(value, digits=0):
    if value is None:
        return "—"
    return f"{value:.{digits}f}"


def plot(
    batch_size: int,
    runs: dict,
    out: str,
    colors: dict | None = None,
    title: str = "AlexNet-style CNN",
    prefix: str = "",
    accuracy_range: tuple = (0.7, 0.95),
) -> list:
    """Three PNGs in `out` (`<prefix>b<batch>_<panel>.png`): mean and min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    colors = colors or COLORS
    panels = [
        ("train_loss_vs_steps", "step", "train loss (50-step moving average)"),
        ("test_accuracy_vs_steps", "step", "test accuracy"),
        ("test_accuracy_vs_seconds", "training seconds", "test accuracy"),
    ]
    for name, xlabel, ylabel in panels:
        fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
        for kind, seeds in runs.items():
            if name == "train_loss_vs_steps":
                curves = [smoothed(r["losses"]) for r in seeds]
                n = min(len(c) for c in curves)
                xs = np.arange(n) + window_for(len(seeds[0]["losses"]))
                ys = np.array([c[:n] for c in curves])
            else:
                n = min(len(r["evals"]) for r in seeds)
                key = "step" if name.endswith("steps") else "seconds"
                xs = np.mean([[e[key] for e in r["evals"][:n]] for r in seeds], axis=0)
                ys = np.array([[e["accuracy"] for e in r["evals"][:n]] for r in seeds])
            ax.plot(xs, ys.mean(axis=0), color=colors[kind], label=kind)
            if len(seeds) > 1:
                ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=colors[kind], alpha=0.2)
        if name == "train_loss_vs_steps":
            ax.set_yscale("log")
        else:
            ax.set_ylim(*accuracy_range)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        # Long model names (the ViT's) wrap instead of running off the figure.
        ax.set_title(textwrap.fill(f"Fashion-MNIST, {title}, batch {batch_size}", 60), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out, f"{prefix}b{batch_size}_{name}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def complete_seeds(runs: dict) -> list:
    """Seeds finished by every kind that has runs."""
    done = [{r["seed"] for r in results} for results in runs.values() if results]
    return sorted(set.intersection(*done)) if done else []


def on_seeds(runs: dict, seeds, kinds) -> dict:
    """The runs of `kinds` on `seeds`, per kind."""
    return {kind: [r for r in runs[kind] if r["seed"] in seeds] for kind in kinds}


def finished(runs: dict) -> tuple[list, dict]:
    """(seeds every kind with runs has finished, those runs per kind)."""
    seeds = complete_seeds(runs)
    return seeds, on_seeds(runs, seeds, [kind for kind, done in runs.items() if done])


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """What a benchmark of this protocol varies: the model, its rows and their sweep."""

    name: str  # file prefix: <out>/<name>_b<batch>.json and <name>_b<batch>_<panel>.png
    title: str  # model name in titles
    build: object  # () -> a keras_kfac model
    kinds: tuple
    first_order: tuple
    table: dict  # sweep_table(...)
    colors: dict
    reference: str  # the row step times are compared with
    accuracy_range: tuple = (0.7, 0.95)


def rows_on_most_seeds(runs: dict) -> tuple[list, dict]:
    """(the largest set of seeds some kind has finished, the runs on it of the kinds that
    finished every one of those seeds): the table to read when rows were run on different seeds."""
    done = {kind: {r["seed"] for r in results} for kind, results in runs.items() if results}
    if not done:
        return [], {}
    widest = max(done.values(), key=lambda seeds: (len(seeds), sorted(seeds)))
    return sorted(widest), on_seeds(runs, widest, [kind for kind, seeds in done.items() if widest <= seeds])


def table_text(title: str, table: dict, seeds: list, runs: dict, kinds) -> str:
    """`markdown(...)` of the table, with the note on sources when its rows come from several."""
    note = sources_note(runs)
    return markdown(title, table, seeds, kinds) + (f"\n\n{note}" if note else "")


def report(bench: Benchmark, batch_size: int, runs: dict, out: str) -> dict:
    """Prints the table of the finished runs and draws the plots; returns the table and more.
    When some rows have more seeds than every row shares, a second table gives the rows
    that have the most (the target is then the best first-order row among those)."""
    seeds, complete = finished(runs)
    table = summarize(complete, bench.first_order, bench.reference)
    title = f"{bench.title}, Fashion-MNIST, batch {batch_size}"
    text = table_text(title, table, seeds, complete, bench.kinds)
    more_seeds, rows = rows_on_most_seeds(runs)
    table_most_seeds = None
    if len(more_seeds) > len(seeds):
        table_most_seeds = summarize(rows, bench.first_order, bench.reference)
        title += ", only the rows run on every one of these seeds"
        text += "\n\n" + table_text(title, table_most_seeds, more_seeds, rows, bench.kinds)
    print(text, flush=True)
    plots = plot(
        batch_size,
        complete,
        out,
        colors=bench.colors,
        title=bench.title,
        prefix=f"{bench.name}_",
        accuracy_range=bench.accuracy_range,
    )
    return {"table": table, "table_most_seeds": table_most_seeds, "table_markdown": text, "plots": plots}


def save_results(
    bench: Benchmark,
    path: str,
    settings: dict,
    chosen: dict,
    runs: dict,
    batch_size: int,
    out: str,
    final: bool,
    scores: dict | None = None,
) -> dict:
    """Writes the sweep and the runs so far; the final call adds the table and the plots."""
    record = {"argv": sys.argv[1:], "source_digest": source_digest(), "settings": settings, "sweep": chosen}
    record["sweep_scores"] = scores if scores is not None else {}
    record["runs"] = runs
    if final:
        record |= report(bench, batch_size, runs, out)
    with open(path, "w") as f:
        json.dump(record, f)
    return record


def add_arguments(parser: argparse.ArgumentParser, bench: Benchmark, epochs: int) -> None:
    """The command-line options every benchmark of this protocol has."""
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--sweep-steps", type=int, default=0, help="steps per sweep candidate (0: as many epochs as a run)"
    )
    parser.add_argument("--sweep-only", action="store_true", help="stop after the sweep (saved for --resume)")
    parser.add_argument("--kinds", default=",".join(bench.kinds), help=f"rows to train, among {', '.join(bench.kinds)}")
    parser.add_argument("--rerun-kinds", default="", help="with --resume: train these rows again")
    parser.add_argument(
        "--kfac-args",
        type=keyword_arguments,
        default={},
        help="keyword arguments added to every K-FAC row's KFAC(...), such as stats_batch_size=128 (default: none)",
    )
    parser.add_argument("--evals-per-epoch", type=int, default=10, help="test-set evaluations per epoch")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each run early (smoke tests)")
    parser.add_argument(
        "--resume", action="store_true", help="keep the sweep and the finished runs saved in --out (same settings)"
    )
    parser.add_argument("--from-json", action="store_true", help="only re-print the table and plots saved in --out")


def row_settings(kind: str, chosen: dict, kfac_args: dict) -> dict:
    """The settings a row trains with: the sweep's choice, and for a K-FAC row `kfac_args` on top."""
    best = chosen[kind]["best"]
    return best | kfac_args if kind.startswith("kfac") else best


def resumed(path: str, settings: dict, rerun: list, kinds: list, kfac_args: dict) -> tuple[dict, dict, dict]:
    """(sweep, runs, sweep scores) saved at `path` with the same `settings`; runs of `rerun` kinds
    dropped, and those of the K-FAC rows among `kinds` (the rows to train) too when the keras_kfac
    sources changed or they trained with other settings than `row_settings(..., kfac_args)`. Rows
    not to be trained keep their runs (and the digest of their sources and their settings, which
    the report names); first-order rows are always kept."""
    if not os.path.exists(path):
        return {}, {}, {}
    with open(path) as f:
        saved = json.load(f)
    if saved.get("settings") != json.loads(json.dumps(settings)):
        raise SystemExit(f"{path} was written with other settings ({saved.get('settings')}); rerun without --resume.")
    runs = {}
    for kind, done in saved["runs"].items():
        for run in done:
            run.setdefault("source_digest", saved.get("source_digest"))
        stale = False
        if kind.startswith("kfac") and kind in kinds:
            if any(r["source_digest"] != source_digest() for r in done):
                stale = "are from other keras_kfac sources"
            elif any(r["settings"] != row_settings(kind, saved["sweep"], kfac_args) for r in done):
                stale = "trained with other settings"
        if stale:
            print(f"  {kind}: saved runs {stale}; training them again", flush=True)
        runs[kind] = [] if kind in rerun or stale else done
    return saved["sweep"], runs, saved.get("sweep_scores", {})


def run_benchmark(bench: Benchmark, args, batch_size: int) -> dict | None:
    """Sweep (or the saved one), then every row of `args.kinds` on every seed; returns the record."""
    kinds = args.kinds.split(",")
    unknown = sorted(set(kinds) - set(bench.kinds))
    if unknown:
        raise SystemExit(f"unknown kinds {unknown}; choose among {', '.join(bench.kinds)}")
    path = os.path.join(args.out, f"{bench.name}_b{batch_size}.json")
    if args.from_json:
        with open(path) as f:
            return report(bench, batch_size, json.load(f)["runs"], args.out)
    os.makedirs(args.out, exist_ok=True)
    (x_train, y_train), (x_test, y_test) = load_arrays("fashion_mnist", args.data_dir)
    test = (tf.constant(x_test.astype("float32") / 255.0), y_test)
    seeds = [int(s) for s in args.seeds.split(",")]
    steps_per_epoch = len(x_train) // batch_size
    sweep_steps = args.sweep_steps or args.epochs * ((len(x_train) - VALIDATION_SIZE) // batch_size)
    eval_every = max(1, steps_per_epoch // args.evals_per_epoch)
    if args.max_steps:
        eval_every = min(eval_every, max(1, args.max_steps // 3))
    # What a resumed benchmark must share with the saved one.
    settings = {
        "epochs": args.epochs,
        "batch_size": batch_size,
        "sweep_steps": sweep_steps,
        "max_steps": args.max_steps,
        "eval_every": eval_every,
        "sweep_table": bench.table,
    }
    print(
        f"# {bench.name} {' '.join(sys.argv[1:])}, batch {batch_size} — {time.strftime('%Y-%m-%d %H:%M')}", flush=True
    )
    rerun = [k for k in args.rerun_kinds.split(",") if k]
    chosen, saved_runs, scores = resumed(path, settings, rerun, kinds, args.kfac_args) if args.resume else ({}, {}, {})
    missing = {kind: bench.table[kind] for kind in kinds if kind not in chosen}
    runs = {kind: [] for kind in bench.kinds} | saved_runs

    def save(final=False):
        return save_results(bench, path, settings, chosen, runs, batch_size, args.out, final, scores)

    if missing:
        chosen |= sweep(missing, (x_train, y_train), batch_size, sweep_steps, bench.build, scores, save)
        save()
    if args.sweep_only:
        return None
    for seed in seeds:
        weights = initial_weights(seed, bench.build)
        for kind in kinds:
            if any(r["seed"] == seed for r in runs[kind]):
                continue
            settings_of_row = row_settings(kind, chosen, args.kfac_args)
            result = train(
                kind,
                settings_of_row,
                weights,
                (x_train, y_train),
                batch_size,
                seed,
                args.epochs,
                eval_every,
                test,
                max_steps=args.max_steps,
                build=bench.build,
            )
            runs[kind].append(result)
            print(
                f"  b{batch_size} seed {seed} {kind} ({label(kind, settings_of_row)}): final test accuracy "
                f"{result['evals'][-1]['accuracy']:.4f}, {1e3 * mean_step_seconds(result):.1f} ms/step",
                flush=True,
            )
            save()  # for --resume
    return save(final=True)


SEED_TASK = Benchmark(
    name="compare",
    title="AlexNet-style CNN",
    build=alexnet,
    kinds=KINDS,
    first_order=FIRST_ORDER,
    table=sweep_table(KFAC_SETTINGS, LEARNING_RATES),
    colors=COLORS,
    reference="adam",
)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="128,1024")
    add_arguments(parser, SEED_TASK, epochs=5)
    args = parser.parse_args(argv)
    return [run_benchmark(SEED_TASK, args, int(b)) for b in args.batch_sizes.split(",")]


if __name__ == "__main__":
    main()
