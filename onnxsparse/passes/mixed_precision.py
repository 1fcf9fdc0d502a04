"""``mixed-precision``: each weight in the smallest format the tolerance leaves it, for a smaller file.

A weight tensor can stay float32 or become float16 (stored half, a Cast that onnxruntime folds at
load), an 8-bit or a 4-bit k-means codebook (the ``cluster`` pass's), or 4-bit blocks (the
``weight-only`` pass's MatMulNBits, for MatMul weights). How much each format moves the outputs is
probed for every tensor alone on calibration samples (1 - the worst output's cosine). Per tensor, a
format that another beats on both bytes and drift, or that lies above the line between two others,
drops out: what remains is a ladder of downgrades, each costing more drift per byte saved than the
one before. All tensors' downgrades are sorted by that cost, and the pass keeps the longest run of
them, cheapest first, whose model holds the step's tolerance on calibration data (a binary search,
about log2(downgrades) validations), steps over one that breaks it and searches on (``step_over``
times), then confirms the choice on calibration samples the search never judged by, taking the
costliest back while it does not hold there. The drifts alone only order the downgrades; the
tolerance is judged on the whole model, every time.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..blockwise import BlockCodes, BlockScheme
from ..calibration import read_once
from ..codebook import Codebooks, fit_codebooks
from ..errors import InputDataError
from ..graph import (
    MICROSOFT_DOMAIN,
    at_opset,
    from_gs,
    import_domain,
    stored_constant,
    to_gs,
    unique_name,
    with_initializer_values,
)
from ..layerwise import viewable_hessians
from ..limits import CALIBRATION_SAMPLES
from ..validation import DriftProbe, Tolerance
from ..weights import WeightSite
from .base import Change, Pass, PassContext, PassResult, Requirement, Skip, register
from .cluster import UINT4_CAST_OPSET, Cluster
from .weight_only import INT4_IR_VERSION, WeightOnly

log = logging.getLogger(__name__)

# The formats a weight can take, besides staying float32 (bytes per weight, roughly: 2, 1, 0.625, 0.5).
FORMATS = ("fp16", "cluster8", "int4", "cluster4")
FLOAT16_MAX = 65504.0


@dataclass
class Encoding:
    """One weight in one format: what the file stores (``payload``; None for float16), its bytes, and
    how far that format alone moves the model's outputs."""

    format: str
    payload: Codebooks | BlockCodes | None
    nbytes: int
    drift: float = 0.0

    def decoded(self, value: np.ndarray) -> np.ndarray:
        """The float32 weight the model computes with."""
        if self.payload is None:
            return np.asarray(value).astype(np.float16).astype(np.float32)
        if isinstance(self.payload, Codebooks):
            return self.payload.decoded()
        return self.payload.dequantized()


@dataclass(frozen=True)
class Downgrade:
    """A weight's step down its ladder: to ``encoding``, saving ``saved`` bytes at ``cost`` drift per byte."""

    site: str
    encoding: Encoding
    saved: int
    cost: float
    step: int  # its place on the weight's ladder


