"""The ``qdq`` pass: int8 quantization by QuantizeLinear/DequantizeLinear pairs, calibrated on data; static
or dynamic (or the better of both), guarded, never slower than its input."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...activations import collect_ranges
from ...calibration import first_samples, samples_read
from ...errors import InputDataError, RuntimeLoadError
from ...files import write_text_atomically
from ...graph import (
    MICROSOFT_DOMAIN,
    at_opset,
    constant_value,
    from_gs,
    import_domain,
    name_unnamed_nodes,
    opset_version,
    overridable_initializers,
    to_gs,
)
from ...io import check_model
from ...latency import RETIME_RUNS, RETIME_SECONDS, relative_latency, timing_feed
from ...limits import CALIBRATION_SAMPLES
from ...quantization import CALIBRATION_METHODS, WeightScheme, int8_kernels_saturate, quantize_weight
from ...shapes import shapes_where_known
from ...validation import DriftProbe, Tolerance, ValidationResult
from ...walk import iter_graphs
from ...weights import matches
from ..base import Change, Pass, PassContext, PassResult, Requirement, Skip, register
from ..simplify import Simplify
from .bias_correction import bias_shifts
from .guard import GUARD_REASON, closeness, confirmed, guarded
from .materialize import StaticBuilder, applicable_shifts, dequantized, dynamic_lstm, dynamic_matmul
from .plan import Plan, nested_weight_layers, plan_static, tensors_of
from .rules import COMPUTE, QUANTIZED_OPS, RECURRENT, is_input_layer, speed_kind, timing_kind

log = logging.getLogger(__name__)

# never_slower: a best candidate at this ratio to its input or above is tried with each kind of node
# in float (below it, with the layers reading the model's input in float only); a ratio within
# CLOSE_TO_EVEN of 1 is timed again, longer, before it decides anything.
SPEED_SEARCH_ABOVE = 0.95
CLOSE_TO_EVEN = 0.03
# A change is faster when it takes under this ratio of the time without it: a gain under 1% is within a
# timing's noise (one thread, interleaved, on a shared machine), and "faster" would then be a coin's throw.
# Used for the int8 model against its input (never_slower: not worth its rounding error otherwise) and for
# the layers reading the model's input kept float against the int8 model.
CLEAR_GAIN = 0.99


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
    bounds_labels = True
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
    guard: bool = field(default=True, metadata={
        "help": "keep the most harmful nodes in float until the tolerance holds, judged on calibration samples (mode=dynamic: when given)"})
    bias_correction: Literal["auto", "on", "off"] = field(default="auto", metadata={
        "help": "shift each layer's bias, in graph order, so its mean int8 output matches float (auto: convolutions, with minmax ranges)"})
    correction_samples: int = field(default=16, metadata={"help": "calibration samples read per layer by bias_correction"})
    embeddings: bool = field(default=False, metadata={
        "help": "int8 embedding tables (DequantizeLinear before Gather): MiniLM 0.65x -> 0.26x the file, but 0.46x -> 0.65x latency"})
    calibration_samples: int = field(default=CALIBRATION_SAMPLES, metadata={"help": "calibration samples read (the first ones)"})
    cache: str = field(default="", metadata={"help": "JSON file of calibrated ranges: read if present, written if not"})
    never_slower: bool = field(default=True, metadata={
        "help": "time each candidate against the pass's input in onnxruntime (one thread, interleaved runs) and keep the "
                "input when none is at least 1% faster (less is within a timing's noise), saying so; when the best is not clearly faster, each kind of quantized node "
                "(1-D Conv, depthwise Conv, MatMul of activations, Add, the layers reading the model's input, ...) is also tried in "
                "float, and a kind whose int8 form made the model slower stays float; when it is clearly faster, the layers reading "
                "the model's input are still tried in float (kept so when 1% faster). The pass manager also rolls back a step slower than its input"})
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

    def fits_on_calibration(self) -> bool:
        return self.mode != "dynamic" or self.guard  # the dynamic guard judges its trials on calibration samples, when given

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
            dynamic = self._guarded_dynamic(model, result, weights, context)
            return self._kept_if_faster({"dynamic": self._with_embeddings(dynamic)}, original, context, weights)
        # The dynamic candidate starts from what was said before either was built (opset raised,
        # unmatched patterns), not from the static candidate's figures (its nodes kept float).
        said = _copy_of(result)
        static = self._static(model, context, result, weights)
        candidates = {"static": static.first}
        if self.mode == "auto" and context.validate is not None and context.calibration is not None:
            # guarded only where it could win: a static model that holds with every node int8 is not
            # beaten by a dynamic one with some in float
            whole = bool(static.first.changes) and static.guard_holds is not False and not static.guard_kept
            dynamic = self._dynamic(model, said, weights) if whole else self._guarded_dynamic(model, said, weights, context)
            if dynamic.changes:  # a dynamic candidate that quantizes nothing is the input: never slower or "chosen"
                candidates["dynamic"] = dynamic
                if not static.first.changes:
                    # nor a static one that the guard kept wholly float: it is the simplified input, which can
                    # time faster than a dynamic model within tolerance and then take its place (PP-OCRv4:
                    # 0.957x against 0.984x, and the pass returned its input)
                    del candidates["static"]
                    dynamic.figures["mode_choice"] = ("static: the accuracy guard kept every node float" if static.guard_kept else
                                                      "static: nothing to quantize")
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
        # what the guard already judged of the static candidate, if it is still the model it judged (not one with embeddings)
        known = ({"static": static.guard_holds} if static is not None and static.guard_holds is not None and "static" in candidates
                 and candidates["static"].model is static.guard_model else {})
        chosen, why = _pick(candidates, ratios, original, context, self.default_tolerance.min_cosine or 0.97, known)
        picked = candidates[chosen]
        if len(candidates) > 1:
            picked.figures.update(mode_choice=why, **{f"{mode}_latency_ratio": round(r, 3) for mode, r in ratios.items()})
        ratio = ratios.get(chosen)
        if ratio is not None and picked.changes and static is not None and chosen == "static":
            if ratio >= SPEED_SEARCH_ABOVE:
                picked, ratio = self._without_slow_kinds(static, picked, ratio, original, feed, context)
            else:
                picked, ratio = self._without_slow_input_layers(static, picked, ratio, feed, context)
        picked, ratio = self._with_lstms(picked, ratio, original, feed, context, weights)
        if not self.never_slower or not picked.changes:
            picked.latency_vs_input = ratio
            return picked
        assert ratio is not None  # never_slower times every candidate
        if abs(ratio - 1.0) < CLOSE_TO_EVEN:  # one timing on a shared machine is off by a few percent
            ratio = relative_latency(original, picked.model, feed, runtime=context.runtime, keep_candidate=False,
                                     min_runs=RETIME_RUNS, min_seconds=RETIME_SECONDS)
        picked.figures["latency_ratio"] = round(ratio, 3)
        if ratio < CLEAR_GAIN:
            picked.latency_vs_input = ratio
            return picked
        kept = PassResult(original, warnings=picked.warnings, figures=picked.figures, skipped=picked.skipped)
        why = ("quantizing activations at run time and around small layers can cost more than the int8 kernels save" if ratio >= 1.0 else
               f"a gain under {1 - CLEAR_GAIN:.0%} is within a timing's noise, and not worth int8's rounding error")
        shown = f"{ratio:.3f}" if ratio < 1.0 else f"{ratio:.2f}"  # 0.995x would read 0.99x or 1.00x
        kept.worse = (f"the quantized model took {shown}x its input's time in onnxruntime (one thread), so the input is kept: "
                      f"{why} (never_slower=false keeps the int8 model)")
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
                kinds.setdefault(timing_kind(node), set()).add(node.name)
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
        faster = self._variant(static, picked, slow, context, f"{'+'.join(best)} in float ran faster ({trials[best]:.2f}x)")
        return (picked, ratio) if faster is None else (faster, trials[best])

    def _without_slow_input_layers(self, static: StaticResult, picked: PassResult, ratio: float, feed: dict[str, np.ndarray],
                                   context: PassContext) -> tuple[PassResult, float]:
        """``picked`` with the layers that read the model's input kept float, if that runs faster than
        ``picked`` and holds the tolerance. Timed, not assumed, and against ``picked`` itself: the gain is
        a few percent, within the spread of two timings against the input, and it goes either way
        (one thread, VNNI: MobileNetV2 0.495x -> 0.475x its input's time, the depthwise stack 0.636x
        -> 0.590x, the tf2onnx conv1d model 0.441x -> 0.457x)."""
        first = {node.name: speed_kind(node) for node in static.plan.nodes
                 if node.name not in static.guard_kept and is_input_layer(node)}
        if not first or not static.changes_anything(static.guard_kept | set(first)):
            return picked, ratio
        model = self._with_embeddings(PassResult(static.build(static.guard_kept | set(first)))).model
        # picked is timed as the candidate, so that its session stays handed over for the manager's validation
        relative = 1.0 / relative_latency(model, picked.model, feed, runtime=context.runtime, keep_candidate=True, hand_over=True,
                                          decide_at=(1.0 / CLEAR_GAIN,))
        timed = ratio * relative
        picked.figures["input_layers_in_float_latency"] = round(timed, 3)
        if relative >= CLEAR_GAIN:
            return picked, ratio
        slow = {name: f"kept in float: it reads the model's input, and the model ran faster with this {kind} in float ({ratio:.3f}x "
                      f"-> {timed:.3f}x its input's time)" for name, kind in first.items()}
        faster = self._variant(static, picked, slow, context, f"the layers reading the model's input in float ran faster ({timed:.2f}x)")
        return (picked, ratio) if faster is None else (faster, timed)

    def _variant(self, static: StaticResult, picked: PassResult, slow: dict[str, str], context: PassContext, what: str) -> PassResult | None:
        """The guard's choice with the ``slow`` nodes (name -> why) kept float too, its biases corrected
        for that, reported as such; None, said on ``picked``, when it does not hold the tolerance as
        well as the guard's choice (see :func:`_replaces`)."""
        model, layers = static.corrected(static.guard_kept | set(slow))
        replaces, _, why = _replaces(model, static.guard_model, context, static.guard_holds) if context.validate is not None else (True, None, "")
        if not replaces:
            picked.warnings.append(f"qdq: {what} but {why}: kept int8")
            return None
        guarded = dict.fromkeys(static.guard_kept, GUARD_REASON)
        faster = self._with_embeddings(static.result(model, {**guarded, **slow}))
        faster.figures = {**picked.figures, **faster.figures}  # the mode choice and the trials' timings stay
        if "bias_corrected_layers" in faster.figures:
            faster.figures["bias_corrected_layers"] = layers
        return faster

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
            node.inputs[0] = dequantized(graph, graph, node.inputs[0].name, quant.values, quant.scale, quant.zero_point, 0)
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
        builder = StaticBuilder(model, plan, ranges, weights, self.activations, self.symmetric)
        correcting = self.bias_correction != "off" and (self.bias_correction == "on" or self.method == "minmax")
        # auto corrects convolutions only: on MiniLM's MatMuls it lowered the cosine (0.947 -> 0.932)
        ops = ("Conv", "Gemm", "MatMul") if self.bias_correction == "on" else ("Conv",)
        source = first_samples(context.calibration, model, self.correction_samples) if correcting and context.calibration is not None else None
        if source is not None:
            shifts = bias_shifts(builder, source, ops, context.progress)
            result.figures["bias_corrected_layers"] = len(shifts)
        def build(kept: set[str]) -> onnx.ModelProto:  # the quantized model for a set of nodes kept float (trials)
            return builder.build(kept, shifts)

        def corrected(kept: set[str]) -> tuple[onnx.ModelProto, int]:
            """The model for ``kept`` with its biases corrected again with exactly those nodes float (the
            trials drop every shift below a float layer: for a first layer kept float, all of them),
            and how many layers were corrected."""
            if not shifts or not kept or source is None:
                return build(kept), len(applicable_shifts(graph, kept, shifts))
            again = bias_shifts(builder, source, ops, context.progress, kept_float=frozenset(kept))
            return builder.build(kept, again, measured_with=frozenset(kept)), len(again)

        quantized = build(kept_float)
        holds = None
        if self.guard and context.validate is not None:
            quantized, kept_float, holds = guarded(build, plan.nodes, quantized, context, result)
            if shifts and kept_float:
                again, layers = corrected(kept_float)
                replaces, again_holds, _ = _replaces(again, quantized, context, holds)
                if replaces:
                    quantized, holds = again, again_holds
                result.figures["bias_corrected_layers"] = layers if replaces else len(applicable_shifts(graph, kept_float, shifts))
        result.figures.update(mode="static", activations=self.activations, weights=weights.describe())
        static = StaticResult(graph, plan, nested, build, corrected, kept_float, result, quantized, holds)
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

    # -- the accuracy guard -------------------------------------------------------------------

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

    def _guarded_dynamic(self, model: onnx.ModelProto, said: PassResult, weights: WeightScheme, context: PassContext) -> PassResult:
        """The dynamic quantization with its most harmful layers kept float until the tolerance holds,
        searched as the static guard searches (:func:`guarded`). MPNet (109M) broke the tolerance with
        every MatMul dynamic int8, and its static candidate held only with all 158 in float: without
        a guard here the whole model stayed float."""
        full = self._dynamic(model, _copy_of(said), weights)
        if not self.guard or context.validate is None or not full.changes:
            return full
        quantized = {change.target for change in full.changes}
        nodes = [node for node in to_gs(model).nodes if node.name in quantized]
        def build(kept: set[str]) -> onnx.ModelProto:
            return self._dynamic(model, PassResult(model), weights, frozenset(kept)).model
        _, kept, _ = guarded(build, nodes, full.model, context, full)
        if not kept:
            return full
        guarded_result = self._dynamic(model, said, weights, frozenset(kept))
        guarded_result.figures.update({k: v for k, v in full.figures.items() if k.startswith("guard_")})
        guarded_result.warnings.extend(w for w in full.warnings if w.startswith("qdq guard"))
        return guarded_result

    def _dynamic(self, model: onnx.ModelProto, result: PassResult, weights: WeightScheme, kept: frozenset[str] = frozenset()) -> PassResult:
        """Every MatMul/Gemm with a constant weight to dynamic int8 (activations quantized at run time),
        but those ``kept`` float by the guard."""
        graph = to_gs(model)
        overridable = overridable_initializers(model)
        for node in [n for n in graph.nodes if n.op in ("MatMul", "Gemm")]:
            label = node.name or node.outputs[0].name
            if matches(self.exclude, node.name, node.op):
                result.skipped.append(Skip(label, "excluded by pattern"))
                continue
            if node.name in kept:
                result.skipped.append(Skip(label, GUARD_REASON))
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
    corrected: Callable[[set[str]], tuple[onnx.ModelProto, int]]  # the same, biases corrected for exactly them; layers corrected
    guard_kept: set[str]  # kept float by the accuracy guard
    said: PassResult  # what was said before any variant: calibration, guard figures, excluded nodes
    guard_model: onnx.ModelProto  # the model the guard chose
    guard_holds: bool | None  # whether it holds the tolerance on the judge's and the confirming samples (None: no guard ran)
    first: PassResult = field(init=False)  # the variant the guard chose

    def changes_anything(self, kept: set[str]) -> bool:
        """Whether keeping ``kept`` float builds another model than the guard's: it does when a weight
        stays float or a tensor goes unquantized."""
        def quantized(float_nodes: set[str]) -> tuple[set[str], set[str]]:
            chosen = [n for n in self.plan.nodes if n.name not in float_nodes]
            return tensors_of(chosen, self.plan, self.graph), {n.name for n in chosen if n.op in COMPUTE}
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


