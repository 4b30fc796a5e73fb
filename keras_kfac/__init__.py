"""keras-kfac: K-FAC (Kronecker-factored approximate curvature) for Keras 3 on TensorFlow.

model = keras_kfac.Sequential([...])   # or keras_kfac.Model(...) / keras_kfac.wrap(model)
model.compile(optimizer=keras_kfac.KFAC(), loss=..., metrics=[...])
model.fit(...)
"""

import keras as _keras

from keras_kfac import losses, models
from keras_kfac.blocks import (
    BlockOptions,
    Conv2DBlock,
    CurvatureBlock,
    DenseBlock,
    KroneckerBlock,
    register_block,
    registered_blocks,
)
from keras_kfac.discovery import discover_blocks
from keras_kfac.losses import register_loss
from keras_kfac.model import FunctionalModel, Model, Sequential, WrappedModel, wrap
from keras_kfac.optimizer import KFAC

__version__ = "0.1.0"

# `keras.optimizers.get("kfac")` and `compile(optimizer="kfac")`, as for Keras' own optimizers.
_keras.saving.get_custom_objects().setdefault("kfac", KFAC)

__all__ = [
    "KFAC",
    "Model",
    "Sequential",
    "FunctionalModel",
    "WrappedModel",
    "wrap",
    "models",
    "losses",
    "register_loss",
    "discover_blocks",
    "register_block",
    "registered_blocks",
    "BlockOptions",
    "CurvatureBlock",
    "KroneckerBlock",
    "DenseBlock",
    "Conv2DBlock",
]
