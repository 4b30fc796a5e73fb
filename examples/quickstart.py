"""The shortest complete use of keras-kfac: a small classifier on synthetic data."""

import quiet_tensorflow  # noqa: F401  (before TensorFlow: drops its start-up INFO lines, keeps errors)

# isort: split
import keras
import numpy as np

import keras_kfac

rng = np.random.default_rng(0)
centers = rng.normal(size=(4, 20)) * 1.5
y = rng.integers(0, 4, size=4096)
x = (centers[y] + rng.normal(size=(4096, 20))).astype("float32")

model = keras_kfac.Sequential(
    [
        keras.Input((20,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(4, activation="softmax"),
    ]
)
model.compile(
    optimizer=keras_kfac.KFAC(learning_rate=0.01, damping=1e-2),
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
)
model.kfac_summary()
model.fit(x, y, batch_size=128, epochs=3, validation_split=0.2)
