"""keras_kfac.datasets: IDX parsing, the lookup order and its error, the real data sets when
present, and the tf.data pipelines."""

import gzip
import os
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from keras_kfac import datasets

REPO = Path(__file__).resolve().parents[1]
FILES = datasets.IDX_FILES


def _write_idx(path: Path, array: np.ndarray, magic: bytes | None = None, extra: bytes = b""):
    if magic is None:
        magic = bytes([0, 0, 0x08, array.ndim])
    header = magic + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes() + extra)


def _synthetic(folder: Path, n_train: int = 20, n_test: int = 7, seed: int = 0):
    """Writes the four IDX .gz files into `folder`; returns the arrays load_arrays should give."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    x_train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    y_train = rng.integers(0, 10, n_train, dtype=np.uint8)
    x_test = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    y_test = rng.integers(0, 10, n_test, dtype=np.uint8)
    for key, array in [
        ("train_images", x_train),
        ("train_labels", y_train),
        ("test_images", x_test),
        ("test_labels", y_test),
    ]:
        _write_idx(folder / FILES[key], array)
    return (x_train, y_train), (x_test, y_test)


@pytest.fixture
def offline_lookup(monkeypatch, tmp_path):
    """No tfds, no $KERAS_KFAC_DATA_DIR, an empty home and no Debian folder."""
    monkeypatch.setenv("KERAS_KFAC_NO_TFDS", "1")
    monkeypatch.delenv("KERAS_KFAC_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "no-debian"))
    return tmp_path


# ---------------------------------------------------------------------------------- loading


def test_load_from_data_dir_returns_the_written_arrays(tmp_path):
    (x_train, y_train), (x_test, y_test) = _synthetic(tmp_path)
    (xa, ya), (xb, yb) = datasets.load_arrays("fashion_mnist", data_dir=tmp_path)
    assert xa.shape == (20, 28, 28, 1) and xb.shape == (7, 28, 28, 1)
    assert xa.dtype == np.uint8 and ya.dtype == np.int64 and yb.dtype == np.int64
    np.testing.assert_array_equal(xa[..., 0], x_train)
    np.testing.assert_array_equal(ya, y_train)
    np.testing.assert_array_equal(xb[..., 0], x_test)
    np.testing.assert_array_equal(yb, y_test)
    assert not xa.flags.writeable  # the cached arrays cannot be changed by a caller
    again = datasets.load_arrays("fashion_mnist", data_dir=str(tmp_path))
    assert again[0][0] is xa  # cached


def test_load_from_named_subfolder(tmp_path):
    (x_train, _), _ = _synthetic(tmp_path / "mnist", seed=1)
    (xa, _), _ = datasets.load_arrays("mnist", data_dir=tmp_path)
    np.testing.assert_array_equal(xa[..., 0], x_train)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown data set"):
        datasets.load_arrays("cifar10", data_dir="/nowhere")


def test_missing_data_dir_lists_the_place_and_the_fixes(tmp_path):
    missing = tmp_path / "absent"
    with pytest.raises(datasets.DatasetNotFoundError) as info:
        datasets.load_arrays("fashion_mnist", data_dir=missing)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(missing) in message and "no such folder" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "KERAS_KFAC_DATA_DIR" in message and "data_dir=" in message and "--data-dir" in message
    assert "tensorflow-datasets" in message


def test_missing_file_is_named(tmp_path):
    _synthetic(tmp_path)
    (tmp_path / FILES["test_labels"]).unlink()
    with pytest.raises(datasets.DatasetNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        datasets.load_arrays("mnist", data_dir=tmp_path)


def test_nothing_found_lists_every_place(offline_lookup, monkeypatch):
    env_dir = offline_lookup / "env-dir"
    monkeypatch.setenv("KERAS_KFAC_DATA_DIR", str(env_dir))
    for name, keras_dir in [("fashion_mnist", "fashion-mnist"), ("mnist", "mnist")]:
        with pytest.raises(datasets.DatasetNotFoundError) as info:
            datasets.load_arrays(name)
        message = str(info.value)
        assert "tensorflow-datasets: skipped (KERAS_KFAC_NO_TFDS is set)" in message
        assert str(env_dir) in message
        assert str(offline_lookup / "home" / ".keras" / "datasets" / keras_dir) in message
        assert (str(offline_lookup / "no-debian") in message) == (name == "fashion_mnist")
        assert ("apt-get install dataset-fashion-mnist" in message) == (name == "fashion_mnist")
        assert "KERAS_KFAC_DATA_DIR" in message


def test_lookup_order_env_dir_then_keras_dir(offline_lookup, monkeypatch):
    keras_dir = offline_lookup / "home" / ".keras" / "datasets" / "fashion-mnist"
    (from_keras, _), _ = _synthetic(keras_dir, seed=2)
    (xa, _), _ = datasets.load_arrays("fashion_mnist")
    np.testing.assert_array_equal(xa[..., 0], from_keras)
    (from_env, _), _ = _synthetic(offline_lookup / "env", seed=3)
    monkeypatch.setenv("KERAS_KFAC_DATA_DIR", str(offline_lookup / "env"))
    (xa, _), _ = datasets.load_arrays("fashion_mnist")
    np.testing.assert_array_equal(xa[..., 0], from_env)


def test_offline_tfds_falls_through_quickly(monkeypatch, tmp_path):
    """tfds with an empty data dir and no network (the probe is forced to fail) reports why and
    hands over to the folders at once instead of retrying downloads for minutes."""
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.delenv("KERAS_KFAC_NO_TFDS", raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(datasets, "_url_answers", lambda url, timeout: (False, f"HEAD {url} failed (test)"))
    monkeypatch.setenv("KERAS_KFAC_DATA_DIR", str(tmp_path / "absent"))
    start = time.perf_counter()
    with pytest.raises(datasets.DatasetNotFoundError, match="tensorflow-datasets: ConnectionError: not prepared"):
        datasets.load_arrays("mnist")
    (x_train, _), _ = _synthetic(tmp_path / "data", seed=4)
    monkeypatch.setenv("KERAS_KFAC_DATA_DIR", str(tmp_path / "data"))
    (xa, _), _ = datasets.load_arrays("mnist")
    np.testing.assert_array_equal(xa[..., 0], x_train)
    assert time.perf_counter() - start < 30


def test_url_probe_is_bounded():
    start = time.perf_counter()
    ok, why = datasets._url_answers("http://keras-kfac-test.invalid/t10k-labels-idx1-ubyte.gz", 0.5)
    assert not ok and "keras-kfac-test.invalid" in why
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    "corrupt, match",
    [
        ("magic", "bad IDX magic number"),
        ("truncated", "IDX header announces shape"),
        ("not_gzip", "not a readable gzip file"),
        ("count_mismatch", "20 images but"),
        ("wrong_image_size", "expected uint8 images of shape"),
    ],
)
def test_corrupt_files_raise_a_clear_error(tmp_path, corrupt, match):
    _synthetic(tmp_path)
    images, labels = tmp_path / FILES["train_images"], tmp_path / FILES["train_labels"]
    if corrupt == "magic":
        _write_idx(images, np.zeros((20, 28, 28)), magic=b"\x12\x34\x08\x03")
    elif corrupt == "truncated":
        with gzip.open(images, "rb") as f:
            data = f.read()
        with gzip.open(images, "wb") as f:
            f.write(data[:-100])
    elif corrupt == "not_gzip":
        images.write_bytes(b"this is not gzip data")
    elif corrupt == "count_mismatch":
        _write_idx(labels, np.zeros(19))
    elif corrupt == "wrong_image_size":
        _write_idx(images, np.zeros((20, 32, 32)))
    with pytest.raises(datasets.IDXFormatError, match=match) as info:
        datasets.load_arrays("fashion_mnist", data_dir=tmp_path)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------- real data


def _real_data_dir(name: str) -> Path:
    """The folder holding the official files: ../shared/data/<name> next to the repository,
    $KERAS_KFAC_DATA_DIR(/<name>) or, for Fashion-MNIST, Debian's folder; skip when absent."""
    candidates = [REPO.parent / "shared" / "data" / name]
    if os.environ.get("KERAS_KFAC_DATA_DIR"):
        env = Path(os.environ["KERAS_KFAC_DATA_DIR"])
        candidates += [env / name, env]
    if name == "fashion_mnist":
        candidates.append(Path(datasets.DEBIAN_FASHION_MNIST_DIR))
    for folder in candidates:
        if all((folder / f).is_file() for f in FILES.values()):
            return folder
    how = "apt-get install dataset-fashion-mnist, or " if name == "fashion_mnist" else ""
    pytest.skip(
        f"{name} data not found in {', '.join(map(str, candidates))}; to run this test, {how}put the four "
        f"official IDX .gz files in one of these folders or point KERAS_KFAC_DATA_DIR at them"
    )


