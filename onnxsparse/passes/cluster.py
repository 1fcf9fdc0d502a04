"""``cluster``: weights from a k-means codebook, stored as 4-bit (or 8-bit) indices: a smaller file.

Each weight tensor (or each output channel, ``scope=channel``) takes its values from 2^bits
centroids found where its weights are (:mod:`onnxsparse.codebook`). The file holds the indices
(uint4 two to a byte, or uint8) and the codebook; a ``Cast`` and a ``Gather`` decode the weight
in the graph. Their inputs are constants, so onnxruntime folds them when it loads the model: the
model runs as fast as before and takes the float weights' memory; the point is the file's size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..activations import ChangingModelValues, collect_channel_stats
from ..calibration import read_once
from ..codebook import Codebooks, compensated, fit_codebooks, nearest_rows, zero_first
from ..errors import InputDataError
from ..graph import (
    at_opset,
    constant_bytes,
    from_gs,
    opset_version,
    overridable_initializers,
    stored_constant,
    to_gs,
    typed_constant,
    unique_name,
)
from ..layers import RNN_OPS, WEIGHT_OPS, layer_kind
from ..layerwise import current_hessians, from_matrix, original_hessians, to_matrix, unsupported_reason
from ..limits import CALIBRATION_SAMPLES
from ..validation import DriftProbe, Tolerance
from ..weights import WeightSite, find_tables, find_weights, matches, replace_weight
from .base import Change, Pass, PassContext, PassResult, Requirement, Skip, register
from .weight_only import INT4_IR_VERSION

log = logging.getLogger(__name__)

UINT4_CAST_OPSET = 21  # Cast (and Gather's inputs) of uint4 tensors
# The widths allocate=sensitivity chooses from: what a file stores them in (uint4 or uint8 indices), so a
# byte spent is a byte on disk (3 bits cost what 4 do, 6 what 8 do).
ALLOCATED_BITS = (4, 8)


@register
@dataclass(frozen=True)
class Cluster(Pass):
    """Non-uniform weight quantization for a smaller file: each weight tensor (or output channel)
    takes its values from a k-means codebook of 2^bits centroids, stored as indices and decoded by
    a Cast and a Gather that onnxruntime folds at load (same speed, float weights in memory).

    Centroids start at the weights' quantiles and follow Lloyd's algorithm; with ``weighted`` each
    weight counts by the energy of the input it multiplies (calibration data). Exact zeros (pruned
    weights) keep a centroid at 0.0. 4-bit indices are uint4 tensors, which need opset 21: the
    pass raises the model's opset to 21 (``index_type=uint8`` keeps it, at 8 bits per weight).
    """

    name = "cluster"
    default_tolerance = Tolerance(min_cosine=0.97)
    bounds_labels = True

    bits: float = field(default=4, metadata={"help": "bits per index: 2^bits centroids (1 to 8); with allocate=sensitivity, the average "
                                                   "index bits per weight (4 to 8)"})
    allocate: Literal["uniform", "sensitivity"] = field(default="uniform", metadata={
        "help": "uniform: every tensor at `bits`; sensitivity: each tensor at 4 or 8 bits, the 8-bit ones chosen so that the outputs move "
                "least within an average of `bits` bits per weight, from a probe of each tensor alone at each width (calibration data)"})
    scope: Literal["tensor", "channel", "scaled"] = field(default="scaled", metadata={
        "help": "one codebook per tensor; per output channel (each channel's book costs 2^bits floats); or scaled: one book of the "
                "weights divided by their channel's largest magnitude, each channel scaling it back (one float per channel)"})
    method: Literal["kmeans", "gptq"] = field(default="kmeans", metadata={
        "help": "kmeans: each weight to its nearest centroid (data-free); gptq: the layer's rounding errors compensated column by column "
                "on calibration data (Conv, Gemm, MatMul of the main graph read by one node)"})
    damp: float = field(default=0.01, metadata={"help": "gptq: damping, a fraction of the mean Hessian diagonal"})
    sequential: bool = field(default=True, metadata={
        "help": "gptq: each layer fitted to its inputs in the model with the layers before it already clustered (one run of the "
                "model's segments per layer), not in the original"})
    weighted: bool = field(default=False, metadata={"help": "weigh each weight by its input's energy on calibration data"})
    embeddings: bool = field(default=True, metadata={"help": "embedding tables too (constant data that only Gathers read)"})
    keep_zero: bool = field(default=True, metadata={"help": "a centroid fixed at 0.0 where a tensor has exact zeros"})
    index_type: Literal["auto", "uint4", "uint8"] = field(default="auto", metadata={
        "help": "auto: uint4 for bits <= 4 (raising the opset to 21), else uint8"})
    min_elements: int = field(default=4096, metadata={"help": "smaller tensors stay float (the codebook and decoding nodes save too little)"})
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "weight, node name or op type patterns left float"})
    iterations: int = field(default=30, metadata={"help": "k-means iterations at most"})
    calibration_samples: int = field(default=CALIBRATION_SAMPLES, metadata={"help": "weighted: calibration samples read (the first ones)"})

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8 or (self.allocate == "uniform" and self.bits != int(self.bits)):
            raise ValueError(f"bits {self.bits}: a whole number from 1 to 8 (an average from 4 to 8 with allocate=sensitivity)")
        if self.allocate == "sensitivity" and not ALLOCATED_BITS[0] <= self.bits <= ALLOCATED_BITS[-1]:
            raise ValueError(f"allocate=sensitivity: bits {self.bits} is an average of 4- and 8-bit tensors, from 4 to 8")
        if self.index_type == "uint4" and self.bits > 4:
            raise ValueError(f"index_type=uint4 holds at most 4 bits, not {self.bits}")
        if self.iterations < 1 or self.min_elements < 1 or self.calibration_samples < 1:
            raise ValueError("iterations, min_elements and calibration_samples must be at least 1")

    def needs(self) -> frozenset[Requirement]:
        data = self.weighted or self.method == "gptq" or self.allocate == "sensitivity"
        return frozenset({Requirement.CALIBRATION}) if data else frozenset()

    @property
    def packed(self) -> bool:
        return self.index_type == "uint4" or (self.index_type == "auto" and (self.bits <= 4 or self.allocate == "sensitivity"))

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        result = PassResult(model)
        graph = to_gs(model)
        sites = self.chosen_sites(graph, model, result)
        if not sites:
            result.skipped.append(Skip("model", f"no float32 weight of {self.min_elements} elements or more to cluster"))
            return result
        packed = False
        if self.packed:
            converted = self.at_uint4_opset(model, result)
            packed = converted is not None
            if converted is not None and converted is not model:  # the sites again, in the converted graph
                model, graph = converted, to_gs(converted)
                sites = self.chosen_sites(graph, model, PassResult(model))
        importance = self._importance(model, sites, context) if self.weighted else {}
        widths = self._allocated(model, sites, importance, context, result) if self.allocate == "sensitivity" else {}
        all_books = self._fitted(model, graph, sites, importance, context, result, widths)
        before = after = 0
        for site, books in zip(sites, all_books):
            before += site.value.nbytes
            after += self.materialize(graph, site, books, packed and widths.get(site.name, int(self.bits)) <= 4)
        graph.cleanup().toposort()
        result.model = from_gs(graph, like=model)
        if packed:
            result.model.ir_version = max(result.model.ir_version, INT4_IR_VERSION)
        result.figures.update(tensors_clustered=len(sites), weight_bytes_before=before, weight_bytes_after=after,
                              weight_bytes_ratio=round(after / max(before, 1), 4), index_type="uint4" if packed else "uint8")
        return result

    # -- what to cluster --------------------------------------------------------------------

    def chosen_sites(self, graph: gs.Graph, model: onnx.ModelProto, result: PassResult) -> list[WeightSite]:
        sites, rejected = find_weights(graph, (*WEIGHT_OPS, *RNN_OPS), overridable_initializers(model))
        if self.embeddings:
            tables, rejected_tables = find_tables(graph, overridable_initializers(model))
            sites, rejected = [*sites, *tables], [*rejected, *rejected_tables]
        result.skipped.extend(Skip(r.name, r.reason) for r in rejected)
        chosen = []
        for site in sites:
            reason = ("excluded" if matches(self.exclude, site.name, *site.node_names, site.op)
                      else f"{site.value.dtype} weight (float32 only)" if site.value.dtype != np.float32
                      else f"{site.value.size} elements, fewer than min_elements={self.min_elements}" if site.value.size < self.min_elements
                      else "read inside more than one graph" if len({id(use.scope) for use in site.uses}) > 1 else "")
            if reason:
                result.skipped.append(Skip(site.name, reason))
            else:
                chosen.append(site)
        return chosen

    def at_uint4_opset(self, model: onnx.ModelProto, result: PassResult) -> onnx.ModelProto | None:
        """The model at an opset that casts uint4 (itself, or onnx's conversion to 21); None if it cannot be."""
        try:
            converted = at_opset(model, UINT4_CAST_OPSET)
        except InputDataError as error:
            if self.index_type == "uint4":
                raise InputDataError(f"cluster index_type=uint4 needs opset {UINT4_CAST_OPSET}: {error}; use index_type=uint8") from error
            result.warnings.append(f"cluster: {error}: indices stored as uint8")
            return None
        if converted is not model:
            result.warnings.append(f"cluster: opset raised from {opset_version(model)} to {UINT4_CAST_OPSET} (uint4 indices)")
            result.figures["opset_raised_to"] = UINT4_CAST_OPSET
        return converted

    def _importance(self, model: onnx.ModelProto, sites: list[WeightSite], context: PassContext) -> dict[str, np.ndarray]:
        """Per weight, the mean square of the input channel each of its elements multiplies, shaped to
        broadcast against it; weights without one layer reading a main-graph input are not weighted."""
        if context.calibration is None:
            raise InputDataError("cluster weighted=true needs calibration data (--calibration)")
        wanted: dict[str, tuple[str, int]] = {}
        for site in sites:
            use = site.uses[0]
            kind = layer_kind(use.node.op)
            reading = kind.activation(use.node.attrs, use.index) if kind is not None else None
            if len(site.uses) == 1 and not site.in_subgraph and reading is not None:
                wanted[site.name] = (use.node.inputs[reading[0]].name, reading[1])
        source = read_once(context.calibration, model, limit=self.calibration_samples)
        stats = collect_channel_stats(model, source, {name: axis for name, axis in wanted.values()}, limit=self.calibration_samples,
                                      label="cluster input energy")
        importance = {}
        for site in sites:
            if site.name in wanted:
                shaped = _per_element(site, stats[wanted[site.name][0]].mean_square)
                if shaped is not None:
                    importance[site.name] = shaped
        return importance

    def _fitted(self, model: onnx.ModelProto, graph: gs.Graph, sites: list[WeightSite], importance: dict[str, np.ndarray],
                context: PassContext, result: PassResult, widths: dict[str, int]) -> list[Codebooks]:
        """Each weight's codebooks and indices, in graph order; with gptq the indices compensate the
        layer's rounding errors on its inputs (sequential: in the model clustered up to that layer,
        whose weights stand in the graph as their decoded values meanwhile), where that moves the
        model's outputs less than the nearest centroids do, each layer alone on held-out calibration
        samples. (Compensation cuts every MiniLM layer's error on its inputs 10-2000x and still made the
        embeddings worse, min cosine 0.90 -> 0.58: the error it minimises is the high-norm tokens'.)"""
        compensating: set[str] = set()
        source = None
        probe = None
        if self.method == "gptq":
            if context.calibration is None:
                raise InputDataError("cluster method=gptq needs calibration data (--calibration)")
            probe = DriftProbe(model, context.calibration)
            try:
                source = read_once(probe.held_out, model, limit=self.calibration_samples)
            except InputDataError:  # the probe took every sample: fit on them all, unchecked
                result.warnings.append(f"cluster gptq: {DriftProbe.SAMPLES} calibration samples or fewer: the compensation is fitted "
                                       "on all of them and not checked against held-out ones")
                source, probe = read_once(context.calibration, model, limit=self.calibration_samples), None
            for site in sites:
                reason = unsupported_reason(site)
                if reason:
                    result.skipped.append(Skip(site.name, f"gptq: {reason}; each weight to its nearest centroid instead"))
                else:
                    compensating.add(site.name)
        viewed = [site for site in sites if site.name in compensating]
        hessians = (original_hessians(model, viewed, source, self.calibration_samples, label="cluster gptq inputs")
                    if source is not None and not self.sequential else {})
        inputs = ChangingModelValues(source, self.calibration_samples, label="cluster gptq inputs") if source is not None and self.sequential else None
        fitted: list[Codebooks] = []
        nearest: list[Codebooks] = []
        for site in sites:
            bits = widths.get(site.name, int(self.bits))
            books = fit_codebooks(np.asarray(site.value), 1 << bits, self.scope, site.out_axis, importance.get(site.name),
                                  iterations=self.iterations, keep_zero=self.keep_zero)
            nearest.append(books)
            if site.name in compensating:
                gram = current_hessians(from_gs(graph, like=model), site, inputs) if inputs is not None else hessians[site.name]
                books = self.compensated(site, books, gram)
                if inputs is not None:  # the later layers see this one clustered
                    replace_weight(site, books.decoded())
                    inputs.edited(graph, [use.node for use in site.uses])
            fitted.append(books)
        if probe is not None and compensating and not self._compensation_pays(model, sites, fitted, nearest, probe, result):
            fitted, compensating = nearest, set()
        for site, books in zip(sites, fitted):
            error = float(np.linalg.norm(books.decoded() - site.value)) / max(float(np.linalg.norm(site.value)), 1e-30)
            result.changes.append(Change(site.name, f"{books.centroids.shape[1].bit_length() - 1}-bit codebook", {
                "nodes": site.node_names, "shape": list(site.value.shape), "scope": self.scope, "codebooks": len(books.centroids),
                "compensated": site.name in compensating, "weight_error": round(error, 6)}))
        return fitted

    def _allocated(self, model: onnx.ModelProto, sites: list[WeightSite], importance: dict[str, np.ndarray], context: PassContext,
                   result: PassResult) -> dict[str, int]:
        """Bits per tensor (of ALLOCATED_BITS) minimising the sum of the drifts each tensor causes alone
        at its width, within the index bytes of ``bits`` everywhere: greedily, the upgrade that buys the
        most drift per byte first. Tensors the probe cannot swap alone (Constant nodes, subgraphs) take
        the allowed width nearest ``bits``."""
        if context.calibration is None:
            raise InputDataError("cluster allocate=sensitivity needs calibration data (--calibration)")
        probe = DriftProbe(model, context.calibration)
        initializers = {tensor.name for tensor in model.graph.initializer}
        drifts: dict[str, dict[int, float]] = {}
        for site in sites:
            if site.name not in initializers or site.in_subgraph:
                continue
            drifts[site.name] = {}
            for bits in ALLOCATED_BITS:
                books = fit_codebooks(np.asarray(site.value), 1 << bits, self.scope, site.out_axis, importance.get(site.name),
                                      iterations=self.iterations, keep_zero=self.keep_zero)
                drifts[site.name][bits] = probe.drift_with({site.name: books.decoded()})
        sizes = {site.name: site.value.size for site in sites if site.name in drifts}
        widths = {name: ALLOCATED_BITS[0] for name in drifts}
        spare = sum(size * (self.bits - ALLOCATED_BITS[0]) for size in sizes.values())
        while True:
            best = None
            for name, bits in widths.items():
                for wider in (b for b in ALLOCATED_BITS if b > bits):
                    cost = sizes[name] * (wider - bits)
                    gain = drifts[name][bits] - drifts[name][wider]
                    if cost <= spare and gain > 0 and (best is None or gain / cost > best[0]):
                        best = (gain / cost, name, wider, cost)
            if best is None:
                break
            _, name, wider, cost = best
            widths[name], spare = wider, spare - cost
        nearest_width = min(ALLOCATED_BITS, key=lambda width: abs(width - self.bits))
        widths.update({site.name: nearest_width for site in sites if site.name not in widths})
        result.figures["bits_allocated"] = {name: widths[name] for name in widths}
        result.figures["drift_alone"] = {name: round(drifts[name][width], 6) for name, width in widths.items() if name in drifts}
        return widths

    @staticmethod
    def _compensation_pays(model: onnx.ModelProto, sites: list[WeightSite], compensated_books: list[Codebooks], nearest: list[Codebooks],
                           probe: DriftProbe, result: PassResult) -> bool:
        """Whether the compensated layers together move the outputs less than every weight at its nearest
        centroids, on the calibration samples the Hessians left out. Weights that are no main-graph
        initializer (Constant nodes, subgraphs) stay at their float values on both sides of the
        comparison, and follow its verdict."""
        initializers = {tensor.name for tensor in model.graph.initializer}
        drifts = [probe.drift_with({site.name: books.decoded() for site, books in zip(sites, chosen) if site.name in initializers})
                  for chosen in (compensated_books, nearest)]
        result.figures.update(drift_compensated=round(drifts[0], 6), drift_nearest=round(drifts[1], 6))
        if drifts[0] < drifts[1]:
            return True
        result.warnings.append(f"cluster gptq: the compensated layers together moved the outputs more than the nearest centroids on held-out "
                               f"calibration samples (drift {drifts[0]:.4g} against {drifts[1]:.4g}): every weight kept at its nearest centroid")
        return False

    def compensated(self, site: WeightSite, books: Codebooks, hessians: np.ndarray) -> Codebooks:
        """The same codebooks, the weight's indices chosen column by column with each rounding error
        compensated by the columns after it (:func:`codebook.compensated`, group by group)."""
        matrix = to_matrix(site)
        rows = books.row_centroids(site.value.shape[site.out_axis])  # matrix rows are the output channels
        per_group = len(matrix) // len(hessians)
        solved = [compensated(matrix[g * per_group : (g + 1) * per_group], hessians[g], rows[g * per_group : (g + 1) * per_group]
                              if len(rows) > 1 else rows, self.damp) for g in range(len(hessians))]
        values = from_matrix(site, np.concatenate(solved).astype(np.float32))
        moved = np.moveaxis(values, site.out_axis, 0)
        indices = nearest_rows(moved.reshape(len(moved), -1).astype(np.float64), rows).reshape(moved.shape)
        return replace(books, indices=np.moveaxis(indices, 0, site.out_axis).astype(np.uint8))

    # -- writing ----------------------------------------------------------------------------

    def materialize(self, graph: gs.Graph, site: WeightSite, books: Codebooks, packed: bool) -> int:
        """Indices -> Cast(int32) [-> + each channel's offset into the flat books] -> Gather(books)
        [-> x each channel's scale], in the weight's scope and read by every use instead of the weight;
        the bytes the indices, books and scales take."""
        books = zero_first(books)  # the same weights; pruned ones at index 0, one bit each to sparse-encode
        levels = books.centroids.shape[1]
        shape = list(site.value.shape)
        channel_shape = [1] * len(shape)
        channel_shape[site.out_axis] = shape[site.out_axis]
        scope = site.uses[0].scope
        name = site.name
        index_name = unique_name(graph, f"{name}_indices")
        stored = [typed_constant(index_name, books.indices, onnx.TensorProto.UINT4, site.tensor) if packed
                  else stored_constant(index_name, books.indices.astype(np.uint8), site.tensor),
                  gs.Constant(unique_name(graph, f"{name}_codebook"), books.centroids.reshape(-1).astype(np.float32))]
        wide = gs.Variable(unique_name(graph, f"{name}_indices_int32"), dtype=np.int32, shape=shape)
        nodes = [gs.Node("Cast", name=unique_name(graph, f"{name}_Cast"), attrs={"to": onnx.TensorProto.INT32}, inputs=[stored[0]], outputs=[wide])]
        if len(books.centroids) > 1:  # each channel's indices into its own stretch of the flat books
            offsets = gs.Constant(unique_name(graph, f"{name}_offsets"), (np.arange(shape[site.out_axis], dtype=np.int32) * levels).reshape(channel_shape))
            wide = self._then(graph, nodes, "Add", name, [wide, offsets], np.int32, shape)
        decoded = self._then(graph, nodes, "Gather", name, [stored[1], wide], np.float32, shape, attrs={"axis": 0})
        if books.scales is not None:
            stored.append(gs.Constant(unique_name(graph, f"{name}_scales"), books.scales.reshape(channel_shape).astype(np.float32)))
            decoded = self._then(graph, nodes, "Mul", name, [decoded, stored[-1]], np.float32, shape)
        first = min(scope.nodes.index(use.node) for use in site.uses)
        scope.nodes[first:first] = nodes
        for use in site.uses:
            use.node.inputs[use.index] = decoded
        return sum(constant_bytes(constant) for constant in stored)

    @staticmethod
    def _then(graph: gs.Graph, nodes: list[gs.Node], op: str, name: str, inputs: list[gs.Tensor], dtype: type, shape: list[int],
              attrs: dict[str, int] | None = None) -> gs.Variable:
        """A node appended to ``nodes`` and its output."""
        output = gs.Variable(unique_name(graph, f"{name}_{op.lower()}"), dtype=dtype, shape=shape)
        nodes.append(gs.Node(op, name=unique_name(graph, f"{name}_{op}"), attrs=attrs or {}, inputs=inputs, outputs=[output]))
        return output


def _per_element(site: WeightSite, mean_square: np.ndarray) -> np.ndarray | None:
    """The input channels' mean squares laid along the weight's reduction axis (a grouped Conv's
    channels split by group), shaped to broadcast against the weight; None if they do not fit."""
    value, axis = site.value, site.reduction_axis
    shape = [1] * value.ndim
    if value.shape[axis] == len(mean_square):
        shape[axis] = len(mean_square)
        return mean_square.reshape(shape)
    node = site.uses[0].node
    groups = int(node.attrs.get("group", 1))
    if node.op == "Conv" and axis == 1 and value.shape[1] * groups == len(mean_square):
        per_group = mean_square.reshape(groups, value.shape[1])  # [groups, channels of a group]
        rows = np.repeat(per_group, value.shape[0] // groups, axis=0)  # [outputs, channels of its group]
        return rows.reshape(value.shape[0], value.shape[1], *([1] * (value.ndim - 2)))
    return None
