"""`model.export` of a K-FAC-trained model serves from a process that cannot import keras_kfac.

Two independent checks, each shown to catch a SavedModel that does depend on keras_kfac:

- the export's files name nothing of K-FAC (`_kfac_mentions`); `tf.saved_model.save(model)`,
  which also saves the K-FAC optimizer state, is caught by it;
- a fresh process in which keras_kfac is reachable on the path but blocked by an import hook
  loads the export and serves `serving_default` with `model.predict`'s outputs, and the hook
  records that nothing tried to import keras_kfac; a SavedModel whose serving function calls
  keras_kfac code (through `tf.py_function`) is caught by it.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import keras_kfac
from keras_kfac import inversion

# The serving side. Before anything else it checks that keras_kfac could be imported here,
# then installs a meta-path hook that refuses (and records) every import of keras_kfac or its
# submodules, loads the SavedModel with TensorFlow alone and runs `serving_default`, as
# TF-Serving would. It reports what the hook saw, and whether the hook still refuses afterwards.
_SERVE = """
import importlib.abc
import importlib.util
import json
import sys

path, x_path, out_path = sys.argv[1:4]
reachable = importlib.util.find_spec("keras_kfac") is not None
attempts = []


class BlockKerasKfac(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "keras_kfac" or name.startswith("keras_kfac."):
            attempts.append(name)
            raise ImportError(f"{name} is blocked in this serving process")
        return None


sys.meta_path.insert(0, BlockKerasKfac())
import numpy as np
import tensorflow as tf

error = None
try:
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    (name,) = serve.structured_input_signature[1]
    outputs = serve(**{name: tf.constant(np.load(x_path))})
    np.savez(out_path, **{k: v.numpy() for k, v in outputs.items()})
except Exception as e:
    error = f"{type(e).__name__}: {e}"
while_serving = list(attempts)
loaded_modules = [m for m in sys.modules if m.split(".")[0] == "keras_kfac" and sys.modules[m] is not None]
try:
    import keras_kfac  # noqa: F401
    blocked_after = False
except ImportError:
    blocked_after = True
print(json.dumps({"reachable": reachable, "error": error, "attempts": while_serving,
                  "loaded": loaded_modules, "blocked_after": blocked_after}))
"""

# The repository root holding the keras_kfac under test: on the serving side's path, so only the
# hook stands between the serving process and keras_kfac.
_ROOT = str(Path(keras_kfac.__file__).resolve().parents[1])


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=_ROOT)


def _serve_without_keras_kfac(export_dir, x, tmp_path):
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "served.npz"
    if out.exists():
        out.unlink()
    script = [sys.executable, "-c", _SERVE, str(export_dir), str(tmp_path / "x.npy"), str(out)]
    result = subprocess.run(script, capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # The hook was needed (keras_kfac was importable there) and worked (it still refuses it).
    assert report["reachable"] and report["blocked_after"], report
    return report, out


def _kfac_mentions(saved_model_dir):
    """Every name containing "kfac" (any case) in any file of a SavedModel folder."""
    found = set()
    for path in Path(saved_model_dir).rglob("*"):
        if path.is_file():
            found |= {m.group(0).decode() for m in re.finditer(rb"[\w/.>]*kfac[\w/.>]*", path.read_bytes(), re.I)}
    return sorted(found)


def _trained_model():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 5)).astype("float32")
    y = rng.integers(0, 3, size=24)
    model = keras_kfac.Sequential(
        [
            keras.Input((5,), name="features"),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    opt = keras_kfac.KFAC(learning_rate=0.05, inverse_every=2)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return model, x


def test_exported_model_serves_without_keras_kfac(tmp_path):
    model, x = _trained_model()
    # TF-Serving's layout: <model name>/<version>/saved_model.pb
    export_dir = tmp_path / "classifier" / "1"
    model.export(str(export_dir), verbose=False)
    expected = model.predict(x, verbose=0)

    assert _kfac_mentions(export_dir) == []

    report, out = _serve_without_keras_kfac(export_dir, x, tmp_path)
    assert report["error"] is None, report
    assert report["attempts"] == [] and report["loaded"] == [], report
    served = np.load(out)
    assert len(served.files) == 1
    np.testing.assert_allclose(served[served.files[0]], expected, rtol=1e-6, atol=1e-7)

    cli = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--all", "--dir", str(export_dir)]
    shown = subprocess.run(cli, capture_output=True, text=True, env=_env(), timeout=120)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "signature_def['serving_default']" in shown.stdout
    assert "shape: (-1, 5)" in shown.stdout


def test_the_checks_catch_savedmodels_that_depend_on_keras_kfac(tmp_path):
    # 1. `tf.saved_model.save` of the compiled model also writes the K-FAC optimizer's state:
    #    the file scan names it.
    model, x = _trained_model()
    tf.saved_model.save(model, str(tmp_path / "with_optimizer"))
    assert _kfac_mentions(tmp_path / "with_optimizer")

    # 2. A serving function that runs keras_kfac Python code: nothing in the files names K-FAC,
    #    the SavedModel loads, but serving it in the blocked process fails.
    class UsesKerasKfac(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32, name="features")])
        def serve(self, features):
            pi_of = lambda a: inversion.pi_factor(tf.reduce_mean(a), tf.constant(1.0))  # noqa: E731
            pi = tf.py_function(pi_of, [tf.abs(features[0])], tf.float32)
            return {"output": features * pi}

    module = UsesKerasKfac()
    np.testing.assert_allclose(module.serve(tf.constant(x))["output"].shape, x.shape)  # serves in-process
    tf.saved_model.save(module, str(tmp_path / "py_function"), signatures={"serving_default": module.serve})
    assert _kfac_mentions(tmp_path / "py_function") == []
    report, _ = _serve_without_keras_kfac(tmp_path / "py_function", x, tmp_path)
    assert report["error"] is not None and "pyfunc" in report["error"], report
