"""keras_kfac.models: AlexNet for 28x28 images, the MLP and the small Vision Transformer."""

import re

import keras
import numpy as np
import pytest

import keras_kfac
from keras_kfac.model import Model, Sequential
from keras_kfac.models import alexnet, mlp, vit


def _layers_of(model, cls):
    return [layer for layer in model.layers if isinstance(layer, cls)]


def test_alexnet_outputs_probabilities():
    model = alexnet()
    assert isinstance(model, Sequential) and model.built
    x = np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32)
    probs = keras.ops.convert_to_numpy(model(x, training=False))
    assert probs.shape == (3, 10)
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_alexnet_layout_and_documented_parameter_count():
    model = alexnet()
    assert len(_layers_of(model, keras.layers.Conv2D)) == 5
    dense = _layers_of(model, keras.layers.Dense)
    assert len(dense) == 3 and dense[-1].units == 10
    assert len(_layers_of(model, keras.layers.MaxPooling2D)) == 3
    assert len(_layers_of(model, keras.layers.Dropout)) == 2
    documented = re.search(r"Total: ([\d,]+) parameters", alexnet.__doc__).group(1)
    assert model.count_params() == int(documented.replace(",", ""))
    # The table's rows add up to the total too.
    rows = re.findall(r"^\s+(\w+)\s+\([\d, ]*\)\s+([\d,]+)$", alexnet.__doc__, flags=re.M)
    assert len(rows) == len(model.layers)
    assert sum(int(p.replace(",", "")) for _, p in rows) == model.count_params()
    for (name, params), layer in zip(rows, model.layers):
        assert name == layer.name and int(params.replace(",", "")) == layer.count_params()


def test_alexnet_options():
    model = alexnet(input_shape=(32, 32, 3), num_classes=5, width=0.25, dropout=0.2)
    assert model.output_shape == (None, 5)
    convs = _layers_of(model, keras.layers.Conv2D)
    assert [c.filters for c in convs] == [15, 40, 60, 60, 40]
    assert [d.units for d in _layers_of(model, keras.layers.Dense)] == [64, 64, 5]
    assert all(d.rate == 0.2 for d in _layers_of(model, keras.layers.Dropout))


def test_mlp_parameter_count():
    model = mlp()
    assert isinstance(model, Sequential) and model.output_shape == (None, 10)
    assert model.count_params() == 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    documented = re.search(r"= ([\d,]+) parameters", mlp.__doc__).group(1)
    assert model.count_params() == int(documented.replace(",", ""))
    assert [d.units for d in _layers_of(model, keras.layers.Dense)] == [256, 256, 10]
    assert mlp(hidden=(32,)).count_params() == 784 * 32 + 32 + 32 * 10 + 10


def test_vit_layout_and_documented_parameter_count():
    model = vit()
    assert isinstance(model, Model) and model.output_shape == (None, 10)
    documented = re.search(r"With the defaults: ([\d,]+) parameters", vit.__doc__).group(1)
    assert model.count_params() == int(documented.replace(",", ""))
    assert len(_layers_of(model, keras.layers.MultiHeadAttention)) == 4
    assert model.get_layer("patch_embedding").strides == (4, 4)
    assert model.get_layer("position_embedding").input_dim == 49
    probs = keras.ops.convert_to_numpy(model(np.zeros((2, 28, 28, 1), "float32")))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    small = vit(patch_size=7, dim=32, depth=2, num_heads=2, mlp_dim=64)
    assert small.get_layer("position_embedding").input_dim == 16
    with pytest.raises(ValueError, match="patch_size"):
        vit(patch_size=5)


@pytest.mark.parametrize("weight_sharing", [None, "reduce"])
def test_vit_parameters_are_all_under_curvature_blocks(weight_sharing):
    model = vit()
    model.compile(optimizer=keras_kfac.KFAC(weight_sharing=weight_sharing), loss="sparse_categorical_crossentropy")
    last = model.kfac_summary(print_fn=None).splitlines()[-1]
    assert "Updated by the fallback optimizer" not in model.kfac_summary(print_fn=None)
    assert last.endswith("(100.0%)"), last
