"""Reports as one self-contained HTML file each: inline SVG and CSS, no script, no network.

The run report (``optimize --report r.html``) is here, with the pieces the tuner's report shares: the
style, horizontal bars of a per-layer error, and cells cut short with the whole text in a tooltip.
The markup is well-formed XML (every element closed, text escaped), so a test reads it back with an
XML parser and a browser renders it as HTML.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from typing import Any

from .inspect_model import ModelSummary
from .report import RunReport, StepReport, worst_output

WIDTH = 720
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
tr.chosen { background: #e8f4e8; font-weight: bold; }
.within { fill: #2b7bb9; }
.over { fill: #fff; stroke: #c0392b; stroke-width: 1.5; }
.unchanged, .failed { fill: #bbb; }
.chosen-ring { fill: none; stroke: #1a7f37; stroke-width: 2.5; }
.axis { stroke: #444; }
.bar { fill: #888; }
.bar.int8, .bar.cluster8 { fill: #2b7bb9; }
.bar.float, .bar.float32 { fill: #e67e22; }
.bar.fp16 { fill: #8e44ad; }
.bar.int4 { fill: #16a085; }
.bar.cluster4 { fill: #1a5276; }
.grid { stroke: #eee; }
.budget { stroke: #c0392b; stroke-dasharray: 6 4; }
.failed-step { color: #c0392b; }
text { font-size: 11px; fill: #333; }
"""
BARS = 30  # the worst this many layers get a bar
LAYER_ROWS = 300  # rows of "what each layer became" per step


@dataclass(frozen=True)
class Bar:
    """One layer's bar: its label, the error it adds (the length), a CSS class (the colour) and a tooltip."""

    label: str
    error: float
    kind: str
    note: str = ""


def bars_svg(bars: list[Bar]) -> str:
    """Horizontal bars, the worst ``BARS`` first, each labelled with its error."""
    shown = sorted(bars, key=lambda bar: -bar.error)[:BARS]
    largest = max((bar.error for bar in shown), default=0.0) or 1.0
    label_width, bar_width, row = 330, WIDTH - 330 - 90, 18
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{row * len(shown) + 10}" role="img">']
    for index, bar in enumerate(shown):
        y = 5 + index * row
        length = max(0.0, bar.error) / largest * bar_width
        out.append(f'<text x="{label_width - 6}" y="{y + 12}" text-anchor="end">{escape(bar.label[-60:])}</text>')
        out.append(f'<rect class="bar {escape(bar.kind)}" x="{label_width}" y="{y + 2}" width="{max(1.0, length):.1f}" height="{row - 5}">'
                   f"<title>{escape(bar.note or bar.kind)}</title></rect>")
        out.append(f'<text x="{label_width + length + 6:.1f}" y="{y + 12}">{bar.error:.2e}</text>')
    out.append("</svg>")
    return "\n".join(out)


