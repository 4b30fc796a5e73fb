"""What a Keras user expects of an optimizer: lookup by name, unique default names, the public
submodules after `import keras_kfac`."""

import re
import subprocess
import sys

import keras
import numpy as np

import keras_kfac


def test_keras_optimizers_get_kfac_and_compile_by_name():
    assert isinstance(keras.optimizers.get("kfac"), keras_kfac.KFAC)
    model = keras_kfac.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="kfac", loss="sparse_categorical_crossentropy")
    assert isinstance(model.optimizer, keras_kfac.KFAC)
    kernel = model.layers[0].kernel.numpy().copy()
    model.train_on_batch(np.ones((4, 3), "float32"), np.array([0, 1, 0, 1]))
    assert not np.array_equal(kernel, model.layers[0].kernel.numpy())


def test_default_names_are_unique_as_keras_makes_them():
    first, second = keras_kfac.KFAC(), keras_kfac.KFAC()
    assert first.name != second.name
    assert re.fullmatch(r"kfac(_\d+)?", first.name) and re.fullmatch(r"kfac(_\d+)?", second.name)
    assert keras_kfac.KFAC(name="mine").name == "mine"


def test_import_keras_kfac_makes_its_submodules_available():
    code = "import keras_kfac; print(keras_kfac.models.alexnet.__name__, keras_kfac.losses.register_loss.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["alexnet", "register_loss"]
