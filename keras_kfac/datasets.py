"""Fashion-MNIST and MNIST as numpy arrays and as `tf.data` pipelines, online or offline.

`load_arrays(name, data_dir=None)` returns `((x_train, y_train), (x_test, y_test))` with
`x` uint8 of shape (N, 28, 28, 1) and `y` int64 of shape (N,). It looks for the data in this
order and uses the first place that works:

1. `data_dir`, when given: that folder must hold the four official IDX files
   (`train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz`,
   `t10k-labels-idx1-ubyte.gz`), either directly or in a subfolder named after the data set
   (`fashion_mnist/` or `fashion-mnist/`, `mnist/`), so one parent folder can serve both.
   Nothing else is tried.
2. tensorflow-datasets (`tfds.load`), which reads a data set already prepared in its data dir
   (`$TFDS_DATA_DIR`, default `~/tensorflow_datasets`) or downloads and prepares it. Offline,
   tfds retries its downloads for minutes before giving up, so it is called only when the data
   set is already prepared or an HTTP HEAD request for one of its files succeeds within 2 s.
   Set `KERAS_KFAC_NO_TFDS=1` to skip tensorflow-datasets entirely.
3. The first folder holding the four IDX files (directly or in the subfolder named as in 1.),
   among: `$KERAS_KFAC_DATA_DIR`, `~/.keras/datasets/fashion-mnist` (`~/.keras/datasets/mnist`
   for MNIST) and, for Fashion-MNIST only, `/usr/share/datasets/fashion-mnist`, where Debian's
   package `dataset-fashion-mnist` installs the files.

When none works, `DatasetNotFoundError` (a `FileNotFoundError`) is raised; its message lists
every place tried, why each failed, and how to provide the data. A file whose IDX header or
size is wrong raises `IDXFormatError` (a `ValueError`). The IDX files hold no name of their
data set: a folder of Fashion-MNIST files handed to `load_arrays("mnist", ...)` is read as is.

Arrays are cached in-process per data set and folder; the cached arrays are read-only.
`fashion_mnist(...)` and `mnist(...)` build the training and test pipelines from them.
"""

from __future__ import annotations

import functools
import gzip
import os
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import tensorflow as tf

__all__ = [
    "DatasetNotFoundError",
    "IDXFormatError",
    "NAMES",
    "load_arrays",
    "make_pipelines",
    "fashion_mnist",
    "mnist",
]

NAMES = ("fashion_mnist", "mnist")

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# Subfolders of a data folder that may hold a given data set's files.
_SUBFOLDERS = {"fashion_mnist": ("fashion_mnist", "fashion-mnist"), "mnist": ("mnist",)}

# Where Debian's package `dataset-fashion-mnist` installs the four files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_NO_TFDS_ENV = "KERAS_KFAC_NO_TFDS"
_DATA_DIR_ENV = "KERAS_KFAC_DATA_DIR"
_PROBE_TIMEOUT_S = 2.0

# IDX type codes (third byte of the magic number) -> numpy big-endian dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

Arrays = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class DatasetNotFoundError(FileNotFoundError):
    """The data set was found nowhere; the message lists the places tried and the fixes."""


class IDXFormatError(ValueError):
    """An IDX file has a bad header, an unexpected type or shape, or the wrong size."""


# --------------------------------------------------------------------------------------------
# IDX files


