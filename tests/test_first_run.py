"""A fit whose epochs end with a partial batch (60000 = 468 x 128 + 96 in the Fashion-MNIST
example) traces and compiles every K-FAC function during the first epoch only, and the first
step is traced once (the optimizer is built before it).

XLA compiles a `jit_compile` function once per concrete shape of its arguments (a trace with a
`None` batch dimension does not change that), so the compilations of a K-FAC function are the
distinct argument shapes it is called with. The tests record them at run time (`tf.py_function`
in Keras' step function, which is not XLA-compiled, just before each call) and count traces
with `experimental_get_tracing_count`.
"""

import importlib.util
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
BATCH, PARTIAL, EPOCHS = 64, 48, 5


def _data():
    # 4 steps per epoch, the 4th with 48 examples: with stats_every=5 the global steps 3, 7, 11, 15
    # are the partial ones and step 15 (epoch 4) is the first partial batch on a statistics step.
    rng = np.random.default_rng(0)
    n = 3 * BATCH + PARTIAL
    x = rng.normal(size=(n, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 4, size=n)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)


def _record_call_shapes(opt, calls: list) -> None:
    """Makes every function the optimizer compiles append (name, argument shapes) to `calls`
    each time it runs."""
    original = opt._function

    def function(key, fn, jit):
        compiled = original(key, fn, jit)
        if tf.executing_eagerly():
            return compiled
        name = key if isinstance(key, str) else key[0]

        def call(*args):
            tensors = [t for t in tf.nest.flatten(args) if tf.is_tensor(t)]

            def record(*shapes):
                calls.append((name, tuple(tuple(s.numpy().tolist()) for s in shapes)))
                return np.int32(0)

            done = tf.py_function(record, [tf.shape(t) for t in tensors], tf.int32)
            with tf.control_dependencies([done]):
                return compiled(*args)

        return call

    opt._function = function


class _EpochMarks(keras.callbacks.Callback):
    def __init__(self, calls, functions):
        super().__init__()
        self.calls, self.functions = calls, functions
        self.ends, self.traces = [], []

    def on_epoch_end(self, epoch, logs=None):
        self.ends.append(len(self.calls))
        self.traces.append({name: f.experimental_get_tracing_count() for name, f in self.functions().items()})


@pytest.mark.parametrize(
    "jit_compile, fisher",
    [(True, "sampled"), (False, "empirical")],
    ids=["xla-forward-sampled", "empirical"],
)
def test_no_trace_or_compilation_after_the_first_epoch_with_a_partial_last_batch(jit_compile, fisher):
    model = keras_kfac.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    opt = keras_kfac.KFAC(
        learning_rate=0.01,
        fisher=fisher,
        stats_every=5,
        inverse_every=5,
        stats_batch_size=32,
        statistics_jit=True,
        inverse_jit=False,
    )
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", jit_compile=jit_compile)
    calls = []
    _record_call_shapes(opt, calls)

    def functions():
        found = {str(key): f for key, f in opt._state.compiled.items()}
        if model._kfac_forward_fn is not None:
            found["forward"] = model._kfac_forward_fn
        return found

    marks = _EpochMarks(calls, functions)
    model.fit(_data(), epochs=EPOCHS, verbose=0, shuffle=False, callbacks=[marks])

    assert {"statistics", "inverses"} <= {name for name, _ in calls}
    assert ("forward" in functions()) == jit_compile
    first = {}
    for name, shapes in calls[: marks.ends[0]]:
        first.setdefault(name, set()).add(shapes)
    later = {}
    for name, shapes in calls[marks.ends[0] :]:
        if shapes not in first.get(name, set()):
            later.setdefault(name, set()).add(shapes)
    assert later == {}, f"new argument shapes (XLA compilations) after epoch 1: {later}"
    assert all(len(shapes) == 1 for shapes in first.values()), first  # the partial batch included
    assert marks.traces[1:] == marks.traces[:1] * (EPOCHS - 1), marks.traces


