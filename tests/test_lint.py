"""ruff passes on the package, the tests and the tools, and mypy on the package, with the versions
pinned in the `test` extra (their rules change between versions; pyproject.toml holds their settings)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO


def test_ruff_finds_nothing():
    pytest.importorskip("ruff", reason="ruff comes with the test extra: pip install '.[test]'")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "onnxsparse", "tests", "tools"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_finds_nothing(tmp_path):
    pytest.importorskip("mypy", reason="mypy comes with the test extra: pip install '.[test]'")
    done = subprocess.run([sys.executable, "-m", "mypy", "onnxsparse", "--cache-dir", str(tmp_path / "mypy")],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
