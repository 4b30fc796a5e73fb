"""The ViT example end to end for a few K-FAC steps, on a tiny synthetic stand-in for Fashion-MNIST."""

import importlib.util
import math
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))  # for `import quiet_tensorflow`, `fashion_mnist`
    spec = importlib.util.spec_from_file_location(
        "vit_fashion_mnist_example", os.path.join(ROOT, "examples", "vit_fashion_mnist.py")
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def _synthetic(batch_size, data_dir=None, shuffle_seed=None):
    """(train, test) pipelines shaped like `keras_kfac.datasets.fashion_mnist`'s: 4 batches and 1."""
    rng = np.random.default_rng(0)
    x = rng.random((5 * batch_size, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, size=5 * batch_size)
    train = tf.data.Dataset.from_tensor_slices((x[: 4 * batch_size], y[: 4 * batch_size])).batch(batch_size)
    test = tf.data.Dataset.from_tensor_slices((x[4 * batch_size :], y[4 * batch_size :])).batch(batch_size)
    return train, test


def test_vit_example_trains_with_kfac_reduce(monkeypatch, capsys):
    example = _example(monkeypatch)
    # The data are loaded by the sibling example's train_and_evaluate, which the ViT example reuses.
    monkeypatch.setattr(sys.modules["fashion_mnist"], "fashion_mnist", _synthetic)
    # One Transformer block instead of four keeps the tracing of the K-FAC step short.
    args = ["--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "32", "--depth", "1", "--verbose", "0"]
    # Not the package default (KFAC-expand): the option must reach the blocks.
    result = example.main(args + ["--weight-sharing", "reduce"])
    out = capsys.readouterr().out
    assert "KFAC-reduce" in out and "KFAC-expand" not in out  # the summary names the weight sharing
    assert "Trainable parameters under curvature blocks: 38,474 of 38,474 (100.0%)" in out
    assert "(kfac, reduce, 2 epochs)" in out
    assert len(result["history"]["loss"]) == 2
    assert all(math.isfinite(v) for v in result["history"]["loss"])
    assert result["history"]["skipped_steps"][-1] == 0
    assert 0.0 <= result["test_accuracy"] <= 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optimizer", "adamw", "--weight-sharing", "reduce"], "--weight-sharing applies to --optimizer kfac"),
        (["--epochs", "0"], "positive integer"),
        (["--batch-size", "-5"], "positive integer"),
        (["--optimizer", "sgd"], "invalid choice"),
        (["--weight-sharing", "full"], "invalid choice"),
    ],
)
def test_vit_example_argument_checks(monkeypatch, capsys, args, message):
    example = _example(monkeypatch)
    with pytest.raises(SystemExit):
        example.main(args)
    assert message in capsys.readouterr().err


def test_vit_example_first_order_optimizers(monkeypatch):
    example = _example(monkeypatch)
    import keras

    names = {name: type(example.make_optimizer(name)).__name__ for name in ("adamw", "adam", "muon")}
    assert names == {"adamw": "AdamW", "adam": "Adam", "muon": "Muon"}
    assert example.make_optimizer("kfac", "expand").weight_sharing == "expand"
    assert isinstance(example.make_optimizer("kfac"), keras.optimizers.Optimizer)
