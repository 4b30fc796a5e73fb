"""The fit logs (History, progress bar, TensorBoard) carry learning_rate, damping,
kl_clip_factor and skipped_steps."""

import glob
import math
import os

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf

import keras_kfac

LR, DAMPING, KL_CLIP = 0.5, 1e-2, 1e-4


def _data(m=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(m, 5)).astype("float32"), rng.integers(0, 3, size=m)


def _mlp():
    keras.utils.set_random_seed(3)
    return keras_kfac.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3, activation="softmax")]
    )


def test_kl_clip_factor_matches_numpy():
    """ν = min(1, sqrt(kl_clip / (lr² Σ U·∇))) from the float64 reference step, and the step is −lr·ν·U."""
    x, y = _data()
    model = _mlp()
    before = [
        (layer.kernel.numpy().astype(np.float64), layer.bias.numpy().astype(np.float64)) for layer in model.layers
    ]
    expected = ref.mlp_step(
        x.astype(np.float64), y, [(k, b, a) for (k, b), a in zip(before, ["tanh", "softmax"])], LR, DAMPING, "eigen"
    )
    inner = sum(float(np.sum(e["update"] * e["grad"])) for e in expected)
    nu = min(1.0, math.sqrt(KL_CLIP / (LR * LR * inner)))
    assert nu < 0.5  # the clip is active
    opt = keras_kfac.KFAC(
        learning_rate=LR,
        momentum=0.0,
        damping=DAMPING,
        stats_decay=0.0,
        inverse_every=1,
        stats_every=1,
        stats_batch_size=None,
        fisher="empirical",
        damping_mode="eigen",
        graft=None,
        kl_clip=KL_CLIP,
    )
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    logs = model.train_on_batch(x, y, return_dict=True)
    assert abs(logs["kl_clip_factor"] - nu) < 1e-4 * nu
    assert logs["learning_rate"] == pytest.approx(LR)
    assert logs["damping"] == pytest.approx(DAMPING)
    assert logs["skipped_steps"] == 0
    for layer, (kernel, _), e in zip(model.layers, before, expected):
        step = layer.kernel.numpy() - kernel
        assert ref.rel_err(step, -LR * nu * e["update"][:-1]) < 2e-4


def test_progress_bar_history_and_tensorboard_show_the_schedules(tmp_path, capsys):
    x, y = _data(48)
    lr = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.9)
    damping = keras.optimizers.schedules.PolynomialDecay(1e-2, decay_steps=10, end_learning_rate=1e-3)
    model = _mlp()
    opt = keras_kfac.KFAC(learning_rate=lr, damping=damping, kl_clip=1e-3, inverse_every=2)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    x_bad = x.copy()
    x_bad[20, 0] = np.inf  # batch 3 of every epoch is skipped
    log_dir = str(tmp_path / "logs")
    board = keras.callbacks.TensorBoard(log_dir, update_freq="epoch")
    history = model.fit(x_bad, y, batch_size=8, epochs=3, shuffle=False, verbose=2, callbacks=[board]).history
    printed = capsys.readouterr().out  # verbose=2: one progress line per epoch
    for name in ("learning_rate", "damping", "kl_clip_factor", "skipped_steps"):
        assert printed.count(f" - {name}: ") == 3
    # Values at the end of each epoch: the schedules at the step counter (applied steps only).
    steps = np.array([5, 10, 15])
    np.testing.assert_allclose(history["learning_rate"], 0.1 * 0.9**steps, rtol=1e-6)
    np.testing.assert_allclose(history["damping"], 1e-2 - 9e-3 * np.minimum(steps, 10) / 10, rtol=1e-6)
    assert history["skipped_steps"] == [1, 2, 3]
    assert all(0.0 < v <= 1.0 for v in history["kl_clip_factor"])

    events = glob.glob(os.path.join(log_dir, "train", "events.out.tfevents.*"))
    assert events
    scalars = {}
    for path in events:
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag.startswith("epoch_"):  # the scalars; Keras also writes the model's config
                    scalars.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    for name in ("learning_rate", "damping", "kl_clip_factor", "skipped_steps"):
        logged = scalars[f"epoch_{name}"]
        np.testing.assert_allclose([logged[e] for e in range(3)], history[name], rtol=1e-6)
