"""The source distribution carries what its own tests import, the examples and the LICENSE.

The sdist is built offline with setuptools' PEP 517 backend (no `build` package, no network)
in a subprocess, from a copy of the checkout, so that the checkout gets no egg-info folder.
"""

import ast
import importlib.util
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"

_BUILD = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
_IGNORE = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist", ".*_cache", "*.keras")


def _local_imports(path: Path) -> set[str]:
    """Modules a test file imports that live in tests/ itself (found by the file's AST)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names if (TESTS / f"{name}.py").is_file()}


def _required_files() -> set[str]:
    """Paths (relative to the sdist root) that running the sdist's tests needs."""
    test_files = sorted(TESTS.glob("test_*.py"))
    required = {f"tests/{p.name}" for p in test_files} | {"tests/conftest.py"}
    for path in [*test_files, TESTS / "conftest.py"]:
        required |= {f"tests/{name}.py" for name in _local_imports(path)}
    # test_distributed.py starts distributed_worker.py by path as well as importing it.
    required.add("tests/distributed_worker.py")
    required |= {f"examples/{p.name}" for p in (REPO / "examples").glob("*.py")}
    required |= {"LICENSE", "README.md", "BENCHMARKS.md", "pyproject.toml", "setup.cfg"}
    return required


def test_helpers_are_found_by_the_import_scan():
    # Guards the scan itself: if it found nothing, the sdist check below would be vacuous.
    required = _required_files()
    for helper in ("conftest.py", "reference.py", "exact.py", "distributed_worker.py"):
        assert f"tests/{helper}" in required


def test_sdist_carries_the_tests_helpers_examples_and_license(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: the sdist cannot be built offline")
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 61:
        pytest.skip(f"setuptools {setuptools.__version__} is older than pyproject.toml's setuptools>=61")
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=_IGNORE)
    out = tmp_path / "dist"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", _BUILD, str(out)], cwd=source, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (archive,) = out.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    root = names[0].split("/")[0]
    carried = {name[len(root) + 1 :] for name in names if name.startswith(root + "/")}
    missing = sorted(_required_files() - carried)
    assert not missing, f"{archive.name} lacks {missing}"
    assert not [name for name in carried if "__pycache__" in name or name.endswith(".pyc")]
