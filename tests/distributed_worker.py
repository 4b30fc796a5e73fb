"""Subprocess of tests/test_distributed.py: trains a tiny K-FAC model under a strategy.

    python distributed_worker.py mirrored OUT.npz   # two logical CPUs: MirroredStrategy runs
    python distributed_worker.py worker OUT.npz     # one MultiWorkerMirroredStrategy worker (TF_CONFIG)

Logical devices must be configured before TensorFlow starts, hence a process of its own. The
single-device references run in the test process (`build`, `train`, `state` are importable).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_kfac  # noqa: E402

BATCH, STEPS = 16, 6  # global batch; one epoch is STEPS steps
CONFIGS = {
    "factored": dict(damping_mode="factored", distribute_inverses=True),
    "eigen_everyone_inverts": dict(damping_mode="eigen", distribute_inverses=False),
}


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * STEPS, 5)).astype("float32")
    y = rng.integers(0, 3, size=BATCH * STEPS)
    return x, y


def build(damping_mode="factored", distribute_inverses=True):
    keras.utils.set_random_seed(3)
    model = keras_kfac.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.LayerNormalization(name="norm"),  # a scale-and-shift block, shared too
            keras.layers.Dense(6, activation="relu", name="middle"),
            keras.layers.Dense(3, activation="softmax", name="out"),
        ]
    )
    optimizer = keras_kfac.KFAC(
        learning_rate=0.05,
        damping=1e-2,
        fisher="empirical",
        stats_every=2,
        inverse_every=3,
        stats_batch_size=None,
        kl_clip=1e-2,  # nonlinear in the gradients, like the Adam graft:
        graft="adam",  # both differ unless the reduced gradients are preconditioned
        damping_mode=damping_mode,
        distribute_inverses=distribute_inverses,
    )
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    return model


def train(model, epochs=1, nan_row=None):
    x, y = data()
    if nan_row is not None:  # a non-finite input in one replica's half of one batch
        x = x.copy()
        x[nan_row, 2] = np.nan
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)


NAN_ROW = BATCH + 3  # second step, first replica's half


def state(model, prefix="") -> dict:
    """Weights (w0, w1, ...) and optimizer variables (o0, ...; "_eigenvectors" appended to those)
    as NumPy arrays, in creation order (the same in a model loaded from a file)."""
    out = {f"{prefix}w{i}": v.numpy() for i, v in enumerate(model.weights)}
    for i, v in enumerate(model.optimizer.variables):
        out[f"{prefix}o{i}" + ("_eigenvectors" if "eigenvectors" in v.name else "")] = v.numpy()
    return out


def local_copies(strategy, variable) -> np.ndarray:
    """Every replica's copy of `variable`, stacked on axis 0."""
    return np.stack([t.numpy() for t in strategy.experimental_local_results(variable.value)])


def replica_copies(strategy, model, prefix) -> dict:
    """Every replica's copy of every weight and optimizer variable, stacked on axis 0."""
    return {f"{prefix}{i}": local_copies(strategy, v) for i, v in enumerate(model.weights + model.optimizer.variables)}


def inverse_owners(strategy, distribute_inverses) -> dict:
    """Gives each replica other factors, runs one inversion and returns each replica's inverses
    and factors: with distribute_inverses every block ends with its owner's inverse on both."""
    with strategy.scope():
        model = build(distribute_inverses=distribute_inverses)
        model.optimizer.build(model.trainable_variables)
    optimizer = model.optimizer
    rng = np.random.default_rng(5)
    kronecker = [b for b in optimizer.blocks if isinstance(b, keras_kfac.KroneckerBlock)]
    for block in kronecker:
        for variable in block.statistics_variables:
            for replica, copy in enumerate(strategy.experimental_local_results(variable.value)):
                rows = rng.normal(size=(2 * variable.shape[0], variable.shape[0])).astype("float32")
                copy.assign(rows.T @ rows / len(rows) * (1.0 + replica))

    @tf.function
    def invert():
        def step():
            reducer = keras_kfac.distributed.reducer(distribute_inverses)
            return optimizer._update_inverses(reducer)

        strategy.run(step)

    invert()
    out = {}
    tag = "split" if distribute_inverses else "all"
    for b, block in enumerate(kronecker):
        (a, g), (inv_a, inv_g) = block.statistics_variables, block.inverse_variables
        for name, variable in (("a", a), ("g", g), ("inv_a", inv_a), ("inv_g", inv_g)):
            copies = strategy.experimental_local_results(variable.value)
            out[f"owners_{tag}_{b}_{name}"] = np.stack([t.numpy() for t in copies])
    out[f"owners_{tag}_damping"] = np.array(float(optimizer.damping.numpy()))
    return out


def mirrored(path):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {}
    folder = os.path.dirname(os.path.abspath(path))
    for name, settings in CONFIGS.items():
        with strategy.scope():
            model = build(**settings)
        train(model)
        results.update(state(model, f"{name}_"))
        results.update(replica_copies(strategy, model, f"{name}_replicas_"))
        if name == "factored":
            # Keras' apply reads use_ema and loss_scale_factor as off inside the block update,
            # per replica thread: the settings themselves must survive (once they did not).
            results["settings_after_fit"] = np.array(
                [float(model.optimizer.use_ema), model.optimizer.polynomial_averaging or -1.0]
            )
            model.save(os.path.join(folder, "mirrored.keras"))
    # Checkpoints: one epoch under the strategy, saved, the second on one device, and the reverse.
    single = keras.models.load_model(os.path.join(folder, "mirrored.keras"))
    train(single)
    results.update(state(single, "to_single_"))
    single = build()
    train(single)
    single.save(os.path.join(folder, "single.keras"))
    with strategy.scope():
        model = keras.models.load_model(os.path.join(folder, "single.keras"))
    train(model)
    results.update(state(model, "to_mirrored_"))
    results.update(replica_copies(strategy, model, "to_mirrored_replicas_"))
    with strategy.scope():
        model = build()
    train(model, nan_row=NAN_ROW)
    results.update(state(model, "nan_"))
    results.update(replica_copies(strategy, model, "nan_replicas_"))
    results.update(inverse_owners(strategy, True))
    results.update(inverse_owners(strategy, False))
    results["auto_learning_rate"] = auto_learning_rate(strategy)
    np.savez(path, **results)


def auto_learning_rate(strategy, global_batch=512) -> np.ndarray:
    """The learning rate `KFAC()` ("auto") sets at its first step under `strategy`, where each
    replica sees global_batch / replicas examples."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(global_batch, 5)).astype("float32")
    y = rng.integers(0, 3, size=global_batch)
    with strategy.scope():
        model = keras_kfac.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="softmax")])
        model.compile(optimizer=keras_kfac.KFAC(), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=global_batch, epochs=1, shuffle=False, verbose=0)
    return local_copies(strategy, model.optimizer._learning_rate)


def worker(path):
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING
        )
    )
    with strategy.scope():
        model = build()
    train(model)
    np.savez(path, **state(model))


if __name__ == "__main__":
    keras.config.disable_traceback_filtering()
    {"mirrored": mirrored, "worker": worker}[sys.argv[1]](sys.argv[2])
    print("done", sys.argv[1])
