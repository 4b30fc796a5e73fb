"""What steps does a K-FAC configuration take?  Per-step trace on the seed task.

    python benchmarks/step_trace.py --configs "KFAC()" "KFAC(learning_rate=None, momentum=None, adapt_damping=True)"
                                    [--seed 0] [--batch-size 128] [--epochs 5] [--eval-every 100]
                                    [--data-dir DIR] [--out benchmarks/results/study/trace]

Trains the AlexNet-style CNN with each configuration (a `KFAC(...)` expression) from the same
initial weights and batches as `compare_optimizers.py` and records, at every step t, the loss of
the batch, the length of the step ‖θ_t − θ_{t−1}‖ (all trainable weights, Euclidean), and the
optimizer's own diagnostics as `fit` logs them after the step: the learning rate (the chosen α with
`learning_rate=None`), the damping λ, the chosen momentum μ and the reduction ratio ρ of the
Levenberg–Marquardt rule where they exist.  Test accuracy (all 10,000 images) every `--eval-every`
steps.  It prints, per configuration and window of steps, the medians of these and the drop of
the mean training loss over the window, and saves one JSON per configuration,
`<out>/b<batch>_s<seed>_<digest of the config>.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compare_optimizers as compare  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from kfac_study import optimizer_from  # noqa: E402

from keras_kfac.datasets import load_arrays  # noqa: E402

TRACED = ("learning_rate", "damping", "momentum", "rho")
WINDOWS = ((1, 300), (301, 600), (601, 1200), (1201, 1800), (1801, None))


class StepTrace(keras.callbacks.Callback):
    """Per-step loss, step length and optimizer diagnostics; test accuracy every `eval_every` steps."""

    def __init__(self, eval_every: int, last_step: int, images, labels):
        super().__init__()
        self.eval_every, self.last_step = eval_every, last_step
        self.images, self.labels = images, labels
        self.steps = {name: [] for name in ("loss", "step_length", *TRACED)}
        self.evals = []
        self._running = 0.0

    def on_train_begin(self, logs=None):
        self.predict = compare.class_predictor(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        self._running = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._before = [w.numpy() for w in self.model.trainable_variables]

    def on_train_batch_end(self, batch, logs=None):
        mean = float(logs["loss"])  # Keras' running mean over the epoch
        self.steps["loss"].append(compare.batch_loss(batch, mean, self._running))
        self._running = mean
        after = [w.numpy() for w in self.model.trainable_variables]
        length = np.sqrt(sum(float(np.sum((a - b).astype(np.float64) ** 2)) for a, b in zip(after, self._before)))
        self.steps["step_length"].append(length)
        for name in TRACED:
            self.steps[name].append(float(logs[name]) if name in logs else None)
        step = len(self.steps["loss"])
        if step % self.eval_every == 0 or step == self.last_step:
            share = compare.accuracy(self.predict, self.images, self.labels, batch=1000)
            self.evals.append({"step": step, "accuracy": share})


def window_rows(run: dict) -> list[str]:
    """Markdown rows: per window, medians of the traced values and the drop of the mean loss."""
    rows = []
    losses = np.asarray(run["steps"]["loss"])
    for first, last in WINDOWS:
        last = min(last or len(losses), len(losses))
        if first > last:
            continue
        span = slice(first - 1, last)
        cells = []
        for name in ("step_length", *TRACED):
            values = [v for v in run["steps"][name][span] if v is not None]
            cells.append(f"{np.median(values):.3g}" if values else "–")
        head, tail = losses[span][:50].mean(), losses[span][-50:].mean()
        rows.append(f"| `{run['config']}` | {first}–{last} | " + " | ".join(cells) + f" | {head:.3f} → {tail:.3f} |")
    return rows


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["KFAC()"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/study/trace")
    args = parser.parse_args(argv)
    (x, y), (x_test, y_test) = load_arrays("fashion_mnist", args.data_dir)
    images = tf.constant(x_test.astype("float32") / 255.0)
    weights = compare.initial_weights(args.seed)
    last_step = args.epochs * (len(y) // args.batch_size)
    os.makedirs(args.out, exist_ok=True)
    runs = []
    for config in args.configs:
        keras.utils.set_random_seed(args.seed)
        model = compare.alexnet()
        model.set_weights(weights)
        model.compile(optimizer=optimizer_from(config), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        trace = StepTrace(args.eval_every, last_step, images, y_test)
        model.fit(compare.batches(x, y, args.batch_size, args.seed), epochs=args.epochs, verbose=0, callbacks=[trace])
        run = {
            "config": config,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "steps": trace.steps,
            "evals": trace.evals,
            "source_digest": compare.source_digest(),
        }
        key = hashlib.sha1(config.encode()).hexdigest()[:10]
        with open(os.path.join(args.out, f"b{args.batch_size}_s{args.seed}_{key}.json"), "w") as f:
            json.dump(run, f)
        runs.append(run)
        print(f"{config}: " + ", ".join(f"{e['step']}: {e['accuracy']:.4f}" for e in trace.evals), flush=True)
    print("| configuration | steps | ‖Δθ‖ | " + " | ".join(TRACED) + " | train loss, first → last 50 |")
    print("|" + "---|" * (len(TRACED) + 4))
    for run in runs:
        print("\n".join(window_rows(run)))
    return runs


if __name__ == "__main__":
    main()
