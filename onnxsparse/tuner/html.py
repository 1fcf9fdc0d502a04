"""The tuner's report as one self-contained HTML file: the frontier drawn in inline SVG (no script, no
network, nothing to install), every candidate in a table, and the steps of the chosen one.

The markup is well-formed XML (every element closed, text escaped), so a test reads it back with an
XML parser and a browser renders it as HTML.
"""

from __future__ import annotations

import dataclasses
import math
from html import escape
from typing import TYPE_CHECKING

from ..errors import OnnxsparseError
from ..htmlpage import STYLE, WIDTH, bars_svg, int8_sensitivity_bars, shortened
from ..spec import parse_tolerance_text

if TYPE_CHECKING:
    from .records import Record, TuneResult

HEIGHT = 420
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 20, 50


def render_html(result: TuneResult) -> str:
    chosen = result.chosen
    headline = (f"chosen: <code>{escape(chosen.pipeline)}</code>, {_objective_text(chosen, result)}"
                if chosen is not None else escape(result.warnings[0] if result.warnings else "nothing was written"))
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/>',
        f"<title>onnxsparse tune: {escape(result.input)}</title><style>{STYLE}</style></head><body>",
        f"<h1>onnxsparse tune: <code>{escape(result.input)}</code></h1>",
        f"<p>objective: <b>{escape(result.objective)}</b>; budget: <b>{escape(result.budget)}</b>; {headline}</p>",
        (f"<p>{len(result.records)} candidates in {result.seconds:.0f} s, {escape(result.executor)}; figures cached in "
         f"<code>{escape(result.cache)}</code>.</p>"),
        "<h2>Frontier</h2>",
        frontier_svg(result),
        ("<p>Each point is a candidate: filled within the budget, hollow over it; the ring marks the one written; diamonds are "
         "onnxruntime's own quantizer on the same data, for reference. A latency with ~ is the short estimate every candidate "
         "gets; the finalists' long timings decide. "
         "Latencies are onnxruntime run times over the input model's, one thread, interleaved runs.</p>"),
        "<h2>Candidates</h2>",
        _candidates_table(result),
    ]
    if result.sensitivity:
        parts += ["<h2>Per-layer sensitivity: int8, one node at a time</h2>",
                  ("<p>How far the outputs move when only this node is quantized (1 - cosine of the worst output, on calibration "
                   "samples), worst first; blue: int8 in that candidate, orange: kept float.</p>"),
                  bars_svg(int8_sensitivity_bars(result.sensitivity))]
    if chosen is not None:
        parts += ["<h2>What the chosen pipeline did</h2>", _steps_table(chosen), _layers_table(result)]
    parts += [f"<p>{escape(w)}</p>" for w in result.warnings]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def frontier_svg(result: TuneResult) -> str:
    """Objective (x, lower is better) against quality (y, higher is better) of every candidate that
    has both; the budget's bound as a dashed line when it bounds what is plotted."""
    points = [(r, r.objective(result.objective), r.quality) for r in result.records]
    drawn = [(r, x, y) for r, x, y in points if x is not None and y is not None and 0 < x < math.inf and math.isfinite(y)]
    bound = _budget_line(result)
    # ratios on a log axis: 0.05x and 9x (onnxruntime's dynamic int8 on a CNN) both stay readable
    xs = [math.log10(x) for _, x, _ in drawn] + [0.0]
    ys = [y for _, _, y in drawn] + ([bound] if bound is not None else [])
    x_low, x_high = _padded(min(xs), max(xs))
    y_low, y_high = _padded(min(ys), max(ys)) if ys else (0.0, 1.0)

    def sx(x: float) -> float:
        return LEFT + (math.log10(x) - x_low) / (x_high - x_low) * (WIDTH - LEFT - RIGHT)

    def sy(y: float) -> float:
        return HEIGHT - BOTTOM - (y - y_low) / (y_high - y_low) * (HEIGHT - TOP - BOTTOM)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img">']
    for tick in _ratio_ticks(x_low, x_high):
        out.append(f'<line class="grid" x1="{sx(tick):.1f}" y1="{TOP}" x2="{sx(tick):.1f}" y2="{HEIGHT - BOTTOM}"/>')
        out.append(f'<text x="{sx(tick):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{tick:.3g}x</text>')
    for tick in _ticks(y_low, y_high):
        out.append(f'<line class="grid" x1="{LEFT}" y1="{sy(tick):.1f}" x2="{WIDTH - RIGHT}" y2="{sy(tick):.1f}"/>')
        out.append(f'<text x="{LEFT - 6}" y="{sy(tick) + 4:.1f}" text-anchor="end">{tick:.4g}</text>')
    out.append(f'<line class="axis" x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" y2="{HEIGHT - BOTTOM}"/>')
    out.append(f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{HEIGHT - BOTTOM}"/>')
    out.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2:.0f}" y="{HEIGHT - 12}" text-anchor="middle">{escape(_objective_label(result))}</text>')
    out.append(f'<text x="14" y="{(TOP + HEIGHT - BOTTOM) / 2:.0f}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(TOP + HEIGHT - BOTTOM) / 2:.0f})">{escape(result.quality_label)}</text>')
    out.append(f'<line class="axis" x1="{sx(1.0):.1f}" y1="{TOP}" x2="{sx(1.0):.1f}" y2="{HEIGHT - BOTTOM}" stroke-dasharray="2 3"/>')
    if bound is not None:
        out.append(f'<line class="budget" x1="{LEFT}" y1="{sy(bound):.1f}" x2="{WIDTH - RIGHT}" y2="{sy(bound):.1f}"/>')
        out.append(f'<text x="{WIDTH - RIGHT - 4}" y="{sy(bound) - 4:.1f}" text-anchor="end">budget</text>')
    for record, x, y in drawn:
        shape = (f'<rect class="{record.status} candidate peer" x="{sx(x) - 5:.1f}" y="{sy(y) - 5:.1f}" width="10" height="10" '
                 f'transform="rotate(45 {sx(x):.1f} {sy(y):.1f})">' if record.peer else
                 f'<circle class="{record.status} candidate" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5">')
        out.append(f"{shape}<title>{escape(record.pipeline)}: {x:.3f}x, {y:.4g}</title></{'rect' if record.peer else 'circle'}>")
        if record is result.chosen:
            out.append(f'<circle class="chosen-ring" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="9"/>')
            out.append(f'<text x="{sx(x) + 12:.1f}" y="{sy(y) - 10:.1f}">{escape(record.family)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _layers_table(result: TuneResult) -> str:
    if not result.layers:
        return ""
    rows = ["<table><tr><th>step</th><th>node, tensor or channels</th><th>what became of it</th></tr>"]
    rows += [f"<tr><td><code>{escape(r['step'])}</code></td><td>{escape(r['target'])}</td><td>{shortened(r['what'])}</td></tr>"
             for r in result.layers]
    rows.append("</table>")
    return "\n".join(rows)


def _candidates_table(result: TuneResult) -> str:
    fields = ["pipeline", "status", "size", "latency (estimate)", "latency 1 thread", "latency all cores", result.quality_label,
              "build s", "peak memory", "why"]
    rows = ["<table><tr>" + "".join(f"<th>{escape(f)}</th>" for f in fields) + "</tr>"]
    ordered = sorted(result.records, key=lambda r: (r.status != "within", r.objective(result.objective) or math.inf))
    for record in ordered:
        cells = [
            f"<code>{escape(record.pipeline)}</code>", escape(record.status + (" (cached)" if record.reused else "")),
            _ratio(record.size_ratio), _ratio(record.latency_estimate, "~"), _ratio(record.latency), _ratio(record.latency_all_cores),
            "-" if record.quality is None else f"{record.quality:.4g}", f"{record.build_seconds:.0f}",
            "-" if record.peak_memory is None else f"{record.peak_memory / 2**20:.0f} MiB", shortened(record.reason),
        ]
        kind = ' class="chosen"' if record is result.chosen else ""
        rows.append(f"<tr{kind}>" + "".join(f'<td class="number">{c}</td>' if 2 <= i <= 8 else f"<td>{c}</td>" for i, c in enumerate(cells)) + "</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _steps_table(record: Record) -> str:
    rows = ["<table><tr><th>step</th><th>status</th><th>changes</th><th>left alone</th><th>why</th></tr>"]
    for step in record.steps:
        rows.append(f"<tr><td><code>{escape(str(step['spec']))}</code></td><td>{escape(str(step['status']))}</td>"
                    f"<td class=\"number\">{step['changes']}</td><td class=\"number\">{step['skipped']}</td><td>{escape(str(step['reason']))}</td></tr>")
    rows.append("</table>")
    rows.append(f"<p>worst output against the input model: {escape(record.worst)}</p>")
    return "\n".join(rows)


def _budget_line(result: TuneResult) -> float | None:
    """Where the budget's first bound falls on the quality axis (which plots that bound, negated for a
    maximum, unless a task metric is plotted)."""
    if result.quality_label == "task metric":
        return None
    try:
        tolerance = parse_tolerance_text(result.budget, "--budget")
    except OnnxsparseError:  # "each pass's default tolerance": no bound to draw
        return None
    for field in dataclasses.fields(tolerance):
        value = getattr(tolerance, field.name)
        if value is not None:
            return -float(value) if field.name.startswith("max_") else float(value)
    return None


def _objective_text(record: Record, result: TuneResult) -> str:
    value = record.objective(result.objective)
    quality = "-" if record.quality is None else f"{record.quality:.4g}"
    what = "latency" if result.objective == "latency" else "size"
    return f"{what} {_ratio(value)} of the input's, {escape(result.quality_label)} {quality}"


def _objective_label(result: TuneResult) -> str:
    if result.objective == "size":
        return "file size over the input's"
    return "latency over the input's (one thread)"


def _ratio(value: float | None, mark: str = "") -> str:
    return "-" if value is None else f"{mark}{value:.3f}x"


def _padded(low: float, high: float) -> tuple[float, float]:
    if high - low < 1e-9:
        low, high = low - 0.05 * max(abs(low), 1.0), high + 0.05 * max(abs(high), 1.0)
    margin = 0.06 * (high - low)
    return low - margin, high + margin


def _ratio_ticks(log_low: float, log_high: float) -> list[float]:
    """1-2-5 ratios between two powers of ten (a log axis)."""
    ticks = [m * 10.0**e for e in range(math.floor(log_low), math.ceil(log_high) + 1) for m in (1, 2, 5)]
    return [t for t in ticks if log_low <= math.log10(t) <= log_high]


def _ticks(low: float, high: float, count: int = 6) -> list[float]:
    step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(step))
    nice = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step)
    first = math.ceil(low / nice) * nice
    return [first + i * nice for i in range(count + 2) if first + i * nice <= high]