def _parse_idx(data: bytes, path: str) -> np.ndarray:
    """Parses the bytes of one (decompressed) IDX file."""
    if len(data) < 4:
        raise IDXFormatError(f"{path}: {len(data)} bytes, too short for an IDX header")
    zero, type_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise IDXFormatError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000TTDD with type TT in "
            f"{sorted(_IDX_DTYPES)} and DD > 0 dimensions)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(f"{path}: IDX header announces {ndim} dimensions but the file ends early")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise IDXFormatError(
            f"{path}: IDX header announces shape {dims} ({expected} bytes of data) but the file holds "
            f"{len(data) - header} bytes after the header"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _read_idx_gz(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise IDXFormatError(f"{path}: not a readable gzip file ({e})") from e
    return _parse_idx(data, str(path))


def _check_pair(images: np.ndarray, labels: np.ndarray, images_path: Path, labels_path: Path):
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise IDXFormatError(
            f"{images_path}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise IDXFormatError(f"{labels_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise IDXFormatError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise IDXFormatError(f"{labels_path}: labels must lie in 0..9, found {labels.max()}")


def _missing_files(folder: Path) -> list[str]:
    return [f for f in IDX_FILES.values() if not (folder / f).is_file()]


def _find_in(folder: Path, name: str) -> tuple[Path | None, list[str]]:
    """The folder, or its subfolder for `name`, that holds the four files; else (None, notes)."""
    if not folder.is_dir():
        return None, [f"{folder}: no such folder"]
    notes = []
    for candidate in (folder, *(folder / sub for sub in _SUBFOLDERS[name])):
        if candidate is not folder and not candidate.is_dir():
            continue
        missing = _missing_files(candidate)
        if not missing:
            return candidate, notes
        notes.append(f"{candidate}: missing {', '.join(missing)}")
    return None, notes


@functools.lru_cache(maxsize=8)
def _arrays_from_folder(name: str, folder: str) -> Arrays:
    del name  # part of the cache key only
    paths = {key: Path(folder) / file for key, file in IDX_FILES.items()}
    arrays = {key: _read_idx_gz(path) for key, path in paths.items()}
    out = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        _check_pair(images, labels, paths[f"{split}_images"], paths[f"{split}_labels"])
        out.append((_frozen(images[..., None].astype(np.uint8)), _frozen(labels.astype(np.int64))))
    return tuple(out)


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.setflags(write=False)
    return array


# --------------------------------------------------------------------------------------------
# tensorflow-datasets


def _url_answers(url: str, timeout: float) -> tuple[bool, str]:
    """Whether an HTTP HEAD request for `url` succeeds within about `timeout` seconds.

    A real request, not just a TCP connection: some sandboxes accept every connection and answer
    404. It runs in a daemon thread so that a slow DNS lookup cannot block either; urllib uses
    the proxies configured in the environment, as tensorflow-datasets' downloader does."""
    result: dict[str, object] = {}

    def probe():
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as r:
                result["status"] = r.status
        except Exception as e:  # URLError, HTTPError, socket errors, bad URLs
            result["error"] = e

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if 200 <= int(result.get("status", 0)) < 400:
        return True, ""
    error = result.get("error", f"no answer within {timeout:g} s")
    return False, f"HEAD {url} failed ({error})"


def _tfds_key() -> str:
    return os.environ.get("TFDS_DATA_DIR", "")


@functools.lru_cache(maxsize=4)
def _arrays_from_tfds(name: str, tfds_data_dir_env: str) -> Arrays:
    """Loads with tensorflow-datasets; raises with the reason when it cannot work now."""
    del tfds_data_dir_env  # part of the cache key only
    import tensorflow_datasets as tfds

    builder = tfds.builder(name)
    # (is_prepared() logs a warning for a folder that does not exist; look first.)
    if not (builder.data_path.exists() and builder.is_prepared()):
        # Both builders download the official file names from their class attribute URL.
        url = urllib.parse.urljoin(getattr(type(builder), "URL", ""), IDX_FILES["test_labels"])
        ok, why = _url_answers(url, _PROBE_TIMEOUT_S)
        if not ok:
            raise ConnectionError(f"not prepared in {builder.data_dir} and offline: {why}")
    train, test = tfds.as_numpy(tfds.load(name, split=["train", "test"], batch_size=-1, as_supervised=True))
    return tuple((_frozen(np.asarray(x, np.uint8)), _frozen(np.asarray(y, np.int64))) for x, y in (train, test))


# --------------------------------------------------------------------------------------------
# Lookup


def _check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown data set {name!r}; expected one of {NAMES}")
    return name


def _search_folders(name: str) -> list[Path]:
    folders = []
    if os.environ.get(_DATA_DIR_ENV):
        folders.append(Path(os.environ[_DATA_DIR_ENV]).expanduser())
    keras_sub = "fashion-mnist" if name == "fashion_mnist" else "mnist"
    folders.append(Path("~/.keras/datasets").expanduser() / keras_sub)
    if name == "fashion_mnist":
        folders.append(Path(DEBIAN_FASHION_MNIST_DIR))
    return folders


def _not_found(name: str, tried: list[str]) -> DatasetNotFoundError:
    lines = [f"Could not find the {name} data set. Places tried:"]
    lines += [f"  - {t}" for t in tried]
    lines.append("To fix it, either:")
    if name == "fashion_mnist":
        lines.append("  - install the Debian package: apt-get install dataset-fashion-mnist")
    lines.append(
        f"  - put the four files {', '.join(IDX_FILES.values())} in a folder and pass it as "
        f"data_dir= (--data-dir in the examples) or set {_DATA_DIR_ENV}"
    )
    lines.append("With internet access, tensorflow-datasets downloads the data set by itself.")
    return DatasetNotFoundError("\n".join(lines))


def load_arrays(name: str, data_dir: str | os.PathLike | None = None) -> Arrays:
    """Returns `((x_train, y_train), (x_test, y_test))` for "fashion_mnist" or "mnist".

    `x` is uint8 of shape (N, 28, 28, 1), `y` int64 of shape (N,); the arrays are read-only and
    cached. See the module docstring for where the data is looked for. Raises
    `DatasetNotFoundError` when it is found nowhere and `IDXFormatError` for a corrupt file.
    """
    name = _check_name(name)
    if data_dir is not None:
        folder, notes = _find_in(Path(data_dir).expanduser(), name)
        if folder is None:
            raise _not_found(name, [f"data_dir={os.fspath(data_dir)!r}: " + "; ".join(notes)])
        return _arrays_from_folder(name, str(folder.resolve()))

    tried = []
    if os.environ.get(_NO_TFDS_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        tried.append(f"tensorflow-datasets: skipped ({_NO_TFDS_ENV} is set)")
    else:
        try:
            return _arrays_from_tfds(name, _tfds_key())
        except Exception as e:  # any failure falls through to the local folders
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            tried.append(f"tensorflow-datasets: {reason[:400]}")

    for base in _search_folders(name):
        folder, notes = _find_in(base, name)
        if folder is not None:
            return _arrays_from_folder(name, str(folder.resolve()))
        tried.append("; ".join(notes))
    raise _not_found(name, tried)


# --------------------------------------------------------------------------------------------
# tf.data pipelines


def _scale(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    return tf.cast(x, tf.float32) / 255.0, y


def _pipeline(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle_seed: int | None, shuffle: bool):
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).map(_scale, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def make_pipelines(
    arrays: Arrays, batch_size: int, shuffle_seed: int | None = 0, validation_split: float = 0.0
) -> tuple[tf.data.Dataset, ...]:
    """`(train, test)`, or `(train, val, test)` when `validation_split > 0`, from `load_arrays`'s
    arrays: float32 pixels in [0, 1], int64 labels, batched and prefetched. Only the training
    set is shuffled (seeded by `shuffle_seed`, a new order each epoch). The validation set is the
    last `round(validation_split * N)` training examples, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must lie in [0, 1), got {validation_split}")
    (x_train, y_train), (x_test, y_test) = arrays
    test = _pipeline(x_test, y_test, batch_size, None, shuffle=False)
    if validation_split == 0.0:
        return _pipeline(x_train, y_train, batch_size, shuffle_seed, shuffle=True), test
    n_val = int(round(validation_split * len(x_train)))
    if not 0 < n_val < len(x_train):
        raise ValueError(f"validation_split={validation_split} leaves {n_val} of {len(x_train)} examples")
    train = _pipeline(x_train[:-n_val], y_train[:-n_val], batch_size, shuffle_seed, shuffle=True)
    val = _pipeline(x_train[-n_val:], y_train[-n_val:], batch_size, None, shuffle=False)
    return train, val, test


def fashion_mnist(
    batch_size: int,
    data_dir: str | os.PathLike | None = None,
    shuffle_seed: int | None = 0,
    validation_split: float = 0.0,
) -> tuple[tf.data.Dataset, ...]:
    """Fashion-MNIST as `(train_ds, test_ds)`, or `(train_ds, val_ds, test_ds)` when
    `validation_split > 0`; see `make_pipelines` and, for `data_dir`, `load_arrays`."""
    return make_pipelines(load_arrays("fashion_mnist", data_dir), batch_size, shuffle_seed, validation_split)


def mnist(
    batch_size: int,
    data_dir: str | os.PathLike | None = None,
    shuffle_seed: int | None = 0,
    validation_split: float = 0.0,
) -> tuple[tf.data.Dataset, ...]:
    """MNIST as `(train_ds, test_ds)`, or `(train_ds, val_ds, test_ds)` when
    `validation_split > 0`; see `make_pipelines` and, for `data_dir`, `load_arrays`."""
    return make_pipelines(load_arrays("mnist", data_dir), batch_size, shuffle_seed, validation_split)
