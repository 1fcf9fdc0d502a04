"""Channel dependency analysis: which channels must be removed together, and what to edit when they go.

Every producer of channels (a Conv's filters, a Gemm/MatMul's output features) owns a block of
*root channels*. Walking the graph in topological order, each activation tensor gets a channel
*space*: its channel axis and, for every position along it, the root channel it carries.
Pass-through ops (activations, BatchNorm, pooling, depthwise convs...) keep the roots; Concat
concatenates them, Split/Slice cut them, Flatten/Reshape into a Gemm repeat each root over its
block of H*W features; an element-wise op on two activations (a residual Add) makes the roots
at equal positions one *unit* (union-find). A unit is what can be removed; any root that reaches
an op without a rule, a graph output or a subgraph is pinned, with the op that pinned it.

The analysis also records every *edit* that removing roots implies: weights and parameters to
slice along an axis, group counts, Reshape/Split/Slice constants. Applying a plan is then one
pass over the edits, against the unmodified graph (plan first, apply once).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .graph import constant_value, unique_name
from .layers import CONV, CONV_TRANSPOSE, GEMM

UNARY_PASS_THROUGH = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Elu",
    "Selu", "Celu", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Identity", "Dropout", "Cast", "Neg",
    "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
})
ELEMENTWISE_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "Mean"})
CHANNEL_POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
REDUCTIONS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceProd", "ReduceSumSquare"})


@dataclass
class Space:
    """A tensor's channel axis and the root channel at each position along it."""

    axis: int
    roots: np.ndarray  # int64 [size along axis]


@dataclass
class Producer:
    """A node that creates channels: its output channel ``i`` is root ``base + i``."""

    node: gs.Node
    base: int
    channels: int
    weight: np.ndarray  # read-only
    out_axis: int  # the weight's output-channel axis

    @property
    def roots(self) -> np.ndarray:
        return np.arange(self.base, self.base + self.channels)

    def filter_values(self, channel: int) -> np.ndarray:
        return np.take(self.weight, channel, axis=self.out_axis)


@dataclass
class SliceEdit:
    """Keep only the positions of a constant input whose root survives, along ``axis``."""

    node: gs.Node
    index: int
    axis: int
    roots: np.ndarray


@dataclass
class GroupEdit:
    """A depthwise Conv's ``group`` follows the number of its input channels that survive."""

    node: gs.Node
    roots: np.ndarray  # the input channels' roots


@dataclass
class ShapeEdit:
    """An explicit entry of a Reshape's constant shape follows the surviving positions of its axis."""

    node: gs.Node
    position: int
    roots: np.ndarray


@dataclass
class SplitEdit:
    """A Split on the channel axis: each section keeps its surviving positions."""

    node: gs.Node
    sections: list[np.ndarray]


@dataclass
class SliceRangeEdit:
    """A Slice (step 1) on the channel axis: starts/ends count surviving positions before them."""

    node: gs.Node
    entry: int  # which entry of starts/ends/axes is the channel axis
    roots: np.ndarray  # the input's roots
    start: int
    end: int


@dataclass
class ConsumerUse:
    """A weight op reading channels: where its input channels live in its weight."""

    node: gs.Node
    weight_index: int
    axis: int
    roots: np.ndarray
    tensor: gs.Tensor  # the activation read


Edit = SliceEdit | GroupEdit | ShapeEdit | SplitEdit | SliceRangeEdit


@dataclass
class Analysis:
    producers: list[Producer] = field(default_factory=list)
    consumers: list[ConsumerUse] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)  # union-find over root ids
    pinned: dict[int, str] = field(default_factory=dict)  # root -> why
    spaces: dict[str, Space] = field(default_factory=dict)  # tensor name -> its channel space
    approximate: dict[int, str] = field(default_factory=dict)  # root -> why removing it is not exact at the op

    # -- union-find ---------------------------------------------------------------------------

    def new_roots(self, count: int) -> int:
        base = len(self.parent)
        self.parent.extend(range(base, base + count))
        return base

    def find(self, root: int) -> int:
        while self.parent[root] != root:
            self.parent[root] = self.parent[self.parent[root]]
            root = self.parent[root]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def pin(self, roots: np.ndarray, reason: str) -> None:
        for root in roots.tolist():
            self.pinned.setdefault(root, reason)

    # -- units and groups ---------------------------------------------------------------------

    def units(self) -> dict[int, list[int]]:
        """Class representative -> the root channels removed together."""
        classes: dict[int, list[int]] = defaultdict(list)
        for root in range(len(self.parent)):
            classes[self.find(root)].append(root)
        return dict(classes)

    def unit_pin(self, members: Sequence[int]) -> str:
        return next((self.pinned[m] for m in members if m in self.pinned), "")

    def producer_of(self, root: int) -> Producer | None:
        for producer in self.producers:
            if producer.base <= root < producer.base + producer.channels:
                return producer
        return None


