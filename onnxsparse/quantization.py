"""The arithmetic of int8 quantization: choosing a range from calibration statistics, and turning
ranges and weights into scales, zero points and integers. No graph code here (see passes/qdq.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    for start, stop in zip(bounds[:-1], bounds[1:]):
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


def quantize_weight(weight: np.ndarray, axis: int | None) -> WeightQuant:
    """Symmetric int8 in [-127, 127] (zero point 0, so a pruned zero stays exactly zero)."""
    w = weight.astype(np.float64)
    if axis is None:
        bound = np.array(np.max(np.abs(w)) if w.size else 0.0)
        scale = np.where(bound > 0, bound / 127.0, 1.0)
        values = np.clip(np.round(w / scale), -127, 127)
    else:
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        bound = np.max(np.abs(moved), axis=1) if moved.size else np.zeros(w.shape[axis])
        scale = np.where(bound > 0, bound / 127.0, 1.0)
        shape = [1] * w.ndim
        shape[axis] = -1
        values = np.clip(np.round(w / scale.reshape(shape)), -127, 127)
    scale32 = scale.astype(np.float32)
    return WeightQuant(values.astype(np.int8), scale32, np.zeros(scale32.shape, dtype=np.int8), axis)


def quantize_bias(bias: np.ndarray, input_scale: np.float32, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias with scale = input scale x weight scale (what int8 kernels add to the accumulator)."""
    scale = (np.float32(input_scale) * weight_scale.astype(np.float32)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    values = np.clip(np.round(bias.astype(np.float64) / scale), -(2**31), 2**31 - 1).astype(np.int32)
    return values, scale
