"""Train the AlexNet-style CNN on Fashion-MNIST with K-FAC (default), Adam or SGD.

    python examples/fashion_mnist.py [--optimizer kfac|adam|sgd] [--epochs 5] [--batch-size 128]
                                     [--data-dir DIR] [--seed 0] [--tensorboard DIR]

K-FAC runs with `keras_kfac.KFAC()` and no arguments: the package defaults are the settings
that `benchmarks/compare_optimizers.py` found best for this model.  Adam and SGD (momentum 0.9)
use the learning rates that the same sweep chose.  The data come from tensorflow-datasets when
it can download, else from the official IDX files (see `keras_kfac.datasets`).  With
`--tensorboard DIR` the fit logs (loss, accuracy and K-FAC's learning_rate, damping and
skipped_steps) are written for `tensorboard --logdir DIR`.
"""

from __future__ import annotations

import argparse

import quiet_tensorflow  # noqa: F401  (before TensorFlow: drops its start-up INFO lines, keeps errors)

# isort: split
import keras

import keras_kfac
from keras_kfac.datasets import fashion_mnist
from keras_kfac.models import alexnet

# Learning rates chosen by the validation sweep of benchmarks/compare_optimizers.py (batch 128).
ADAM_LEARNING_RATE = 3e-3
SGD_LEARNING_RATE = 0.03


def make_optimizer(name: str) -> keras.optimizers.Optimizer:
    if name == "kfac":
        return keras_kfac.KFAC()
    if name == "adam":
        return keras.optimizers.Adam(ADAM_LEARNING_RATE)
    if name == "sgd":
        return keras.optimizers.SGD(SGD_LEARNING_RATE, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}")


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (`--epochs 0`, `--epochs -1`, `--batch-size -5` are errors)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), got {value}")
    return value


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every Fashion-MNIST example shares (epochs, batch size, data, seed, logging)."""
    parser.add_argument("--epochs", type=positive_int, default=5)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--data-dir", default=None, help="folder with the four official IDX .gz files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--steps-per-epoch", type=positive_int, default=None, help="shorten each epoch (for smoke tests)"
    )
    parser.add_argument("--test-examples", type=positive_int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--verbose", type=int, default=1, help="Keras fit verbosity (1: progress bar)")
    parser.add_argument("--tensorboard", metavar="DIR", default=None, help="write TensorBoard logs to DIR")


def train_and_evaluate(build_model, optimizer: keras.optimizers.Optimizer, args, label: str) -> dict:
    """Seeds, builds the model with `build_model()`, fits it on Fashion-MNIST as `args` say and
    prints (and returns) the test loss and accuracy."""
    keras.utils.set_random_seed(args.seed)
    train, test = fashion_mnist(args.batch_size, data_dir=args.data_dir, shuffle_seed=args.seed)
    if args.test_examples:
        test = test.unbatch().take(args.test_examples).batch(args.batch_size)
    model = build_model()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    if isinstance(optimizer, keras_kfac.KFAC):
        model.kfac_summary()
    callbacks = [keras.callbacks.TensorBoard(args.tensorboard)] if args.tensorboard else []
    # One iterator over a repeated pipeline for the whole fit (each pass is reshuffled and ends
    # with its partial batch of 60000 % batch_size images): on a finite dataset Keras starts a new
    # iterator every epoch, and freeing the previous one held the first step of later epochs for
    # 9-39 s on 2 loaded CPU cores.
    history = model.fit(
        train.repeat(),
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch or int(train.cardinality()),
        verbose=args.verbose,
        callbacks=callbacks,
        shuffle=False,  # the pipeline itself reshuffles every epoch; Keras would warn that it ignores shuffle=True
    )
    loss, accuracy = model.evaluate(test, verbose=0)
    print(f"test loss {loss:.4f}, test accuracy {accuracy:.4f} ({label}, {args.epochs} epochs)")
    return {"test_loss": loss, "test_accuracy": accuracy, "history": history.history}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=["kfac", "adam", "sgd"], default="kfac")
    add_training_arguments(parser)
    args = parser.parse_args(argv)
    return train_and_evaluate(alexnet, make_optimizer(args.optimizer), args, args.optimizer)


if __name__ == "__main__":
    main()