# ---------------------------------------------------------------------------------------------
# the walk
# ---------------------------------------------------------------------------------------------


def analyze(graph: gs.Graph, overridable: AbstractSet[str] = frozenset()) -> Analysis:
    """Channel spaces, units, pins and edits of ``graph`` (shapes must have been inferred).

    ``overridable``: initializers that are also graph inputs; channels whose removal would have to
    slice one of them are pinned (a caller may feed that input at its full size)."""
    analysis = Analysis()
    walker = _Walker(graph, analysis)
    for node in graph.nodes:
        walker.visit(node)
    for edit in analysis.edits:
        if isinstance(edit, SliceEdit) and edit.node.inputs[edit.index].name in overridable:
            analysis.pin(edit.roots, f"slices '{edit.node.inputs[edit.index].name}', an overridable graph input")
    for output in graph.outputs:
        space = analysis.spaces.get(output.name)
        if space is not None:
            analysis.pin(space.roots, f"reaches graph output '{output.name}'")
    _tie_shared_weights(analysis)
    return analysis


def _rank_of_constant(tensor: gs.Tensor) -> int:
    """The rank of a constant tensor (an initializer or a Constant node's output); -1 for an activation."""
    if isinstance(tensor, gs.Constant):
        return len(tensor.shape)
    value = constant_value(tensor)
    return value.ndim if value is not None else -1


def _tie_shared_weights(analysis: Analysis) -> None:
    """A weight (a constant of rank 2 or more) read by several nodes must be cut the same way for all,
    or each reader would get its own cut copy: a tf2onnx audio CNN's shared kernels went from 36,037
    to 183,983 parameters. Where every reader cuts it along the same axes, their channels along each
    axis are united (they go together, as Torch-Pruning does with tied weights); where a reader would
    keep it whole or cut it otherwise, the channels are pinned, with the reason. Shared vectors (a
    bias, a norm's scale) may still be copied: a copy costs little, tying would couple unrelated layers."""
    by_tensor: dict[int, list[SliceEdit]] = defaultdict(list)
    for edit in analysis.edits:
        if isinstance(edit, SliceEdit):
            tensor = edit.node.inputs[edit.index]
            if len({id(n) for n in tensor.outputs}) > 1 and _rank_of_constant(tensor) >= 2:
                by_tensor[id(tensor)].append(edit)
    for edits in by_tensor.values():
        tensor = edits[0].node.inputs[edits[0].index]
        readers = {id(n): n for n in tensor.outputs}
        for axis in sorted({e.axis for e in edits}):
            along = [e for e in edits if e.axis == axis]
            cut_by = {id(e.node) for e in along}
            if cut_by == set(readers) and len({len(e.roots) for e in along}) == 1:
                for other in along[1:]:
                    analysis.union(along[0].roots, other.roots)
                continue
            keeps = [n for key, n in readers.items() if key not in cut_by]
            why = (f"{keeps[0].op} '{keeps[0].name}' keeps it whole" if keeps else "its readers cut it differently")
            for edit in along:
                analysis.pin(edit.roots, f"weight '{tensor.name}' is shared by {len(readers)} nodes and {why}")


