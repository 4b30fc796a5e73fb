"""Import TensorFlow without its start-up INFO lines; warnings and errors still print.

`import quiet_tensorflow` before Keras or TensorFlow (the examples do it first). It sets
`TF_CPP_MIN_LOG_LEVEL=2` unless already set, which hides TensorFlow's C++ INFO and WARNING
messages once its logging is initialized, and imports TensorFlow with file descriptor 2
redirected, because the INFO lines that its shared libraries log while loading (oneDNN, "Could
not find cuda drivers", absl's "All log messages before absl::InitializeLog()" banner) come
before that and ignore the variable. Of what was written to stderr in that window only those
INFO lines (`I0000 ...`) and the banner are dropped; everything else (E/W/F lines, Python
warnings and tracebacks) is written back to stderr. Set `TF_CPP_MIN_LOG_LEVEL=0` to see it all.
"""

import os
import re
import sys
import tempfile

_DROPPED = re.compile(r"I\d{4} |WARNING: All log messages before absl::InitializeLog\(\) is called")


def _import_tensorflow() -> None:
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # device discovery logs at start-up too
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not _DROPPED.match(line)))
            sys.stderr.flush()


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_import_tensorflow()