@register
@dataclass(frozen=True)
class MixedPrecision(Pass):
    """Each weight in the smallest of float32, float16, an 8-bit or 4-bit codebook or 4-bit blocks
    that keeps the model within tolerance: formats probed per tensor on calibration data, then taken
    cheapest drift per byte first while the whole model holds the tolerance (needs --calibration).

    The point is the file: codebooks and float16 decode at load (same speed as float32);
    4-bit blocks run as onnxruntime's MatMulNBits kernel. The report lists each tensor's format and
    the drift it caused alone.
    """

    name = "mixed-precision"
    default_tolerance = Tolerance(min_cosine=0.97)
    bounds_labels = True
    may_change_speed = True  # MatMulNBits is a kernel of its own

    formats: tuple[str, ...] = field(default=FORMATS, metadata={
        "help": f"the formats to choose from besides float32: {', '.join(FORMATS)} (int4: MatMul weights, as MatMulNBits)"})
    method: Literal["nearest", "gptq"] = field(default="nearest", metadata={
        "help": "nearest: int4 blocks rounded to nearest, weights to their nearest centroid; gptq: each layer's rounding errors "
                "compensated on its calibration inputs (Conv, Gemm and MatMul weights read by one node). gptq let the search take "
                "more 4-bit tensors that then broke the budget on held-out data (MobileNetV2 agreement 0.9375, MiniLM worst sentence "
                "0.963, both against budgets the calibration samples held)"})
    block: int = field(default=32, metadata={"help": "int4: rows of K sharing a scale"})
    scope: Literal["tensor", "channel", "scaled"] = field(default="scaled", metadata={"help": "codebooks' scope (see cluster's scope)"})
    embeddings: bool = field(default=True, metadata={"help": "embedding tables too (constant data that only Gathers read)"})
    min_elements: int = field(default=4096, metadata={"help": "smaller tensors stay float32"})
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "weight, node name or op type patterns left float32"})
    iterations: int = field(default=30, metadata={"help": "k-means iterations at most"})
    calibration_samples: int = field(default=CALIBRATION_SAMPLES, metadata={"help": "gptq: calibration samples read"})
    step_over: int = field(default=8, metadata={
        "help": "downgrades that broke the tolerance to step over, each followed by a search of the ones after it (each costs a few "
                "validations)"})

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats or len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats {', '.join(self.formats) or '(none)'}: one or more of {', '.join(FORMATS)}, each once")
        BlockScheme(4, self.block)  # raises ValueError on a bad block
        if self.iterations < 1 or self.min_elements < 1 or self.calibration_samples < 1 or self.step_over < 0:
            raise ValueError("iterations, min_elements and calibration_samples must be at least 1, step_over at least 0")

    def needs(self) -> frozenset[Requirement]:
        return frozenset({Requirement.CALIBRATION})

    @property
    def _codebooks(self) -> Cluster:
        return Cluster(scope=self.scope, embeddings=self.embeddings, min_elements=self.min_elements, exclude=self.exclude, iterations=self.iterations)

    @property
    def _blocks(self) -> WeightOnly:
        return WeightOnly(bits=4, block=self.block, method="gptq" if self.method == "gptq" else "rtn")

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        if context.calibration is None or context.validate is None:
            raise InputDataError("mixed-precision needs calibration data (--calibration): it probes each weight's formats on it")
        result = PassResult(model)
        sites = self._probed_sites(model, result)
        if not sites:
            result.skipped.append(Skip("model", f"no float32 main-graph weight of {self.min_elements} elements or more"))
            return result
        formats, at_uint4 = self._usable_formats(model, result)
        probe = DriftProbe(model, context.calibration)
        ladders = self._ladders(model, sites, formats, probe, context, result)
        downgrades = sorted((d for ladder in ladders.values() for d in ladder), key=lambda d: (d.cost, d.step))
        by_name = {s.name: s for s in sites}
        taken = self._confirmed(model, by_name, self._holding(model, by_name, downgrades, context, result), context, result)
        chosen = {d.site: d.encoding for d in taken}
        self._explain_the_rest(sites, formats, chosen, ladders, result)
        if chosen:
            packed = any(e.format == "cluster4" for e in chosen.values())
            if packed and at_uint4 is not model:
                result.warnings.append(f"mixed-precision: opset raised to {UINT4_CAST_OPSET} (uint4 codebook indices)")
                result.figures["opset_raised_to"] = UINT4_CAST_OPSET
            result.model = self._written(at_uint4 if packed and at_uint4 is not None else model, chosen, packed, result)
        return result

    def _usable_formats(self, model: onnx.ModelProto, result: PassResult) -> tuple[tuple[str, ...], onnx.ModelProto | None]:
        """The formats asked for that this model can be written in, and the model at the opset that
        4-bit codebook indices need (uint4: 21) when they are among them. Decided before any probe:
        the search prices a 4-bit codebook at half a byte per weight."""
        if "cluster4" not in self.formats:
            return self.formats, None
        try:
            return self.formats, at_opset(model, UINT4_CAST_OPSET)
        except InputDataError as error:
            result.warnings.append(f"mixed-precision: 4-bit codebooks left out: their uint4 indices need opset {UINT4_CAST_OPSET}, and {error}")
            return tuple(f for f in self.formats if f != "cluster4"), None

    # -- what to probe -----------------------------------------------------------------------

    def _probed_sites(self, model: onnx.ModelProto, result: PassResult) -> list[WeightSite]:
        """The cluster pass's choice of weights, less those a probe cannot swap alone (Constant nodes,
        subgraphs): the probe replaces main-graph initializers."""
        initializers = {tensor.name for tensor in model.graph.initializer}
        sites = []
        for site in self._codebooks.chosen_sites(to_gs(model), model, result):
            if site.name in initializers and not site.in_subgraph:
                sites.append(site)
            else:
                result.skipped.append(Skip(site.name, "a Constant node's value or read in a subgraph: kept float32 (the probe swaps "
                                                      "main-graph initializers)"))
        return sites

    def _ladders(self, model: onnx.ModelProto, sites: list[WeightSite], formats: tuple[str, ...], probe: DriftProbe, context: PassContext,
                 result: PassResult) -> dict[str, list[Downgrade]]:
        """Every weight's downgrades, each format it can take probed alone."""
        hessians = self._hessians(model, sites, probe, result) if self.method == "gptq" else {}
        ladders = {}
        for index, site in enumerate(sites):
            encodings = [self._encoded(site, fmt, hessians.get(site.name)) for fmt in formats if not self._why_not(site, fmt)]
            for encoding in encodings:
                encoding.drift = probe.drift_with({site.name: encoding.decoded(site.value)})
            ladders[site.name] = _ladder(site.name, site.value.nbytes, encodings)
            if context.progress:
                context.progress("mixed-precision probes", index + 1, len(sites))
        return ladders

    def _hessians(self, model: onnx.ModelProto, sites: list[WeightSite], probe: DriftProbe, result: PassResult) -> dict[str, np.ndarray]:
        """XᵀX per group of every layer's input that gptq can view, in one pass over the calibration
        samples the probe does not judge by."""
        source = read_once(probe.held_out, model, limit=self.calibration_samples)
        grams, unviewed = viewable_hessians(model, sites, source, self.calibration_samples, label="mixed-precision layer inputs")
        result.skipped.extend(Skip(name, f"gptq: {reason}; its formats round to nearest") for name, reason in unviewed.items())
        return grams

    def _why_not(self, site: WeightSite, fmt: str) -> str:
        """Why ``site`` cannot take ``fmt`` (empty when it can)."""
        if fmt == "fp16":
            peak = float(np.max(np.abs(site.value)))
            return f"float16 cannot hold its largest magnitude, {peak:.6g}" if peak > FLOAT16_MAX else ""
        if fmt == "int4":
            if site.op != "MatMul":
                return f"int4 blocks are MatMulNBits weights, not {site.op}'s"
            reason = self._blocks.why_not(site)
            return f"int4 blocks: {reason}" if reason else ""
        return ""

    def _encoded(self, site: WeightSite, fmt: str, hessian: np.ndarray | None) -> Encoding:
        """``site`` in ``fmt`` (one :meth:`_why_not` allows); ``hessian``: its input's XᵀX per group,
        to compensate the rounding with."""
        value = np.asarray(site.value)
        if fmt == "fp16":
            return Encoding(fmt, None, value.size * 2)
        if fmt == "int4":
            codes = self._blocks.codes(value, hessian[0] if hessian is not None else None)
            return Encoding(fmt, codes, codes.codes.size // 2 + codes.scales.nbytes)
        bits = 8 if fmt == "cluster8" else 4
        books = fit_codebooks(value, 1 << bits, self.scope, site.out_axis, iterations=self.iterations)
        if hessian is not None:
            books = self._codebooks.compensated(site, books, hessian)
        extra = books.centroids.nbytes + (books.scales.nbytes if books.scales is not None else 0)
        if len(books.centroids) > 1:  # a book per channel: each channel's int32 offset into them (see Cluster.materialize)
            extra += value.shape[site.out_axis] * 4
        return Encoding(fmt, books, (value.size * bits + 7) // 8 + extra)

    # -- choosing ----------------------------------------------------------------------------

    def _holding(self, model: onnx.ModelProto, sites: dict[str, WeightSite], downgrades: list[Downgrade], context: PassContext,
                 result: PassResult) -> list[Downgrade]:
        """The downgrades the model takes within tolerance: the longest run of them, cheapest first
        (binary search, the whole list tried first); then the one that broke it is stepped over, with
        its weight's later steps, and the search goes on in the rest, ``step_over`` times at most (one
        tensor that flips a label should not keep every cheaper-looking one after it float)."""
        validate = context.validate
        assert validate is not None
        trials = 0
        taken: list[Downgrade] = []

        def holds(extra: list[Downgrade]) -> bool:
            nonlocal trials
            trials += 1
            passed = validate(_trial(model, sites, [*taken, *extra])).passed
            log.info("mixed-precision: %d + %d downgrades %s", len(taken), len(extra), "hold" if passed else "break the tolerance")
            return passed

        rest = downgrades
        stepped_over: list[Downgrade] = []
        while rest:
            if holds(rest):
                taken += rest
                break
            holding, breaking = 0, len(rest)
            while breaking - holding > 1:
                middle = (holding + breaking) // 2
                if holds(rest[:middle]):
                    holding = middle
                else:
                    breaking = middle
            taken += rest[:holding]
            breaker = rest[holding]
            if len(stepped_over) == self.step_over:
                break
            stepped_over.append(breaker)
            rest = [d for d in rest[holding + 1:] if d.site != breaker.site]
        result.figures.update(downgrades_taken=f"{len(taken)} of {len(downgrades)}", validations=trials,
                              stepped_over=[f"{d.site} -> {d.encoding.format}" for d in stepped_over])
        return taken

    @staticmethod
    def _confirmed(model: onnx.ModelProto, sites: dict[str, WeightSite], taken: list[Downgrade], context: PassContext,
                   result: PassResult) -> list[Downgrade]:
        """``taken``, or as much of it as also holds on calibration samples the search never judged by
        (``context.confirm``): the downgrades that cost the most drift per byte go first, by binary
        search. The search tried many trials against the same samples, so its choice fits them a little:
        on MobileNetV2 one held top-1 agreement 0.95 there and gave 0.875 on held-out photos."""
        if not taken or context.confirm is None:
            return taken
        ordered = sorted(taken, key=lambda d: (d.cost, d.step))
        verdict = context.confirm(_trial(model, sites, ordered))
        if verdict is None:
            result.warnings.append("mixed-precision: the choice is not confirmed: the calibration set has no samples besides those the "
                                   "search judged by")
            return taken
        if verdict.passed:
            result.figures["confirmed"] = True
            return taken
        holding, breaking, trials = 0, len(ordered), 1
        while breaking - holding > 1:
            middle = (holding + breaking) // 2
            trials += 1
            again = context.confirm(_trial(model, sites, ordered[:middle]))
            if again is not None and again.passed:
                holding = middle
            else:
                breaking = middle
        log.info("mixed-precision: %d of %d downgrades hold on the confirming samples", holding, len(ordered))
        result.figures.update(confirmed=False, backed_off=len(ordered) - holding, confirmations=trials)
        result.warnings.append(f"mixed-precision: {len(ordered) - holding} of {len(ordered)} downgrades the search chose broke the tolerance on "
                               "calibration samples it had not judged by, and were taken back")
        return ordered[:holding]

    def _explain_the_rest(self, sites: list[WeightSite], formats: tuple[str, ...], chosen: dict[str, Encoding], ladders: dict[str, list[Downgrade]],
                          result: PassResult) -> None:
        for site in sites:
            now = chosen.get(site.name)
            ladder = ladders[site.name]
            further = [d for d in ladder if now is None or d.step > next(x.step for x in ladder if x.encoding is now)]
            if not ladder:
                why = "; ".join(filter(None, (self._why_not(site, fmt) for fmt in formats))) or "no format asked for stores it in fewer bytes"
                result.skipped.append(Skip(site.name, f"float32: {why}"))
            elif further:
                nearest = further[0].encoding
                result.skipped.append(Skip(site.name, f"{now.format if now else 'float32'}: {nearest.format} next (drift alone {nearest.drift:.3g}) "
                                                      "did not fit within the tolerance with the other weights' formats"))

    # -- writing -----------------------------------------------------------------------------

    def _written(self, model: onnx.ModelProto, chosen: dict[str, Encoding], packed: bool, result: PassResult) -> onnx.ModelProto:
        """``model`` with each chosen weight in its format (``packed``: 4-bit codebook indices as uint4, the
        model at opset 21 already)."""
        graph = to_gs(model)
        sites = {s.name: s for s in self._codebooks.chosen_sites(graph, model, PassResult(model))}
        before = after = 0
        # int4 last: MatMulNBits replaces its MatMul, which a constant first operand's decoding is placed by
        for name, encoding in sorted(chosen.items(), key=lambda item: item[1].format == "int4"):
            site = sites[name]
            before += site.value.nbytes
            after += self._write(graph, site, encoding, packed)
            result.changes.append(Change(name, encoding.format, {"nodes": site.node_names, "shape": list(site.value.shape),
                                                                 "drift_alone": round(encoding.drift, 6), "bytes": encoding.nbytes}))
        graph.cleanup().toposort()
        written = from_gs(graph, like=model)
        if any(e.format == "int4" for e in chosen.values()):
            import_domain(written, MICROSOFT_DOMAIN)
        if packed:
            written.ir_version = max(written.ir_version, INT4_IR_VERSION)
        result.figures.update(formats=dict(Counter(e.format for e in chosen.values())), weight_bytes_before=before, weight_bytes_after=after,
                              weight_bytes_ratio=round(after / max(before, 1), 4))
        return written

    def _write(self, graph: gs.Graph, site: WeightSite, encoding: Encoding, packed: bool) -> int:
        if isinstance(encoding.payload, Codebooks):
            return self._codebooks.materialize(graph, site, encoding.payload, packed and encoding.format == "cluster4")
        if isinstance(encoding.payload, BlockCodes):
            return self._blocks.materialize(graph, site, encoding.payload)
        return _write_half(graph, site)


def _ladder(name: str, float_bytes: int, encodings: list[Encoding]) -> list[Downgrade]:
    """The weight's downgrades along the lower convex hull of (bytes saved, drift), from float32 (0, 0):
    each saves bytes at more drift per byte than the one before; a format off the hull is never worth
    taking before (or instead of) the ones on it."""
    points = sorted(((float_bytes - e.nbytes, max(e.drift, 0.0), e) for e in encodings if e.nbytes < float_bytes),
                    key=lambda point: (point[0], point[1]))
    hull: list[tuple[int, float, Encoding | None]] = [(0, 0.0, None)]
    for point in points:
        if point[0] == hull[-1][0]:  # saves no more than the point before it, at more drift
            continue
        while len(hull) > 1 and (hull[-1][1] >= point[1] or _turn(hull[-2], hull[-1], point) <= 0):
            hull.pop()
        hull.append(point)
    return [Downgrade(name, current[2], current[0] - previous[0], (current[1] - previous[1]) / (current[0] - previous[0]), step)
            for step, (previous, current) in enumerate(itertools.pairwise(hull)) if current[2] is not None]


def _trial(model: onnx.ModelProto, sites: dict[str, WeightSite], downgrades: list[Downgrade]) -> onnx.ModelProto:
    """``model`` with each weight at the last of its downgrades listed, as float32 values (what the
    written formats compute with)."""
    chosen = {d.site: d.encoding for d in downgrades}
    return with_initializer_values(model, {name: encoding.decoded(sites[name].value) for name, encoding in chosen.items()})


def _turn(origin: tuple[int, float, object], middle: tuple[int, float, object], point: tuple[int, float, object]) -> float:
    """> 0 when ``middle`` lies below the line from ``origin`` to ``point`` (the hull stays convex)."""
    return (middle[0] - origin[0]) * (point[1] - origin[1]) - (middle[1] - origin[1]) * (point[0] - origin[0])


def _write_half(graph: gs.Graph, site: WeightSite) -> int:
    """The weight stored as float16, cast back to float32 where it is read: onnxruntime folds the Cast
    of a constant at load."""
    half = stored_constant(unique_name(graph, f"{site.name}_fp16"), np.asarray(site.value).astype(np.float16), site.tensor)
    wide = gs.Variable(unique_name(graph, f"{site.name}_float"), dtype=np.float32, shape=list(site.value.shape))
    cast = gs.Node("Cast", name=unique_name(graph, f"{site.name}_Cast"), attrs={"to": onnx.TensorProto.FLOAT}, inputs=[half], outputs=[wide])
    scope = site.uses[0].scope
    scope.nodes.insert(min(scope.nodes.index(use.node) for use in site.uses), cast)
    for use in site.uses:
        use.node.inputs[use.index] = wide
    return int(np.asarray(site.value).size * 2)
