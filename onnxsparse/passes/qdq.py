"""``qdq``: int8 quantization by QuantizeLinear/DequantizeLinear pairs, calibrated on data."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..activations import ChangingModelValues, channel_means, collect_ranges, tensor_values
from ..calibration import first_samples, samples_read
from ..errors import InputDataError, RuntimeLoadError
from ..files import write_text_atomically
from ..graph import (
    MICROSOFT_DOMAIN,
    at_opset,
    constant_value,
    downstream_names,
    from_gs,
    import_domain,
    name_unnamed_nodes,
    opset_version,
    overridable_initializers,
    stored_constant,
    to_gs,
    unique_name,
)
from ..io import check_model
from ..latency import RETIME_RUNS, RETIME_SECONDS, relative_latency, timing_feed
from ..layers import CONV_TRANSPOSE, layer_kind
from ..layerwise import add_output_shift
from ..limits import CALIBRATION_SAMPLES
from ..quantization import (
    CALIBRATION_METHODS,
    ActivationParams,
    WeightScheme,
    activation_params,
    bias_in_scale,
    int8_kernels_saturate,
    quantize_bias,
    quantize_weight,
)
from ..shapes import shapes_where_known
from ..validation import SCORE_MAX_TOP1_DROP, DriftProbe, Tolerance, ValidationResult
from ..walk import iter_graphs
from ..weights import matches
from ..weightstore import release_pages
from .base import Change, Pass, PassContext, PassResult, Requirement, Skip, register
from .simplify import Simplify

log = logging.getLogger(__name__)

# op -> the input indices that carry activations to quantize
COMPUTE = {"Conv": (0,), "ConvTranspose": (0,), "Gemm": (0,), "MatMul": (0, 1)}
ELEMENTWISE = {"Add": (0, 1), "Mul": (0, 1)}
POOLS = {"GlobalAveragePool": (0,), "AveragePool": (0,)}
CONCAT = "Concat"
# Ops onnxruntime runs on int8 when input and output share one scale (data movement): it drops the
# DQ before and the Q after them (tests/test_qdq.py checks each on its optimized graph). Not
# GlobalMaxPool, SpaceToDepth or Pad: onnxruntime 1.32 runs them in float between DQ and Q, so
# quantizing through them only adds a Q/DQ pair.
SAME_SCALE = frozenset({"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize", "Slice", "Identity",
                        "DepthToSpace", "Split", "Gather"})
# a QDQ right after these is what onnxruntime folds into the producer's int8 kernel
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})
# Bias correction patches each layer's shift into one built int8 model; False builds the model again
# per layer (the same bytes, measured by a test; kept to check the patching against).
PATCH_BIASES = True
GUARD_REASON = "kept in float by the accuracy guard"
# The guard searches node by node within the kinds it kept float up to this many nodes (one trial
# each, about 1 s on MiniLM, 2 s on PP-OCRv4): beyond it, whole kinds stay float. 96 took MiniLM's
# static candidate (which auto then did not choose) from 15 s to 104 s. With kinds split finer
# (depthwise, 1-D), MobileNetV2's largest kind is 35 convolutions.
GUARD_MAX_NODE_SEARCH = 48
# Beyond it, the kept kinds' nodes are first searched in this many runs of graph neighbours (a
# detector's 60 convolutions are one kind; its class head alone may be what a metric needs float).
GUARD_RUNS = 8
# never_slower: a best candidate at this ratio to its input or above is tried with each kind of node
# in float; a ratio within CLOSE_TO_EVEN of 1 is timed again, longer, before it decides anything.
SPEED_SEARCH_ABOVE = 0.95
CLOSE_TO_EVEN = 0.03
# Recurrent ops: onnxruntime has an int8 kernel for LSTM only (DynamicQuantizeLSTM, a contrib op).
RECURRENT = frozenset({"LSTM", "GRU", "RNN"})
QUANTIZED_OPS = frozenset({"DynamicQuantizeLSTM", "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
                           "ConvInteger", "DynamicQuantizeLinear"})


@dataclass
class Plan:
    """What to quantize: nodes, activation tensors with their own ranges, tensors sharing a range."""

    nodes: list[gs.Node] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)
    shared: dict[str, str] = field(default_factory=dict)  # tensor -> tensor whose range it reuses


@register
@dataclass(frozen=True)
class Qdq(Pass):
    """Int8 quantization by QuantizeLinear/DequantizeLinear pairs that onnxruntime (and TensorRT,
    OpenVINO) fuse into int8 kernels.

    Weights symmetric int8 (per channel by default, zero stays zero), biases int32, activations
    calibrated on data (min-max, percentile, entropy or MSE). Weights in Constant nodes are found;
    weights inside If/Loop bodies are stored int8 (their activations cannot be observed). An
    opset below 13 is raised to 13 for per-channel scales when the converter can, else per-tensor.
    With ``guard``, the nodes whose quantization breaks the tolerance most are kept in float until
    it holds. ``mode=dynamic`` quantizes MatMul/Gemm weights and computes activation scales at run time.
    """

    name = "qdq"
    default_tolerance = Tolerance(min_cosine=0.97)
    may_change_speed = True

    mode: Literal["auto", "static", "dynamic"] = field(default="auto", metadata={
        "help": "static (calibrated activations), dynamic (MatMul/Gemm, activation scales at run time), or auto: "
                "both, keeping the one within tolerance, the faster if both are"})
    method: Literal["minmax", "percentile", "entropy", "mse"] = field(default="minmax", metadata={"help": "how ranges come from calibration data"})
    percentile: float = field(default=99.999, metadata={"help": "for method=percentile"})
    per_channel: bool = field(default=True, metadata={"help": "one weight scale per output channel"})
    activations: Literal["uint8", "int8"] = field(default="uint8", metadata={"help": "uint8 has the fast x86 kernels"})
    symmetric: bool = field(default=False, metadata={"help": "symmetric activation ranges"})
    reduce_range: Literal["auto", "on", "off"] = field(default="auto", metadata={
        "help": "7-bit weights, so that uint8 x int8 products cannot saturate onnxruntime's int16 pair sums on x86 CPUs "
                "without VNNI (AVX2, AVX-512F); auto: on where this machine's onnxruntime saturates (probed once). "
                "Measured on an AVX2 machine, bundled CNN: logit cosine 0.988 with 8-bit weights, 0.9999 with 7"})
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "node name or op type patterns kept in float"})
    guard: bool = field(default=True, metadata={"help": "keep the most harmful nodes in float until the tolerance holds"})
    bias_correction: Literal["auto", "on", "off"] = field(default="auto", metadata={
        "help": "shift each layer's bias, in graph order, so its mean int8 output matches float (auto: convolutions, with minmax ranges)"})
    correction_samples: int = field(default=16, metadata={"help": "calibration samples read per layer by bias_correction"})
    embeddings: bool = field(default=False, metadata={
        "help": "int8 embedding tables (DequantizeLinear before Gather): MiniLM 0.65x -> 0.26x the file, but 0.46x -> 0.65x latency"})
    calibration_samples: int = field(default=CALIBRATION_SAMPLES, metadata={"help": "calibration samples read (the first ones)"})
    cache: str = field(default="", metadata={"help": "JSON file of calibrated ranges: read if present, written if not"})
    never_slower: bool = field(default=True, metadata={
        "help": "time each candidate against the pass's input in onnxruntime (one thread, interleaved runs) and keep the "
                "input when none is faster, saying so; when the best is not clearly faster, each kind of quantized node "
                "(1-D Conv, depthwise Conv, MatMul of activations, Add, ...) is also tried in float, and a kind whose int8 "
                "form made the model slower stays float. The pass manager also rolls back a step slower than its input"})
    sensitivity: bool = field(default=False, metadata={
        "help": "measure each planned node's error alone (only it in int8: output cosine, top-1 agreement, your --metric) on "
                "the guard's calibration samples, and list them worst first with the nodes kept float and why, in the report "
                "(`onnxsparse explain REPORT.json`); one validation per node"})
    simplify: bool = field(default=True, metadata={
        "help": "fold constants and fuse Pad/BatchNormalization/Add/Mul into Conv/Gemm first (the simplify pass), so that "
                "what an exporter left for the runtime does not stay float between int8 layers (static and auto modes)"})

    def __post_init__(self) -> None:
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile {self.percentile} is outside (0, 100]")
        if self.calibration_samples < 1 or self.correction_samples < 1:
            raise ValueError("calibration_samples and correction_samples must be at least 1")
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"method '{self.method}' is not one of {', '.join(CALIBRATION_METHODS)}")

    def needs(self) -> frozenset[Requirement]:
        return frozenset({Requirement.CALIBRATION}) if self.mode != "dynamic" else frozenset()

    def score_tolerance(self) -> Tolerance:
        # A cosine bound alone let a byte classifier through at 0.923 label agreement (-3.8 points of
        # accuracy): on class scores, labels are what the user reads. Bounded as the accuracy the
        # flips cost by the original's own probabilities, not as agreement: MobileNetV2 flips 1 of 32
        # near-tied views when any single one of its layers is int8, so "agreement >= 0.99" kept 63 of
        # its 64 layers float.
        return replace(self.tolerance(), max_top1_drop=SCORE_MAX_TOP1_DROP)

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        result = PassResult(model)
        already = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
        if already:
            result.warnings.append(f"qdq: the model is already quantized ({', '.join(already)}): left as it is")
            return result
        # Dynamic mode leaves every activation float, so folding gains it nothing, and on a big model
        # onnxruntime's optimizer would load and write every weight once more.
        simplified = _simplified(model, context, result) if self.simplify and self.mode != "dynamic" else None
        if simplified is None or not simplified.changes:
            return self._quantized(model, context, result, model)
        quantized = self._quantized(simplified.model, context, result, model)
        if not quantized.changes:  # the simplification alone is not what was asked for
            quantized.model = model
            if not quantized.worse:
                quantized.warnings.append("qdq: nothing was quantized, so the simplification made first is not kept either "
                                          "(the simplify pass keeps it)")
            return quantized
        quantized.changes[:0] = [Change(c.target, f"simplify: {c.action}", c.details) for c in simplified.changes]
        quantized.figures["simplified_nodes"] = f"{simplified.figures['nodes_before']} -> {simplified.figures['nodes_after']}"
        return quantized

    def _quantized(self, model: onnx.ModelProto, context: PassContext, result: PassResult, original: onnx.ModelProto) -> PassResult:
        """The chosen quantization of ``model`` (the pass's input ``original``, simplified), timed
        against ``original`` itself, or ``original`` when nothing quantized runs faster."""
        model, per_channel = self._opset_for(model, result)
        model = name_unnamed_nodes(shapes_where_known(model))
        self._warn_unmatched(model, result)
        weights = self._scheme(per_channel, result)
        if self.mode == "dynamic":
            return self._kept_if_faster({"dynamic": self._with_embeddings(self._dynamic(model, result, weights))}, original, context, weights)
        # The dynamic candidate starts from what was said before either was built (opset raised,
        # unmatched patterns), not from the static candidate's figures (its nodes kept float).
        said = PassResult(model, changes=list(result.changes), warnings=list(result.warnings), figures=dict(result.figures),
                          skipped=list(result.skipped), standard=result.standard)
        static = self._static(model, context, result, weights)
        candidates = {"static": static.first}
        if self.mode == "auto" and context.validate is not None and context.calibration is not None:
            dynamic = self._dynamic(model, said, weights)
            if dynamic.changes:  # a dynamic candidate that quantizes nothing is the input: never slower or "chosen"
                candidates["dynamic"] = dynamic
        chosen = self._kept_if_faster({mode: self._with_embeddings(c) for mode, c in candidates.items()}, original, context, weights, static)
        if self.sensitivity and chosen.figures.get("mode") == "static":  # also when the input was kept: what each node did
            chosen.figures["sensitivity"] = _sensitivity(static, chosen, context)
        return chosen

    def _kept_if_faster(self, candidates: dict[str, PassResult], original: onnx.ModelProto, context: PassContext, weights: WeightScheme,
                        static: StaticResult | None = None) -> PassResult:
        """Of the candidates, the one within tolerance (the faster if several are: mode=auto); with
        ``never_slower``, a static one with its slow kinds of node kept float where that is faster
        still, and ``original`` itself, said to be kept, when no candidate runs faster than it."""
        timed = self.never_slower or len(candidates) > 1
        feed = timing_feed(original, context.timing_inputs()) if timed else {}
        # Candidates to choose between are timed in full: two that are both clearly faster than the input
        # can still be close to each other (PP-OCRv4: static 0.949x, dynamic 0.964x after 6 pairs each).
        several = len(candidates) > 1
        # a sole candidate's session is kept: the manager validates it next
        ratios = {mode: _time_against(original, c.model, feed, context, early=not several, keep=not several)
                  for mode, c in candidates.items()} if timed else {}
        chosen, why = _pick(candidates, ratios, original, context, self.default_tolerance.min_cosine or 0.97)
        picked = candidates[chosen]
        if len(candidates) > 1:
            picked.figures.update(mode_choice=why, **{f"{mode}_latency_ratio": round(r, 3) for mode, r in ratios.items()})
        ratio = ratios.get(chosen)
        if ratio is not None and picked.changes and static is not None and chosen == "static" and ratio >= SPEED_SEARCH_ABOVE:
            picked, ratio = self._without_slow_kinds(static, picked, ratio, original, feed, context)
        picked, ratio = self._with_lstms(picked, ratio, original, feed, context, weights)
        if not self.never_slower or not picked.changes:
            picked.latency_vs_input = ratio
            return picked
        assert ratio is not None  # never_slower times every candidate
        if abs(ratio - 1.0) < CLOSE_TO_EVEN:  # one timing on a shared machine is off by a few percent
            ratio = relative_latency(original, picked.model, feed, runtime=context.runtime, keep_candidate=False,
                                     min_runs=RETIME_RUNS, min_seconds=RETIME_SECONDS)
        picked.figures["latency_ratio"] = round(ratio, 3)
        if ratio < 1.0:
            picked.latency_vs_input = ratio
            return picked
        kept = PassResult(original, warnings=picked.warnings, figures=picked.figures, skipped=picked.skipped)
        kept.worse = (f"the quantized model took {ratio:.2f}x its input's time in onnxruntime (one thread), so the input is kept: "
                      "quantizing activations at run time and around small layers can cost more than the int8 kernels save "
                      "(never_slower=false keeps the int8 model)")
        kept.warnings.append(f"qdq: {kept.worse}")
        return kept

    def _with_lstms(self, picked: PassResult, ratio: float | None, original: onnx.ModelProto, feed: dict[str, np.ndarray],
                    context: PassContext, weights: WeightScheme) -> tuple[PassResult, float | None]:
        """``picked`` with its LSTMs int8 (onnxruntime's DynamicQuantizeLSTM) where that is within
        tolerance and, with ``never_slower``, faster than ``picked`` without them (``ratio``, or the
        input's time when nothing else was quantized): a small LSTM runs slower in int8 (hidden 32:
        1.45x), a large one faster (hidden 256: 0.63x)."""
        said = PassResult(picked.model)
        model = self._with_recurrent(picked.model, weights, said)
        picked.skipped.extend(said.skipped)
        if not said.changes:
            return picked, ratio
        if context.validate is not None and not context.validate(model).passed:
            picked.skipped.extend(Skip(c.target, "kept float: its int8 form broke the tolerance") for c in said.changes)
            return picked, ratio
        if self.never_slower:
            timed = _time_against(original, model, feed, context, bound=ratio)
            if timed >= (ratio if ratio is not None and picked.changes else 1.0):
                before = f"{ratio:.2f}x" if ratio is not None and picked.changes else "1.00x"
                picked.skipped.extend(Skip(c.target, f"kept float: its int8 form made the model slower ({before} -> {timed:.2f}x its input's time)")
                                      for c in said.changes)
                return picked, ratio
            ratio = timed
        picked.model, picked.standard = model, False  # a contrib op: onnxruntime loads it, other runtimes need not
        picked.changes.extend(said.changes)
        picked.figures["nodes_quantized"] = picked.figures.get("nodes_quantized", 0) + len(said.changes)
        return picked, ratio

    def _without_slow_kinds(self, static: StaticResult, picked: PassResult, ratio: float, original: onnx.ModelProto,
                            feed: dict[str, np.ndarray], context: PassContext) -> tuple[PassResult, float]:
        """The static model with the kinds of node whose int8 form made it slower kept float, if that
        is faster than ``ratio`` and within tolerance; else ``picked`` as it was. Each kind is timed in
        float on its own; the kinds that helped are then kept float together."""
        kinds: dict[str, set[str]] = {}
        for node in static.plan.nodes:
            if node.name not in static.guard_kept:
                kinds.setdefault(speed_kind(node), set()).add(node.name)
        if len(kinds) < 2:  # every kind in float is the input itself
            return picked, ratio
        # An Add or a pool whose tensors its int8 neighbours quantize anyway runs int8 in onnxruntime
        # (it fuses DQ -> Add -> Q) whether or not it is "kept float": such a kind changes nothing alone.
        kinds = {kind: names for kind, names in kinds.items() if static.changes_anything(static.guard_kept | names)}
        def trial(float_kinds: tuple[str, ...]) -> float:  # built as ``picked`` was (int8 embeddings too, if asked)
            built = static.build(static.guard_kept | set().union(*(kinds[k] for k in float_kinds)))
            return _time_against(original, self._with_embeddings(PassResult(built)).model, feed, context, bound=ratio)

        trials: dict[tuple[str, ...], float] = {(kind,): trial((kind,)) for kind in sorted(kinds)}
        helped = tuple(kind for (kind,), timed in trials.items() if timed < ratio)
        if 1 < len(helped) < len(kinds):
            trials[helped] = trial(helped)
        picked.figures["kinds_in_float_latency"] = "; ".join(f"{'+'.join(k)}: {r:.3f}" for k, r in trials.items())
        best = min(trials, key=lambda k: trials[k])
        if trials[best] >= ratio:
            return picked, ratio
        slow = {name: f"kept in float: int8 {kind} made the model slower ({ratio:.2f}x -> {trials[best]:.2f}x its input's time "
                      f"with every {'+'.join(best)} in float)" for kind in best for name in kinds[kind]}
        model = static.build(static.guard_kept | set(slow))
        if context.validate is not None and not context.validate(model).passed:
            picked.warnings.append(f"qdq: {'+'.join(best)} in float ran faster ({trials[best]:.2f}x) but broke the tolerance: kept int8")
            return picked, ratio
        guarded = dict.fromkeys(static.guard_kept, GUARD_REASON)
        faster = self._with_embeddings(static.result(model, {**guarded, **slow}))
        faster.figures = {**picked.figures, **faster.figures}  # the mode choice and the trials' timings stay
        return faster, trials[best]

    def _scheme(self, per_channel: bool, result: PassResult) -> WeightScheme:
        """Weights in 7 bits where asked, or (auto) where this machine's int8 kernels saturate 8-bit ones."""
        reduced = self.reduce_range == "on" or (self.reduce_range == "auto" and int8_kernels_saturate())
        if reduced and self.reduce_range == "auto":
            result.warnings.append(
                "qdq: this machine's onnxruntime saturates uint8 x int8 products (an x86 CPU without VNNI), so weights use "
                "7 bits; for a target with VNNI or an ARM CPU, reduce_range=off keeps the eighth bit")
        return WeightScheme(per_channel, 7 if reduced else 8)

    def _with_embeddings(self, result: PassResult) -> PassResult:
        """Embedding tables (constant 2-D data of a Gather) to int8 with a scale per row. onnxruntime
        dequantizes the whole table at every run (it does not fold DequantizeLinear), hence opt-in."""
        if not self.embeddings:
            return result
        graph = to_gs(result.model)
        for node in [n for n in graph.nodes if n.op == "Gather" and int(n.attrs.get("axis", 0)) == 0]:
            table = constant_value(node.inputs[0])
            if table is None or table.ndim != 2 or table.dtype != np.float32 or table.size < 1024 or matches(self.exclude, node.name, node.op):
                continue
            quant = quantize_weight(table, 0)
            node.inputs[0] = _dequantized(graph, graph, node.inputs[0].name, quant.values, quant.scale, quant.zero_point, 0)
            result.changes.append(Change(node.name or node.outputs[0].name, "int8 embedding table", {"rows": int(table.shape[0])}))
        graph.cleanup().toposort()
        result.model = from_gs(graph, like=result.model)
        return result

    def _static(self, model: onnx.ModelProto, context: PassContext, result: PassResult, weights: WeightScheme) -> StaticResult:
        graph = to_gs(model)
        plan = plan_static(graph, self.exclude, overridable_initializers(model), result)
        nested = [node.name or node.outputs[0].name for node in nested_weight_layers(graph)]
        ranges = self._ranges(model, plan, context, result)
        kept_float: set[str] = set()
        shifts: dict[str, np.ndarray] = {}
        if self.bias_correction != "off" and (self.bias_correction == "on" or self.method == "minmax"):
            shifts = self._bias_shifts(model, plan, ranges, weights, context, result)
        def build(kept: set[str]) -> onnx.ModelProto:  # the quantized model for a set of nodes kept float
            return self._build(model, plan, ranges, kept, weights, shifts)

        quantized = build(kept_float)
        if self.guard and context.validate is not None:
            quantized, kept_float = self._guard(build, plan, quantized, context, result)
        result.figures.update(mode="static", activations=self.activations, weights=weights.describe())
        static = StaticResult(graph, plan, nested, build, kept_float, result)
        static.first = static.result(quantized, dict.fromkeys(kept_float, GUARD_REASON))
        return static

    # -- opsets -------------------------------------------------------------------------------

    def _opset_for(self, model: onnx.ModelProto, result: PassResult) -> tuple[onnx.ModelProto, bool]:
        """Per-channel DequantizeLinear needs opset 13; QuantizeLinear itself 10."""
        version = opset_version(model)
        wanted = 13 if self.per_channel else 10
        if version >= wanted:
            return model, self.per_channel
        try:
            converted = at_opset(model, wanted)
            check_model(converted, "the model at opset 13")  # by path when a weight store holds its tensors
        except Exception as error:  # noqa: BLE001 - the converter's reason, or the checker's
            if version >= 10:
                result.warnings.append(f"qdq: opset {version} could not be raised to 13 ({' '.join(str(error).split())[:120]}): per-tensor weight scales")
                return model, False
            raise InputDataError(f"qdq: opset {version} is below 10 and cannot be converted: {' '.join(str(error).split())[:200]}") from error
        result.warnings.append(f"qdq: opset raised from {version} to {wanted}")
        result.figures["opset_raised_to"] = wanted
        return converted, self.per_channel

    def _warn_unmatched(self, model: onnx.ModelProto, result: PassResult) -> None:
        names = [(n.name, n.op_type) for n in model.graph.node]
        for pattern in self.exclude:
            if not any(matches([pattern], *pair) for pair in names):
                result.warnings.append(f"qdq: exclude pattern '{pattern}' matched no node")

    # -- calibration --------------------------------------------------------------------------

    def _ranges(self, model: onnx.ModelProto, plan: Plan, context: PassContext, result: PassResult) -> dict[str, tuple[float, float]]:
        cached = self._read_cache(plan)
        if cached is not None:
            result.figures["calibration"] = f"read from {self.cache}"
            return cached
        assert context.calibration is not None  # the manager checked needs()
        progress = context.progress
        total = samples_read(context.calibration, model, self.calibration_samples) if progress is not None else 0
        report = (lambda done: progress("qdq calibration", done, total)) if progress is not None else None
        ranges = collect_ranges(model, context.calibration, plan.tensors, method=self.method, percentile=self.percentile,
                                limit=self.calibration_samples, progress=report)
        result.figures["calibration"] = f"{self.method} over {context.calibration.describe()}"
        self._write_cache(ranges)
        return ranges

    def _read_cache(self, plan: Plan) -> dict[str, tuple[float, float]] | None:
        if not self.cache or not os.path.exists(self.cache):
            return None
        try:
            data = json.loads(Path(self.cache).read_text(encoding="utf-8"))
            ranges = {name: (float(low), float(high)) for name, (low, high) in data["ranges"].items()}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InputDataError(f"{self.cache}: not a calibration cache ({error})") from error
        missing = [t for t in plan.tensors if t not in ranges]
        if data.get("method") != self.method or missing:
            log.info("calibration cache %s does not cover this model and method: calibrating again", self.cache)
            return None
        return ranges

    def _write_cache(self, ranges: dict[str, tuple[float, float]]) -> None:
        if not self.cache:
            return
        write_text_atomically(self.cache, json.dumps({"method": self.method, "ranges": ranges}, indent=1))

    # -- building the quantized graph ---------------------------------------------------------

    def _build(self, model: onnx.ModelProto, plan: Plan, ranges: dict[str, tuple[float, float]], kept_float: set[str], weights: WeightScheme,
               shifts: dict[str, np.ndarray] | None = None, biases: dict[str, BiasSite] | None = None) -> onnx.ModelProto:
        """The model with every planned node quantized except those in ``kept_float``; a quantized
        node's bias first takes its correction from ``shifts`` (a float node keeps its own bias).
        ``biases``, when given, is filled with where each shifted Conv's bias ended up, so that a
        later shift can be patched into the built model instead of building it again."""
        graph = to_gs(model)
        nodes = {n.name: n for n in graph.nodes}
        chosen = [nodes[n.name] for n in plan.nodes if n.name not in kept_float and n.name in nodes]
        if shifts and kept_float:
            # A shift corrects the error of every int8 layer above it: below a layer kept float that
            # error is another, and the shift measured with everything int8 would add one of its own.
            # (from layers only: an Add or a pool "kept float" between int8 neighbours still runs int8)
            after_float = downstream_names(nodes[name] for name in kept_float if name in nodes and nodes[name].op in COMPUTE)
            shifts = {name: shift for name, shift in shifts.items()
                      if name in nodes and not any(t.name in after_float for t in nodes[name].inputs)}
        for node in chosen:
            if shifts and node.name in shifts:
                add_output_shift(graph, node, shifts[node.name])
        shifted_biases = {n.name: constant_value(n.inputs[2]) for n in chosen if shifts and n.name in shifts and n.op == "Conv" and len(n.inputs) > 2}
        tensors = {t for t in _tensors_of(chosen, plan, graph)}
        params = {name: activation_params(*ranges[name], self.activations, self.symmetric) for name in plan.tensors if name in tensors}
        for name, root in plan.shared.items():
            if name in tensors and root in params:
                params[name] = params[root]
        variables = graph.tensors()
        main_nodes = {id(node) for node in graph.nodes}
        for name, value in params.items():
            insert_qdq(graph, variables[name], value, main_nodes)
        chosen_ids = {id(node) for node in chosen}
        for node in list(graph.nodes):
            if id(node) not in chosen_ids:
                keep_float_in_onnxruntime(node)
        for node in chosen:
            if node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                quantize_node_weights(graph, node, params, weights)
        for scope in graph.subgraphs(recursive=True):
            for node in scope.nodes:
                if node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                    quantize_node_weights(graph, node, {}, weights, scope=scope)
        if biases is not None:
            biases.update({name: site for name, bias in shifted_biases.items() if bias is not None and (site := _bias_site(nodes[name], bias))})
        graph.cleanup().toposort()
        return from_gs(graph, like=model)

    def _bias_shifts(self, model: onnx.ModelProto, plan: Plan, ranges: dict[str, tuple[float, float]], weights: WeightScheme,
                     context: PassContext, result: PassResult) -> dict[str, np.ndarray]:
        """Per quantized layer, the shift that brings its mean int8 output (per channel, with every
        earlier layer already corrected) back to the float model's. Quantization error is not
        zero-mean, and a shifted mean is what the next layers amplify. Measured here on
        MobileNetV2 (minmax): mean logit cosine 0.973 -> 0.982. With clipped ranges (entropy,
        percentile, mse) it made things worse, hence ``auto`` (minmax, convolutions)."""
        assert context.calibration is not None
        source = first_samples(context.calibration, model, self.correction_samples)
        # auto corrects convolutions only: on MiniLM's MatMuls it lowered the cosine (0.947 -> 0.932)
        ops = ("Conv", "Gemm", "MatMul") if self.bias_correction == "on" else ("Conv",)
        layers = [n for n in plan.nodes if n.op in ops and n.name and constant_value(n.inputs[1]) is not None]
        axes = {n.outputs[0].name: (-1 if n.op == "MatMul" else 1) for n in layers}
        reference = channel_means(tensor_values(model, source, axes, label="bias correction (float)"), axes)
        shifts: dict[str, np.ndarray] = {}
        # One int8 model, built with a zero shift on every Conv whose bias is a constant or absent, whose
        # biases are then patched as their shifts become known: building the model again per layer took
        # half of qdq's time (MobileNetV2: 53 builds, 6.1 s of 22 s). Other layers (a MatMul, whose
        # shift would be an Add node that changes what onnxruntime fuses) are corrected by building
        # again, as before, once their turn comes; both ways give the same bytes (tests/test_qdq.py).
        biases: dict[str, BiasSite] = {}
        zero = {layer.name: np.zeros_like(reference[layer.outputs[0].name], dtype=np.float32) for layer in layers if _patchable(layer)}
        patched = self._build(model, plan, ranges, set(), weights, zero, biases) if PATCH_BIASES else None
        # Each layer's output is computed from the int8 activation entering the layer before it, kept
        # from the step before (a segment run), not by running the model from its inputs: that made
        # the correction quadratic in depth. The int8 tensor is kept, not its dequantized twin, so
        # that onnxruntime fuses the segment's first layer as it does in the whole model.
        values = ChangingModelValues(source, None, label="bias correction (int8)")
        for index, layer in enumerate(layers):
            output = layer.outputs[0].name
            if patched is None or any(name not in biases for name in shifts):
                quantized = self._build(model, plan, ranges, set(), weights, shifts)
                values.kept.clear()  # values of another build
            else:
                quantized = patched
            entry = _int8_entry(quantized, layer.name)
            observed = channel_means(values.values(quantized, [output, *([entry] if entry else [])]), {output: axes[output]})[output]
            values.kept.pop(output, None)  # the layer's bias changes now: its output with it
            shifts[layer.name] = (reference[output] - observed).astype(np.float32)
            if patched is not None and layer.name in biases:
                biases[layer.name].patch(patched, shifts[layer.name])
            if context.progress:
                context.progress("qdq bias correction", index + 1, len(layers))
        result.figures["bias_corrected_layers"] = len(shifts)
        return shifts

    # -- the accuracy guard -------------------------------------------------------------------

    def _guard(self, build: Callable[[set[str]], onnx.ModelProto], plan: Plan, quantized: onnx.ModelProto, context: PassContext,
               result: PassResult) -> tuple[onnx.ModelProto, set[str]]:
        """Keep the most harmful nodes in float until the tolerance holds.

        First by kind (:func:`speed_kind`: op type, depthwise and 1-D convolutions and MatMuls of two
        activations apart): each kind is kept float on its own, kinds are then kept float in order of
        how much that helps until the tolerance holds. Within kinds of more than GUARD_MAX_NODE_SEARCH
        nodes, by runs of nodes next to each other in graph order (GUARD_RUNS of them) the same way.
        Then, within what is kept (up to GUARD_MAX_NODE_SEARCH nodes), node by node the same way,
        doubling the count until it holds and bisecting back to the fewest that do. "Holds" is
        :meth:`GuardTrials.holds`: on the judge's samples and on the confirming ones."""
        assert context.validate is not None
        trials = GuardTrials(build, context, quantized)
        if trials.holds(frozenset()):
            return quantized, set()
        kinds: dict[str, list[str]] = {}
        for node in plan.nodes:
            kinds.setdefault(speed_kind(node), []).append(node.name)
        kept = trials.fewest(list(kinds), lambda chosen: {n for kind in chosen for n in kinds[kind]}, "kinds")
        if kept is None:
            result.warnings.append("qdq guard: even all nodes in float do not meet the tolerance (on the judge's calibration samples, "
                                   "or on the others that confirm its trials); every node kept quantized")
            return quantized, set()
        candidates = [node.name for node in plan.nodes if node.name in kept]  # in graph order
        if len(candidates) > GUARD_MAX_NODE_SEARCH:
            size = -(-len(candidates) // GUARD_RUNS)
            runs = {f"nodes {start + 1}-{min(start + size, len(candidates))}": candidates[start:start + size]
                    for start in range(0, len(candidates), size)}
            refined = trials.fewest(list(runs), lambda chosen: {n for run in chosen for n in runs[run]}, "runs of nodes")
            if refined is not None:
                kept = refined
                candidates = [name for name in candidates if name in kept]
        if 1 < len(candidates) <= GUARD_MAX_NODE_SEARCH:
            refined = trials.fewest(candidates, set, "nodes")
            if refined is not None:
                kept = refined
        result.figures["guard_kept_float"] = len(kept)
        result.figures["guard_kinds"] = ", ".join(sorted({speed_kind(n) for n in plan.nodes if n.name in kept}))
        result.figures["guard_trials"] = trials.built
        return trials.model(kept), set(kept)

    # -- dynamic ------------------------------------------------------------------------------

    def _with_recurrent(self, model: onnx.ModelProto, weights: WeightScheme, result: PassResult) -> onnx.ModelProto:
        """``model`` with its LSTMs (main graph and subgraphs) as onnxruntime's DynamicQuantizeLSTM with
        int8 weights, one scale per gate unit (there is no static int8 LSTM); GRU and RNN stay float
        (onnxruntime has no int8 kernel for them). Said in ``result`` (changes and skips)."""
        if not any(n.op_type in RECURRENT for g in iter_graphs(model.graph) for n in g.node):
            return model
        graph = to_gs(model)
        overridable = overridable_initializers(model)
        quantized = False
        for scope in [graph, *graph.subgraphs(recursive=True)]:
            for node in [n for n in scope.nodes if n.op in RECURRENT]:
                label = node.name or node.outputs[0].name
                if node.op != "LSTM":
                    result.skipped.append(Skip(label, f"onnxruntime has no int8 {node.op} kernel"))
                    continue
                if matches(self.exclude, node.name, node.op):
                    result.skipped.append(Skip(label, "excluded by pattern"))
                    continue
                reason = dynamic_lstm(graph, scope, node, weights, overridable)
                if reason:
                    result.skipped.append(Skip(label, reason))
                else:
                    quantized = True
                    result.changes.append(Change(label, "dynamic int8", {"op": "LSTM", "per_channel": weights.per_channel}))
        if not quantized:
            return model
        graph.cleanup().toposort()
        quantized_model = from_gs(graph, like=model)
        import_domain(quantized_model, MICROSOFT_DOMAIN)
        return quantized_model

    def _dynamic(self, model: onnx.ModelProto, result: PassResult, weights: WeightScheme) -> PassResult:
        graph = to_gs(model)
        overridable = overridable_initializers(model)
        for node in [n for n in graph.nodes if n.op in ("MatMul", "Gemm")]:
            label = node.name or node.outputs[0].name
            if matches(self.exclude, node.name, node.op):
                result.skipped.append(Skip(label, "excluded by pattern"))
                continue
            reason = dynamic_matmul(graph, node, weights, overridable)
            if reason:
                result.skipped.append(Skip(label, reason))
            else:
                result.changes.append(Change(label, "dynamic int8", {"op": node.op, "per_channel": weights.per_channel}))
        graph.cleanup().toposort()
        result.model = from_gs(graph, like=model)
        if not result.changes and not result.skipped:
            result.skipped.append(Skip("model", "no MatMul, Gemm or LSTM: dynamic quantization has nothing to quantize"))
        result.figures.update(nodes_quantized=len(result.changes), mode="dynamic", weights=weights.describe())
        return result


@dataclass
class StaticResult:
    """A static quantization with what it was built from, so that variants of it (more nodes in
    float) can be built and reported without calibrating again."""

    graph: gs.Graph  # what the plan's nodes belong to
    plan: Plan
    nested: list[str]  # weights inside subgraphs, stored int8
    build: Callable[[set[str]], onnx.ModelProto]  # the model with these nodes kept float
    guard_kept: set[str]  # kept float by the accuracy guard
    said: PassResult  # what was said before any variant: calibration, guard figures, excluded nodes
    first: PassResult = field(init=False)  # the variant the guard chose

    def changes_anything(self, kept: set[str]) -> bool:
        """Whether keeping ``kept`` float builds another model than the guard's: it does when a weight
        stays float or a tensor goes unquantized."""
        def quantized(float_nodes: set[str]) -> tuple[set[str], set[str]]:
            chosen = [n for n in self.plan.nodes if n.name not in float_nodes]
            return _tensors_of(chosen, self.plan, self.graph), {n.name for n in chosen if n.op in COMPUTE}
        return quantized(kept) != quantized(self.guard_kept)

    def result(self, model: onnx.ModelProto, kept: dict[str, str]) -> PassResult:
        """The report of ``model``: every planned node quantized but those in ``kept`` (name -> why)."""
        said = self.said
        result = PassResult(model, changes=list(said.changes), skipped=list(said.skipped), figures=dict(said.figures),
                            warnings=list(said.warnings), standard=said.standard)
        for node in self.plan.nodes:
            label = node.name or node.outputs[0].name
            if node.name in kept:
                result.skipped.append(Skip(label, kept[node.name]))
            else:
                result.changes.append(Change(label, "quantized", {"op": node.op}))
        result.changes.extend(Change(label, "int8 weight inside a subgraph (its activations stay float)") for label in self.nested)
        if not self.plan.nodes and not self.nested and not result.skipped:
            result.skipped.append(Skip("model", "no Conv/Gemm/MatMul/Add/Mul/pool/Concat on float activations to quantize"))
        result.figures.update(
            nodes_quantized=len(self.plan.nodes) - len(kept) + len(self.nested), nodes_kept_float=len(kept),
            subgraph_weights_quantized=len(self.nested), tensors_calibrated=len(self.plan.tensors),
        )
        return result


@dataclass(frozen=True)
class BiasSite:
    """Where a Conv's (zero-shifted) bias ended up in a built int8 model: an initializer holding it as
    int32 in units of ``scale`` (behind a DequantizeLinear), or as float (``scale`` None)."""

    initializer: str
    bias: np.ndarray  # float32, as add_output_shift left it with a zero shift
    scale: np.ndarray | None

    def patch(self, model: onnx.ModelProto, shift: np.ndarray) -> None:
        """Put ``bias + shift`` into ``model`` exactly as a build with that shift would: the sum taken
        in float64 and stored as float32 (add_output_shift), then quantized with the same scale."""
        shifted = (self.bias.astype(np.float64) + shift).astype(np.float32)
        stored = bias_in_scale(shifted, self.scale) if self.scale is not None else shifted
        tensor = next(t for t in model.graph.initializer if t.name == self.initializer)
        tensor.CopyFrom(onnx.numpy_helper.from_array(stored, self.initializer))


def _int8_entry(model: onnx.ModelProto, name: str) -> str | None:
    """The quantized activation that the node ``name`` reads through a DequantizeLinear, if it does."""
    node = next((n for n in model.graph.node if n.name == name), None)
    if node is None or not node.input:
        return None
    producer = next((n for n in model.graph.node if node.input[0] in n.output), None)
    return producer.input[0] if producer is not None and producer.op_type == "DequantizeLinear" else None


def _patchable(layer: gs.Node) -> bool:
    """A Conv whose bias is a constant or absent: its shift lands in one initializer, whatever its value."""
    return layer.op == "Conv" and (len(layer.inputs) < 3 or constant_value(layer.inputs[2]) is not None)


def _bias_site(node: gs.Node, bias: np.ndarray) -> BiasSite | None:
    """Where ``node``'s bias is after quantization: a float constant, or an int32 constant read by
    the DequantizeLinear in front of it; None where it is anything else."""
    tensor = node.inputs[2]
    if isinstance(tensor, gs.Constant):
        return BiasSite(tensor.name, bias, None)
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is None or producer.op != "DequantizeLinear" or not isinstance(producer.inputs[0], gs.Constant):
        return None
    scale = constant_value(producer.inputs[1])
    if producer.inputs[0].values.dtype != np.int32 or scale is None:
        return None
    return BiasSite(producer.inputs[0].name, bias, scale.astype(np.float32))


def nested_weight_layers(graph: gs.Graph) -> list[gs.Node]:
    """The layers inside If/Loop bodies whose float weight ``_build`` stores as int8 (their activations
    cannot be observed, so they are not calibrated)."""
    layers = []
    for scope in graph.subgraphs(recursive=True):
        for node in scope.nodes:
            weight = constant_value(node.inputs[1]) if node.op in COMPUTE and len(node.inputs) > 1 else None
            if weight is not None and weight.dtype == np.float32 and weight.ndim >= 2:
                layers.append(node)
    return layers


def _simplified(model: onnx.ModelProto, context: PassContext, result: PassResult) -> PassResult | None:
    """The simplify pass's result on ``model``; None, said in a warning, when onnxruntime's optimizer
    cannot load it."""
    try:
        return Simplify().run(model, context)
    except RuntimeLoadError as error:
        result.warnings.append(f"qdq: not simplified first: {error}")
        return None


def _kind(node: gs.Node) -> str:
    if node.op == "MatMul" and all(constant_value(t) is None for t in node.inputs[:2]):
        return "MatMul of activations"
    return node.op


def _within_own_bound(model: onnx.ModelProto, results: dict[str, PassResult], context: PassContext, bound: float) -> list[str]:
    """The modes whose output cosine to ``model`` (the pass's input) is at least ``bound``."""
    assert context.calibration is not None
    probe = DriftProbe(model, context.calibration)
    return [mode for mode, result in results.items() if 1.0 - probe.drift(result.model) >= bound]


def _pick(results: dict[str, PassResult], ratios: dict[str, float], model: onnx.ModelProto, context: PassContext, own_bound: float) -> tuple[str, str]:
    """mode=auto: the candidate within tolerance; if several are, the faster in onnxruntime on one
    thread (``ratios``, against ``model``). One candidate is simply itself."""
    if len(results) == 1:
        return next(iter(results)), ""
    assert context.validate is not None and context.calibration is not None
    verdicts = {mode: context.validate(result.model) for mode, result in results.items()}
    # within tolerance as the guard means it: the confirming samples agree too (a dynamic candidate
    # the judge's few samples pass must not win over a static one the guard held to more)
    passing = [mode for mode, verdict in verdicts.items() if verdict.passed and _confirmed(results[mode].model, context)]
    why_prefix = ""
    if not passing and not context.validate(model).passed:
        # An earlier lossy pass (pruning) moved the model past the tolerance already: then
        # neither candidate can meet it and "the closer to the original" is merely the one that
        # quantized less. Judge what quantization itself adds: the drift from this pass's input.
        passing = _within_own_bound(model, results, context, own_bound)
        why_prefix = "neither within tolerance of the original; judged against this pass's input: "
    if len(passing) == 1:
        return passing[0], why_prefix + "the only one within tolerance"
    if passing:
        return min(passing, key=lambda mode: ratios[mode]), why_prefix + "both within tolerance; the faster"
    return max(results, key=lambda mode: _closeness(verdicts[mode])), "neither within tolerance; the closer to the original"


def _sensitivity(static: StaticResult, picked: PassResult, context: PassContext) -> list[dict[str, object]]:
    """Per planned node, what quantizing it alone does to the outputs (on the judge's samples),
    with whether it ended int8 or float and why: worst first, so that "which layer broke it" has an
    answer in the report. Empty without calibration data to judge on."""
    if context.validate is None:
        return []
    why_float = {skip.target: skip.reason for skip in picked.skipped}
    planned = {node.name for node in static.plan.nodes}
    rows: list[dict[str, object]] = []
    for index, node in enumerate(static.plan.nodes):
        label = node.name or node.outputs[0].name
        verdict = context.validate(static.build(planned - {node.name}))
        top1 = [o.top1 for o in verdict.outputs if o.top1 is not None]
        row: dict[str, object] = {"node": label, "kind": speed_kind(node), "cosine_alone": round(_closeness(verdict), 6),
                                  "top1_alone": round(min(top1), 4) if top1 else None, "status": why_float.get(label, "int8")}
        if verdict.metric is not None:
            row["metric_alone"] = verdict.metric.value
        rows.append(row)
        if context.progress:
            context.progress("qdq sensitivity", index + 1, len(static.plan.nodes))
    return sorted(rows, key=lambda row: float(row["cosine_alone"]))  # type: ignore[arg-type]


def _time_against(original: onnx.ModelProto, candidate: onnx.ModelProto, feed: dict[str, np.ndarray], context: PassContext,
                  bound: float | None = None, *, early: bool = True, keep: bool = False) -> float:
    """``candidate``'s one-thread onnxruntime time over ``original``'s. With ``early``, timing stops
    once the ratio is clearly on one side of 1 (and of ``bound``); ``keep`` holds the candidate's
    session for its validation."""
    bounds = (1.0,) if bound is None or bound == 1.0 else (1.0, bound)
    return relative_latency(original, candidate, feed, runtime=context.runtime, keep_candidate=keep, hand_over=keep,
                            decide_at=bounds if early else ())


def speed_kind(node: gs.Node) -> str:
    """The kind of node whose int8 form tends to be fast or slow alike: a 1-D convolution (an
    exporter's conv1d over an unsqueezed axis, often between Transposes), a depthwise one, a MatMul
    of two activations, or the op type."""
    if node.op not in ("Conv", "ConvTranspose"):
        return _kind(node)
    weight = constant_value(node.inputs[1])
    kernel = list(weight.shape[2:]) if weight is not None else []
    spatial = list(node.inputs[0].shape[2:]) if node.inputs[0].shape is not None else kernel
    one_d = len(kernel) == 1 or sum(not (isinstance(d, int) and d == 1) for d in spatial) == 1
    depthwise = weight is not None and weight.shape[1] == 1 and int(node.attrs.get("group", 1)) > 1 and node.op == "Conv"
    return f"{'1-D ' if one_d else ''}{'depthwise ' if depthwise else ''}{node.op}"


class GuardTrials:
    """The guard's trials, by the set of nodes kept float: each set's model is built, and judged (and
    confirmed), once. The search meets a set again where a prefix of one length is also what it ranked
    alone, or bisects onto a count it tried; both cost a build and a judgement before."""

    def __init__(self, build: Callable[[set[str]], onnx.ModelProto], context: PassContext, quantized: onnx.ModelProto) -> None:
        self.build, self.context = build, context
        self.built = 0
        self._last: tuple[frozenset[str], onnx.ModelProto] = (frozenset(), quantized)  # only the last: a model each would be a copy each
        self._judged: dict[frozenset[str], ValidationResult] = {}
        self._holds: dict[frozenset[str], bool] = {}

    def model(self, kept: frozenset[str]) -> onnx.ModelProto:
        if self._last[0] != kept:
            self.built += 1
            self._last = (kept, self.build(set(kept)))
        return self._last[1]

    def judged(self, kept: frozenset[str]) -> ValidationResult:
        """The judge's verdict on the model with ``kept`` float."""
        assert self.context.validate is not None
        if kept not in self._judged:
            self._judged[kept] = self.context.validate(self.model(kept))
        return self._judged[kept]

    def holds(self, kept: frozenset[str]) -> bool:
        """Whether the model with ``kept`` float holds the tolerance on the judge's samples and on the
        confirming ones (asked only when the judge's hold). The guard tries many models against the
        judge's few samples, so what it settles on fits them a little: on MobileNetV2 every node
        quantized passed the judge's 32 views and lost 2.8% top-1 agreement on 96 held-out ones, and
        the step was rolled back whole."""
        if kept not in self._holds:
            self._holds[kept] = self.judged(kept).passed and _confirmed(self.model(kept), self.context)
        return self._holds[kept]

    def fewest(self, items: list[str], expand: Callable[[list[str]], set[str]], label: str) -> frozenset[str] | None:
        """The float nodes ``expand(prefix)`` of the shortest prefix of ``items`` (ordered by how much
        keeping each alone in float helps) that hold the tolerance."""
        harm = {}
        for index, item in enumerate(items):
            harm[item] = _closeness(self.judged(frozenset(expand([item]))))
            if self.context.progress:
                self.context.progress(f"qdq guard: {label}", index + 1, len(items))
        order = sorted(items, key=lambda item: harm[item], reverse=True)
        def kept(count: int) -> frozenset[str]:
            return frozenset(expand(order[:count]))
        count, failed, best = 1, 0, None
        while best is None:
            count = min(count, len(order))
            if self.holds(kept(count)):
                best = count
            elif count == len(order):
                return None
            else:
                failed, count = count, count * 2
        low, high = failed, best  # the fewest that pass lie in (low, high]
        while high - low > 1:
            middle = (low + high) // 2
            if self.holds(kept(middle)):
                high = middle
            else:
                low = middle
        return kept(high)


def _confirmed(model: onnx.ModelProto, context: PassContext) -> bool:
    """Whether the calibration samples the judge never sees agree (True where the set has none)."""
    verdict = context.confirm(model) if context.confirm is not None else None
    return verdict is None or verdict.passed


def _closeness(validation: ValidationResult) -> float:
    """How close a trial is to the original: the worst output's cosine (higher is closer)."""
    cosines = [o.cosine for o in validation.outputs if o.cosine is not None]
    return min(cosines) if cosines else 0.0


# ---------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------


def plan_static(graph: gs.Graph, exclude: Iterable[str], overridable: set[str], result: PassResult) -> Plan:
    plan = Plan()
    own: set[str] = set()
    for node in graph.nodes:
        inputs = _activation_inputs(node, overridable)
        if inputs is None:
            continue
        if matches(exclude, node.name, node.op):
            result.skipped.append(Skip(node.name or node.outputs[0].name, "excluded by pattern"))
            continue
        plan.nodes.append(node)
        own.update(t.name for t in inputs)
        own.add(_quantized_output(graph, node.outputs[0]).name)
    # data-movement ops after a quantized tensor keep its range (every output of a Split), so that
    # they run on int8 too; Gather's data is its input 0, the indices are not quantized
    for node in graph.nodes:
        if node.op in SAME_SCALE and node.inputs and _is_float(node.inputs[0]):
            source = node.inputs[0].name
            root = plan.shared.get(source, source)
            if root in own:
                plan.shared.update({output.name: root for output in node.outputs if _is_float(output)})
    plan.tensors = sorted(own)
    return plan


def _activation_inputs(node: gs.Node, overridable: set[str]) -> list[gs.Tensor] | None:
    """The float activations a quantizable node reads, or None if it is not quantized."""
    if node.op in COMPUTE:
        if node.op in ("Conv", "ConvTranspose", "Gemm"):
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            if weight is None or constant_value(weight) is None or weight.name in overridable:
                return None
            if node.op == "Gemm" and node.attrs.get("transA", 0):
                return None
        indices = COMPUTE[node.op]
    elif node.op in ELEMENTWISE:
        indices = ELEMENTWISE[node.op]
        if any(constant_value(node.inputs[i]) is not None for i in indices):
            return None  # an Add of a bias stays float: quantizing the constant costs precision
    elif node.op in POOLS:
        indices = POOLS[node.op]
    elif node.op == CONCAT:
        indices = tuple(range(len(node.inputs)))
        if any(constant_value(t) is not None for t in node.inputs):
            return None
    else:
        return None
    tensors = [node.inputs[i] for i in indices if i < len(node.inputs) and constant_value(node.inputs[i]) is None]
    if not tensors or not all(_is_float(t) for t in [*tensors, *node.outputs[:1]]):
        return None
    return tensors


def _is_float(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and np.dtype(tensor.dtype) == np.float32


def _quantized_output(graph: gs.Graph, output: gs.Tensor) -> gs.Tensor:
    """Where the output's QDQ goes: after a Relu/Clip that is its only reader (onnxruntime then
    runs Conv+Relu as one int8 kernel)."""
    readers = output.outputs
    if len(readers) == 1 and readers[0].op in FUSED_ACTIVATIONS and output not in graph.outputs and readers[0].outputs[0] not in graph.outputs:
        return readers[0].outputs[0]
    return output  # a graph output keeps its float tensor (the interface): the pair goes before the activation


def _tensors_of(nodes: list[gs.Node], plan: Plan, graph: gs.Graph) -> set[str]:
    """The planned tensors that the chosen nodes read or write (a float node's own tensors go)."""
    names: set[str] = set()
    own = set(plan.tensors)
    for node in nodes:
        names.update(t.name for t in node.inputs if t.name in own)
        names.add(_quantized_output(graph, node.outputs[0]).name)
    names &= own
    names.update(t for t, root in plan.shared.items() if root in names)
    return names


# ---------------------------------------------------------------------------------------------
# graph surgery
# ---------------------------------------------------------------------------------------------


def insert_qdq(graph: gs.Graph, tensor: gs.Tensor, params: ActivationParams, main_nodes: set[int]) -> None:
    """tensor -> QuantizeLinear -> DequantizeLinear -> every main-graph reader of tensor
    (``main_nodes``: ids of the main graph's nodes; a subgraph reading the tensor keeps the float)."""
    readers = [node for node in tensor.outputs if id(node) in main_nodes]
    scale = gs.Constant(unique_name(graph, f"{tensor.name}_scale"), np.array(params.scale, dtype=np.float32))
    zero_point = gs.Constant(unique_name(graph, f"{tensor.name}_zero_point"), params.zero_point)
    quantized = gs.Variable(unique_name(graph, f"{tensor.name}_quantized"), dtype=params.dtype, shape=tensor.shape)
    restored = gs.Variable(unique_name(graph, f"{tensor.name}_dequantized"), dtype=np.float32, shape=tensor.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", name=unique_name(graph, f"{tensor.name}_QuantizeLinear"), inputs=[tensor, scale, zero_point], outputs=[quantized]))
    graph.nodes.append(gs.Node("DequantizeLinear", name=unique_name(graph, f"{tensor.name}_DequantizeLinear"), inputs=[quantized, scale, zero_point], outputs=[restored]))
    for node in readers:
        for index, value in enumerate(node.inputs):
            if value is tensor:
                node.inputs[index] = restored


# onnxruntime (WeightBiasQuantization, 1.21 on) quantizes the float weight of these ops itself, to
# per-tensor int8, when the activation comes from a DequantizeLinear and the output goes (through
# Relu/Clip only) to a QuantizeLinear: such a node "kept float" between int8 neighbours would run int8.
WEIGHTS_QUANTIZED_BY_ONNXRUNTIME = frozenset({"Conv", "ConvTranspose", "Gemm"})


def keep_float_in_onnxruntime(node: gs.Node) -> None:
    """Make a float ``node`` that onnxruntime would quantize itself (see
    WEIGHTS_QUANTIZED_BY_ONNXRUNTIME) read its activation before the QuantizeLinear, not after the
    DequantizeLinear. Its producer's output then has two readers, so the producer runs float too:
    the float region grows by one node, which the guard and the speed timing measure."""
    if node.op not in WEIGHTS_QUANTIZED_BY_ONNXRUNTIME or not node.inputs or not _path_to_quantize(node):
        return
    dequantize = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if dequantize is None or dequantize.op != "DequantizeLinear" or not dequantize.inputs[0].inputs:
        return
    quantize = dequantize.inputs[0].inputs[0]
    if quantize.op == "QuantizeLinear":
        node.inputs[0] = quantize.inputs[0]


def _path_to_quantize(node: gs.Node) -> bool:
    """Whether ``node``'s output reaches a QuantizeLinear through single readers that are Relu/Clip."""
    current = node
    while len(current.outputs) == 1 and len(current.outputs[0].outputs) == 1:
        current = current.outputs[0].outputs[0]
        if current.op == "QuantizeLinear":
            return True
        if current.op not in FUSED_ACTIVATIONS:
            return False
    return False


def _weight_axis(node: gs.Node, rank: int) -> int | None:
    """The weight's axis of output units (per-channel scales run along it), from layers.py."""
    kind = layer_kind(node.op)
    return None if kind is None else kind.output_axis(node.attrs, 1, rank)


def quantize_node_weights(graph: gs.Graph, node: gs.Node, params: dict[str, ActivationParams], weights: WeightScheme,
                          scope: gs.Graph | None = None) -> None:
    """Weight (input 1) to int8 behind a DequantizeLinear; bias to int32 when the input is quantized."""
    scope = scope or graph
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.dtype != np.float32 or weight.ndim < 2:
        return
    axis = _weight_axis(node, weight.ndim) if weights.per_channel else None
    if node.op == "ConvTranspose" and CONV_TRANSPOSE.groups(node.attrs) != 1:
        axis = None  # per-channel scales follow output channels, which groups split across axis 1
    quant = quantize_weight(weight, axis, weights.bound)
    release_pages(weight)
    node.inputs[1] = _dequantized(graph, scope, node.inputs[1].name, quant.values, quant.scale, quant.zero_point, axis)
    if len(node.inputs) > 2 and node.op in ("Conv", "ConvTranspose", "Gemm"):
        _quantize_bias(graph, scope, node, params, quant.scale, axis)


def _quantize_bias(graph: gs.Graph, scope: gs.Graph, node: gs.Node, params: dict[str, ActivationParams], weight_scale: np.ndarray, axis: int | None) -> None:
    bias = constant_value(node.inputs[2])
    source = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    # the activation's scale: the DequantizeLinear just inserted in front of this node
    if bias is None or bias.ndim != 1 or source is None or source.op != "DequantizeLinear":
        return
    if node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) != 1.0:
        return
    input_scale = constant_value(source.inputs[1])
    if input_scale is None or input_scale.size != 1:
        return
    scales = weight_scale if axis is not None else np.full(bias.shape, weight_scale, dtype=np.float32)
    if scales.shape != bias.shape:
        return
    values, scale = quantize_bias(bias, np.float32(input_scale.reshape(())), scales)
    node.inputs[2] = _dequantized(graph, scope, node.inputs[2].name, values, scale, np.zeros(scale.shape, np.int32), 0)


def _dequantized(graph: gs.Graph, scope: gs.Graph, base: str, values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> gs.Variable:
    quantized = gs.Constant(unique_name(graph, f"{base}_quantized"), values)
    scale_tensor = gs.Constant(unique_name(graph, f"{base}_scale"), scale)
    zero_tensor = gs.Constant(unique_name(graph, f"{base}_zero_point"), zero_point)
    restored = gs.Variable(unique_name(graph, f"{base}_dequantized"), dtype=np.float32, shape=list(values.shape))
    attrs = {"axis": axis} if axis is not None and scale.ndim == 1 else {}
    scope.nodes.append(gs.Node("DequantizeLinear", name=unique_name(graph, f"{base}_DequantizeLinear"), attrs=attrs,
                               inputs=[quantized, scale_tensor, zero_tensor], outputs=[restored]))
    return restored


def dynamic_lstm(graph: gs.Graph, scope: gs.Graph, node: gs.Node, weights: WeightScheme, overridable: set[str]) -> str:
    """Replace an LSTM by onnxruntime's DynamicQuantizeLSTM: W and R int8 (symmetric, one scale per gate
    unit and direction, or per direction), stored transposed as the kernel reads them ([directions,
    inputs, 4 x hidden]). Returns why not, or ''."""
    if int(node.attrs.get("layout", 0)) != 0:
        return "batch-first layout (layout=1): DynamicQuantizeLSTM has no such attribute"
    matrices = []
    for tensor in node.inputs[1:3]:
        value = constant_value(tensor)
        if value is None or value.dtype != np.float32 or value.ndim != 3 or tensor.name in overridable:
            return "W or R is not a constant float32 weight"
        matrices.append(value)
    new_inputs = [node.inputs[0]]
    quantized = []
    for value, role in zip(matrices, ("W", "R")):
        directions, rows, columns = value.shape
        if weights.per_channel:
            quant = quantize_weight(value.reshape(directions * rows, columns), 0, weights.bound)
            integers, scale = quant.values, quant.scale.reshape(directions, rows)
        else:
            parts = [quantize_weight(value[d], None, weights.bound) for d in range(directions)]
            integers, scale = np.stack([p.values for p in parts]), np.array([float(p.scale) for p in parts], np.float32)
        values = np.ascontiguousarray(integers.reshape(directions, rows, columns).transpose(0, 2, 1))
        base = f"{node.name or node.outputs[0].name}_{role}"
        new_inputs.append(stored_constant(unique_name(graph, f"{base}_quantized"), values, node.inputs[1]))
        quantized.append((gs.Constant(unique_name(graph, f"{base}_scale"), np.asarray(scale, np.float32)),
                          gs.Constant(unique_name(graph, f"{base}_zero_point"), np.zeros(np.shape(scale), np.int8))))
    optional = list(node.inputs[3:8]) + [gs.Variable.empty()] * (8 - max(3, len(node.inputs)))
    new_inputs += optional[:5]
    for scale, zero in quantized:
        new_inputs += [scale, zero]
    attrs = {k: v for k, v in node.attrs.items() if k != "layout"}
    replacement = gs.Node("DynamicQuantizeLSTM", name=unique_name(graph, f"{node.name or node.outputs[0].name}_int8"), attrs=attrs,
                          inputs=new_inputs, outputs=list(node.outputs), domain=MICROSOFT_DOMAIN)
    node.outputs.clear()
    node.inputs.clear()
    scope.nodes.append(replacement)
    return ""


def dynamic_matmul(graph: gs.Graph, node: gs.Node, weights: WeightScheme, overridable: set[str]) -> str:
    """Replace MatMul/Gemm(x, W) by DynamicQuantizeLinear + MatMulInteger + scale multiply, the
    pattern onnxruntime fuses into DynamicQuantizeMatMul. Returns why not, or ''."""
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32 or node.inputs[1].name in overridable:
        return "no constant 2-D float weight"
    if constant_value(node.inputs[0]) is not None or not _is_float(node.inputs[0]):
        return "the left operand is not a float activation"
    bias = None
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return "Gemm with transA"
        weight = weight.T if node.attrs.get("transB", 0) else weight
        alpha = float(node.attrs.get("alpha", 1.0))
        if len(node.inputs) > 2:
            bias = constant_value(node.inputs[2])
            if bias is None:
                return "Gemm bias is not a constant"
            bias = (bias * float(node.attrs.get("beta", 1.0))).astype(np.float32)
    else:
        alpha = 1.0
    quant = quantize_weight(weight, 1 if weights.per_channel else None, weights.bound)
    release_pages(weight)  # read once: a store-held weight's pages need not stay in memory
    weight_input = node.inputs[1]  # where the int8 weight is stored: the float one's store, if any (not held in memory)
    base = node.name or node.outputs[0].name
    x = node.inputs[0]
    xq = gs.Variable(unique_name(graph, f"{base}_x_quantized"), dtype=np.uint8)
    xs = gs.Variable(unique_name(graph, f"{base}_x_scale"), dtype=np.float32)
    xz = gs.Variable(unique_name(graph, f"{base}_x_zero_point"), dtype=np.uint8)
    accumulated = gs.Variable(unique_name(graph, f"{base}_int32"), dtype=np.int32)
    as_float = gs.Variable(unique_name(graph, f"{base}_int32_float"), dtype=np.float32)
    scale = gs.Variable(unique_name(graph, f"{base}_scale"), dtype=np.float32)
    weight_scale = gs.Constant(unique_name(graph, f"{base}_weight_scale"), np.asarray(quant.scale * np.float32(alpha), dtype=np.float32))  # an array even per tensor
    output = node.outputs[0]
    scaled = output if bias is None else gs.Variable(unique_name(graph, f"{base}_unbiased"), dtype=np.float32)
    new_nodes = [
        gs.Node("DynamicQuantizeLinear", name=unique_name(graph, f"{base}_DynamicQuantizeLinear"), inputs=[x], outputs=[xq, xs, xz]),
        gs.Node("MatMulInteger", name=unique_name(graph, f"{base}_MatMulInteger"),
                inputs=[xq, stored_constant(unique_name(graph, f"{base}_weight_quantized"), quant.values, weight_input), xz,
                        gs.Constant(unique_name(graph, f"{base}_weight_zero_point"), quant.zero_point)], outputs=[accumulated]),
        gs.Node("Mul", name=unique_name(graph, f"{base}_scale_Mul"), inputs=[xs, weight_scale], outputs=[scale]),
        gs.Node("Cast", name=unique_name(graph, f"{base}_Cast"), attrs={"to": onnx.TensorProto.FLOAT}, inputs=[accumulated], outputs=[as_float]),
        gs.Node("Mul", name=unique_name(graph, f"{base}_output_Mul"), inputs=[as_float, scale], outputs=[scaled]),
    ]
    if bias is not None:
        new_nodes.append(gs.Node("Add", name=unique_name(graph, f"{base}_bias_Add"),
                                 inputs=[scaled, gs.Constant(unique_name(graph, f"{base}_bias"), bias)], outputs=[output]))
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.extend(new_nodes)
    return ""
