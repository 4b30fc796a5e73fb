"""keras-kfac: K-FAC (Kronecker-factored approximate curvature) for Keras 3 on TensorFlow.

model = keras_kfac.Sequential([...])   # or keras_kfac.Model(...) / keras_kfac.wrap(model)
model.compile(optimizer=keras_kfac.KFAC(), loss=..., metrics=[...])
model.fit(...)
"""

from keras_kfac.blocks import Conv2DBlock, DenseBlock, KroneckerBlock
from keras_kfac.model import FunctionalModel, Model, Sequential, WrappedModel, discover_blocks, wrap
from keras_kfac.optimizer import KFAC

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "Model",
    "Sequential",
    "FunctionalModel",
    "WrappedModel",
    "wrap",
    "discover_blocks",
    "KroneckerBlock",
    "DenseBlock",
    "Conv2DBlock",
]
