"""Seeded byte-mutants of the bundled models through the CLI, in this process: exit 0, 1 or 2 only,
never 3 (an internal error), never a hang, nothing written when a run fails, no leftovers, the input
untouched. tools/fuzz.py runs the same cases at length (forked, killed on a hang)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from fuzz import KINDS, Mutant, draw, run_case, run_in_process

SEED = 15
CASES = 400
TIME_LIMIT = 30.0  # seconds per command: a case here takes well under one


@pytest.fixture
def quiet_logs(caplog):
    """The CLI's warnings are part of the case, not of the test's output."""
    caplog.set_level(logging.CRITICAL, logger="onnxsparse")


def test_mutants_of_the_bundled_models_never_crash_hang_or_write_on_failure(tmp_path, quiet_logs):
    outcomes = [run_case(draw(SEED, case), _folder(tmp_path, case), run_in_process, TIME_LIMIT) for case in range(CASES)]
    problems = [f"{o.mutant.describe()}: {'; '.join(o.problems)}" for o in outcomes if o.problems]
    assert problems == []
    # the mutants reach both sides: some are refused, some still optimize (the test would prove
    # nothing if every mutant failed to parse)
    statuses = [o.statuses["optimize"] for o in outcomes]
    assert statuses.count(2) >= CASES // 4 and statuses.count(0) >= CASES // 10
    assert {o.mutant.kind for o in outcomes} == set(KINDS) and {o.mutant.target for o in outcomes} == {"onnx", "inputs.npz"}


def _folder(root: Path, case: int) -> Path:
    folder = root / f"case{case}"
    folder.mkdir()
    return folder


def test_a_case_is_drawn_from_its_seed_and_number_alone():
    assert draw(7, 3) == draw(7, 3)
    assert len({draw(7, case) for case in range(50)}) == 50


@pytest.mark.parametrize("mutant, expected", [
    (Mutant(0, 0, "m", "flip", 1, bytes([0x01, 0x80])), b"\x00\x03\x83\x03"),
    (Mutant(0, 0, "m", "set", 3, b"\xff\xee"), b"\xee\x02\x03\xff"),
    (Mutant(0, 0, "m", "truncate", 2), b"\x00\x02"),
    (Mutant(0, 0, "m", "insert", 1, b"\xaa"), b"\x00\xaa\x02\x03\x03"),
])
def test_mutations_do_what_they_say(mutant, expected):
    assert mutant.apply(b"\x00\x02\x03\x03") == expected


def test_the_known_non_utf8_mutant_is_refused_not_a_crash(tmp_path, quiet_logs):
    """The issue's find: bytes 889-890 of digits_transformer.onnx set to ff 80 (exit 3 before)."""
    outcome = run_case(Mutant(0, 0, "digits_transformer", "set", 889, b"\xff\x80"), tmp_path, run_in_process, TIME_LIMIT)
    assert outcome.statuses == {"inspect": 2, "optimize": 2} and not outcome.problems
    assert "is not UTF-8 text" in outcome.errors["optimize"]


def test_an_npz_header_numpy_cannot_tokenize_is_refused_not_a_crash(tmp_path, quiet_logs):
    """Found by tools/fuzz.py (seed 2, case 162): one bit of the inputs' .npy header flipped made
    numpy's header parser raise tokenize.TokenError, an exit 3."""
    outcome = run_case(Mutant(2, 162, "digits_transformer", "flip", 134, b"\x08", "inputs.npz"), tmp_path, run_in_process, TIME_LIMIT)
    assert outcome.statuses == {"validate": 2, "optimize": 2} and not outcome.problems
    assert "m.npz: cannot be read as .npz or .npy" in outcome.errors["optimize"]
