"""The arithmetic of int8 quantization: choosing a range from calibration statistics, and turning
ranges and weights into scales, zero points and integers. No graph code here (see passes/qdq/)."""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass

import numpy as np

from .runtime import make_session
from .weightstore import release_pages

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")

_LIMITS = {"uint8": (0, 255), "int8": (-128, 127)}
_NUMPY = {"uint8": np.uint8, "int8": np.int8}


# ---------------------------------------------------------------------------------------------
# ranges from statistics
# ---------------------------------------------------------------------------------------------


def choose_range(low: float, high: float, histogram: np.ndarray | None, method: str, percentile: float = 99.999) -> tuple[float, float]:
    """[low, high] for a tensor, always holding 0 (so that zero is exact and padding stays zero)."""
    if not np.isfinite(low) or not np.isfinite(high):
        return 0.0, 0.0
    low, high = min(low, 0.0), max(high, 0.0)
    if method == "minmax" or histogram is None or histogram.sum() == 0:
        return low, high
    bound = max(abs(low), abs(high))
    edges = np.linspace(-bound, bound, len(histogram) + 1)
    if method == "percentile":
        clipped = _percentile_range(histogram, edges, percentile)
    elif method == "mse":
        clipped = _mse_range(histogram, edges, low, high)
    elif method == "entropy":
        threshold = _entropy_threshold(histogram, edges, levels=255 if low >= 0 else 127)
        clipped = (max(low, -threshold), min(high, threshold))
    else:
        raise ValueError(f"unknown calibration method '{method}'")
    return min(clipped[0], 0.0), max(clipped[1], 0.0)


def _percentile_range(histogram: np.ndarray, edges: np.ndarray, percentile: float) -> tuple[float, float]:
    cdf = np.cumsum(histogram) / histogram.sum()
    tail = (100.0 - percentile) / 100.0
    low = edges[int(np.searchsorted(cdf, tail, side="left"))]
    high = edges[min(int(np.searchsorted(cdf, 1.0 - tail, side="left")) + 1, len(edges) - 1)]
    return float(low), float(high)


def _mse_range(histogram: np.ndarray, edges: np.ndarray, low: float, high: float, steps: int = 100) -> tuple[float, float]:
    """The shrink of [low, high] that minimizes the expected squared error of uint8-style quantization:
    rounding noise (step²/12) inside the range, clipping error outside."""
    centers = (edges[:-1] + edges[1:]) / 2
    counts = histogram.astype(np.float64)
    best, best_error = (low, high), np.inf
    for factor in np.linspace(1.0 / steps, 1.0, steps):
        lo, hi = low * factor, high * factor
        step = (hi - lo) / 255 if hi > lo else 1.0
        clipped = np.clip(centers, lo, hi)
        error = np.sum(counts * ((centers - clipped) ** 2 + np.where(centers == clipped, step**2 / 12, 0.0)))
        if error < best_error:
            best, best_error = (lo, hi), error
    return best