def legend_svg(kinds: list[str]) -> str:
    """A swatch and the name of each kind of bar."""
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="20" role="img">']
    for index, kind in enumerate(kinds):
        x = 10 + index * 110
        out.append(f'<rect class="bar {escape(kind)}" x="{x}" y="4" width="12" height="12"><title>{escape(kind)}</title></rect>')
        out.append(f'<text x="{x + 18}" y="14">{escape(kind)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def int8_sensitivity_bars(rows: list[dict[str, Any]]) -> list[Bar]:
    """qdq's per-node scan (``sensitivity=true``): each node's error when only it is int8."""
    return [Bar(f"{row.get('node', '')} ({row.get('kind', '')})", max(0.0, 1.0 - float(row.get("cosine_alone", 1.0))),
                "int8" if row.get("status") == "int8" else "float", str(row.get("status", ""))) for row in rows]


def shortened(text: str, limit: int = 200) -> str:
    """A long text cut to ``limit`` characters in its cell, whole in the tooltip."""
    if len(text) <= limit:
        return escape(text)
    return f'<span title="{escape(text)}">{escape(text[:limit])}...</span>'


def render_run(report: RunReport) -> str:
    """The run report: the model before and after, every step, and for each step the error each layer
    added alone (where the pass measured it) and what became of every layer it touched or left alone."""
    title = f"onnxsparse optimize: {report.input.source}"
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/>',
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>onnxsparse optimize: <code>{escape(report.input.source)}</code></h1>",
        f"<p>pipeline <code>{escape(report.pipeline)}</code>; failure policy {escape(report.policy)}; {report.seconds:.1f} s.</p>",
        _models_table(report.input, report.output, report.output_path),
        _verdict(report),
        "<h2>Steps</h2>",
        _steps_table(report.steps),
    ]
    for number, step in enumerate(report.steps, 1):
        parts += _step_section(number, step)
    if report.warnings:
        parts += ["<h2>Warnings</h2>", "<ul>", *(f"<li>{escape(w)}</li>" for w in report.warnings), "</ul>"]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _models_table(before: ModelSummary, after: ModelSummary | None, path: str | None) -> str:
    rows = ["<table><tr><th></th><th>file</th><th>bytes</th><th>nodes</th><th>parameters</th><th>non-zero</th></tr>"]
    for label, summary, where in (("input", before, before.source), ("output", after, path or "(not written)")):
        if summary is None:
            continue
        ratio = f" ({summary.file_bytes / before.file_bytes:.3f}x)" if label == "output" and before.file_bytes else ""
        rows.append(f"<tr><td>{label}</td><td><code>{escape(str(where))}</code></td><td class=\"number\">{summary.file_bytes:,}{ratio}</td>"
                    f"<td class=\"number\">{summary.nodes:,}</td><td class=\"number\">{summary.parameters:,}</td>"
                    f"<td class=\"number\">{summary.nonzero_parameters:,}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _verdict(report: RunReport) -> str:
    lines = [f"<p>validated on {escape(report.inputs)}"]
    if report.calibration:
        lines.append(f"; the passes fitted on {escape(report.calibration)}")
    final = report.final_validation
    if final is not None:
        verdict = "passed" if final.passed else '<b class="failed-step">FAILED</b>'
        lines.append(f". Final validation against the input: {verdict}; {escape(worst_output(final))}")
    lines.append(".</p>")
    return "".join(lines)


def _steps_table(steps: list[StepReport]) -> str:
    fields = ["#", "step", "status", "changes", "left alone", "worst output against the input", "latency", "run s", "why"]
    rows = ["<table><tr>" + "".join(f"<th>{f}</th>" for f in fields) + "</tr>"]
    for number, step in enumerate(steps, 1):
        latency = step.figures.get("latency_vs_input")
        cells = [str(number), f"<code>{escape(step.spec)}</code>", escape(step.status), str(len(step.changes)), str(len(step.skipped)),
                 escape(worst_output(step.validation)), "-" if latency is None else f"{float(latency):.3f}x",
                 f"{step.seconds.get('run', 0.0):.1f}", shortened(step.reason)]
        rows.append("<tr>" + "".join(f'<td class="number">{c}</td>' if i in (0, 3, 4, 6, 7) else f"<td>{c}</td>" for i, c in enumerate(cells))
                    + "</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _step_section(number: int, step: StepReport) -> list[str]:
    if not step.changes and not step.skipped:
        return []
    parts = [f"<h2>Step {number}: <code>{escape(step.spec)}</code> ({escape(step.status)})</h2>"]
    scan = step.figures.get("sensitivity")
    if isinstance(scan, list) and scan:
        parts += [("<p>How far the outputs move when only this node is int8 (1 - cosine of the worst output, on calibration "
                   "samples), worst first; blue: int8 in the result, orange: kept float.</p>"), bars_svg(int8_sensitivity_bars(scan))]
    alone = [Bar(change.target, float(change.details["drift_alone"]), change.action, change.action)
             for change in step.changes if isinstance(change.details.get("drift_alone"), (int, float))]
    if alone:
        parts += [("<p>How far the outputs moved with only this tensor in its format (1 - cosine of the worst output, on "
                   "calibration samples), worst first; the colour is the format:</p>"), legend_svg(sorted({bar.kind for bar in alone})),
                  bars_svg(alone)]
    parts.append(_layers_table(step))
    return parts


def _layers_table(step: StepReport) -> str:
    rows = ["<table><tr><th>node, tensor or channels</th><th>what became of it</th></tr>"]
    entries = [(c.target, c.action) for c in step.changes] + [(s.target, f"left alone: {s.reason}") for s in step.skipped]
    rows += [f"<tr><td>{escape(target)}</td><td>{shortened(what)}</td></tr>" for target, what in entries[:LAYER_ROWS]]
    if len(entries) > LAYER_ROWS:
        rows.append(f"<tr><td colspan=\"2\">and {len(entries) - LAYER_ROWS} more (all of them in the JSON report)</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)
