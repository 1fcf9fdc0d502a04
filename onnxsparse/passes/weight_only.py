"""``weight-only``: 4-bit (or 8-bit) block-wise weights for MatMul layers, activations left float.

Each MatMul weight W [K, N] becomes codes in blocks of ``block`` rows of K per output column, one
scale (and with ``symmetric=false`` one zero point) per block, written as onnxruntime's
``MatMulNBits`` (com.microsoft; the kernel onnxruntime has on CPU and GPU) or, with
``format=qdq``, as standard ONNX: a blocked ``DequantizeLinear`` of int4/uint4 codes (opset 21,
which the pass raises the model to) feeding the MatMul, which onnxruntime fuses into MatMulNBits.
The arithmetic is in :mod:`onnxsparse.blockwise`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..blockwise import BlockCodes, BlockScheme, clipped_to_least_error, gptq, pack_low_first, round_to_nearest
from ..calibration import read_once
from ..errors import InputDataError
from ..graph import (
    MICROSOFT_DOMAIN,
    at_opset,
    constant_bytes,
    from_gs,
    import_domain,
    opset_version,
    overridable_initializers,
    stored_constant,
    to_gs,
    typed_constant,
    unique_name,
)
from ..layerwise import viewable_hessians
from ..limits import CALIBRATION_SAMPLES
from ..validation import Tolerance
from ..weights import WeightSite, find_tables, find_weights, matches
from ..weightstore import release_pages
from .base import Change, Pass, PassContext, PassResult, Requirement, Skip, register

log = logging.getLogger(__name__)

BLOCKED_DEQUANTIZE_OPSET = 21  # DequantizeLinear with block_size, and int4/uint4 tensors
INT4_IR_VERSION = 10  # the first IR version with int4/uint4 tensors


@register
@dataclass(frozen=True)
class WeightOnly(Pass):
    """4-bit (or 8-bit) block-wise weight-only quantization of MatMul weights, for onnxruntime's
    MatMulNBits kernel (or a standard blocked DequantizeLinear with ``format=qdq``).

    Activations stay float: the file shrinks to about bits/32 of the weights' bytes (plus a scale per
    block) and onnxruntime runs int4/int8 weight kernels. ``method``: ``rtn`` rounds each block to
    its own range (the codes are onnxruntime's MatMulNBitsQuantizer's, bit for bit); ``mse`` shrinks
    each block's range to the one with the least weight error (data-free); ``gptq`` compensates
    each row's rounding error in the rows after it, weighted by the layer's calibration inputs.
    Weights read as something else too (a tied embedding), N-D weights and float16 weights are
    left alone with the reason.
    """

    name = "weight-only"
    # Looser than int8's 0.97: 4-bit round-to-nearest gives MiniLM's embedding 0.968 (onnxruntime's quantizer the same)
    default_tolerance = Tolerance(min_cosine=0.95)
    bounds_labels = True
    may_change_speed = True

    bits: int = field(default=4, metadata={"help": "bits per weight: 4 or 8 (2 for MatMulNBits only)"})
    block: int = field(default=32, metadata={"help": "rows of K sharing a scale: a power of two, at least 16"})
    symmetric: bool = field(default=True, metadata={"help": "no zero points (the block's extreme weight is exact); false: a zero point per block"})
    method: Literal["rtn", "mse", "gptq"] = field(default="rtn", metadata={
        "help": "rtn: round to nearest; mse: each block's range shrunk to the least weight error (data-free); "
                "gptq: rounding errors compensated on calibration data (needs --calibration)"})
    format: Literal["nbits", "qdq"] = field(default="nbits", metadata={
        "help": "nbits: onnxruntime's MatMulNBits (com.microsoft); qdq: standard ONNX, DequantizeLinear of int4/uint4 "
                "codes with block_size (opset 21), which onnxruntime fuses into MatMulNBits"})
    accuracy_level: int = field(default=0, metadata={
        "help": "MatMulNBits' accuracy_level: 0 unset (float math), 4 = activations quantized to int8 per block inside the "
                "kernel (faster on x86 with VNNI, less exact)"})
    embeddings: bool = field(default=True, metadata={
        "help": "embedding tables (constant 2-D data of a Gather) to onnxruntime's GatherBlockQuantized, blocks along each row: "
                "often the model's largest tensor (MiniLM: 40% of its bytes)"})
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "weight, node name or op type patterns left float"})
    act_order: bool = field(default=True, metadata={
        "help": "gptq: round the rows of K with the most input energy first, every block's range fixed beforehand "
                "(MiniLM, 4-bit: min embedding cosine 0.973 -> 0.975)"})
    calibration_samples: int = field(default=CALIBRATION_SAMPLES, metadata={"help": "gptq: calibration samples read (the first ones)"})
    damp: float = field(default=0.01, metadata={"help": "gptq: damping, a fraction of the mean Hessian diagonal"})

    def __post_init__(self) -> None:
        BlockScheme(self.bits, self.block, self.symmetric)  # raises ValueError on a bad combination
        if self.format == "qdq" and self.bits == 2:
            raise ValueError("format=qdq writes int4 or int8 codes: bits 4 or 8")
        if not 0 <= self.accuracy_level <= 4:
            raise ValueError(f"accuracy_level {self.accuracy_level}: 0 to 4")
        if self.format == "qdq" and self.accuracy_level:
            raise ValueError("accuracy_level is an attribute of MatMulNBits: format=nbits")
        if self.calibration_samples < 1 or not 0 < self.damp < 1:
            raise ValueError("calibration_samples must be at least 1 and damp within (0, 1)")

    def needs(self) -> frozenset[Requirement]:
        return frozenset({Requirement.CALIBRATION}) if self.method == "gptq" else frozenset()

    @property
    def scheme(self) -> BlockScheme:
        return BlockScheme(self.bits, self.block, self.symmetric)

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        result = PassResult(model)
        if self.format == "qdq":
            model = self._at_blocked_opset(model, result)
        graph = to_gs(model)
        sites = self._chosen_sites(graph, model, result)
        tables = self._embedding_tables(graph, model, result) if self.embeddings else []
        if not sites and not tables:
            result.skipped.append(Skip("model", "no MatMul with a constant 2-D float32 weight, nor embedding table, to quantize"))
            return result
        hessians = self.hessians(model, sites, context, result) if self.method == "gptq" else {}
        before = after = 0
        for site in sites:
            codes = self.codes(np.asarray(site.value), hessians.get(site.name))
            before += site.value.nbytes
            after += self.materialize(graph, site, codes)
            result.changes.append(Change(site.name, f"int{self.bits} weight-only", {
                "nodes": site.node_names, "shape": list(site.value.shape), "block": self.block,
                "method": self.method if self.method != "gptq" or site.name in hessians else "rtn",
                "weight_error": _relative_error(site.value, codes)}))
            release_pages(site.value)
        for table in tables:
            codes = self.codes(np.asarray(table.value).T, None)  # rows are the output units, blocks run along each row
            before += table.value.nbytes
            after += self._materialize_table(table, codes)
            result.changes.append(Change(table.name, f"int{self.bits} embedding table", {
                "nodes": table.node_names, "shape": list(table.value.shape), "block": self.block,
                "method": "rtn" if self.method == "gptq" else self.method, "weight_error": _relative_error(table.value.T, codes)}))
        graph.cleanup().toposort()
        result.model = from_gs(graph, like=model)
        if self.format == "nbits" or tables:
            import_domain(result.model, MICROSOFT_DOMAIN)
        if tables and self.bits == 4:
            result.model.ir_version = max(result.model.ir_version, INT4_IR_VERSION)
        result.figures.update(tensors_quantized=len(sites) + len(tables), weight_bytes_before=before, weight_bytes_after=after,
                              weight_bytes_ratio=round(after / max(before, 1), 4))
        return result

    # -- what to quantize --------------------------------------------------------------------

    def _chosen_sites(self, graph: gs.Graph, model: onnx.ModelProto, result: PassResult) -> list[WeightSite]:
        sites, rejected = find_weights(graph, ("MatMul",), overridable_initializers(model))
        result.skipped.extend(Skip(r.name, r.reason) for r in rejected)
        chosen = []
        for site in sites:
            reason = self.why_not(site)
            if reason:
                result.skipped.append(Skip(site.name, reason))
            else:
                chosen.append(site)
        return chosen

    def why_not(self, site: WeightSite) -> str:
        if matches(self.exclude, site.name, *site.node_names, site.op):
            return "excluded"
        if any(use.index != 1 for use in site.uses):
            return "the constant is MatMul's first operand (the kernel takes a constant second one)"
        if site.value.ndim != 2:
            return f"{site.value.ndim}-D weight (MatMulNBits takes [K, N])"
        if site.value.dtype != np.float32:
            return f"{site.value.dtype} weight (float32 only)"
        return ""

    def hessians(self, model: onnx.ModelProto, sites: list[WeightSite], context: PassContext, result: PassResult) -> dict[str, np.ndarray]:
        """XᵀX of every chosen layer's input in the pass's input model, in one pass over the data (layers
        without a layer-wise view, in a subgraph or shared by several nodes, are rounded to nearest)."""
        if context.calibration is None:
            raise InputDataError("weight-only method=gptq needs calibration data (--calibration)")
        source = read_once(context.calibration, model, limit=self.calibration_samples)
        grams, unviewed = viewable_hessians(model, sites, source, self.calibration_samples, label="weight-only gptq inputs")
        result.skipped.extend(Skip(name, f"gptq: {reason}; rounded to nearest instead") for name, reason in unviewed.items())
        return {name: blocks[0] for name, blocks in grams.items()}

    def _embedding_tables(self, graph: gs.Graph, model: onnx.ModelProto, result: PassResult) -> list[WeightSite]:
        """Constant 2-D float32 tables that only Gathers along axis 0 read (not a tied weight a MatMul reads too)."""
        tables, rejected = find_tables(graph, overridable_initializers(model))
        result.skipped.extend(Skip(r.name, r.reason) for r in rejected)
        chosen = []
        for table in tables:
            reason = ("excluded" if matches(self.exclude, table.name, *table.node_names, "Gather")
                      else f"{table.value.dtype} table (float32 only)" if table.value.dtype != np.float32 else "")
            if reason:
                result.skipped.append(Skip(table.name, reason))
            else:
                chosen.append(table)
        return chosen

    def codes(self, weight: np.ndarray, hessian: np.ndarray | None) -> BlockCodes:
        if self.method == "gptq" and hessian is not None:
            return gptq(weight, hessian, self.scheme, self.damp, act_order=self.act_order)
        if self.method == "mse":
            return clipped_to_least_error(weight, self.scheme)
        return round_to_nearest(weight, self.scheme)

    # -- writing ----------------------------------------------------------------------------

    def _at_blocked_opset(self, model: onnx.ModelProto, result: PassResult) -> onnx.ModelProto:
        try:
            converted = at_opset(model, BLOCKED_DEQUANTIZE_OPSET)
        except InputDataError as error:
            raise InputDataError(f"weight-only format=qdq needs opset {BLOCKED_DEQUANTIZE_OPSET}: {error}; use format=nbits") from error
        if converted is not model:
            result.warnings.append(f"weight-only: opset raised from {opset_version(model)} to {BLOCKED_DEQUANTIZE_OPSET} (blocked DequantizeLinear)")
            result.figures["opset_raised_to"] = BLOCKED_DEQUANTIZE_OPSET
        return converted

    def materialize(self, graph: gs.Graph, site: WeightSite, codes: BlockCodes) -> int:
        """Every MatMul reading the weight rewired to the codes; the bytes the codes and scales take."""
        constants = self._nbits_constants(site, codes) if self.format == "nbits" else self._qdq_constants(site, codes)
        for use in site.uses:
            node = use.node
            if self.format == "nbits":
                k, n = site.value.shape
                attrs = {"K": k, "N": n, "bits": self.bits, "block_size": self.block}
                if self.accuracy_level:
                    attrs["accuracy_level"] = self.accuracy_level
                replacement = gs.Node("MatMulNBits", name=node.name, attrs=attrs, inputs=[node.inputs[0], *constants],
                                      outputs=list(node.outputs), domain=MICROSOFT_DOMAIN)
                node.inputs.clear()
                node.outputs.clear()
                position = use.scope.nodes.index(node)
                use.scope.nodes[position] = replacement
            else:
                dequantized = gs.Variable(unique_name(graph, f"{site.name}_dequantized"), dtype=np.float32, shape=list(site.value.shape))
                dequantize = gs.Node("DequantizeLinear", name=unique_name(graph, f"{site.name}_DequantizeLinear"),
                                     attrs={"axis": 0, "block_size": self.block}, inputs=list(constants), outputs=[dequantized])
                use.scope.nodes.insert(use.scope.nodes.index(node), dequantize)
                node.inputs[use.index] = dequantized
        return sum(constant_bytes(constant) for constant in constants)

    def _materialize_table(self, table: WeightSite, codes: BlockCodes) -> int:
        """Every Gather of the table made a GatherBlockQuantized of int4 (or uint4 with zero points) codes
        [rows, D] and scales [rows, blocks]; the bytes they take."""
        constants = self._table_constants(table, codes)
        for use in table.uses:
            node, scope = use.node, use.scope
            replacement = gs.Node("GatherBlockQuantized", name=node.name,
                                  attrs={"gather_axis": 0, "quantize_axis": 1, "block_size": self.block, **({"bits": 8} if self.bits == 8 else {})},
                                  inputs=[constants[0], node.inputs[1], *constants[1:]], outputs=list(node.outputs), domain=MICROSOFT_DOMAIN)
            node.inputs.clear()
            node.outputs.clear()
            scope.nodes[scope.nodes.index(node)] = replacement
        return sum(constant_bytes(constant) for constant in constants)

    def _table_constants(self, table: WeightSite, codes: BlockCodes) -> list[gs.Constant]:
        rows, width = table.value.shape
        flat = codes.codes.reshape(rows, -1)[:, :width].astype(np.int16)
        if self.bits == 8:  # GatherBlockQuantized reads 8-bit codes as uint8 with zero points (128 when symmetric)
            constants = [stored_constant(f"{table.name}_q8", flat.astype(np.uint8), table.tensor),
                         stored_constant(f"{table.name}_scales", codes.scales, table.tensor),
                         stored_constant(f"{table.name}_zero_points", codes.zero_points, table.tensor)]
            return constants
        data_type = onnx.TensorProto.INT4 if self.symmetric else onnx.TensorProto.UINT4
        values = flat - self.scheme.middle if self.symmetric else flat
        constants = [typed_constant(f"{table.name}_q4", values, data_type, table.tensor), stored_constant(f"{table.name}_scales", codes.scales, table.tensor)]
        if not self.symmetric:
            constants.append(typed_constant(f"{table.name}_zero_points", codes.zero_points.astype(np.int16), data_type, table.tensor))
        return constants

    def _nbits_constants(self, site: WeightSite, codes: BlockCodes) -> list[gs.Constant]:
        """MatMulNBits' B [N, blocks, block * bits / 8], scales [N, blocks] and packed zero points."""
        like = site.tensor
        constants = [stored_constant(f"{site.name}_q{self.bits}", pack_low_first(codes.codes, self.bits), like),
                     stored_constant(f"{site.name}_scales", codes.scales, like)]
        if not self.symmetric:
            per_byte = 8 // self.bits
            padded = np.pad(codes.zero_points, ((0, 0), (0, -codes.zero_points.shape[1] % per_byte)), constant_values=self.scheme.middle)
            constants.append(stored_constant(f"{site.name}_zero_points", pack_low_first(padded, self.bits), like))
        return constants

    def _qdq_constants(self, site: WeightSite, codes: BlockCodes) -> list[gs.Constant]:
        """DequantizeLinear's codes [K, N] (int4/int8 symmetric, uint4/uint8 with zero points), scales and
        zero points [blocks, N]."""
        k = codes.k
        signed = self.symmetric
        data_type = {(4, True): onnx.TensorProto.INT4, (4, False): onnx.TensorProto.UINT4,
                     (8, True): onnx.TensorProto.INT8, (8, False): onnx.TensorProto.UINT8}[(self.bits, signed)]
        values = codes.codes.reshape(len(codes.codes), -1)[:, :k].T.astype(np.int16)  # [K, N]
        if signed:
            values = values - self.scheme.middle
        constants = [typed_constant(f"{site.name}_q{self.bits}", values, data_type, site.tensor),
                     stored_constant(f"{site.name}_scales", np.ascontiguousarray(codes.scales.T), site.tensor)]
        if not signed:
            constants.append(typed_constant(f"{site.name}_zero_points", codes.zero_points.T.astype(np.int16), data_type, site.tensor))
        return constants


def _relative_error(weight: np.ndarray, codes: BlockCodes) -> float:
    """||W - dequantized|| / ||W||: how much of the weight the codes lose."""
    norm = float(np.linalg.norm(weight))
    return round(float(np.linalg.norm(codes.dequantized() - weight)) / norm, 6) if norm else 0.0
