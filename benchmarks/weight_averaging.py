"""Does averaging K-FAC's iterates reach the bar sooner?  A one-seed probe on the seed task.

    python benchmarks/weight_averaging.py --config "KFAC()" [--seed 0] [--batch-size 128]
                                          [--model alexnet|vit_p7] [--data-dir DIR]
                                          [--averages ema0.99,poly8,...]
                                          [--out benchmarks/results/study/averaging]

Trains the AlexNet-style CNN (or, with `--model vit_p7`, `benchmarks/vit.py`'s 7x7-patch ViT) with
the optimizer of `--config` (a `KFAC(...)` expression) from the same initial weights and batches
as `compare_optimizers.py` (and `vit.py`), and keeps, beside the weights w_t
themselves, running averages of them, named by `--averages` (default: `DEFAULT_AVERAGES`;
t counts steps from 1, every average starts at w_1):

    "ema<β>":  x ← x + (1 − β)(w_t − x)          (Keras' `use_ema` with `ema_momentum=β`)
    "poly<η>": x ← x + (η + 1)/(t + η) · (w_t − x)   (polynomial-decay averaging, Shamir & Zhang
               2013: weights ∝ roughly s^η over the steps s ≤ t, so the window grows with t)

Every `--eval-every` steps it measures test accuracy (all 10,000 images) of w_t ("raw") and of each
average, swapped in for the evaluation.  The evaluations make the step times meaningless, so none
are kept.  Output: one JSON per run, `<out>/[vit_p7_]b<batch>_s<seed>_<digest of the config>.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compare_optimizers as compare  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import vit as vit_benchmark  # noqa: E402
from kfac_study import optimizer_from  # noqa: E402

from keras_kfac.datasets import load_arrays  # noqa: E402

MODELS = {"alexnet": compare.alexnet, "vit_p7": vit_benchmark.builder(7)}


def parse_averages(names: str) -> dict:
    """{name: (kind, constant)} for comma-separated names such as "ema0.99,poly8"."""
    averages = {}
    for name in filter(None, (n.strip() for n in names.split(","))):
        match = re.fullmatch(r"(ema|poly)(\d+(?:\.\d*)?)", name)
        if match is None:
            raise ValueError(f"unknown average {name!r}: expected ema<β> or poly<η>, such as ema0.99 or poly8")
        averages[name] = (match.group(1), float(match.group(2)))
    return averages


DEFAULT_AVERAGES = "ema0.99,ema0.995,ema0.998,poly3,poly8"


def averaging_weight(kind: str, constant: float, step: int) -> float:
    """The weight of w_t in the update x ← x + r (w_t − x) at step t ≥ 1."""
    return 1.0 - constant if kind == "ema" else (constant + 1.0) / (step + constant)


class AveragedEvaluation(keras.callbacks.Callback):
    """Keeps the running `averages` ({name: (kind, constant)}) and evaluates them beside the raw weights."""

    def __init__(self, eval_every: int, last_step: int, images, labels, averages: dict):
        super().__init__()
        self.eval_every, self.last_step, self.average_kinds = eval_every, last_step, averages
        self.images, self.labels = images, labels
        self.evals, self.step = [], 0

    def on_train_begin(self, logs=None):
        model = self.model
        self.weights = model.trainable_variables
        self.averages = {name: [tf.Variable(w.value) for w in self.weights] for name in self.average_kinds}
        self.predict = compare.class_predictor(model)

    def accuracy(self) -> float:
        return compare.accuracy(self.predict, self.images, self.labels, batch=1000)

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        for name, (kind, constant) in self.average_kinds.items():
            rate = averaging_weight(kind, constant, self.step)
            for average, weight in zip(self.averages[name], self.weights):
                average.assign_add(rate * (weight.value - average))
        if self.step % self.eval_every and self.step != self.last_step:
            return
        record = {"step": self.step, "raw": self.accuracy()}
        if logs and "kl_clip_factor" in logs:  # the step's KL-clip factor ν (1: the clip did not bind)
            record["kl_clip_factor"] = round(float(logs["kl_clip_factor"]), 5)
        for name in self.average_kinds:
            with compare.weights_replaced(zip(self.weights, self.averages[name])):
                record[name] = self.accuracy()
        self.evals.append(record)
        print(json.dumps(record), flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="KFAC()")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--model", choices=sorted(MODELS), default="alexnet")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--averages", default=DEFAULT_AVERAGES, help="comma-separated ema<β> / poly<η> names")
    parser.add_argument("--out", default="benchmarks/results/study/averaging")
    args = parser.parse_args(argv)
    averages = parse_averages(args.averages)
    (x, y), (x_test, y_test) = load_arrays("fashion_mnist", args.data_dir)
    build = MODELS[args.model]
    weights = compare.initial_weights(args.seed, build)
    keras.utils.set_random_seed(args.seed)
    model = build()
    model.set_weights(weights)
    model.compile(optimizer=optimizer_from(args.config), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    last_step = args.epochs * (len(y) // args.batch_size)
    test_images = tf.constant(x_test.astype("float32") / 255.0)
    recorder = AveragedEvaluation(args.eval_every, last_step, test_images, y_test, averages)
    model.fit(compare.batches(x, y, args.batch_size, args.seed), epochs=args.epochs, verbose=0, callbacks=[recorder])
    run = {
        "config": args.config,
        "model": args.model,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "evals": recorder.evals,
        "source_digest": compare.source_digest(),
    }
    os.makedirs(args.out, exist_ok=True)
    key = hashlib.sha1(args.config.encode()).hexdigest()[:10]
    prefix = "" if args.model == "alexnet" else f"{args.model}_"
    with open(os.path.join(args.out, f"{prefix}b{args.batch_size}_s{args.seed}_{key}.json"), "w") as f:
        json.dump(run, f)
    return run


if __name__ == "__main__":
    main()