def _replaces(model: onnx.ModelProto, current: onnx.ModelProto, context: PassContext, current_holds: bool | None = None) -> tuple[bool, bool, str]:
    """Whether ``model`` may replace ``current``, whether it holds the tolerance, and why not: it may when
    it holds it (on the judge's samples and the confirming ones), or when neither does and it is no
    further from the original (after a lossy step nothing may hold). ``current_holds``: whether
    ``current`` holds, when that is known (None: judged here if needed)."""
    assert context.validate is not None
    verdict = context.validate(model)
    if verdict.passed and confirmed(model, context):
        return True, True, ""
    if current_holds:
        return False, False, "broke the tolerance"
    before = context.validate(current)
    if current_holds is None and before.passed and confirmed(current, context):
        return False, False, "broke the tolerance"
    closer, kept = closeness(verdict), closeness(before)
    return closer >= kept, False, f"was further from the original (cosine {closer:.6f} against {kept:.6f}), and neither holds the tolerance"


def _simplified(model: onnx.ModelProto, context: PassContext, result: PassResult) -> PassResult | None:
    """The simplify pass's result on ``model``; None, said in a warning, when onnxruntime's optimizer
    cannot load it."""
    try:
        return Simplify().run(model, context)
    except RuntimeLoadError as error:
        result.warnings.append(f"qdq: not simplified first: {error}")
        return None