class _Walker:
    def __init__(self, graph: gs.Graph, analysis: Analysis) -> None:
        self.graph = graph
        self.a = analysis

    # -- helpers ------------------------------------------------------------------------------

    def space(self, tensor: gs.Tensor) -> Space | None:
        return self.a.spaces.get(tensor.name) if tensor.name else None

    def set_space(self, tensor: gs.Tensor, axis: int, roots: np.ndarray) -> None:
        self.a.spaces[tensor.name] = Space(axis, np.asarray(roots, dtype=np.int64))

    def pin_inputs(self, node: gs.Node, why: str) -> None:
        for tensor in node.inputs:
            space = self.space(tensor)
            if space is not None:
                self.a.pin(space.roots, f"{why} ({node.op} '{node.name}')")

    @staticmethod
    def rank(tensor: gs.Tensor) -> int | None:
        return len(tensor.shape) if tensor.shape is not None else None

    @staticmethod
    def static_dims(tensor: gs.Tensor) -> list[int] | None:
        if tensor.shape is None:
            return None
        return [d if isinstance(d, int) and d >= 0 else -1 for d in tensor.shape]

    # -- dispatch -----------------------------------------------------------------------------

    def visit(self, node: gs.Node) -> None:
        for attribute in node.attrs.values():
            if isinstance(attribute, gs.Graph):
                self.pin_subgraph_reads(node, attribute)
        handler = getattr(self, f"op_{node.op}", None)
        if node.op in UNARY_PASS_THROUGH:
            handler = self.unary
        elif node.op in ELEMENTWISE_BINARY:
            handler = self.elementwise
        elif node.op in CHANNEL_POOLS:
            handler = self.pool
        elif node.op in REDUCTIONS:
            handler = self.reduction
        if handler is None:
            self.pin_inputs(node, "no channel rule for this op")
            return
        handler(node)

    def pin_subgraph_reads(self, node: gs.Node, subgraph: gs.Graph) -> None:
        for inner in [subgraph, *subgraph.subgraphs(recursive=True)]:
            for inner_node in inner.nodes:
                for tensor in inner_node.inputs:
                    space = self.space(tensor)
                    if space is not None:
                        self.a.pin(space.roots, f"read inside a subgraph of {node.op} '{node.name}'")

    # -- producers and consumers --------------------------------------------------------------

    def op_Conv(self, node: gs.Node) -> None:
        weight = constant_value(node.inputs[1])
        inp = self.space(node.inputs[0])
        if weight is None:
            self.pin_inputs(node, "Conv weight is not a constant")
            return
        groups = CONV.groups(node.attrs)
        in_channels = weight.shape[1] * groups
        if groups == 1:
            if inp is not None:
                self.consume(node, 1, 1, inp, axis_expected=1)
            self.produce(node, weight, out_axis=0, output_axis=1)
        elif weight.shape[1] == 1 and inp is not None and inp.axis == 1 and len(inp.roots) == in_channels:
            # depthwise: output channel o reads input channel o // multiplier
            multiplier = weight.shape[0] // groups
            roots = np.repeat(inp.roots, multiplier)
            self.a.edits.append(SliceEdit(node, 1, 0, roots))
            if len(node.inputs) > 2:
                self.a.edits.append(SliceEdit(node, 2, 0, roots))
            self.a.edits.append(GroupEdit(node, inp.roots))
            self.set_space(node.outputs[0], 1, roots)
        elif inp is not None:
            self.a.pin(inp.roots, f"grouped Conv (group={groups}) ('{node.name}')")

    def op_ConvTranspose(self, node: gs.Node) -> None:
        weight = constant_value(node.inputs[1])
        inp = self.space(node.inputs[0])
        if weight is None or CONV_TRANSPOSE.groups(node.attrs) != 1:
            self.pin_inputs(node, "ConvTranspose with a non-constant weight or groups")
            return
        if inp is not None:
            self.consume(node, 1, 0, inp, axis_expected=1)
        self.produce(node, weight, out_axis=1, output_axis=1)

    def op_Gemm(self, node: gs.Node) -> None:
        weight = constant_value(node.inputs[1])
        if weight is None or constant_value(node.inputs[0]) is not None:
            self.pin_inputs(node, "Gemm without a constant B")
            return
        axes, activation = GEMM.axes(node.attrs, 1, 2), GEMM.activation(node.attrs, 1)
        assert axes is not None and activation is not None  # B of a Gemm is 2-D: always a weight
        (out_axis, reduction_axis), (_, feature_axis) = axes, activation
        inp = self.space(node.inputs[0])
        if inp is not None:
            self.consume(node, 1, reduction_axis, inp, axis_expected=feature_axis)
        self.produce(node, weight, out_axis=out_axis, output_axis=1)

    def op_MatMul(self, node: gs.Node) -> None:
        weight = constant_value(node.inputs[1])
        inp = self.space(node.inputs[0])
        rank = self.rank(node.inputs[0])
        if weight is None or weight.ndim != 2 or rank is None:
            self.pin_inputs(node, "MatMul without a constant 2-D right operand")
            return
        if inp is not None:
            self.consume(node, 1, 0, inp, axis_expected=rank - 1)
        out_rank = self.rank(node.outputs[0]) or rank
        self.produce(node, weight, out_axis=1, output_axis=out_rank - 1)

    def consume(self, node: gs.Node, weight_index: int, weight_axis: int, inp: Space, *, axis_expected: int) -> None:
        if inp.axis != axis_expected:
            self.a.pin(inp.roots, f"{node.op} '{node.name}' reads channels on another axis")
            return
        self.a.edits.append(SliceEdit(node, weight_index, weight_axis, inp.roots))
        self.a.consumers.append(ConsumerUse(node, weight_index, weight_axis, inp.roots, node.inputs[0]))

    def produce(self, node: gs.Node, weight: np.ndarray, *, out_axis: int, output_axis: int) -> None:
        channels = weight.shape[out_axis]
        base = self.a.new_roots(channels)
        producer = Producer(node, base, channels, weight, out_axis)
        self.a.producers.append(producer)
        self.a.edits.append(SliceEdit(node, 1, out_axis, producer.roots))
        if node.op in ("Conv", "ConvTranspose") and len(node.inputs) > 2:
            self.a.edits.append(SliceEdit(node, 2, 0, producer.roots))
        if node.op == "Gemm" and len(node.inputs) > 2:
            self._gemm_bias(node, producer)
        self.set_space(node.outputs[0], output_axis, producer.roots)

    def _gemm_bias(self, node: gs.Node, producer: Producer) -> None:
        bias = constant_value(node.inputs[2])
        if bias is None:
            self.a.pin(producer.roots, f"Gemm '{node.name}' bias is not a constant")
        elif bias.ndim >= 1 and bias.shape[-1] == producer.channels:
            self.a.edits.append(SliceEdit(node, 2, bias.ndim - 1, producer.roots))
        elif bias.size != 1 and bias.shape[-1] != 1:
            self.a.pin(producer.roots, f"Gemm '{node.name}' bias shape {list(bias.shape)}")

    # -- pass-through -------------------------------------------------------------------------

    def unary(self, node: gs.Node) -> None:
        inp = self.space(node.inputs[0]) if node.inputs else None
        if inp is None:
            return
        if node.op == "PRelu":
            self._per_channel_constant(node, 1, inp, self.rank(node.inputs[0]))
        for extra in node.inputs[1:]:
            if node.op != "PRelu" and self.space(extra) is not None:
                self.a.pin(self.space(extra).roots, f"channels used as a parameter of {node.op} '{node.name}'")  # type: ignore[union-attr]
        self.set_space(node.outputs[0], inp.axis, inp.roots)

    def op_BatchNormalization(self, node: gs.Node) -> None:
        self._normalization(node, parameters=(1, 2, 3, 4))

    def op_InstanceNormalization(self, node: gs.Node) -> None:
        self._normalization(node, parameters=(1, 2))

    def _normalization(self, node: gs.Node, parameters: tuple[int, ...]) -> None:
        inp = self.space(node.inputs[0])
        if inp is None:
            return
        if inp.axis != 1 or any(constant_value(node.inputs[i]) is None for i in parameters):
            self.pin_inputs(node, "normalization over another axis or with non-constant parameters")
            return
        self.a.edits.extend(SliceEdit(node, i, 0, inp.roots) for i in parameters)
        self.set_space(node.outputs[0], 1, inp.roots)

    def op_LayerNormalization(self, node: gs.Node) -> None:
        inp = self.space(node.inputs[0])
        rank = self.rank(node.inputs[0])
        if inp is None or rank is None:
            return
        start = int(node.attrs.get("axis", -1)) % rank
        if inp.axis < start:  # normalized over later axes only: channels stay independent
            self.set_space(node.outputs[0], inp.axis, inp.roots)
            return
        if start == rank - 1 and inp.axis == rank - 1:
            # Normalized over the channels themselves: the statistics change when channels go, so
            # removing is not exact here even for dead channels; parameters are sliced.
            for index in (1, 2):
                if index < len(node.inputs) and node.inputs[index].name:
                    if constant_value(node.inputs[index]) is None:
                        self.pin_inputs(node, "LayerNormalization with non-constant parameters")
                        return
                    self.a.edits.append(SliceEdit(node, index, 0, inp.roots))
            for root in inp.roots.tolist():
                self.a.approximate.setdefault(root, f"LayerNormalization '{node.name}' normalizes over the channels")
            self.set_space(node.outputs[0], inp.axis, inp.roots)
            return
        self.pin_inputs(node, "LayerNormalization over several axes including the channels")

    def pool(self, node: gs.Node) -> None:
        inp = self.space(node.inputs[0])
        if inp is None:
            return
        if inp.axis != 1:
            self.pin_inputs(node, "pooling over the channel axis")
            return
        self.set_space(node.outputs[0], 1, inp.roots)

    def reduction(self, node: gs.Node) -> None:
        inp = self.space(node.inputs[0])
        rank = self.rank(node.inputs[0])
        if inp is None:
            return
        axes = _attribute_or_input(node, "axes", 1)
        if rank is None or axes is None:
            self.pin_inputs(node, "reduction over unknown axes")
            return
        axes = sorted(a % rank for a in axes)
        if inp.axis in axes:
            self.pin_inputs(node, "reduction over the channel axis")
            return
        keepdims = int(node.attrs.get("keepdims", 1))
        axis = inp.axis if keepdims else inp.axis - sum(a < inp.axis for a in axes)
        self.set_space(node.outputs[0], axis, inp.roots)

    def op_Softmax(self, node: gs.Node) -> None:
        self._along_other_axis(node)

    def op_LogSoftmax(self, node: gs.Node) -> None:
        self._along_other_axis(node)

    def _along_other_axis(self, node: gs.Node) -> None:
        inp = self.space(node.inputs[0])
        rank = self.rank(node.inputs[0])
        if inp is None:
            return
        if rank is None or int(node.attrs.get("axis", -1)) % rank == inp.axis:
            self.pin_inputs(node, "normalizes across the channels")
            return
        self.set_space(node.outputs[0], inp.axis, inp.roots)

    def op_Resize(self, node: gs.Node) -> None:
        inp = self.space(node.inputs[0])
        if inp is None:
            return
        out_dims = self.static_dims(node.outputs[0])
        if out_dims is None or out_dims[inp.axis] != len(inp.roots):
            self.pin_inputs(node, "Resize that may scale the channel axis")
            return
        self.set_space(node.outputs[0], inp.axis, inp.roots)

    op_Upsample = op_Resize

    def op_Pad(self, node: gs.Node) -> None:
        inp = self.space(node.inputs[0])
        rank = self.rank(node.inputs[0])
        if inp is None:
            return
        pads = _attribute_or_input(node, "pads", 1)
        axes_input = constant_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
        if pads is None or rank is None or axes_input is not None:
            self.pin_inputs(node, "Pad with unknown pads")
            return
        if pads[inp.axis] or pads[inp.axis + rank]:
            self.pin_inputs(node, "Pad on the channel axis")
            return
        self.set_space(node.outputs[0], inp.axis, inp.roots)

    def op_Transpose(self, node: gs.Node) -> None:
        inp = self.space(node.inputs[0])
        rank = self.rank(node.inputs[0])
        if inp is None:
            return
        perm = node.attrs.get("perm", list(reversed(range(rank or 0))))
        self.set_space(node.outputs[0], list(perm).index(inp.axis), inp.roots)

    def op_QuantizeLinear(self, node: gs.Node) -> None:
        inp = self.space(node.inputs[0])
        if inp is None:
            return
        scale = constant_value(node.inputs[1])
        if scale is None:
            self.pin_inputs(node, "quantization scale is not a constant")
            return
        if scale.size > 1:
            rank = self.rank(node.inputs[0]) or 0
            if int(node.attrs.get("axis", 1)) % max(rank, 1) != inp.axis:
                self.pin_inputs(node, "per-channel quantization along another axis")
                return
            self.a.edits.extend(SliceEdit(node, i, 0, inp.roots) for i in (1, 2) if i < len(node.inputs) and node.inputs[i].name)
        self.set_space(node.outputs[0], inp.axis, inp.roots)

    op_DequantizeLinear = op_QuantizeLinear

    # -- element-wise with two inputs ---------------------------------------------------------

    def elementwise(self, node: gs.Node) -> None:
        spaced = [(i, t, space) for i, t in enumerate(node.inputs) if (space := self.space(t)) is not None]
        if not spaced:
            return
        out_rank = self.rank(node.outputs[0])
        if out_rank is None:
            self.pin_inputs(node, "unknown output rank")
            return
        first_index, first_tensor, first = spaced[0]
        axis = first.axis + out_rank - (self.rank(first_tensor) or out_rank)
        for index, tensor in enumerate(node.inputs):
            if index == first_index:
                continue
            if not self._couple(node, index, tensor, first, axis, out_rank):
                return
        self.set_space(node.outputs[0], axis, first.roots)

    def _couple(self, node: gs.Node, index: int, tensor: gs.Tensor, first: Space, axis: int, out_rank: int) -> bool:
        """Align input ``index`` with the channel axis of the first spaced input; False if pinned."""
        rank = self.rank(tensor)
        if rank is None:
            self.pin_inputs(node, "input of unknown rank")
            return False
        own_axis = axis - (out_rank - rank)
        other = self.space(tensor)
        if other is not None:
            if other.axis != own_axis or len(other.roots) != len(first.roots):
                self.pin_inputs(node, "inputs carry channels on different axes")
                return False
            self.a.union(first.roots, other.roots)
            return True
        if own_axis < 0:
            return True  # broadcast: this input has no such axis
        dims = self.static_dims(tensor)
        size = dims[own_axis] if dims is not None else -1
        if size == 1:
            return True
        if size == len(first.roots) and constant_value(tensor) is not None:
            self.a.edits.append(SliceEdit(node, index, own_axis, first.roots))
            return True
        self.pin_inputs(node, "combined with a tensor whose channels are not tracked")
        return False

    def _per_channel_constant(self, node: gs.Node, index: int, inp: Space, rank: int | None) -> None:
        value = constant_value(node.inputs[index])
        if value is None or rank is None:
            self.pin_inputs(node, "per-channel parameter is not a constant")
            return
        own_axis = inp.axis - (rank - value.ndim)
        if own_axis >= 0 and value.shape[own_axis] == len(inp.roots):
            self.a.edits.append(SliceEdit(node, index, own_axis, inp.roots))
        elif own_axis >= 0 and value.shape[own_axis] != 1:
            self.pin_inputs(node, "parameter shape does not match the channels")

    # -- layout ops ---------------------------------------------------------------------------

    def op_Concat(self, node: gs.Node) -> None:
        spaces = [self.space(t) for t in node.inputs]
        if all(s is None for s in spaces):
            return
        rank = self.rank(node.outputs[0])
        if rank is None:
            self.pin_inputs(node, "Concat of unknown rank")
            return
        axis = int(node.attrs["axis"]) % rank
        if any(s is not None and s.axis != axis for s in spaces):
            if all(s is not None and s.axis == spaces[0].axis for s in spaces):  # type: ignore[union-attr]
                for s in spaces[1:]:
                    self.a.union(spaces[0].roots, s.roots)  # type: ignore[union-attr]
                self.set_space(node.outputs[0], spaces[0].axis, spaces[0].roots)  # type: ignore[union-attr]
            else:
                self.pin_inputs(node, "Concat along another axis with untracked inputs")
            return
        parts = []
        for tensor, space in zip(node.inputs, spaces):
            if space is not None:
                parts.append(space.roots)
                continue
            dims = self.static_dims(tensor)
            if dims is None or dims[axis] < 0:
                self.pin_inputs(node, "Concat with an input of unknown size")
                return
            fixed = np.arange(self.a.new_roots(dims[axis]), len(self.a.parent))
            self.a.pin(fixed, f"channels from an untracked input of Concat '{node.name}'")
            parts.append(fixed)
        self.set_space(node.outputs[0], axis, np.concatenate(parts))

    def op_Split(self, node: gs.Node) -> None:
        inp = self.space(node.inputs[0])
        rank = self.rank(node.inputs[0])
        if inp is None:
            return
        axis = int(node.attrs.get("axis", 0)) % (rank or 1)
        if axis != inp.axis:
            for output in node.outputs:
                self.set_space(output, inp.axis, inp.roots)
            return
        sizes = node.attrs.get("split")
        if sizes is None and len(node.inputs) > 1 and node.inputs[1].name:
            value = constant_value(node.inputs[1])
            sizes = None if value is None else value.tolist()
        if sizes is None:
            dims = [self.static_dims(o) for o in node.outputs]
            sizes = None if any(d is None or d[axis] < 0 for d in dims) else [d[axis] for d in dims]  # type: ignore[index]
        if sizes is None or sum(sizes) != len(inp.roots):
            self.pin_inputs(node, "Split on the channel axis with unknown sizes")
            return
        bounds = np.cumsum([0, *sizes])
        sections = [inp.roots[a:b] for a, b in itertools.pairwise(bounds)]
        self.a.edits.append(SplitEdit(node, sections))
        for output, section in zip(node.outputs, sections):
            self.set_space(output, axis, section)

    def op_Slice(self, node: gs.Node) -> None:
        inp = self.space(node.inputs[0])
        rank = self.rank(node.inputs[0])
        if inp is None:
            return
        values = [constant_value(t) if i < len(node.inputs) and t.name else None for i, t in enumerate(node.inputs)]
        starts, ends = values[1], values[2] if len(values) > 2 else None
        axes = values[3] if len(values) > 3 and values[3] is not None else (np.arange(len(starts)) if starts is not None else None)
        steps = values[4] if len(values) > 4 and values[4] is not None else None
        if starts is None or ends is None or axes is None or rank is None:
            self.pin_inputs(node, "Slice with non-constant bounds")
            return
        entries = [i for i, a in enumerate(axes.tolist()) if a % rank == inp.axis]
        if not entries:
            self.set_space(node.outputs[0], inp.axis, inp.roots)
            return
        entry = entries[0]
        if steps is not None and int(steps[entry]) != 1:
            self.pin_inputs(node, "strided Slice on the channel axis")
            return
        start, end, _ = slice(int(starts[entry]), int(ends[entry])).indices(len(inp.roots))
        self.a.edits.append(SliceRangeEdit(node, entry, inp.roots, start, end))
        self.set_space(node.outputs[0], inp.axis, inp.roots[start:end])

    def op_Flatten(self, node: gs.Node) -> None:
        inp = self.space(node.inputs[0])
        dims = self.static_dims(node.inputs[0])
        if inp is None:
            return
        if dims is None:
            self.pin_inputs(node, "Flatten of unknown shape")
            return
        start = int(node.attrs.get("axis", 1)) % len(dims) if dims else 0
        self._merge(node, inp, dims, start, len(dims) - 1, out_axis=1 if inp.axis >= start else 0)

    def op_Reshape(self, node: gs.Node) -> None:
        inp = self.space(node.inputs[0])
        if inp is None:
            return
        in_dims, out_dims = self.static_dims(node.inputs[0]), self.static_dims(node.outputs[0])
        target = constant_value(node.inputs[1])
        if in_dims is None or out_dims is None or target is None:
            self.pin_inputs(node, "Reshape with unknown shapes")
            return
        merge = _merged_run(in_dims, out_dims, inp.axis)
        if merge is None:
            self.pin_inputs(node, "Reshape that splits or reorders the channel axis")
            return
        first, last, out_axis = merge
        if self._merge(node, inp, in_dims, first, last, out_axis) and int(target[out_axis]) > 0:
            self.a.edits.append(ShapeEdit(node, out_axis, self.a.spaces[node.outputs[0].name].roots))

    def _merge(self, node: gs.Node, inp: Space, dims: list[int], first: int, last: int, out_axis: int) -> bool:
        """Axes first..last (holding the channel axis) become one: roots repeat over the other axes."""
        if not first <= inp.axis <= last:
            self.set_space(node.outputs[0], out_axis if inp.axis > last else inp.axis, inp.roots)
            return True
        merged = dims[first : last + 1]
        if any(d < 0 for i, d in enumerate(merged) if first + i != inp.axis):
            self.pin_inputs(node, "merging axes of unknown size into the channels")
            return False
        shape = [len(inp.roots) if first + i == inp.axis else d for i, d in enumerate(merged)]
        view = [len(inp.roots) if first + i == inp.axis else 1 for i in range(len(merged))]
        roots = np.broadcast_to(inp.roots.reshape(view), shape).reshape(-1)
        self.set_space(node.outputs[0], out_axis, roots)
        return True