def test_real_fashion_mnist():
    (x_train, y_train), (x_test, y_test) = datasets.load_arrays("fashion_mnist", _real_data_dir("fashion_mnist"))
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.int64
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    np.testing.assert_array_equal(np.bincount(y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(y_test), [1000] * 10)
    assert x_train.max() == 255 and x_train.min() == 0


def test_real_mnist():
    (x_train, y_train), (x_test, y_test) = datasets.load_arrays("mnist", _real_data_dir("mnist"))
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert x_train.dtype == np.uint8 and y_test.dtype == np.int64
    # The official set's class counts.
    np.testing.assert_array_equal(np.bincount(y_train), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    np.testing.assert_array_equal(np.bincount(y_test), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])


def test_real_fashion_mnist_pipelines():
    train, val, test = datasets.fashion_mnist(128, _real_data_dir("fashion_mnist"), validation_split=0.1)
    x, y = next(iter(train))
    assert x.shape == (128, 28, 28, 1) and x.dtype == tf.float32 and y.shape == (128,)
    assert y.dtype in (tf.int32, tf.int64)
    assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0
    assert int(train.cardinality()) == -(-54000 // 128)
    assert int(val.cardinality()) == -(-6000 // 128)
    assert int(test.cardinality()) == -(-10000 // 128)


# ---------------------------------------------------------------------------------- pipelines


def _arrays(n_train=100, n_test=30):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (n_train + n_test, 28, 28, 1), dtype=np.uint8)
    y = (np.arange(n_train + n_test) % 10).astype(np.int64)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def _collect(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def test_pipelines_scale_batch_and_split():
    arrays = _arrays()
    (x_train, y_train), (x_test, y_test) = arrays
    train, val, test = datasets.make_pipelines(arrays, batch_size=16, validation_split=0.2)
    x, y = next(iter(train))
    assert x.shape == (16, 28, 28, 1) and x.dtype == tf.float32 and y.dtype == tf.int64
    tx, ty = _collect(train)
    vx, vy = _collect(val)
    sx, sy = _collect(test)
    assert len(tx) == 80 and len(vx) == 20 and len(sx) == 30
    # The validation examples are the last 20 training examples, in order; the test set is unshuffled.
    np.testing.assert_allclose(vx, x_train[80:] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(vy, y_train[80:])
    np.testing.assert_allclose(sx, x_test / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(sy, y_test)
    # The training set holds exactly the first 80 examples, shuffled.
    np.testing.assert_array_equal(np.sort(ty), np.sort(y_train[:80]))
    assert tx.min() >= 0.0 and tx.max() <= 1.0


def test_training_shuffle_is_seeded_and_reshuffled_each_epoch():
    arrays = _arrays()
    (train_a, _), (train_b, _) = (datasets.make_pipelines(arrays, 100, shuffle_seed=7) for _ in range(2))
    first_a, second_a = _collect(train_a)[1], _collect(train_a)[1]
    first_b = _collect(train_b)[1]
    np.testing.assert_array_equal(first_a, first_b)  # same seed, same order
    assert not np.array_equal(first_a, second_a)  # a new order each epoch
    assert not np.array_equal(first_a, arrays[0][1])  # shuffled at all


def test_two_tuple_without_validation_and_bad_arguments():
    arrays = _arrays()
    assert len(datasets.make_pipelines(arrays, 32)) == 2
    with pytest.raises(ValueError, match="validation_split"):
        datasets.make_pipelines(arrays, 32, validation_split=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        datasets.make_pipelines(arrays, 0)


def test_mnist_and_fashion_mnist_functions_use_data_dir(tmp_path):
    _synthetic(tmp_path / "fashion_mnist", n_train=20, n_test=7, seed=6)
    _synthetic(tmp_path / "mnist", n_train=10, n_test=5, seed=7)
    train, test = datasets.fashion_mnist(8, data_dir=tmp_path)
    assert sum(int(x.shape[0]) for x, _ in train) == 20 and sum(int(x.shape[0]) for x, _ in test) == 7
    train, val, test = datasets.mnist(4, data_dir=tmp_path, validation_split=0.2)
    assert [sum(int(x.shape[0]) for x, _ in ds) for ds in (train, val, test)] == [8, 2, 5]