def _load_example():
    spec = importlib.util.spec_from_file_location("fashion_mnist_example", os.path.join(EXAMPLES, "fashion_mnist.py"))
    example = importlib.util.module_from_spec(spec)
    sys.path.insert(0, EXAMPLES)
    try:
        spec.loader.exec_module(example)
    finally:
        sys.path.remove(EXAMPLES)
    return example


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "-1"], "--epochs: must be a positive integer (1 or more), got -1"),
        (["--epochs", "0"], "--epochs: must be a positive integer (1 or more), got 0"),
        (["--batch-size", "-128"], "--batch-size: must be a positive integer (1 or more), got -128"),
        (["--batch-size", "0"], "--batch-size: must be a positive integer (1 or more), got 0"),
        (["--epochs", "two"], "--epochs: expected a positive integer, got 'two'"),
        (["--steps-per-epoch", "0"], "--steps-per-epoch: must be a positive integer (1 or more), got 0"),
    ],
)
def test_example_rejects_non_positive_counts(args, message, capsys):
    example = _load_example()
    with pytest.raises(SystemExit) as exit_info:
        example.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _run(code, pythonpath, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )


def test_quiet_tensorflow_keeps_what_is_not_start_up_info(tmp_path):
    # A stand-in for TensorFlow that writes, while it is imported, the start-up lines and others.
    fake = tmp_path / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import os, types, warnings\n"
        "os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n')\n"
        "os.write(2, b'I0000 00:00:1.2 7 port.cc:153] oneDNN custom operations are on.\\n')\n"
        "os.write(2, b'E0000 00:00:1.3 7 real.cc:1] a real error\\n')\n"
        "os.write(2, b'W0000 00:00:1.4 7 real.cc:2] a real warning\\n')\n"
        "warnings.warn('a Python warning')\n"
        "config = types.SimpleNamespace(list_physical_devices=lambda: [])\n"
    )
    result = _run("import quiet_tensorflow\nprint('imported')", [str(tmp_path / "fake"), EXAMPLES], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "imported\n"
    assert "I0000" not in result.stderr and "absl::InitializeLog" not in result.stderr
    for kept in ("E0000 00:00:1.3 7 real.cc:1] a real error", "W0000 00:00:1.4 7 real.cc:2] a real warning"):
        assert kept in result.stderr.splitlines()
    assert "UserWarning: a Python warning" in result.stderr
    # An import error still shows its traceback.
    (fake / "__init__.py").write_text("raise ImportError('broken tensorflow')\n")
    result = _run("import quiet_tensorflow", [str(tmp_path / "fake"), EXAMPLES], tmp_path)
    assert result.returncode == 1 and "ImportError: broken tensorflow" in result.stderr


def test_quiet_tensorflow_silences_the_real_start_up(tmp_path):
    code = "import quiet_tensorflow\nimport tensorflow as tf\nprint(tf.reduce_sum(tf.ones(3)).numpy())"
    result = _run(code, [EXAMPLES], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "3.0\n"
    lines = result.stderr.splitlines()
    # Left: at most TensorFlow's error on a machine without a CUDA driver ("failed call to cuInit").
    assert not [line for line in lines if line.startswith("I0000") or "absl::InitializeLog" in line], lines
    assert all(line.startswith("E0000") for line in lines), lines


class TraceCountingSequential(keras_kfac.Sequential):
    """Counts the Python calls of train_step: one a trace when the step is compiled."""

    def train_step(self, data):
        self.train_step_calls.append(1)
        return super().train_step(data)


@pytest.mark.parametrize("entry", ["fit_arrays", "fit_dataset", "train_on_batch"])
def test_the_first_step_is_traced_once_with_the_optimizer_built_before_it(entry):
    # Built inside the first trace (Keras' lazy build without a strategy), the optimizer's
    # variables made TensorFlow trace the whole step a second time: ResNet50's first epoch took
    # 65 s instead of 39 s.
    model = TraceCountingSequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(4),
        ]
    )
    model.train_step_calls = []
    opt = keras_kfac.KFAC(learning_rate=0.01)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 4, size=64)
    if entry == "fit_arrays":
        model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    elif entry == "fit_dataset":
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=2, verbose=0)
    else:
        for start in (0, 32, 0):
            model.train_on_batch(x[start : start + 32], y[start : start + 32])
    assert len(model.train_step_calls) == 1
    assert int(opt.iterations.numpy()) in (3, 4)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
