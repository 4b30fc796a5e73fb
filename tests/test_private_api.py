"""Private Keras and TensorFlow APIs are used in one module only (keras_kfac/_private.py), so
that an upgrade that breaks one breaks there."""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "keras_kfac"
# Imports of private modules, TensorFlow's internal namespace, and attributes of other objects
# that Keras and TensorFlow keep private (a leading underscore after a dot, not on `self`).
PRIVATE = re.compile(r"keras\.src|tf\.__internal__|tensorflow\.python|(?<!self)(?<!cls)\.\b_[a-z]\w*")
# Members of the optimizer's own subclass protocol (listed in _private.py's docstring) and of
# this package's own modules, which are not Keras or TensorFlow APIs.
ALLOWED = re.compile(r"self\._|super\(\)\._|_private\b|\bopt\._|KFACTrainStep\._|registry\._BLOCKS")


def test_private_apis_only_in_the_private_module():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_private.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#")[0]
            if '"""' in line or code.strip().startswith(("`", "-")):
                continue
            for match in PRIVATE.finditer(code):
                start = max(0, match.start() - 20)
                if not ALLOWED.search(code[start : match.end()]):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "private API outside keras_kfac/_private.py:\n" + "\n".join(offenders)
