"""End to end: the Fashion-MNIST example for a few dozen K-FAC steps on the real data."""

import glob
import importlib.util
import os

import pytest
import tensorflow as tf

from keras_kfac.datasets import DatasetNotFoundError, load_arrays

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data_dir():
    for candidate in (os.path.join(ROOT, "..", "shared", "data", "fashion_mnist"), "/usr/share/datasets/fashion-mnist"):
        if os.path.isdir(candidate):
            return candidate
    return None


def test_example_trains_on_a_slice_of_fashion_mnist(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_KFAC_NO_TFDS", "1")
    data_dir = _data_dir()
    try:
        load_arrays("fashion_mnist", data_dir)
    except DatasetNotFoundError as error:
        pytest.skip(f"Fashion-MNIST not found (install it with `apt-get install dataset-fashion-mnist`): {error}")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))  # for its `import quiet_tensorflow`
    spec = importlib.util.spec_from_file_location(
        "fashion_mnist_example", os.path.join(ROOT, "examples", "fashion_mnist.py")
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    board = tmp_path / "board"
    args = ["--epochs", "2", "--steps-per-epoch", "20", "--test-examples", "2000", "--verbose", "0"]
    args += ["--tensorboard", str(board)]
    if data_dir:
        args += ["--data-dir", data_dir]
    result = example.main(args)
    losses = result["history"]["loss"]
    assert losses[1] < losses[0]
    assert result["test_accuracy"] > 0.5  # chance is 0.1
    # --tensorboard DIR: K-FAC's diagnostics are among the logged scalars.
    tags = set()
    for path in glob.glob(str(board / "train" / "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            tags.update(v.tag for v in tf.compat.v1.Event.FromString(record.numpy()).summary.value)
    assert {"epoch_loss", "epoch_learning_rate", "epoch_damping", "epoch_skipped_steps"} <= tags
