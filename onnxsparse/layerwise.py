"""Layer-wise views of weights and their inputs: each weight as a matrix [outputs, inputs] and each
layer's input activation as rows [samples, inputs] in the same column order, so that the layer is
``rows @ matrix.T``. SparseGPT's Hessian H = XᵀX, bias correction and least-squares refits all work
on this view.

Convolutions are unfolded (im2col) with the input channel innermost, (kernel positions..., channel),
so that N:M groups of consecutive columns are groups of input channels at one kernel position.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .activations import ChangingModelValues, collect_channel_stats, tensor_values
from .calibration import InputSource
from .graph import constant_value, from_gs, unique_name
from .layers import CONV, layer_kind
from .weights import WeightSite

SUPPORTED = ("Conv", "Gemm", "MatMul")


def unsupported_reason(site: WeightSite) -> str:
    """Why a weight has no layer-wise view (empty when it has one)."""
    if site.in_subgraph:
        return "inside a subgraph"
    if len(site.uses) != 1:
        return "shared by several nodes"
    node, index = site.uses[0].node, site.uses[0].index
    if node.op not in SUPPORTED:
        return f"{node.op} has no layer-wise view"
    if node.op == "MatMul" and index != 1:
        return "MatMul weight on the left"
    if node.op == "Gemm" and index != 1:
        return "Gemm weight as operand A"
    if node.op == "Conv" and node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return "Conv with auto_pad SAME_*"
    if node.op == "MatMul" and site.value.ndim != 2:
        return "batched MatMul weight"
    return ""


def groups_of(site: WeightSite) -> int:
    node = site.uses[0].node
    kind = layer_kind(node.op)
    return 1 if kind is None else kind.groups(node.attrs)


def to_matrix(site: WeightSite, value: np.ndarray | None = None) -> np.ndarray:
    """The weight as [outputs, inputs]; a Conv as [C_out, kernel positions x C_in/groups]."""
    w = site.value if value is None else value
    node = site.uses[0].node
    if node.op == "Conv":
        return np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return w
    return w.T


def from_matrix(site: WeightSite, matrix: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_matrix`, in the weight's own layout and dtype."""
    w = site.value
    node = site.uses[0].node
    if node.op == "Conv":
        kernel_first = (w.shape[0], *w.shape[2:], w.shape[1])
        out = np.moveaxis(matrix.reshape(kernel_first), -1, 1)
    elif node.op == "Gemm" and node.attrs.get("transB", 0):
        out = matrix
    else:
        out = matrix.T
    return np.ascontiguousarray(out, dtype=w.dtype)


def activation_name(site: WeightSite) -> str:
    return site.uses[0].node.inputs[0].name


def input_rows(site: WeightSite, activation: np.ndarray, dtype: type[np.floating] = np.float64) -> np.ndarray:
    """The layer's input as rows [samples, inputs] matching :func:`to_matrix`'s columns, in ``dtype``.

    For a grouped Conv the rows hold every group side by side: [samples, groups x columns].
    """
    node = site.uses[0].node
    x = np.asarray(activation, dtype=dtype)
    if node.op == "Gemm":
        return x.T if node.attrs.get("transA", 0) else x
    if node.op == "MatMul":
        return x.reshape(-1, x.shape[-1])
    return _unfold(node, x, site.value.shape)


def grouped_rows(site: WeightSite, activation: np.ndarray, dtype: type[np.floating] = np.float32) -> np.ndarray:
    """The layer's input as rows per group, [groups, samples, columns of one group] (the columns of
    :func:`to_matrix`), each group's rows contiguous so that its Gram is one BLAS product."""
    node = site.uses[0].node
    if node.op != "Conv":
        return input_rows(site, activation, dtype)[None]
    return _unfold(node, np.asarray(activation, dtype=dtype), site.value.shape, group_major=True)


def gram_blocks(rows: np.ndarray, teacher_rows: np.ndarray | None = None) -> np.ndarray:
    """X_tᵀX per group ([groups, columns, columns], float64) of rows from :func:`grouped_rows`, XᵀX
    without a teacher. The products are taken in the rows' dtype (float32, as SparseGPT's reference
    accumulates its Hessians) in one batched product over the groups: a depthwise layer's 960 groups
    sliced out of one float64 im2col one by one took 69 s of SparseGPT's 191 on MobileNetV2."""
    other = rows if teacher_rows is None else teacher_rows
    return np.matmul(other.transpose(0, 2, 1), rows).astype(np.float64)