def _entropy_threshold(histogram: np.ndarray, edges: np.ndarray, levels: int) -> float:
    """The |x| threshold whose quantized distribution is closest (KL divergence) to the observed one."""
    middle = len(histogram) // 2
    folded = histogram[middle:].astype(np.float64) + histogram[:middle][::-1]
    width = edges[middle + 1] - edges[middle]
    best_threshold, best_kl = width * len(folded), np.inf
    for stop in range(levels, len(folded) + 1, max(1, (len(folded) - levels) // 128)):
        reference = folded[:stop].copy()
        reference[-1] += folded[stop:].sum()
        if reference.sum() == 0:
            continue
        candidate = _spread_over_levels(folded[:stop], levels)
        kl = _kl(reference / reference.sum(), candidate / max(candidate.sum(), 1e-30))
        if kl < best_kl:
            best_threshold, best_kl = width * stop, kl
    return float(best_threshold)


def _spread_over_levels(counts: np.ndarray, levels: int) -> np.ndarray:
    """Merge ``counts`` into ``levels`` groups and spread each group's total over its non-empty bins."""
    bounds = np.linspace(0, len(counts), levels + 1).astype(int)
    spread = np.zeros_like(counts)
    for start, stop in itertools.pairwise(bounds):
        chunk = counts[start:stop]
        filled = chunk > 0
        if filled.any():
            spread[start:stop][filled] = chunk.sum() / filled.sum()
    return spread


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


# ---------------------------------------------------------------------------------------------
# parameters and integers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationParams:
    scale: np.float32
    zero_point: np.ndarray  # a 0-d array of the activation dtype

    @property
    def dtype(self) -> np.dtype:
        return self.zero_point.dtype


def activation_params(low: float, high: float, dtype: str, symmetric: bool) -> ActivationParams:
    """Scale and zero point mapping [low, high] (which holds 0) onto the integer type."""
    qmin, qmax = _LIMITS[dtype]
    if symmetric:
        bound = max(abs(low), abs(high))
        scale = bound / ((qmax - qmin) / 2) if bound > 0 else 1.0
        zero_point = (qmax + qmin + 1) // 2 if dtype == "uint8" else 0
    else:
        scale = (high - low) / (qmax - qmin) if high > low else 1.0
        zero_point = int(np.clip(round(qmin - low / scale), qmin, qmax))
    return ActivationParams(np.float32(scale), np.array(zero_point, dtype=_NUMPY[dtype]))


@dataclass(frozen=True)
class WeightQuant:
    values: np.ndarray  # int8
    scale: np.ndarray  # float32: [channels] per channel, [] per tensor
    zero_point: np.ndarray  # int8 zeros, same shape as scale
    axis: int | None


@dataclass(frozen=True)
class WeightScheme:
    """How weights become integers: one scale per output channel or per tensor, and how many bits.

    7 bits ("reduce range") keep a uint8 x int8 pair sum inside int16, which onnxruntime's x86
    kernels without VNNI (AVX2, AVX-512F) use: with 8 bits, 255 x 127 x 2 saturates there."""

    per_channel: bool = True
    bits: int = 8

    def __post_init__(self) -> None:
        if self.bits not in (7, 8):
            raise ValueError(f"weight bits must be 7 or 8, not {self.bits}")

    @property
    def bound(self) -> int:
        """The largest integer magnitude (symmetric, so a pruned zero stays exactly zero)."""
        return 2 ** (self.bits - 1) - 1

    def describe(self) -> str:
        return f"int8{' (7-bit range)' if self.bits == 7 else ''} {'per-channel' if self.per_channel else 'per-tensor'}"


def quantize_weight(weight: np.ndarray, axis: int | None, bound: int = 127) -> WeightQuant:
    """Symmetric int8 in [-bound, bound] (zero point 0, so a pruned zero stays exactly zero).

    Rounded (ties to even) from w divided by the float32 scale the model stores, so each integer is
    the nearest to w that the stored scale can express (up to the float32 rounding of the quotient:
    one in 1.2 million of a random 2048x600 weight was within an ulp of a half). In float32 (float64
    took 1.8x as long), a block of rows at a time for the peaks and for the rounding: a big weight
    never gets a whole float copy beside its int8 one, and a store-held weight's pages leave memory
    block by block."""
    peak = _peaks(weight, axis)
    scale32 = np.where(peak > 0, peak / bound, 1.0).astype(np.float32)
    shape = [1] * weight.ndim
    if axis is not None:
        shape[axis] = -1
    divisor = scale32.reshape(shape)
    values = np.empty(weight.shape, dtype=np.int8)
    if weight.ndim == 0:
        values[()] = np.clip(np.rint(np.float32(weight) / scale32), -bound, bound)
    for start, stop in _row_blocks(weight):
        block = np.divide(weight[start:stop], divisor[start:stop] if axis == 0 else divisor, dtype=np.float32)
        np.rint(block, out=block)
        np.clip(block, -bound, bound, out=block)
        values[start:stop] = block
        release_pages(weight)
    return WeightQuant(values, scale32, np.zeros(scale32.shape, dtype=np.int8), axis)


def _peaks(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """max |w| per index of ``axis`` (float64), or of the whole weight (a 0-d array)."""
    if axis is None:
        peak = 0.0 if weight.ndim else float(abs(weight))
        for start, stop in _row_blocks(weight):
            peak = max(peak, float(np.max(np.abs(weight[start:stop]), initial=0.0)))
            release_pages(weight)
        return np.array(peak)
    others = tuple(a for a in range(weight.ndim) if a != axis)
    peaks = np.zeros(weight.shape[axis])
    for start, stop in _row_blocks(weight):
        part = np.max(np.abs(weight[start:stop]), axis=others, initial=0.0)
        if axis == 0:
            peaks[start:stop] = part
        else:
            np.maximum(peaks, part, out=peaks)
        release_pages(weight)
    return peaks


def _row_blocks(weight: np.ndarray) -> list[tuple[int, int]]:
    """Ranges of axis 0 of about _ROUNDING_BLOCK values each (none for a 0-d weight)."""
    if weight.ndim == 0:
        return []
    step = max(1, _ROUNDING_BLOCK // max(1, weight[:1].size))
    return [(start, min(start + step, weight.shape[0])) for start in range(0, weight.shape[0], step)]


_ROUNDING_BLOCK = 1 << 20  # values rounded per block in quantize_weight (4 MiB of float32)


@functools.cache
def int8_kernels_saturate() -> bool:
    """Whether this machine's onnxruntime saturates int8 products of full-range weights.

    x86 CPUs without VNNI multiply uint8 by int8 with an instruction (pmaddubsw) that adds two
    products into int16: 255 x 127 x 2 = 64,770 clips to 32,767. Which kernel runs depends on the
    CPU and the onnxruntime build, so it is measured, not guessed from CPU flags: one MatMulInteger
    of extreme uint8 values, whose exact result is known. uint8 whatever the model's activations:
    on x86 onnxruntime shifts int8 activations by 128 into the same uint8 x int8 kernels (a bare
    int8 x int8 MatMulInteger is exact there, the fused QLinear ops are not)."""
    from onnx import TensorProto, helper

    depth = 16
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "saturation_probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, depth])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 8])],
        [helper.make_tensor("b", TensorProto.INT8, [depth, 8], np.full((depth, 8), 127, np.int8).tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    try:
        result = make_session(model, "int8 saturation probe").run(None, {"a": np.full((4, depth), 255, np.uint8)})[0]
    except Exception:  # noqa: BLE001 - no integer kernel at all: nothing to saturate
        log.debug("int8 saturation probe did not run", exc_info=True)
        return False
    saturates = bool(np.any(result != 255 * 127 * depth))
    log.debug("int8 saturation probe: %s", "saturates" if saturates else "exact")
    return saturates


def quantize_bias(bias: np.ndarray, input_scale: np.float32, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias with scale = input scale x weight scale (what int8 kernels add to the accumulator)."""
    scale = (np.float32(input_scale) * weight_scale.astype(np.float32)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    return bias_in_scale(bias, scale), scale


def bias_in_scale(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``bias`` as int32 in units of ``scale``: rounded in float64, clipped to the int32 range."""
    return np.clip(np.round(bias.astype(np.float64) / scale), -(2**31), 2**31 - 1).astype(np.int32)
