"""ruff passes on the package, the tests and the tools, with the version pinned in the `test` extra
(ruff's default rules change between versions; pyproject.toml says which codes our noqa comments name)."""

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
