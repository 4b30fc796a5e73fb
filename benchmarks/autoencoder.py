"""MNIST deep autoencoder (Martens & Grosse 2015, section 13): K-FAC block-diagonal and
block-tridiagonal against Adam and SGD-momentum.

    python benchmarks/autoencoder.py [--steps 3000] [--batch-size 1000] [--sweep-steps 300]
                                     [--seeds 0] [--data-dir DIR] [--out benchmarks/results]
                                     [--markdown BENCHMARKS.md] [--max-steps N --train-size N]
                                     [--kinds kfac_diagonal,adam,...] [--resume]

Model: `keras_kfac.models.deep_autoencoder()`, 784-1000-500-250-30-250-500-1000-784 with
logistic hidden units, a linear code layer and a sigmoid cross-entropy on the pixels
(`BinaryCrossentropy(from_logits=True)`: Keras averages over the 784 pixels; the table also
gives the per-image sum over pixels, the quantity the paper plots).  MNIST from
`keras_kfac.datasets.load_arrays("mnist", data_dir)` (tensorflow-datasets first, then the
official IDX files; `--data-dir` points at a folder holding them).

1. **Sweep** (seed 0): every candidate of `SWEEP` trains for `--sweep-steps` steps on the
   training images minus the last 10,000 and is scored by its reconstruction loss on those
   10,000; the best of each optimizer is kept (the test set is never looked at).
2. **Runs**: the kept settings train for `--steps` steps on all 60,000 training images, from the
   same initial weights and the same batches per seed.  The train loss of every step and the
   wall-clock of the training steps are recorded; the test loss at the end.

Writes `<out>/autoencoder.json` (after every run), plots of the train loss against steps and
against seconds (`<out>/autoencoder_loss_vs_steps.png`, `..._vs_seconds.png`) and a table
(steps and seconds to Adam's final train loss, final train and test loss, step time) into the
`--markdown` file between the markers `<!-- autoencoder:begin -->` / `<!-- autoencoder:end -->`
(appended when absent).  `--max-steps` (a smoke run) caps every run and the sweep and writes the
table to `<out>/autoencoder_smoke.md` instead of the markdown file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from compare_optimizers import (  # noqa: E402
    Recorder,
    run_sweep,
    saved_sweep_and_runs,
    smoothed,
    source_digest,
    training_seconds,
    window_for,
)

import keras_kfac  # noqa: E402
from keras_kfac.datasets import load_arrays  # noqa: E402
from keras_kfac.models import deep_autoencoder  # noqa: E402

VALIDATION_SIZE = 10000
PIXELS = 784
KINDS = ("kfac_tridiagonal", "kfac_diagonal", "kfac_adaptive", "adam", "sgd")
BEGIN, END = "<!-- autoencoder:begin -->", "<!-- autoencoder:end -->"

# K-FAC settings shared by both approximations (statistics from 256 examples: the factors are up
# to 1001x1001); the sweep varies the learning rate, the damping and the statistics interval.
# Keras averages the loss over the 784 pixels, which divides the Fisher and the gradient by 784:
# a damping λ here is 784·λ for the per-image sum of the paper.  The middle layers' G factors are
# tiny on that scale (their gradients pass through several sigmoids), so dampings of 1e-4 to 1e-5
# turn their blocks into scaled gradient steps that stay on the initial plateau (the mean image,
# loss 0.261) for hundreds of steps; 1e-8 and 1e-9 leave it (probe of 200 steps, 2026-11-28).
KFAC_BASE = {"stats_batch_size": 256}
KFAC_CANDIDATES = [
    {"learning_rate": 3e-3, "damping": 1e-8},
    {"learning_rate": 3e-3, "damping": 1e-9},
    {"learning_rate": 1e-3, "damping": 1e-9},
    {"learning_rate": 3e-3, "damping": 1e-8, "stats_every": 5, "inverse_every": 20},
]
SWEEP = {
    "kfac_tridiagonal": KFAC_CANDIDATES,
    "kfac_diagonal": KFAC_CANDIDATES,
    "adam": [{"learning_rate": lr} for lr in (1e-3, 3e-3, 1e-2)],
    "sgd": [{"learning_rate": lr} for lr in (1.0, 3.0, 10.0)],  # loss averaged over pixels: small gradients
    # "No tuning" (block-diagonal): automatic α, μ and Levenberg-Marquardt damping from the
    # paper's starting damping, 150 for the per-image sum, which is 150/784 for Keras' mean over
    # the pixels (see above); one candidate, so the sweep does not train it.
    "kfac_adaptive": [{"learning_rate": None, "momentum": None, "adapt_damping": True, "damping": 150.0 / PIXELS}],
}
COLORS = {
    "kfac_tridiagonal": "tab:red",
    "kfac_diagonal": "tab:orange",
    "kfac_adaptive": "tab:purple",
    "adam": "tab:blue",
    "sgd": "tab:green",
}


def make_optimizer(kind: str, settings: dict):
    if kind == "adam":
        return keras.optimizers.Adam(**settings)
    if kind == "sgd":
        return keras.optimizers.SGD(momentum=0.9, **settings)
    approximation = "block_tridiagonal" if kind == "kfac_tridiagonal" else "block_diagonal"
    return keras_kfac.KFAC(approximation=approximation, **{**KFAC_BASE, **settings})


def images(x: np.ndarray) -> np.ndarray:
    """(N, 28, 28, 1) uint8 -> (N, 784) float32 in [0, 1]."""
    return x.reshape(len(x), PIXELS).astype("float32") / 255.0


def batches(x: np.ndarray, batch_size: int, seed: int) -> tf.data.Dataset:
    """Shuffled (seeded, reshuffled each epoch) full batches of (image, image)."""
    ds = tf.data.Dataset.from_tensor_slices(x).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size, drop_remainder=True).map(lambda a: (a, a)).prefetch(tf.data.AUTOTUNE)


def train(kind, settings, weights, x, batch_size, seed, steps, eval_x=None):
    keras.utils.set_random_seed(seed)
    model = deep_autoencoder()
    model.set_weights(weights)
    model.compile(optimizer=make_optimizer(kind, settings), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    recorder = Recorder(eval_every=steps + 1, eval_data=None, max_steps=steps)
    epochs = -(-steps // (len(x) // batch_size))
    model.fit(batches(x, batch_size, seed), epochs=epochs, verbose=0, callbacks=[recorder])
    eval_loss = None if eval_x is None else float(model.evaluate(eval_x, eval_x, batch_size=1000, verbose=0))
    skipped = int(model.optimizer.skipped_steps.numpy()) if hasattr(model.optimizer, "skipped_steps") else 0
    return {
        "kind": kind,
        "settings": settings,
        "seed": seed,
        "losses": recorder.losses,
        "step_seconds": recorder.step_seconds,
        "eval_loss": eval_loss,
        "skipped_steps": skipped,
        "source_digest": source_digest(),
    }


def initial_weights(seed: int):
    keras.utils.set_random_seed(seed)
    return deep_autoencoder().get_weights()


def sweep(x: np.ndarray, batch_size: int, steps: int) -> dict:
    fit_x, val_x = x[:-VALIDATION_SIZE], x[-VALIDATION_SIZE:]
    weights = initial_weights(0)

    def score(kind, settings):
        run = train(kind, settings, weights, fit_x, batch_size, 0, steps, val_x)
        return run["eval_loss"], run["skipped_steps"]

    return run_sweep(SWEEP, score, "val_loss", minimize=True)


def summarize(runs: dict) -> dict:
    """Per optimizer, mean over seeds: steps/seconds to Adam's final (smoothed) train loss,
    final train and test loss, mean step time (first 5 steps excluded) and its ratio to Adam's."""
    adam_final = statistics.fmean(smoothed(r["losses"])[-1] for r in runs["adam"])
    adam_step = statistics.fmean(statistics.fmean(r["step_seconds"][5:] or r["step_seconds"]) for r in runs["adam"])
    table = {"_adam_final_loss": adam_final, "_adam_steps": len(runs["adam"][0]["losses"])}
    for kind, seeds in runs.items():
        steps, seconds = [], []
        for r in seeds:
            curve = smoothed(r["losses"])
            hit = np.nonzero(curve <= adam_final)[0]
            step = None if len(hit) == 0 else int(hit[0]) + window_for(len(r["losses"]))
            steps.append(step)
            seconds.append(None if step is None else training_seconds(r["step_seconds"], step))
        step_ms = 1e3 * statistics.fmean(statistics.fmean(r["step_seconds"][5:] or r["step_seconds"]) for r in seeds)
        table[kind] = {
            "steps_to_adam_final_loss": None if None in steps else statistics.fmean(steps),
            "seconds_to_adam_final_loss": None if None in seconds else statistics.fmean(seconds),
            "final_train_loss": statistics.fmean(smoothed(r["losses"])[-1] for r in seeds),
            "final_test_loss": statistics.fmean(r["eval_loss"] for r in seeds),
            "mean_step_ms": step_ms,
            "step_ratio_to_adam": step_ms / (1e3 * adam_step),
            "skipped_steps": sum(r["skipped_steps"] for r in seeds),
        }
    return table


