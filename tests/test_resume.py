"""Exact resume through `.keras` files, `tf.train.Checkpoint` and `BackupAndRestore`; clear
errors for checkpoints of another architecture; a non-finite batch leaves a usable state.

A run stopped after 2 epochs and resumed must end with the weights of the uninterrupted run:
bitwise with fisher="empirical" (no random ops, deterministic kernels on CPU). The sampled
targets are drawn with the stateless seed (seed, iterations), so they are restored with the
step counter.
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac

EPOCHS, STOP = 4, 2
# How Keras (load_weights) and TensorFlow (Checkpoint) name the mismatched layer "out".
NAMES_OUT = r"(name=out\b|/out/)"


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 4)).astype("float32")
    y = rng.integers(0, 3, size=48)
    return x, y


def _model(fisher="empirical", classes=3, **kwargs):
    keras.utils.set_random_seed(1)
    model = keras_kfac.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, activation="tanh", name="hidden"),
            keras.layers.BatchNormalization(name="norm"),  # a scale-and-shift block with moving statistics
            keras.layers.PReLU(name="act"),  # state of the fallback optimizer too
            keras.layers.Dense(classes, activation="softmax", name="out"),
        ]
    )
    settings = dict(learning_rate=0.05, stats_every=2, inverse_every=3, fisher=fisher, kl_clip=1e-2, graft="adam")
    settings.update(kwargs)
    model.compile(optimizer=keras_kfac.KFAC(**settings), loss="sparse_categorical_crossentropy")
    return model


def _fit(model, epochs, **kwargs):
    x, y = _data()
    return model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, **kwargs)


@functools.cache
def _uninterrupted(fisher="empirical", damping_mode="factored"):
    """Weights and optimizer state (NumPy) after EPOCHS epochs without a stop; computed once."""
    model = _model(fisher, damping_mode=damping_mode)
    _fit(model, EPOCHS)
    return [v.numpy() for v in model.weights], [v.numpy() for v in model.optimizer.variables]


def _assert_same_run(expected, actual, exact):
    check = np.testing.assert_array_equal if exact else lambda a, b: np.testing.assert_allclose(a, b, 1e-5, 1e-6)
    weights, state = expected
    assert int(actual.optimizer.iterations.numpy()) == EPOCHS * 6
    assert len(state) == len(actual.optimizer.variables)
    for a, b in zip(weights + state, actual.weights + actual.optimizer.variables):
        check(b.numpy(), a)


@pytest.mark.parametrize(
    "fisher, damping_mode", [("empirical", "factored"), ("sampled", "eigen"), ("sampled", "eigen_adam")]
)
def test_keras_file_resume_equals_the_uninterrupted_run(tmp_path, fisher, damping_mode):
    expected = _uninterrupted(fisher, damping_mode)
    first = _model(fisher, damping_mode=damping_mode)
    _fit(first, STOP)
    first.save(tmp_path / "run.keras")
    resumed = keras.models.load_model(tmp_path / "run.keras")  # no custom_objects
    assert isinstance(resumed.optimizer, keras_kfac.KFAC)
    _fit(resumed, EPOCHS - STOP)
    _assert_same_run(expected, resumed, exact=fisher == "empirical")
    if fisher == "empirical":
        # The comparison can fail: the weights alone, with a fresh optimizer, give another run.
        fresh = _model(fisher)
        fresh.set_weights(first.get_weights())
        _fit(fresh, EPOCHS - STOP)
        assert not np.allclose(fresh.layers[0].kernel.numpy(), expected[0][0], atol=1e-4)


def test_keras_file_resume_with_a_weight_average(tmp_path):
    """The saved model holds the average (what `fit` ends on); the optimizer state holds the
    weights training reached, and the resumed run trains on from them."""
    whole = _model(polynomial_averaging=8)
    _fit(whole, EPOCHS)
    first = _model(polynomial_averaging=8)
    _fit(first, STOP)
    first.save(tmp_path / "run.keras")
    resumed = keras.models.load_model(tmp_path / "run.keras")
    for v, a in zip(resumed.trainable_variables, resumed.optimizer._model_variables_moving_average):
        np.testing.assert_array_equal(v.numpy(), a.numpy())
    _fit(resumed, EPOCHS - STOP)
    expected = [v.numpy() for v in whole.weights], [v.numpy() for v in whole.optimizer.variables]
    _assert_same_run(expected, resumed, exact=True)


@pytest.mark.parametrize("built", [False, True], ids=["restore-then-build", "build-then-restore"])
def test_tf_checkpoint_resume_equals_the_uninterrupted_run(tmp_path, built):
    expected = _uninterrupted()
    first = _model()
    _fit(first, STOP)
    path = tf.train.Checkpoint(model=first, optimizer=first.optimizer).save(str(tmp_path / "ckpt"))
    resumed = _model()
    if built:
        resumed.optimizer.build(resumed.trainable_variables)
    # Unbuilt, the optimizer's variables are restored when fit creates them.
    status = tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(path)
    _fit(resumed, EPOCHS - STOP)
    status.assert_consumed()
    _assert_same_run(expected, resumed, exact=True)


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            raise KeyboardInterrupt


def test_backup_and_restore_resume_equals_the_uninterrupted_run(tmp_path):
    expected = _uninterrupted()
    backup = str(tmp_path / "backup")
    with pytest.raises(KeyboardInterrupt):
        _fit(_model(), EPOCHS, callbacks=[keras.callbacks.BackupAndRestore(backup), _StopAfter(STOP)])
    resumed = _model()  # a new process would build and compile the model again
    history = _fit(resumed, EPOCHS, callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert history.epoch == list(range(STOP, EPOCHS))
    _assert_same_run(expected, resumed, exact=True)


# ------------------------------------------------------------------------------ bad input
def test_load_weights_of_another_architecture_names_the_layer(tmp_path):
    saved = _model()
    _fit(saved, 1)
    saved.save_weights(tmp_path / "run.weights.h5")
    with pytest.raises(ValueError, match=NAMES_OUT):
        _model(classes=4).load_weights(tmp_path / "run.weights.h5")


def test_backup_of_another_architecture_names_the_layer(tmp_path):
    backup = str(tmp_path / "backup")
    with pytest.raises(KeyboardInterrupt):
        _fit(_model(), 2, callbacks=[keras.callbacks.BackupAndRestore(backup), _StopAfter(1)])
    with pytest.raises(ValueError, match=NAMES_OUT):
        _fit(_model(classes=4), 2, callbacks=[keras.callbacks.BackupAndRestore(backup)])


def test_tf_checkpoint_of_another_architecture_names_the_layer(tmp_path):
    saved = _model()
    _fit(saved, 1)
    path = tf.train.Checkpoint(model=saved, optimizer=saved.optimizer).save(str(tmp_path / "ckpt"))
    other = _model(classes=4)
    with pytest.raises(ValueError, match=NAMES_OUT):
        tf.train.Checkpoint(model=other, optimizer=other.optimizer).restore(path)


def test_optimizer_state_of_other_kfac_settings_names_the_layer(tmp_path):
    saved = _model(damping_mode="eigen")
    _fit(saved, 1)
    saved.save_weights(tmp_path / "run.weights.h5")
    other = _model(damping_mode="factored")  # same layers, other optimizer state
    with pytest.raises(ValueError, match="layer 'hidden'.* shape \\(5, 5\\) here and \\(5,\\) in the saved state"):
        other.load_weights(tmp_path / "run.weights.h5")
    # skip_mismatch=True loads the weights and leaves the optimizer state as it is.
    with pytest.warns(UserWarning):
        other.load_weights(tmp_path / "run.weights.h5", skip_mismatch=True)
    for a, b in zip(saved.weights, other.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(other.optimizer.iterations.numpy()) == 0


def test_load_weights_right_after_compile_restores_the_optimizer_state(tmp_path):
    saved = _model()
    _fit(saved, 1)
    saved.save_weights(tmp_path / "run.weights.h5")
    loaded = _model()
    assert not loaded.optimizer.built
    loaded.load_weights(tmp_path / "run.weights.h5")
    for a, b in zip(saved.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_non_finite_batch_then_save_load_and_continue(tmp_path):
    x, y = _data()
    x_bad = x.copy()
    x_bad[17, 2] = np.nan  # in the third batch of 8
    model = _model()
    history = model.fit(x_bad, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert history.history["skipped_steps"] == [1]
    model.save(tmp_path / "run.keras")
    loaded = keras.models.load_model(tmp_path / "run.keras")
    assert int(loaded.optimizer.skipped_steps.numpy()) == 1
    for v in loaded.weights + loaded.optimizer.variables:
        assert np.all(np.isfinite(v.numpy())), v.path
    history = loaded.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    # The skipped batch changed nothing: the same as a run that never saw it.
    keep = np.r_[0:16, 24:48]
    reference = _model()
    reference.fit(x[keep], y[keep], batch_size=8, epochs=1, shuffle=False, verbose=0)
    reference.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(reference.weights, loaded.weights):
        np.testing.assert_array_equal(b.numpy(), a.numpy())
