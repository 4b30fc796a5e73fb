"""README.md's examples run as written.

Every ```python block runs on its own, in a fresh interpreter in an empty folder, within a time
limit. A block whose text holds a line `# not run: <why>` is skipped; that line must say why.
The TF-Serving commands are checked against the model the "Saving and resuming" block saves,
and the two commands at the top are pinned.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
TIME_LIMIT_S = 300

_FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
_NOT_RUN = re.compile(r"^# not run\b:?(.*)$", re.M)


def _blocks(language):
    """(line number, text) of each fenced block of that language, in order."""
    return [
        (README.count("\n", 0, m.start()) + 1, m.group(2)) for m in _FENCE.finditer(README) if m.group(1) == language
    ]


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _run_python(code, cwd):
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIME_LIMIT_S
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-4000:]}"
    return result


PYTHON_BLOCKS = _blocks("python")


def test_readme_has_python_examples():
    # Guards the extraction itself: if the fence pattern broke, the test below would run nothing.
    assert len(PYTHON_BLOCKS) >= 3
    assert sum(not _NOT_RUN.search(code) for _, code in PYTHON_BLOCKS) >= 2


@pytest.mark.parametrize("line, code", PYTHON_BLOCKS, ids=[f"README.md:{line}" for line, _ in PYTHON_BLOCKS])
def test_python_block_runs_as_written(line, code, tmp_path):
    marker = _NOT_RUN.search(code)
    if marker:
        reason = marker.group(1).strip()
        assert len(reason) >= 10, f"README.md:{line}: '# not run' must say why the block cannot run offline"
        pytest.skip(f"README.md:{line}: {reason}")
    _run_python(code, tmp_path)


def _block_containing(language, text):
    (code,) = [code for _, code in _blocks(language) if text in code]
    return code


def test_serving_commands_fit_the_saved_model(tmp_path):
    # The "Saving and resuming" block writes run.keras; the serving block exports it and shows
    # its signature; the curl request must have the exported input's shape.
    _run_python(_block_containing("python", 'model.save("run.keras")'), tmp_path)
    serving = _block_containing("bash", "saved_model_cli")
    commands = [c for c in serving.splitlines() if c.startswith(("python ", "saved_model_cli "))]
    assert len(commands) == 2
    shown = ""
    for command in commands:
        command = command.split("   #")[0].strip()
        result = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIME_LIMIT_S
        )
        assert result.returncode == 0, f"{command}\n{result.stderr[-4000:]}"
        shown = result.stdout
    signature = shown[shown.index("signature_def['serving_default']") :]
    (dims,) = re.findall(r"inputs\['\w+'\] tensor_info:\s+dtype: DT_FLOAT\s+shape: \(([-\d, ]+)\)", signature)[:1]
    features = int(dims.split(",")[-1])

    (curl,) = [c for c in serving.splitlines() if c.startswith("curl ")]
    request = json.loads(shlex.split(curl)[2])
    assert [len(instance) for instance in request["instances"]] == [features] * len(request["instances"])
    # The model and version folders of the export are the ones TF-Serving is pointed at.
    assert (tmp_path / "serving" / "classifier" / "1" / "saved_model.pb").is_file()
    assert "MODEL_NAME=classifier" in serving and '"$PWD/serving/classifier:/models/classifier"' in serving


def test_the_two_commands_at_the_top_are_unchanged():
    bash = [code.strip() for _, code in _blocks("bash")[:2]]
    assert bash == [
        '(apt-get update && apt-get install -y dataset-fashion-mnist); pip install -e ".[test]" '
        "&& python examples/fashion_mnist.py",
        "python -m pytest -q tests",
    ]
    assert README.index("```bash") < README.index("## ")


def test_measured_xla_figures_live_in_benchmarks_only():
    # README points to BENCHMARKS.md for measured speed ratios instead of restating them, and
    # the section it points to exists there and holds each figure once.
    assert not re.findall(r"\d+(?:\.\d+)?x (?:slower|faster)", README)
    section = "XLA or plain `tf.function` on CPU"
    assert f'BENCHMARKS.md, "{section}"' in README
    benchmarks = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert f"### {section}\n" in benchmarks
    for figure in ("**3.3x** slower under XLA", "**41x** slower"):
        assert benchmarks.count(figure) == 1, figure


def test_the_kfac_signature_shown_is_the_code_s():
    """README's `KFAC(...)` line gives every argument with the default the constructor has (those
    every Keras optimizer takes are its `**keras_optimizer_kwargs`)."""
    import ast
    import inspect

    from keras.src.optimizers.base_optimizer import BaseOptimizer

    import keras_kfac

    shown = re.search(r"^`KFAC\((learning_rate=.*?), \*\*keras_optimizer_kwargs\)`", README, re.M | re.S)
    assert shown, "README no longer shows the KFAC signature"
    call = ast.parse(f"f({' '.join(shown.group(1).split())})", mode="eval").body
    readme_defaults = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    parameters = inspect.signature(keras_kfac.KFAC.__init__).parameters.values()
    keras_arguments = inspect.signature(BaseOptimizer.__init__).parameters
    code_defaults = {
        p.name: p.default
        for p in parameters
        if p.default is not inspect.Parameter.empty and (p.name == "learning_rate" or p.name not in keras_arguments)
    }
    assert readme_defaults == code_defaults