def _unfold(node: gs.Node, x: np.ndarray, weight_shape: tuple[int, ...], group_major: bool = False) -> np.ndarray:
    """im2col for an N-d convolution: [N*out positions, groups * (kernel positions x C_in/groups)],
    or with ``group_major`` [groups, N*out positions, kernel positions x C_in/groups]."""
    spatial = x.ndim - 2
    kernel = tuple(weight_shape[2:])
    strides = tuple(node.attrs.get("strides", [1] * spatial))
    dilations = tuple(node.attrs.get("dilations", [1] * spatial))
    pads = list(node.attrs.get("pads", [0] * 2 * spatial))
    # np.pad copies even with nothing to pad: a pointwise layer's input is then copied once, not twice
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + spatial]) for i in range(spatial)]) if any(pads) else x
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=tuple(range(2, 2 + spatial)))
    # windows: [N, C, positions..., span...]; keep every stride-th position and every dilation-th tap
    windows = windows[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(slice(None, None, d) for d in dilations)]
    groups = CONV.groups(node.attrs)
    n, channels = x.shape[:2]
    positions = windows.shape[2 : 2 + spatial]
    grouped = windows.reshape(n, groups, channels // groups, *positions, *kernel)
    if group_major:  # -> [groups, N, positions..., kernel..., C_in/groups]
        order = (1, 0, *range(3, 3 + spatial), *range(3 + spatial, 3 + 2 * spatial), 2)
        return grouped.transpose(order).reshape(groups, n * math.prod(positions), -1)
    # -> [N, positions..., groups, kernel..., C_in/groups] so that each group's columns are contiguous
    order = (0, *range(3, 3 + spatial), 1, *range(3 + spatial, 3 + 2 * spatial), 2)
    return grouped.transpose(order).reshape(n * math.prod(positions), -1)


class CentredColumns:
    """A layer's input (or, with ``output=True``, its output) as centred columns per group,
    [groups, columns of one group, samples]: the transpose of :func:`grouped_rows` (of the output
    rows [groups, samples, outputs of one group]) less a shift per column, so that XᵀX is one BLAS
    product per group of the columns with their own transpose. The shift is the channel means of
    the first array given; :attr:`shift` is the one used by the last call.

    A Conv's input is copied kernel tap by kernel tap from a zero-padded copy into buffers kept
    between calls, each tap one strided subtraction with contiguous rows: im2col's transposing copy
    into fresh arrays wrote 9 floats at a time and page-faulted every new buffer (MobileNetV2's
    downstream refit: 8.7 s of copies and 11 s of system time)."""

    def __init__(self, site: WeightSite, output: bool = False) -> None:
        self.node = site.uses[0].node
        self.output = output
        self.groups = groups_of(site)
        self.kernel = tuple(site.value.shape[2:]) if self.node.op == "Conv" and not output else ()
        self.shift = np.zeros((0, 0), np.float32)
        self._channel_shift: np.ndarray | None = None
        self._buffers: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}

    def __call__(self, value: np.ndarray) -> np.ndarray:
        x = np.asarray(value, dtype=np.float32)
        if self.node.op != "Conv":  # Gemm/MatMul rows [samples, columns], one group
            rows = x.T if self.node.op == "Gemm" and self.node.attrs.get("transA", 0) and not self.output else x.reshape(-1, x.shape[-1])
            if self._channel_shift is None:
                self._channel_shift = rows.mean(axis=0, dtype=np.float64).astype(np.float32)
            self.shift = self._channel_shift[None]
            return np.subtract(rows.T, self._channel_shift[:, None])[None]
        if self._channel_shift is None:
            self._channel_shift = x.mean(axis=(0, *range(2, x.ndim)), dtype=np.float64).astype(np.float32)
        per_group = self._channel_shift.reshape(self.groups, -1)  # [g, channels of one group]
        taps = math.prod(self.kernel)
        self.shift = np.tile(per_group, (1, taps))  # columns ordered (kernel tap, channel)
        return self._output_columns(x, per_group) if self.output else self._input_columns(x, per_group)

    def _output_columns(self, y: np.ndarray, shift: np.ndarray) -> np.ndarray:
        n, channels = y.shape[:2]
        by_group = y.reshape(n, self.groups, channels // self.groups, -1).transpose(1, 2, 0, 3)  # [g, o, n, positions]
        out = self._buffer("out", by_group.shape)
        np.subtract(by_group, shift[:, :, None, None], out=out)
        return out.reshape(self.groups, channels // self.groups, -1)

    def _input_columns(self, x: np.ndarray, shift: np.ndarray) -> np.ndarray:
        spatial = x.ndim - 2
        attrs = self.node.attrs
        strides = tuple(attrs.get("strides", [1] * spatial))
        dilations = tuple(attrs.get("dilations", [1] * spatial))
        pads = list(attrs.get("pads", [0] * 2 * spatial))
        padded = x
        if any(pads):  # the borders of the kept buffer stay zero: only its interior is ever written
            padded = self._buffer("padded", (*x.shape[:2], *(x.shape[2 + i] + pads[i] + pads[i + spatial] for i in range(spatial))), zero=True)
            padded[(slice(None), slice(None), *(slice(pads[i], pads[i] + x.shape[2 + i]) for i in range(spatial)))] = x
        positions = tuple((padded.shape[2 + i] - (self.kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(spatial))
        n, channels = x.shape[:2]
        per_group = channels // self.groups
        out = self._buffer("in", (self.groups, math.prod(self.kernel), per_group, n, *positions))
        for tap, offset in enumerate(np.ndindex(*self.kernel)):
            window = padded[(slice(None), slice(None),
                             *(slice(offset[i] * dilations[i], offset[i] * dilations[i] + (positions[i] - 1) * strides[i] + 1, strides[i])
                               for i in range(spatial)))]
            by_group = window.reshape(n, self.groups, per_group, *positions).transpose(1, 2, 0, *range(3, 3 + spatial))
            np.subtract(by_group, shift.reshape(self.groups, per_group, *[1] * (1 + spatial)), out=out[:, tap])
        return out.reshape(self.groups, -1, n * math.prod(positions))

    def _buffer(self, role: str, shape: tuple[int, ...], zero: bool = False) -> np.ndarray:
        key = (role, shape)  # a slice shorter than the others (a run's last) gets buffers of its own
        if key not in self._buffers:
            self._buffers[key] = np.zeros(shape, np.float32) if zero else np.empty(shape, np.float32)
        return self._buffers[key]


# Images per slice when a Conv's input is unfolded: im2col of a whole calibration batch can take
# gigabytes (160 images x 112 x 112 positions x 288 columns in float64 is 4.6 GB).
CONV_SAMPLES_PER_SLICE = 8


def sample_slices(site: WeightSite, *arrays: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    """The arrays (a Conv's input and whatever goes with it, sample-aligned) a few images at a time;
    other layers' arrays whole."""
    if site.uses[0].node.op != "Conv" or len({a.shape[0] for a in arrays}) != 1:
        yield arrays
        return
    for start in range(0, arrays[0].shape[0], CONV_SAMPLES_PER_SLICE):
        yield tuple(a[start : start + CONV_SAMPLES_PER_SLICE] for a in arrays)


def ridge_towards(gram: np.ndarray, right: np.ndarray, start: np.ndarray, ridge: float | np.ndarray) -> np.ndarray:
    """Θ minimising |XΘ - Y|² + ridge |Θ - start|², from gram = XᵀX and right = XᵀY: the least-squares
    fit pulled towards the current weights rather than towards zero, so that a small calibration set
    moves them only where the data says so. Batched: gram [..., c, c], right and start [..., c, o],
    ridge a scalar or one per leading index. (LU, numpy's: this OpenBLAS's Cholesky ran 1.5-3.7x
    slower than its LU on 2,305 columns, though it does half the arithmetic.)"""
    ridge = np.asarray(ridge, dtype=np.float64)
    width = gram.shape[-1]
    system = np.array(gram, dtype=np.float64, order="C")  # a C-ordered copy (reshape below is then a view), its diagonal raised in place
    diagonal = system.reshape(*system.shape[:-2], width * width)[..., :: width + 1]
    diagonal += ridge[..., None]
    return np.linalg.solve(system, right + ridge[..., None, None] * start)


def fit_to_teacher(matrix: np.ndarray, cross: np.ndarray, hessian: np.ndarray, strength: float) -> np.ndarray:
    """The weights W' that best map the pruned model's layer input X to the original layer's output
    X_t Wᵀ, pulled towards W itself:  min ||X W'ᵀ - X_t Wᵀ||² + λ ||W' - W||²  with λ = strength x the
    mean of diag(XᵀX). Closed form: W' = W (X_tᵀX + λI)(XᵀX + λI)⁻¹.

    This undoes the drift that earlier pruned layers left in this layer's input before the layer
    is itself pruned; the pull towards W keeps a layer with few calibration rows (a classifier fed
    one pooled vector per image) from memorising the calibration set.
    """
    w = matrix.astype(np.float64)
    ridge = strength * float(np.mean(np.diag(hessian))) or 1e-8
    # With Y = X_t Wᵀ, XᵀY = (X_tᵀX)ᵀ Wᵀ: the ridge fit of Θ = W'ᵀ towards Wᵀ.
    return ridge_towards(hessian.astype(np.float64), cross.astype(np.float64).T @ w.T, w.T, ridge).T


# ---------------------------------------------------------------------------------------------
# Hessians: XᵀX per group of each layer's input
# ---------------------------------------------------------------------------------------------


def add_blocks(total: np.ndarray | None, blocks: np.ndarray) -> np.ndarray:
    """Per-group blocks [groups, ...] summed (``total`` None: the first)."""
    return blocks if total is None else total + blocks


def add_hessians(total: np.ndarray | None, site: WeightSite, activation: np.ndarray) -> np.ndarray:
    """``total`` plus XᵀX per group of the layer's input ``activation`` (a Conv's a few images at a time)."""
    for (part,) in sample_slices(site, activation):
        total = add_blocks(total, gram_blocks(grouped_rows(site, part)))
    assert total is not None
    return total


# Hessians gathered side by side in one pass over the data; more layers than this take more passes.
HESSIAN_BYTES_PER_PASS = 1 << 30


def current_hessians(model: onnx.ModelProto, site: WeightSite, inputs: ChangingModelValues) -> np.ndarray:
    """XᵀX per group of the layer's input in ``model`` (a model a layer-by-layer pass is editing), over
    every run of ``inputs``."""
    name = activation_name(site)
    total: np.ndarray | None = None
    for values in inputs.values(model, [name]):
        total = add_hessians(total, site, values[name])
    assert total is not None, "no calibration feed"
    return total


def viewable_hessians(model: onnx.ModelProto, sites: list[WeightSite], source: InputSource, limit: int | None = None,
                      label: str = "layer inputs") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """:func:`original_hessians` of the sites that have a layer-wise view, and why each other has none."""
    unviewed = {site.name: reason for site in sites if (reason := unsupported_reason(site))}
    viewed = [site for site in sites if site.name not in unviewed]
    return original_hessians(model, viewed, source, limit, label=label), unviewed


def original_hessians(model: onnx.ModelProto, sites: list[WeightSite], source: InputSource, limit: int | None = None,
                      label: str = "layer inputs") -> dict[str, np.ndarray]:
    """XᵀX per group of every listed layer's input in ``model``, in as few passes over ``source`` as
    fit HESSIAN_BYTES_PER_PASS (a sensitivity scan of MobileNetV2's 53 tensors ran the model once
    per tensor before: 53 passes over 368 images, now one)."""
    hessians: dict[str, np.ndarray] = {}
    for batch in _by_hessian_bytes(sites, HESSIAN_BYTES_PER_PASS):
        names = {site.name: activation_name(site) for site in batch}
        for values in tensor_values(model, source, list(dict.fromkeys(names.values())), limit=limit, label=label):
            for site in batch:
                hessians[site.name] = add_hessians(hessians.get(site.name), site, values[names[site.name]])
    return hessians


def _by_hessian_bytes(sites: list[WeightSite], budget: int) -> Iterator[list[WeightSite]]:
    """``sites`` in runs whose float64 Hessians (groups x columns² each) add up to at most ``budget``."""
    batch: list[WeightSite] = []
    used = 0
    for site in sites:
        size = groups_of(site) * to_matrix(site).shape[1] ** 2 * 8
        if batch and used + size > budget:
            yield batch
            batch, used = [], 0
        batch.append(site)
        used += size
    if batch:
        yield batch



# ---------------------------------------------------------------------------------------------
# SparseGPT (Frantar & Alistarh, 2023): prune with the inverse Hessian, update the survivors
# ---------------------------------------------------------------------------------------------


def sparsegpt(
    matrix: np.ndarray,
    hessian: np.ndarray,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    per_row: bool = False,
    block: int = 128,
    damp: float = 0.01,
) -> np.ndarray:
    """Prune ``matrix`` [outputs, inputs] to ``sparsity`` (or N:M along inputs) and update the kept
    weights so that ``rows @ matrix.T`` changes as little as possible for inputs with Gram matrix H.

    Columns are processed in blocks: the mask of a block is chosen by the saliency w² / [H⁻¹]ᵢᵢ²,
    and each pruned column's error is spread over the later columns through the Cholesky factor
    of H⁻¹ (the optimal brain surgeon update, one column at a time).
    """
    w = matrix.astype(np.float64).copy()
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    inverse_factor = upper_cholesky_of_inverse(h)
    columns = w.shape[1]
    for start in range(0, columns, block):
        end = min(start + block, columns)
        _prune_block(w, inverse_factor, start, end, sparsity, nm, per_row)
    return w


def upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """U with H⁻¹ = UᵀU (upper triangular), raising the damping until H is positive definite."""
    jitter = 0.0
    scale = float(np.mean(np.diag(h)))
    for _ in range(8):
        try:
            lower = np.linalg.cholesky(h + jitter * np.eye(len(h)))
            inverse = np.linalg.inv(lower).T @ np.linalg.inv(lower)
            return np.linalg.cholesky(inverse).T
        except np.linalg.LinAlgError:
            jitter = scale * 0.01 if jitter == 0 else jitter * 10
    raise np.linalg.LinAlgError("the layer's input Gram matrix stays singular after damping")


def _prune_block(w: np.ndarray, u: np.ndarray, start: int, end: int, sparsity: float, nm: tuple[int, int] | None, per_row: bool) -> None:
    block_w = w[:, start:end].copy()
    block_u = u[start:end, start:end]
    diagonal = np.diag(block_u)
    errors = np.zeros_like(block_w)
    drop = np.zeros(block_w.shape, dtype=bool)
    if nm is None:
        saliency = block_w**2 / diagonal[None, :] ** 2
        drop = _lowest(saliency, sparsity, per_row)
    for i in range(end - start):
        if nm is not None and i % nm[1] == 0:
            group = block_w[:, i : i + nm[1]] ** 2 / diagonal[None, i : i + nm[1]] ** 2
            lowest = np.argpartition(group, nm[1] - nm[0] - 1, axis=1)[:, : nm[1] - nm[0]]
            np.put_along_axis(drop[:, i : i + nm[1]], lowest, True, axis=1)
        column = block_w[:, i]
        kept = np.where(drop[:, i], 0.0, column)
        error = (column - kept) / diagonal[i]
        block_w[:, i:] -= np.outer(error, block_u[i, i:])
        block_w[:, i] = kept
        errors[:, i] = error
    w[:, start:end] = block_w
    w[:, end:] -= errors @ u[start:end, end:]


def _lowest(saliency: np.ndarray, sparsity: float, per_row: bool) -> np.ndarray:
    """True where a weight is among the ``sparsity`` fraction with the lowest saliency."""
    drop = np.zeros(saliency.shape, dtype=bool)
    if per_row:
        count = round(sparsity * saliency.shape[1])
        if count:
            np.put_along_axis(drop, np.argpartition(saliency, count - 1, axis=1)[:, :count], True, axis=1)
        return drop
    count = round(sparsity * saliency.size)
    if count:
        drop.reshape(-1)[np.argpartition(saliency.reshape(-1), count - 1)[:count]] = True
    return drop


# ---------------------------------------------------------------------------------------------
# bias correction: re-centre each pruned layer's mean output
# ---------------------------------------------------------------------------------------------


def correct_biases(original: onnx.ModelProto, graph: gs.Graph, sites: list[WeightSite], source: InputSource, limit: int) -> int:
    """Shift the bias of each layer so that its mean output per channel over the calibration data
    equals the original model's. Measured in one pass over both models (all layers pruned at once),
    so each shift also absorbs the drift that earlier layers passed on. Returns the layers corrected."""
    eligible = [site for site in sites if not unsupported_reason(site)]
    axes = {site.uses[0].node.outputs[0].name: (-1 if site.uses[0].node.op == "MatMul" else 1) for site in eligible}
    if not axes:
        return 0
    before = collect_channel_stats(original, source, axes, limit=limit, label="bias correction (original)")
    after = collect_channel_stats(from_gs(graph, like=original), source, axes, limit=limit, label="bias correction (pruned)")
    for site in eligible:
        output = site.uses[0].node.outputs[0].name
        add_output_shift(graph, site.uses[0].node, before[output].mean - after[output].mean)
    return len(eligible)


def add_output_shift(graph: gs.Graph, node: gs.Node, shift: np.ndarray) -> None:
    """Make ``node``'s output larger by ``shift`` (per output channel): through its bias when it
    has a constant one, else a new bias input, else an Add node after it (MatMul)."""
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    dtype = weight.dtype if weight is not None else np.dtype(np.float32)
    if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and constant_value(node.inputs[2]) is not None:
        bias = constant_value(node.inputs[2]).astype(np.float64)  # type: ignore[union-attr]
        beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        if beta != 0:
            node.inputs[2] = gs.Constant(unique_name(graph, f"{node.inputs[2].name}_corrected"), (bias + shift / beta).astype(dtype))
            return
    if node.op in ("Conv", "Gemm") and len(node.inputs) == 2:
        node.inputs.append(gs.Constant(unique_name(graph, f"{node.name or node.outputs[0].name}.bias"), shift.astype(dtype)))
        if node.op == "Gemm":
            node.attrs["beta"] = 1.0
        return
    output = node.outputs[0]
    if _shift_following_add(graph, node, shift):
        return
    # MatMul (or a Gemm whose bias is not constant) with no bias Add after it: add one.
    unshifted = gs.Variable(unique_name(graph, f"{output.name}_uncorrected"), dtype=output.dtype)
    node.outputs[0] = unshifted
    shift_tensor = gs.Constant(unique_name(graph, f"{output.name}_bias_correction"), shift.astype(dtype))
    graph.nodes.append(gs.Node("Add", name=unique_name(graph, f"{node.name or output.name}_bias_correction"), inputs=[unshifted, shift_tensor], outputs=[output]))


def _shift_following_add(graph: gs.Graph, node: gs.Node, shift: np.ndarray) -> bool:
    """A MatMul followed only by ``Add(x, constant bias)`` (the exported Linear): shift that bias."""
    output = node.outputs[0]
    if len(output.outputs) != 1 or output in graph.outputs or output.outputs[0].op != "Add":
        return False
    add = output.outputs[0]
    index = 1 if add.inputs[0] is output else 0
    bias = constant_value(add.inputs[index])
    if bias is None or bias.ndim < 1 or bias.shape[-1] != shift.shape[0] or bias.size != shift.shape[0]:
        return False
    shifted = (bias.astype(np.float64) + shift.reshape(bias.shape)).astype(bias.dtype)
    add.inputs[index] = gs.Constant(unique_name(graph, f"{add.inputs[index].name}_shifted"), shifted)
    return True


# ---------------------------------------------------------------------------------------------
# Channel removal order by reconstruction cost (group Optimal Brain Surgeon)
# ---------------------------------------------------------------------------------------------


@dataclass
class ReadingLayer:
    """One layer that reads channels: its weight as [rows, inputs] (a kxk conv contributes one row per
    output and tap, so the channel Gram stands in for every tap), the Gram of its input [a, 1] over
    calibration data (the last column is the constant a bias absorbs), and, per unit, the input
    positions the unit holds (-1 padding where a unit holds fewer)."""

    weight: np.ndarray
    gram: np.ndarray
    positions: np.ndarray  # [units, slots]


def greedy_removal_costs(layers: list[ReadingLayer], units: int, damp: float = 0.01) -> np.ndarray:
    """The order in which removing units costs the reading layers least after each is compensated
    by the others (the surviving columns refit by least squares, as ``refit`` will), as the
    cumulative cost at which each unit goes: removal k costs tr(W_S (H⁻¹_SS)⁻¹ W_Sᵀ) with S the
    unit's positions, after the k-1 cheaper ones were taken out and W, H⁻¹ updated (OBS).

    A channel that its neighbours duplicate costs little here even if its filter is large, which a
    norm criterion cannot see. Cumulative costs rise along the order, so the lowest k are the first
    k removals."""
    states = [(layer.weight.astype(np.float64).copy(), _damped_inverse(layer.gram, damp), layer.positions) for layer in layers]
    remaining = np.ones(units, dtype=bool)
    cumulative = np.zeros(units)
    total = 0.0
    for _ in range(units):
        costs = np.zeros(units)
        for weight, inverse, positions in states:
            costs += _unit_costs(weight, inverse, positions)
        costs[~remaining] = np.inf
        chosen = int(np.argmin(costs))
        total += max(float(costs[chosen]), 0.0)
        cumulative[chosen] = total
        remaining[chosen] = False
        for weight, inverse, positions in states:
            _remove_positions(weight, inverse, positions[chosen][positions[chosen] >= 0])
    return cumulative


def compensated_removal(layer: ReadingLayer, positions: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """The layer's weight [rows, inputs + 1] once ``positions`` are taken out of its input and the other
    columns, the constant one among them, make up for them (the OBS update, as a refit would)."""
    weight = layer.weight.astype(np.float64).copy()
    _remove_positions(weight, _damped_inverse(layer.gram, damp), positions)
    return weight


def _damped_inverse(gram: np.ndarray, damp: float) -> np.ndarray:
    gram = gram.astype(np.float64)
    return np.linalg.inv(gram + damp * float(np.mean(np.diag(gram)) or 1.0) * np.eye(len(gram)))


def _unit_costs(weight: np.ndarray, inverse: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Per unit, tr(W_S (H⁻¹_SS)⁻¹ W_Sᵀ) for its positions S in this layer (0 where it holds none)."""
    held = positions >= 0
    safe = np.where(held, positions, 0)
    if positions.shape[1] == 1:  # one position per unit: the common case, without inverses
        diagonal = np.diag(inverse)[safe[:, 0]]
        energy = np.square(weight[:, safe[:, 0]]).sum(axis=0)
        return np.where(held[:, 0], energy / np.maximum(diagonal, 1e-30), 0.0)  # a rounding-negative diagonal: costed last
    block = inverse[safe[:, :, None], safe[:, None, :]]  # [units, slots, slots]
    mask = held[:, :, None] & held[:, None, :]
    block = np.where(mask, block, np.eye(positions.shape[1])[None])  # padding slots decouple
    columns = np.where(held[None], weight[:, safe], 0.0)  # [rows, units, slots]
    solved = np.linalg.solve(block, np.transpose(columns, (1, 2, 0)))  # [units, slots, rows]
    return np.maximum(np.einsum("rus,usr->u", columns, solved), 0.0)  # rounding can make a block indefinite


def _remove_positions(weight: np.ndarray, inverse: np.ndarray, positions: np.ndarray) -> None:
    """Take ``positions`` out of the layer's input, compensating with the rest (in place)."""
    if not len(positions):
        return
    block = inverse[np.ix_(positions, positions)]
    rows = inverse[positions]  # [s, n]
    step = np.linalg.solve(block, rows)  # (H⁻¹_SS)⁻¹ H⁻¹_S:
    weight -= weight[:, positions] @ step
    inverse -= inverse[:, positions] @ step
    weight[:, positions] = 0.0
    inverse[positions, :] = 0.0
    inverse[:, positions] = 0.0
    inverse[positions, positions] = 1.0  # a removed input stays removed (never chosen, never divides by 0)
