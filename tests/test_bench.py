"""tools/bench.py's pure parts: latency ratio, Markdown table, peer call specs, error lines, config
folders. No model cache and no onnxruntime session needed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from benchmark.cell import first_error_line, task_pipeline
from benchmark.configs import CONFIGS, Config, find_config
from benchmark.measure import latency_ratio, relative_spread
from benchmark.peer import Call, parse_calls
from benchmark.table import render_table, status_cell


def test_latency_ratio_is_a_ratio_of_medians() -> None:
    # The outlier (a descheduled run) moves neither median.
    assert latency_ratio([2.0, 2.0, 9.0], [4.0, 4.0, 4.1]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        latency_ratio([], [1.0])


def test_relative_spread() -> None:
    assert relative_spread([1.0] * 10) == 0.0
    assert relative_spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((5.0 - 1.0) / 3.0)


def ok_result(config: str, tool: str = "onnxsparse", macs: int = 800) -> dict:
    return {
        "config": config, "tool": tool, "status": "ok", "note": "", "tool_seconds": 1.25,
        "figures": {"file_bytes": 1500, "size_ratio": 0.5, "parameters": 1000, "nonzero_parameters": 500, "unused_tensors": 2, "unused_bytes": 64,
                    "macs": macs},
        "latency": {"ratio": 0.8}, "metrics": {"accuracy": 0.97, "cer": "inf"},
    }  # fmt: skip


def test_render_table_rows_and_error_cells() -> None:
    results = [
        ok_result("fp32", tool="fp32"),
        ok_result("magnitude 50%", macs=400) | {"note": "over tolerance (kept): magnitude-prune"},
        {"config": "int8", "tool": "onnxsparse", "status": "error", "error": "unknown pass 'qdq' | known: a\nsecond line", "tool_seconds": 0.3},
    ]
    lines = render_table(results, ["accuracy", "cer"]).splitlines()
    assert lines[0].startswith("| configuration | status | file bytes |") and lines[0].endswith("| accuracy | cer | tool s |")
    assert len(lines) == 2 + len(results)
    assert all(line.count(" | ") == lines[0].count(" | ") for line in lines[2:])  # an escaped pipe is no column
    assert "| fp32 | ok | 1,500 | 0.500 | 1,000 | 500 | 2 (64 B) | 1.000 | 0.80 | 0.9700 | inf | - |" == lines[2]
    assert "ok (over tolerance (kept): magnitude-prune)" in lines[3] and "| 2 (64 B) | 0.500 | 0.80 |" in lines[3]  # MACs 400 / 800
    assert "unknown pass 'qdq' \\| known: a second line" in lines[4] and lines[4].endswith("| - | - | 0.3 |")


def test_status_cell_of_a_rolled_back_pass_is_its_reason() -> None:
    assert status_cell({"status": "rolled-back", "note": "qdq rolled back: pass raised KeyError: 'x'"}) == "qdq rolled back: pass raised KeyError: 'x'"
    assert status_cell({"status": "timeout", "error": "timeout after 900 s"}) == "timeout after 900 s"


def test_parse_calls_takes_literal_keywords_only() -> None:
    assert parse_calls("simplify(); apply_magnitude_pruning(sparsity=0.5, n=None)") == [
        Call("simplify", {}),
        Call("apply_magnitude_pruning", {"sparsity": 0.5, "n": None}),
    ]
    for bad in ("f(1)", "os.system(cmd='x')", "f(a=open('x'))", "", "f(**k)"):
        with pytest.raises((ValueError, SyntaxError)):
            parse_calls(bad)


def test_every_peer_spec_parses() -> None:
    for config in CONFIGS:
        if config.tool in ("ort", "onnxsim"):
            assert parse_calls(config.pipeline)


def test_every_onnxsparse_row_parses_with_its_task_folder_filled_in(tmp_path: Path) -> None:
    from onnxsparse.spec import parse_pipeline

    (tmp_path / "train.npz").write_bytes(b"")  # rows that train name the task's training split
    for config in CONFIGS:
        if config.tool == "onnxsparse":
            assert parse_pipeline(task_pipeline(config.pipeline, tmp_path)), config.name
    assert task_pipeline('distill{data="$TASK/train.npz"}', tmp_path) == f'distill{{data="{tmp_path}/train.npz"}}'


def test_first_error_line_prefers_the_tools_own_line() -> None:
    assert first_error_line("$ cmd\nonnxsparse: error: unknown pass 'qdq'; known: a\n") == "unknown pass 'qdq'; known: a"
    assert first_error_line("Traceback (most recent call last):\n  File x\nValueError: bad shape\n") == "ValueError: bad shape"
    assert first_error_line("noise\nFAILED: KeyError: 'w'\n") == "KeyError: 'w'"
    assert first_error_line("onnxsparse: internal error: KeyError: 'w' (a bug)") == "internal error: KeyError: 'w' (a bug)"
    assert first_error_line("") == "no output"


def test_config_folders_are_unique_and_findable() -> None:
    assert Config("magnitude 50% wanda", "").slug == "magnitude-50pct-wanda"
    assert Config("channel 30% + int8", "").slug == "channel-30pct-plus-int8"
    assert len({c.slug for c in CONFIGS}) == len(CONFIGS)
    assert find_config("2of4-sparsegpt").name == "2:4 sparsegpt"
    with pytest.raises(KeyError):
        find_config("nope")
