"""Train a small Vision Transformer on Fashion-MNIST with K-FAC (default), AdamW, Adam or Muon.

    python examples/vit_fashion_mnist.py [--optimizer kfac|adamw|adam|muon] [--epochs 5]
                                         [--batch-size 128] [--weight-sharing expand|reduce]
                                         [--depth 4] [--data-dir DIR] [--seed 0] [--tensorboard DIR]

The model is `keras_kfac.models.vit()`: 4x4 patches (a strided Conv2D), a learned position
Embedding, four pre-LN Transformer blocks (MultiHeadAttention, gelu MLP) of width 64, mean
pooling and a softmax head, 138,890 parameters, all of them under K-FAC curvature blocks
(`model.kfac_summary()` is printed).  K-FAC runs with `keras_kfac.KFAC()` and no arguments
but `--weight-sharing`: how the layers applied to every token (the attention projections and
the MLP) treat the shared positions, "expand" (every token a row of the factors; the package
default, chosen by `benchmarks/vit.py`) or "reduce" (per image, inputs averaged and output
gradients summed over the tokens).
The first-order optimizers take a constant learning rate of 1e-3 (Keras' default; not tuned:
`benchmarks/vit.py` sweeps them); Muon leaves the softmax head to its AdamW step, as Keras advises.
The data come from tensorflow-datasets when it can download, else from the official IDX files
(see `keras_kfac.datasets`).
"""

from __future__ import annotations

import argparse

import quiet_tensorflow  # noqa: F401  (before TensorFlow: drops its start-up INFO lines, keeps errors)

# isort: split
import keras
from fashion_mnist import add_training_arguments, positive_int, train_and_evaluate  # the sibling example's

import keras_kfac
from keras_kfac.models import vit

OPTIMIZERS = ("kfac", "adamw", "adam", "muon")
LEARNING_RATE = 1e-3  # the first-order optimizers' (Keras' default)


def make_optimizer(name: str, weight_sharing: str | None = None) -> keras.optimizers.Optimizer:
    """`KFAC()` (with `weight_sharing` when given) or a first-order optimizer at 1e-3."""
    if name == "kfac":
        return keras_kfac.KFAC(weight_sharing=weight_sharing)
    if name == "adamw":
        return keras.optimizers.AdamW(LEARNING_RATE)
    if name == "adam":
        return keras.optimizers.Adam(LEARNING_RATE)
    if name == "muon":
        return keras.optimizers.Muon(LEARNING_RATE, exclude_layers=["predictions"])
    raise ValueError(f"unknown optimizer {name!r}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="kfac")
    parser.add_argument(
        "--weight-sharing",
        choices=["expand", "reduce"],
        default=None,
        help="K-FAC only: KFAC-expand (the package default) or KFAC-reduce for the layers applied to every token",
    )
    parser.add_argument("--depth", type=positive_int, default=4, help="Transformer blocks (4: the benchmarked model)")
    add_training_arguments(parser)
    args = parser.parse_args(argv)
    if args.weight_sharing is not None and args.optimizer != "kfac":
        parser.error(f"--weight-sharing applies to --optimizer kfac only, not {args.optimizer}")
    label = args.optimizer + (f", {args.weight_sharing}" if args.weight_sharing else "")
    optimizer = make_optimizer(args.optimizer, args.weight_sharing)
    return train_and_evaluate(lambda: vit(depth=args.depth), optimizer, args, label)


if __name__ == "__main__":
    main()
