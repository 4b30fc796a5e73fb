"""`model.export` of a K-FAC-trained model serves from a process that cannot import keras_kfac."""

import json
import os
import subprocess
import sys

import keras
import numpy as np

import keras_kfac

# Loads the SavedModel with TensorFlow alone (keras_kfac made unimportable) and runs the
# `serving_default` signature, as TF-Serving would.
_SERVE = """
import json
import sys
sys.modules["keras_kfac"] = None  # `import keras_kfac` raises ImportError from here on
import numpy as np
import tensorflow as tf
path, x_path, out_path = sys.argv[1:4]
loaded = tf.saved_model.load(path)
serve = loaded.signatures["serving_default"]
(name,) = serve.structured_input_signature[1]
outputs = serve(**{name: tf.constant(np.load(x_path))})
np.savez(out_path, **{k: v.numpy() for k, v in outputs.items()})
try:
    import keras_kfac  # noqa: F401
    importable = True
except ImportError:
    importable = False
loaded_modules = [m for m in sys.modules if m.split(".")[0] == "keras_kfac" and sys.modules[m] is not None]
print(json.dumps({"importable": importable, "loaded": loaded_modules}))
"""


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)  # the repository is not on the serving side's path
    return env


def test_exported_model_serves_without_keras_kfac(tmp_path):
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
    # TF-Serving's layout: <model name>/<version>/saved_model.pb
    export_dir = tmp_path / "classifier" / "1"
    model.export(str(export_dir), verbose=False)
    expected = model.predict(x, verbose=0)

    pb = (export_dir / "saved_model.pb").read_bytes()
    assert b"keras_kfac" not in pb and b"KFAC" not in pb and b"kfac" not in pb

    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "served.npz"
    script = [sys.executable, "-c", _SERVE, str(export_dir), str(tmp_path / "x.npy"), str(out)]
    result = subprocess.run(script, capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"importable": False, "loaded": []}
    served = np.load(out)
    assert len(served.files) == 1
    np.testing.assert_allclose(served[served.files[0]], expected, rtol=1e-6, atol=1e-7)

    cli = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--all", "--dir", str(export_dir)]
    shown = subprocess.run(cli, capture_output=True, text=True, env=_env(), timeout=120)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "signature_def['serving_default']" in shown.stdout
    assert "shape: (-1, 5)" in shown.stdout
