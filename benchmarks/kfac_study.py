"""One-seed study of K-FAC's settings on the seed task (AlexNet-style CNN, Fashion-MNIST).

    python benchmarks/kfac_study.py --configs "KFAC()" "KFAC(damping=1e-6)" [--batch-size 128]
                                    [--epochs 5] [--seed 0] [--out benchmarks/results/study]

Each configuration is a `KFAC(...)` expression (or "adam" for Adam(1e-3)) trained from the same
initial weights on the same batches as `compare_optimizers.py` (seed 0 by default).  Test accuracy
on all 10,000 images is taken every `--eval-every` steps.  Each run is saved as
`<out>/b<batch>_<digest>.json` (a rerun of the same expression on unchanged sources is skipped),
and the table printed at the end gives, per configuration: test accuracy at steps 100, 250, 500,
1000 and at the end, the mean training loss of the last 100 steps, and the mean step time
(the first step, tracing and compilation, left out).
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

import keras_kfac  # noqa: E402
from keras_kfac.datasets import load_arrays  # noqa: E402

CHECKS = (100, 250, 500, 1000)


def optimizer_from(expression: str):
    if expression == "adam":
        return keras.optimizers.Adam(1e-3)
    namespace = {"KFAC": keras_kfac.KFAC, "keras": keras}
    return eval(expression, namespace)  # a KFAC(...) or keras.optimizers.X(...) expression


def run_one(expression, weights, train_arrays, eval_data, batch_size, seed, epochs, eval_every):
    """`compare_optimizers.train` with the optimizer of `expression`, labelled by it."""
    run = compare.train(
        expression,
        {},
        weights,
        train_arrays,
        batch_size,
        seed,
        epochs,
        eval_every,
        eval_data,
        make=lambda expr, _settings, _total_steps: optimizer_from(expr),
    )
    return run | {"expression": expression, "batch_size": batch_size, "epochs": epochs}


def row(run: dict) -> str:
    by_step = {e["step"]: e["accuracy"] for e in run["evals"]}
    checks = [f"{by_step[s]:.4f}" if s in by_step else "–" for s in CHECKS]
    final = run["evals"][-1]["accuracy"]
    loss = float(np.mean(run["losses"][-100:]))
    step_ms = 1000 * float(np.median(run["step_seconds"][1:]))
    return f"| `{run['expression']}` | " + " | ".join(checks) + f" | {final:.4f} | {loss:.4f} | {step_ms:.0f} |"


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["KFAC()"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/study")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    (x, y), (xt, yt) = load_arrays("fashion_mnist", args.data_dir)
    eval_data = (tf.constant(xt.astype("float32") / 255.0), yt)
    weights = compare.initial_weights(args.seed)
    runs = []
    for expression in args.configs:
        key = hashlib.sha1(f"{expression}|{args.seed}|{args.epochs}".encode()).hexdigest()[:10]
        path = os.path.join(args.out, f"b{args.batch_size}_{key}.json")
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved["source_digest"] == compare.source_digest():
                runs.append(saved)
                print(row(saved), "(saved)", flush=True)
                continue
        run = run_one(expression, weights, (x, y), eval_data, args.batch_size, args.seed, args.epochs, args.eval_every)
        with open(path, "w") as f:
            json.dump(run, f)
        runs.append(run)
        print(row(run), flush=True)
    checks = " | ".join(f"acc@{s}" for s in CHECKS)
    print(f"| configuration | {checks} | final acc | loss (last 100) | step ms |")
    print("|" + "---|" * (len(CHECKS) + 4))
    for run in runs:
        print(row(run))
    return runs


if __name__ == "__main__":
    main()
