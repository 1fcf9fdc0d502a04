"""What a layer op means for its constant weight: the one registry of per-op layout knowledge.

Pruning, quantization, the layer-wise solvers and the channel analysis all need to know, for an op
that multiplies an activation by a weight, which axis of the weight holds the output units, which
one is summed over, where the bias is, how the op splits into groups, and which axis of the
activation the weight reads. Each op family answers here, once; teaching the tool a new op (a
vendor's fused Conv, say) is one :func:`register_layer` call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Attrs = Mapping[str, Any]


@dataclass(frozen=True)
class LayerKind:
    """One op family. ``axes(attrs, index, rank)`` gives (output axis, reduction axis) of the
    constant at input ``index`` with ``rank`` dimensions, or None when that input is no weight;
    ``activation(attrs, index)`` gives (input index, feature axis) of the activation that weight
    multiplies."""

    op: str
    axes: Callable[[Attrs, int, int], tuple[int, int] | None]
    activation: Callable[[Attrs, int], tuple[int, int] | None]
    bias_index: int | None = None  # the input holding a per-output bias (Conv, Gemm's C)
    grouped: bool = False  # has a ``group`` attribute

    def groups(self, attrs: Attrs) -> int:
        return int(attrs.get("group", 1)) if self.grouped else 1

    def output_axis(self, attrs: Attrs, index: int, rank: int) -> int | None:
        axes = self.axes(attrs, index, rank)
        return None if axes is None else axes[0]


def _conv_axes(attrs: Attrs, index: int, rank: int) -> tuple[int, int] | None:
    return (0, 1) if index == 1 and rank >= 3 else None  # [C_out, C_in / groups, kernel...]


def _conv_transpose_axes(attrs: Attrs, index: int, rank: int) -> tuple[int, int] | None:
    return (1, 0) if index == 1 and rank >= 3 else None  # [C_in, C_out / groups, kernel...]


def _channels_first_activation(attrs: Attrs, index: int) -> tuple[int, int] | None:
    return (0, 1) if index == 1 else None


def _gemm_axes(attrs: Attrs, index: int, rank: int) -> tuple[int, int] | None:
    if rank != 2:
        return None
    if index == 1:  # B: [K, N], or [N, K] with transB
        return (0, 1) if attrs.get("transB", 0) else (1, 0)
    if index == 0:  # a constant A: [M, K], or [K, M] with transA
        return (1, 0) if attrs.get("transA", 0) else (0, 1)
    return None


def _gemm_activation(attrs: Attrs, index: int) -> tuple[int, int] | None:
    if index == 1:
        return 0, (0 if attrs.get("transA", 0) else 1)
    if index == 0:
        return 1, (1 if attrs.get("transB", 0) else 0)
    return None


def _matmul_axes(attrs: Attrs, index: int, rank: int) -> tuple[int, int] | None:
    if rank < 2:
        return None
    if index == 1:  # [..., K, N]
        return rank - 1, rank - 2
    if index == 0:  # [..., M, K]
        return rank - 2, rank - 1
    return None


def _matmul_activation(attrs: Attrs, index: int) -> tuple[int, int] | None:
    return {1: (0, -1), 0: (1, -2)}.get(index)


def _recurrent_axes(attrs: Attrs, index: int, rank: int) -> tuple[int, int] | None:
    return (1, 2) if index in (1, 2) and rank == 3 else None  # W, R: [directions, gates x hidden, input or hidden]


def _recurrent_activation(attrs: Attrs, index: int) -> tuple[int, int] | None:
    return None  # W reads the sequence and R the hidden state: no one activation tensor to read


_KINDS: dict[str, LayerKind] = {}


def register_layer(kind: LayerKind) -> LayerKind:
    """Teach the tool an op: every analysis that asks :func:`layer_kind` then knows it."""
    _KINDS[kind.op] = kind
    return kind


def layer_kind(op: str) -> LayerKind | None:
    """The registered kind of ``op``, or None for an op that holds no weight."""
    return _KINDS.get(op)


def layer_ops() -> tuple[str, ...]:
    """Every op registered as a layer with a weight."""
    return tuple(_KINDS)


CONV = register_layer(LayerKind("Conv", _conv_axes, _channels_first_activation, bias_index=2, grouped=True))
CONV_TRANSPOSE = register_layer(LayerKind("ConvTranspose", _conv_transpose_axes, _channels_first_activation, bias_index=2, grouped=True))
GEMM = register_layer(LayerKind("Gemm", _gemm_axes, _gemm_activation, bias_index=2))
register_layer(LayerKind("MatMul", _matmul_axes, _matmul_activation))
for _op in ("LSTM", "GRU", "RNN"):
    register_layer(LayerKind(_op, _recurrent_axes, _recurrent_activation))

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # what passes treat as weights by default
RNN_OPS = ("LSTM", "GRU", "RNN")  # weights too, on request (their gates make channel edits hard)
