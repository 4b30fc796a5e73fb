"""K-FAC vs Adam vs SGD-momentum on Fashion-MNIST with the AlexNet-style CNN.

    python benchmarks/compare_optimizers.py [--batch-sizes 128,1024] [--epochs 5] [--seeds 0,1,2]
                                            [--sweep-steps 0] [--out benchmarks/results]

For each batch size:

1. **Sweep** (seed 0): every candidate of `SWEEP` trains on the training set minus its last
   5,000 examples for `--sweep-steps` steps (default: one epoch) and is scored by its accuracy
   on those 5,000 held-out examples; the test set is never looked at.  The best candidate of
   each optimizer is kept.
2. **Runs**: the kept settings train on the full training set for `--epochs` epochs from the
   same initial weights (per seed) and the same batches, once per seed.  Train loss is recorded
   every step, test accuracy every `eval_every` steps (on all 10,000 test images), and the
   wall-clock of the training steps alone (evaluation excluded).

It writes `<out>/compare_b<batch>.json` (after every run: `--resume` continues an interrupted
benchmark with the same sweep, provided the keras_kfac sources are unchanged; `--rerun-kinds
kfac_adaptive` trains that row again on the saved sweep and other rows, and the table then names
the sources of each row), three PNG plots
per batch size (train loss vs steps, test accuracy vs steps, test accuracy vs seconds; mean
and min–max band over seeds), and prints a table: steps and seconds to 85/88/90% test
accuracy, steps to Adam's final training loss, final test accuracy, mean step time and its
ratio to Adam's.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_kfac  # noqa: E402
from keras_kfac.datasets import load_arrays  # noqa: E402
from keras_kfac.models import alexnet  # noqa: E402

VALIDATION_SIZE = 5000
THRESHOLDS = (0.85, 0.88, 0.90)
EVAL_BATCH = 2000
SMOOTHING = 50  # steps in the moving average used to compare training losses

# Candidates per optimizer: name -> list of keyword dicts.  K-FAC's grid covers the levers the
# issue names (grafting, damping, statistics subsample and periods) around the prototype's
# best settings; the first Adam/SGD entries are Keras' usual defaults.
SWEEP = {
    "adam": [{"learning_rate": lr} for lr in (3e-4, 1e-3, 3e-3)],
    "sgd": [{"learning_rate": lr} for lr in (0.01, 0.03, 0.1)],
    "kfac": [
        {},  # the package defaults
        {"learning_rate": 3e-3},
        {"damping": 1e-3},
        {"stats_every": 5, "inverse_every": 20},
        {"stats_locations": 16},
    ],
    # "No tuning": the automatic step size and momentum with Levenberg-Marquardt damping from the
    # paper's starting damping.  One candidate, so the sweep does not train it.
    "kfac_adaptive": [{"learning_rate": None, "momentum": None, "adapt_damping": True, "damping": 150.0}],
}
KINDS = ("kfac", "kfac_adaptive", "adam", "sgd")


def make_optimizer(kind: str, settings: dict):
    if kind == "adam":
        return keras.optimizers.Adam(**settings)
    if kind == "sgd":
        return keras.optimizers.SGD(momentum=0.9, **settings)
    return keras_kfac.KFAC(**settings)


def batches(x, y, batch_size: int, seed: int) -> tf.data.Dataset:
    """Shuffled (seeded, reshuffled each epoch), scaled, full batches only."""
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=True).map(lambda a, b: (tf.cast(a, tf.float32) / 255.0, b))
    return ds.prefetch(tf.data.AUTOTUNE)


def training_seconds(step_seconds, step: int) -> float:
    """Training time up to `step`, without the first step (one-time tracing and compilation)."""
    return float(np.sum(step_seconds[1:step]))


class Recorder(keras.callbacks.Callback):
    """Per-step train loss (recovered from Keras' running mean), step time, periodic evaluation."""

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
        k = batch + 1
        self.losses.append(k * mean - (k - 1) * self._running)
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
            model = self.model
            self._predict = tf.function(lambda x: tf.argmax(model(x, training=False), axis=-1, output_type=tf.int32))
        images, labels = self.eval_data
        correct = sum(
            int(np.sum(self._predict(images[i : i + EVAL_BATCH]).numpy() == labels[i : i + EVAL_BATCH]))
            for i in range(0, len(labels), EVAL_BATCH)
        )
        accuracy = correct / len(labels)
        self.evals.append(
            {"step": step, "seconds": training_seconds(self.step_seconds, step), "accuracy": float(accuracy)}
        )


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
    """One run from `weights`: the model of `build()` with the optimizer `make(kind, settings)`
    (benchmarks/vit.py passes its own)."""
    keras.utils.set_random_seed(seed)
    model = build()
    model.set_weights(weights)
    model.compile(optimizer=make(kind, settings), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
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


def sweep(train_arrays, batch_size: int, steps: int) -> dict:
    (x, y) = train_arrays
    fit_data = (x[:-VALIDATION_SIZE], y[:-VALIDATION_SIZE])
    val = (tf.constant(x[-VALIDATION_SIZE:].astype("float32") / 255.0), y[-VALIDATION_SIZE:])
    weights = initial_weights(0)

    def score(kind, settings):
        run = train(kind, settings, weights, fit_data, batch_size, 0, 1000, steps, val, max_steps=steps)
        return run["evals"][-1]["accuracy"], run["skipped_steps"]

    return run_sweep(SWEEP, score, "val_accuracy")


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


def summarize(runs: dict) -> dict:
    """Per optimizer: mean over seeds of each table entry (None when a seed never got there)."""
    adam_final_loss = statistics.fmean(smoothed(r["losses"])[-1] for r in runs["adam"])
    best_adam_accuracy = statistics.fmean(r["evals"][-1]["accuracy"] for r in runs["adam"])
    adam_step = statistics.fmean(statistics.fmean(r["step_seconds"][5:]) for r in runs["adam"])
    table = {}
    for kind, seeds in runs.items():
        row = {}
        for threshold in (*THRESHOLDS, "adam_final"):
            target = best_adam_accuracy if threshold == "adam_final" else threshold
            steps, seconds = [], []
            for r in seeds:
                step = first_step([e["step"] for e in r["evals"]], [e["accuracy"] for e in r["evals"]], target - 1e-9)
                steps.append(step)
                seconds.append(None if step is None else next(e["seconds"] for e in r["evals"] if e["step"] == step))
            key = f"{threshold:.2f}" if threshold != "adam_final" else "adam_final_accuracy"
            row[f"steps_to_{key}"] = None if None in steps else statistics.fmean(steps)
            row[f"seconds_to_{key}"] = None if None in seconds else statistics.fmean(seconds)
        loss_steps = []
        for r in seeds:
            curve = smoothed(r["losses"])
            hit = np.nonzero(curve <= adam_final_loss)[0]
            loss_steps.append(None if len(hit) == 0 else int(hit[0]) + window_for(len(r["losses"])))
        row["steps_to_adam_final_loss"] = None if None in loss_steps else statistics.fmean(loss_steps)
        row["final_test_accuracy"] = statistics.fmean(r["evals"][-1]["accuracy"] for r in seeds)
        row["final_train_loss"] = statistics.fmean(smoothed(r["losses"])[-1] for r in seeds)
        row["mean_step_ms"] = 1e3 * statistics.fmean(statistics.fmean(r["step_seconds"][5:]) for r in seeds)
        row["step_ratio_to_adam"] = row["mean_step_ms"] / (1e3 * adam_step)
        row["skipped_steps"] = sum(r["skipped_steps"] for r in seeds)
        row["seeds"] = [r["seed"] for r in seeds]
        table[kind] = row
    table["_adam_final_accuracy"] = best_adam_accuracy
    table["_adam_final_loss"] = adam_final_loss
    return table


def fmt(value, digits=0):
    if value is None:
        return "—"
    return f"{value:.{digits}f}"


def print_table(batch_size: int, table: dict, seeds) -> str:
    lines = [
        f"### Batch {batch_size} ({len(seeds)} seed(s): {', '.join(map(str, seeds))}; mean over seeds"
        + "".join(
            f"; {kind}: seed(s) {', '.join(map(str, table[kind]['seeds']))}"
            for kind in KINDS
            if kind in table and table[kind]["seeds"] != list(seeds)
        )
        + ")",
        "",
        "| optimizer | steps to 85% | s to 85% | steps to 88% | s to 88% | steps to 90% | s to 90% "
        f"| steps to Adam's final acc. ({table['_adam_final_accuracy']:.4f}) | s to it "
        f"| steps to Adam's final loss ({table['_adam_final_loss']:.3f}) | final test acc. | step ms | x Adam |",
        "|---|" + "---|" * 12,
    ]
    for kind in (k for k in KINDS if k in table):
        r = table[kind]
        lines.append(
            f"| {kind} | {fmt(r['steps_to_0.85'])} | {fmt(r['seconds_to_0.85'])} | {fmt(r['steps_to_0.88'])} "
            f"| {fmt(r['seconds_to_0.88'])} | {fmt(r['steps_to_0.90'])} | {fmt(r['seconds_to_0.90'])} "
            f"| {fmt(r['steps_to_adam_final_accuracy'])} | {fmt(r['seconds_to_adam_final_accuracy'])} "
            f"| {fmt(r['steps_to_adam_final_loss'])} | {r['final_test_accuracy']:.4f} | {r['mean_step_ms']:.1f} "
            f"| {r['step_ratio_to_adam']:.2f} |"
        )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


COLORS = {"kfac": "tab:red", "kfac_adaptive": "tab:purple", "adam": "tab:blue", "sgd": "tab:green"}


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
        ax.set_title(f"Fashion-MNIST, {title}, batch {batch_size}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out, f"{prefix}b{batch_size}_{name}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


BASELINES = ("kfac", "adam", "sgd")


def complete_seeds(runs: dict) -> list:
    """Seeds that K-FAC, Adam and SGD have all finished (the adaptive row, which can be run on
    fewer seeds, uses its own runs among these and says how many)."""
    return sorted(set.intersection(*({r["seed"] for r in runs.get(kind, [])} for kind in BASELINES)))


def seeds_of(runs: dict) -> dict:
    return {kind: [r["seed"] for r in done] for kind, done in runs.items()}


def save_results(path: str, chosen: dict, runs: dict, batch_size: int, out: str, final: bool) -> None:
    """Writes the sweep and the runs so far; the final call adds the table and the plots."""
    record = {"argv": sys.argv[1:], "source_digest": source_digest(), "sweep": chosen, "runs": runs}
    if final:
        seeds = complete_seeds(runs)
        complete = {kind: [r for r in done if r["seed"] in seeds] for kind, done in runs.items() if done}
        table = summarize(complete)
        record["table"] = table
        record["table_markdown"] = print_table(batch_size, table, seeds)
        note = sources_note(complete)
        if note:
            print(note, flush=True)
            record["table_markdown"] += "\n\n" + note
        record["plots"] = plot(batch_size, complete, out)
    with open(path, "w") as f:
        json.dump(record, f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="128,1024")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sweep-steps", type=int, default=0, help="steps per sweep candidate (0: one epoch)")
    parser.add_argument("--no-sweep", action="store_true", help="use the first candidate of each optimizer")
    parser.add_argument("--kinds", default=",".join(KINDS), help="optimizers to run (others keep their saved runs)")
    parser.add_argument("--run-seeds", default=None, help="seeds to train now (default: all of --seeds)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each run early (smoke tests)")
    parser.add_argument("--from-json", action="store_true", help="only re-print the tables of the runs saved in --out")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the sweep and the finished runs saved in --out (same keras_kfac sources only)",
    )
    parser.add_argument(
        "--rerun-kinds",
        default=None,
        help="with the sweep and the other runs saved in --out (from any keras_kfac sources), drop the saved "
        "runs of these optimizers and train them again; the table names the sources of each row",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            with open(os.path.join(args.out, f"compare_b{batch_size}.json")) as f:
                saved = json.load(f)
            seeds = complete_seeds(saved["runs"])
            runs = {kind: [r for r in done if r["seed"] in seeds] for kind, done in saved["runs"].items() if done}
            for done in runs.values():
                for run in done:
                    for e in run["evals"]:
                        e["seconds"] = training_seconds(run["step_seconds"], e["step"])
            print_table(batch_size, summarize(runs), seeds)
            note = sources_note(runs)
            if note:
                print(note)
            plot(batch_size, runs, args.out)
        return
    os.makedirs(args.out, exist_ok=True)
    (x_train, y_train), (x_test, y_test) = load_arrays("fashion_mnist", args.data_dir)
    test = (tf.constant(x_test.astype("float32") / 255.0), y_test)
    seeds = [int(s) for s in args.seeds.split(",")]
    run_seeds = seeds if args.run_seeds is None else [int(s) for s in args.run_seeds.split(",")]
    print(f"# compare_optimizers.py {' '.join(sys.argv[1:])} — {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        steps_per_epoch = len(x_train) // batch_size
        eval_every = max(1, steps_per_epoch // 10)
        if args.max_steps:
            eval_every = min(eval_every, max(1, args.max_steps // 3))
        path = os.path.join(args.out, f"compare_b{batch_size}.json")
        rerun = args.rerun_kinds.split(",") if args.rerun_kinds else []
        chosen, saved_runs = saved_sweep_and_runs(path, SWEEP, args.resume, rerun, seeds)
        if chosen is None and args.no_sweep:
            chosen = {kind: {"best": candidates[0]} for kind, candidates in SWEEP.items()}
        elif chosen is None:
            sweep_steps = args.sweep_steps or (len(x_train) - VALIDATION_SIZE) // batch_size
            chosen = sweep((x_train, y_train), batch_size, sweep_steps)
        runs = {kind: [] for kind in KINDS} | saved_runs

        for seed in seeds:
            weights = initial_weights(seed)
            for kind in runs:
                if (
                    kind not in (rerun or args.kinds.split(","))
                    or seed not in run_seeds
                    or any(r["seed"] == seed for r in runs[kind])
                ):
                    continue
                run = train(
                    kind,
                    chosen[kind]["best"],
                    weights,
                    (x_train, y_train),
                    batch_size,
                    seed,
                    args.epochs,
                    eval_every,
                    test,
                    max_steps=args.max_steps,
                )
                runs[kind].append(run)
                print(
                    f"  b{batch_size} seed {seed} {kind}: final test accuracy {run['evals'][-1]['accuracy']:.4f}, "
                    f"{statistics.fmean(run['step_seconds'][5:]) * 1e3:.1f} ms/step",
                    flush=True,
                )
                # An interrupted benchmark resumes from here (--resume).
                save_results(path, chosen, runs, batch_size, args.out, final=False)
        save_results(path, chosen, runs, batch_size, args.out, final=True)


if __name__ == "__main__":
    main()
