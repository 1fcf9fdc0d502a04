"""Markdown tables from cell results (plain dicts as written to result.json): one table per model,
one row per configuration. Pure functions over dicts, so they are tested without any model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MISSING = "-"


def pipe_safe(text: str) -> str:
    """A Markdown cell: '|' would end it and a newline would end the row."""
    return " ".join(str(text).split()).replace("|", "\\|")


def format_int(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, (int, float)) else MISSING


def format_ratio(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else MISSING


def format_metric(value: Any) -> str:
    if isinstance(value, str):  # "inf" / "nan" as stored in JSON
        return value
    if not isinstance(value, (int, float)):
        return MISSING
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.4g}"


def status_cell(result: Mapping[str, Any]) -> str:
    """'ok', 'ok (over tolerance (kept): ...)', or the first error line, cut to stay readable."""
    status = result.get("status", "missing")
    if status in ("error", "timeout"):
        text = result.get("error") or status
    elif status == "rolled-back":
        text = result.get("note") or status  # "<pass> rolled back: <reason>"
    elif result.get("note"):
        text = f"{status} ({result['note']})"
    else:
        text = status
    text = pipe_safe(text)
    return text if len(text) <= 160 else text[:157] + "..."


def unused_cell(figures: Mapping[str, Any]) -> str:
    count = figures.get("unused_tensors")
    if not isinstance(count, int):
        return MISSING
    return "0" if count == 0 else f"{count} ({format_int(figures.get('unused_bytes'))} B)"


def row_cells(result: Mapping[str, Any], metric_names: Sequence[str], fp32_macs: Any = None) -> list[str]:
    figures = result.get("figures") or {}
    latency = result.get("latency") or {}
    metrics = result.get("metrics") or {}
    return [
        pipe_safe(result.get("config", "?")),
        status_cell(result),
        format_int(figures.get("file_bytes")),
        format_ratio(figures.get("size_ratio"), 3),
        format_int(figures.get("parameters")),
        format_int(figures.get("nonzero_parameters")),
        unused_cell(figures),
        format_ratio(macs_ratio(figures, fp32_macs), 3),
        format_ratio(latency.get("ratio")),
        *(format_metric(metrics.get(name)) for name in metric_names),
        format_ratio(result.get("tool_seconds"), 1) if result.get("tool") != "fp32" else MISSING,
    ]


HEADERS = ("configuration", "status", "file bytes", "size x fp32", "params used", "non-zero", "unused tensors", "MACs x fp32",
           "latency x fp32")


# count_macs counts float Conv/Gemm/MatMul nodes only: on a quantized graph its figure is not comparable.
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                           "QLinearConv", "QLinearMatMul", "MatMulNBits", "GatherBlockQuantized"})


def macs_ratio(figures: Mapping[str, Any], fp32_macs: Any) -> float | None:
    if QUANTIZED_OPS & set(figures.get("op_histogram") or {}):
        return None
    macs = figures.get("macs")
    return macs / fp32_macs if isinstance(macs, int) and isinstance(fp32_macs, int) and fp32_macs > 0 else None


def render_table(results: Sequence[Mapping[str, Any]], metric_names: Sequence[str]) -> str:
    headers = [*HEADERS, *metric_names, "tool s"]
    numeric = set(range(2, len(headers)))  # every column after the status is a number: right-align
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if index in numeric else "---" for index in range(len(headers))) + "|",
    ]
    fp32 = next((r for r in results if r.get("tool") == "fp32"), {})
    fp32_macs = (fp32.get("figures") or {}).get("macs")
    lines += ["| " + " | ".join(row_cells(result, metric_names, fp32_macs)) + " |" for result in results]
    return "\n".join(lines)


def model_heading(model: str, results: Sequence[Mapping[str, Any]]) -> str:
    """'## mnist' plus the fp32 absolute figures every ratio below is relative to."""
    fp32 = next((r for r in results if r.get("tool") == "fp32" and r.get("status") == "ok"), None)
    if fp32 is None:
        return f"## {model}"
    latency, figures = fp32.get("latency") or {}, fp32.get("figures") or {}
    spread = latency.get("fp32_spread")
    return (
        f"## {model}\n\nfp32: {format_int(figures.get('file_bytes'))} bytes, median {format_ratio(latency.get('fp32_ms'))} ms per eval batch "
        f"on 1 thread over {latency.get('runs', '?')} interleaved runs"
        + (f" (p10-p90 spread {spread:.0%} of the median; the fp32 row's latency ratio is fp32 against itself)" if isinstance(spread, float) else "")
    )


def render_report(results_by_model: Mapping[str, Sequence[Mapping[str, Any]]], metrics_by_model: Mapping[str, Sequence[str]]) -> str:
    sections = []
    for model, results in results_by_model.items():
        sections.append(model_heading(model, results) + "\n\n" + render_table(results, metrics_by_model.get(model, ())))
    return "\n\n".join(sections) + "\n"


def render_configs(configs: Sequence[Any]) -> str:
    """The legend: what each row ran."""
    lines = ["| configuration | tool | pipeline |", "|---|---|---|"]
    lines += [f"| {pipe_safe(c.name)} | {c.tool} | `{pipe_safe(c.pipeline) or '(the model as cached)'}` |" for c in configs]
    return "\n".join(lines)