def _attribute_or_input(node: gs.Node, attribute: str, index: int) -> list[int] | None:
    """A list given as an attribute (older opsets) or as a constant input (newer ones)."""
    value = node.attrs.get(attribute)
    if value is None and len(node.inputs) > index and node.inputs[index].name:
        constant = constant_value(node.inputs[index])
        value = None if constant is None else constant.tolist()
    return None if value is None else list(value)


def _merged_run(in_dims: list[int], out_dims: list[int], axis: int) -> tuple[int, int, int] | None:
    """If the reshape keeps every axis but merges a run first..last (holding ``axis``) into one
    output axis, return (first, last, that output axis); also for a pure pass-through."""
    for first in range(axis + 1):
        prefix_in = in_dims[:first]
        for out_axis in range(len(out_dims)):
            if _same_dims(prefix_in, out_dims[:out_axis]) is False:
                continue
            for last in range(axis, len(in_dims)):
                run = in_dims[first : last + 1]
                if any(d < 0 for d in run):
                    continue
                if (out_dims[out_axis] == math.prod(run) and _same_dims(in_dims[last + 1 :], out_dims[out_axis + 1 :])
                        and _same_dims(prefix_in, out_dims[:out_axis])):
                    return first, last, out_axis
    return None


def _same_dims(a: list[int], b: list[int]) -> bool:
    """Equal dim lists; an unknown (-1) matches an unknown at the same place (the batch)."""
    return len(a) == len(b) and all(x == y for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# applying a plan
# ---------------------------------------------------------------------------------------------


def apply_plan(graph: gs.Graph, analysis: Analysis, removed: np.ndarray) -> None:
    """Apply every edit with ``removed`` (bool per root id), then forget the now-stale shapes."""
    sliced: dict[tuple[int, int], tuple[gs.Node, int, np.ndarray | None]] = {}
    for edit in analysis.edits:
        if isinstance(edit, SliceEdit):
            key = (id(edit.node), edit.index)
            node, index, value = sliced.get(key, (edit.node, edit.index, constant_value(edit.node.inputs[edit.index])))
            keep = ~removed[edit.roots]
            if value is not None and value.shape[edit.axis] == keep.size:
                value = np.compress(keep, value, axis=edit.axis)
            sliced[key] = (node, index, value)
        elif isinstance(edit, GroupEdit):
            edit.node.attrs["group"] = int(np.count_nonzero(~removed[edit.roots]))
        elif isinstance(edit, ShapeEdit):
            _edit_constant_entry(graph, edit.node, 1, edit.position, int(np.count_nonzero(~removed[edit.roots])))
        elif isinstance(edit, SplitEdit):
            sizes = np.array([np.count_nonzero(~removed[s]) for s in edit.sections], dtype=np.int64)
            if "split" in edit.node.attrs:
                edit.node.attrs["split"] = sizes.tolist()
            elif len(edit.node.inputs) > 1 and edit.node.inputs[1].name:
                edit.node.inputs[1] = gs.Constant(unique_name(graph, f"{edit.node.name}_split"), sizes)
        elif isinstance(edit, SliceRangeEdit):
            kept_before = np.cumsum(np.concatenate([[0], ~removed[edit.roots]]))
            _edit_constant_entry(graph, edit.node, 1, edit.entry, int(kept_before[edit.start]))
            _edit_constant_entry(graph, edit.node, 2, edit.entry, int(kept_before[edit.end]))
    cut: dict[int, list[gs.Constant]] = defaultdict(list)  # a shared weight cut alike for its readers stays one tensor
    for node, index, value in sliced.values():
        old = node.inputs[index]
        if value is None or (isinstance(old, gs.Constant) and tuple(old.shape or ()) == value.shape):
            continue  # nothing cut: the tensor stays as it is (and stays shared)
        same = next((c for c in cut[id(old)] if c.values.shape == value.shape and np.array_equal(c.values, value)), None)
        if same is None:
            name = old.name if len(old.outputs) == 1 and isinstance(old, gs.Constant) else unique_name(graph, f"{old.name}_pruned")
            same = gs.Constant(name, np.ascontiguousarray(value))
            cut[id(old)].append(same)
        node.inputs[index] = same
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor not in graph.inputs and tensor not in graph.outputs:
            tensor.shape = None


def _edit_constant_entry(graph: gs.Graph, node: gs.Node, index: int, entry: int, value: int) -> None:
    current = constant_value(node.inputs[index])
    if current is None:
        return
    updated = np.array(current, copy=True)
    updated[entry] = value
    node.inputs[index] = gs.Constant(unique_name(graph, f"{node.inputs[index].name}_pruned"), updated)