def _within_own_bound(model: onnx.ModelProto, results: dict[str, PassResult], context: PassContext, bound: float) -> list[str]:
    """The modes whose output cosine to ``model`` (the pass's input) is at least ``bound``."""
    assert context.calibration is not None
    probe = DriftProbe(model, context.calibration)
    return [mode for mode, result in results.items() if 1.0 - probe.drift(result.model) >= bound]


def _copy_of(result: PassResult) -> PassResult:
    """What was said so far, for a candidate built from it to add its own without touching the rest."""
    return PassResult(result.model, changes=list(result.changes), warnings=list(result.warnings), figures=dict(result.figures),
                      skipped=list(result.skipped), standard=result.standard)


def _pick(results: dict[str, PassResult], ratios: dict[str, float], model: onnx.ModelProto, context: PassContext, own_bound: float,
          known: Mapping[str, bool] | None = None) -> tuple[str, str]:
    """mode=auto: the candidate within tolerance; if several are, the faster in onnxruntime on one
    thread (``ratios``, against ``model``). One candidate is simply itself. ``known``: whether a
    candidate holds, where that was judged already (the guard's static model)."""
    if len(results) == 1:
        return next(iter(results)), ""
    assert context.validate is not None and context.calibration is not None
    validate = context.validate
    verdicts: dict[str, ValidationResult] = {}

    def verdict(mode: str) -> ValidationResult:
        if mode not in verdicts:
            verdicts[mode] = validate(results[mode].model)
        return verdicts[mode]

    def holds(mode: str) -> bool:
        # within tolerance as the guard means it: the confirming samples agree too (a dynamic candidate
        # the judge's few samples pass must not win over a static one the guard held to more)
        if known is not None and mode in known:
            return known[mode]
        return verdict(mode).passed and confirmed(results[mode].model, context)

    passing = [mode for mode in results if holds(mode)]
    why_prefix = ""
    if not passing and (context.after_lossy or not context.validate(model).passed):
        # Neither candidate holds the original's tolerance, after a lossy pass that moved the model past
        # it or to its edge (a refit that fit the calibration samples passes the judge there, and any
        # quantization then tips it over). "The closer to the original" is then merely the one that
        # quantized less: MobileNetV2 pruned to 0.70x kept dynamic's one Gemm (0.99x) over static's
        # 0.56x. Judge what quantization itself adds: the drift from this pass's input. (On a model no
        # lossy pass touched, the user's tolerance is quantization's own, and stays the measure.)
        passing = _within_own_bound(model, results, context, own_bound)
        why_prefix = "neither within tolerance of the original; judged against this pass's input: "
    if len(passing) == 1:
        return passing[0], why_prefix + "the only one within tolerance"
    if passing:
        return min(passing, key=lambda mode: ratios[mode]), why_prefix + "both within tolerance; the faster"
    return max(results, key=lambda mode: closeness(verdict(mode))), "neither within tolerance; the closer to the original"


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
        reads = [o.sequence_agreement for o in verdict.outputs if o.sequence_agreement is not None]
        row: dict[str, object] = {"node": label, "kind": speed_kind(node), "cosine_alone": round(closeness(verdict), 6),
                                  "top1_alone": round(min(top1), 4) if top1 else None,
                                  "same_read_alone": round(min(reads), 4) if reads else None,
                                  "holds_alone": verdict.passed, "status": why_float.get(label, "int8")}
        if verdict.metric is not None:
            row["metric_alone"] = verdict.metric.value
        rows.append(row)
        if context.progress:
            context.progress("qdq sensitivity", index + 1, len(static.plan.nodes))
    return sorted(rows, key=lambda row: float(row["cosine_alone"]))  # type: ignore[arg-type]


def _time_against(original: onnx.ModelProto, candidate: onnx.ModelProto, feed: dict[str, np.ndarray], context: PassContext,
                  bound: float | None = None, *, early: bool = True, keep: bool = False) -> float:
    """``candidate``'s one-thread onnxruntime time over ``original``'s. With ``early``, timing stops
    once the ratio is clearly on one side of 1, of CLEAR_GAIN (and of ``bound``); ``keep`` holds the
    candidate's session for its validation."""
    bounds = tuple(sorted({1.0, CLEAR_GAIN} | ({bound} if bound is not None else set())))
    return relative_latency(original, candidate, feed, runtime=context.runtime, keep_candidate=keep, hand_over=keep,
                            decide_at=bounds if early else ())