def fmt(value, digits=0):
    return "—" if value is None else f"{value:.{digits}f}"


def table_markdown(table: dict, chosen: dict, args, seeds) -> str:
    adam_final = table["_adam_final_loss"]
    quarter = table["_adam_steps"] / 4
    lines = [
        f"Command: `python benchmarks/autoencoder.py {' '.join(sys.argv[1:])}` "
        f"({time.strftime('%Y-%m-%d %H:%M')}; seeds {', '.join(map(str, seeds))}; mean over seeds). "
        f"Batch {args.batch_size}, {table['_adam_steps']} steps per run; sweep of {args.sweep_steps} steps per "
        "candidate scored on 10,000 held-out training images. Loss: sigmoid cross-entropy, mean over pixels "
        f"(× {PIXELS} = per-image sum, as the paper reports), {50}-step moving average for the train loss.",
        "",
        f"| optimizer | settings | steps to Adam's final loss ({adam_final:.4f}) | s to it | ≤ ¼ of Adam's steps "
        "| final train loss | × 784 | final test loss | step ms | × Adam |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in (k for k in KINDS if k in table):
        r = table[kind]
        steps = r["steps_to_adam_final_loss"]
        reached = "—" if kind == "adam" else ("yes" if steps is not None and steps <= quarter else "no")
        lines.append(
            f"| {kind} | `{json.dumps(chosen[kind]['best'])}` | {fmt(steps)} | {fmt(r['seconds_to_adam_final_loss'])} "
            f"| {reached} | {r['final_train_loss']:.4f} | {r['final_train_loss'] * PIXELS:.1f} "
            f"| {r['final_test_loss']:.4f} | {r['mean_step_ms']:.0f} | {r['step_ratio_to_adam']:.2f} |"
        )
    return "\n".join(lines)


def plot(runs: dict, out: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, xlabel in (("steps", "step"), ("seconds", "training seconds")):
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
        for kind, seeds in runs.items():
            curves = [smoothed(r["losses"]) for r in seeds]
            n = min(len(c) for c in curves)
            window = window_for(len(seeds[0]["losses"]))
            steps = np.arange(n) + window
            if name == "steps":
                xs = steps
            else:
                xs = np.mean([[training_seconds(r["step_seconds"], s) for s in steps] for r in seeds], axis=0)
            ys = np.array([c[:n] for c in curves]) * PIXELS
            ax.plot(xs, ys.mean(axis=0), color=COLORS[kind], label=kind)
            if len(seeds) > 1:
                ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=COLORS[kind], alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("train loss per image (sum over pixels)")
        ax.set_title("MNIST deep autoencoder", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out, f"autoencoder_loss_vs_{name}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_markdown(path: str, text: str, plots: list) -> None:
    """Replaces (or appends) the autoencoder section of the markdown file."""
    root = os.path.dirname(os.path.abspath(path))
    figures = "\n".join(f"![{os.path.basename(p)}]({os.path.relpath(os.path.abspath(p), root)})" for p in plots)
    section = f"{BEGIN}\n## MNIST deep autoencoder (`benchmarks/autoencoder.py`)\n\n{text}\n\n{figures}\n{END}"
    old = open(path).read() if os.path.exists(path) else ""
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + section + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(new)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="steps per run (every optimizer)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--sweep-steps", type=int, default=300)
    parser.add_argument("--no-sweep", action="store_true", help="use the first candidate of each optimizer")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--markdown", default="BENCHMARKS.md")
    parser.add_argument("--max-steps", type=int, default=None, help="cap every run and the sweep (smoke runs)")
    parser.add_argument("--train-size", type=int, default=None, help="use the first N training images (smoke runs)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="optimizers to run (others keep their saved runs)")
    parser.add_argument(
        "--rerun-kinds",
        default=None,
        help="keep the saved sweep and other runs; train these again (an unswept one with its current settings)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the sweep and the finished runs saved in --out (same keras_kfac sources only)",
    )
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    (x_train, _), (x_test, _) = load_arrays("mnist", args.data_dir)
    x_train, x_test = images(x_train), images(x_test)
    if args.train_size:
        x_train = x_train[: args.train_size]
    steps, sweep_steps = args.steps, args.sweep_steps
    if args.max_steps:
        steps, sweep_steps = min(steps, args.max_steps), min(sweep_steps, args.max_steps)
    print(f"# autoencoder.py {' '.join(sys.argv[1:])} — {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    path = os.path.join(args.out, "autoencoder.json")
    rerun = args.rerun_kinds.split(",") if args.rerun_kinds else []
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen, saved_runs = saved_sweep_and_runs(path, SWEEP, args.resume, rerun, seeds)
    if chosen is None and args.no_sweep:
        chosen = {kind: {"best": candidates[0]} for kind, candidates in SWEEP.items()}
    elif chosen is None:
        chosen = sweep(x_train, args.batch_size, sweep_steps)
    runs = {kind: [] for kind in KINDS} | saved_runs
    record = {"argv": sys.argv[1:], "source_digest": source_digest(), "sweep": chosen, "runs": runs}
    for seed in seeds:
        weights = initial_weights(seed)
        for kind in KINDS:
            if kind not in (rerun or args.kinds.split(",")) or any(r["seed"] == seed for r in runs[kind]):
                continue
            run = train(kind, chosen[kind]["best"], weights, x_train, args.batch_size, seed, steps, x_test)
            runs[kind].append(run)
            step_ms = 1e3 * statistics.fmean(run["step_seconds"][5:] or run["step_seconds"])
            print(
                f"  seed {seed} {kind}: final train loss {smoothed(run['losses'])[-1]:.5f}, "
                f"test loss {run['eval_loss']:.5f}, {step_ms:.0f} ms/step",
                flush=True,
            )
            with open(path, "w") as f:
                json.dump(record, f)
    done_seeds = sorted(set.intersection(*({r["seed"] for r in done} for done in runs.values() if done)))
    runs = {kind: [r for r in done if r["seed"] in done_seeds] for kind, done in runs.items() if done}
    table = summarize(runs)
    text = table_markdown(table, chosen, args, done_seeds)
    plots = plot(runs, args.out)
    record["table"], record["table_markdown"], record["plots"] = table, text, plots
    with open(path, "w") as f:
        json.dump(record, f)
    print(text, flush=True)
    markdown = os.path.join(args.out, "autoencoder_smoke.md") if args.max_steps else args.markdown
    write_markdown(markdown, text, plots)


if __name__ == "__main__":
    main()
