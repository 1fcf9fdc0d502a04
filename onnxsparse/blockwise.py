"""Block-wise low-bit weight arithmetic (4 or 8 bits, weight-only): the numbers behind ``weight-only``.

A MatMul weight W [K, N] (K the reduction axis) is quantized per output column in blocks of
``block`` consecutive rows of K: each block has one scale and one integer zero point, and a weight
stands for ``(code - zero_point) * scale`` with codes in [0, 2^bits). This is the layout of
onnxruntime's ``MatMulNBits`` (B stored transposed, [N, blocks, block * bits / 8], codes packed two
to a byte low nibble first, zero points packed the same way) and of a blocked ``DequantizeLinear``
(opset 21) along axis 0.

Three ways to pick the codes, all returning the same :class:`BlockCodes`:

- :func:`round_to_nearest`: each block's range from its own extremes. Symmetric blocks divide by the
  signed extreme over -2^(bits-1), so that the largest-magnitude weight is exact whatever its sign
  (the other side then reaches only 2^(bits-1) - 1 steps; it is never longer).
- :func:`clipped_to_least_error`: data-free; each block's range shrunk to the fraction of a grid that
  gives the block the least squared weight error (outliers cost one weight, a coarse grid costs all).
- :func:`gptq`: data-aware; the columns of K are rounded in order and each one's error is spread
  over the columns not yet rounded through the Cholesky factor of the inverse Gram matrix of the
  layer's inputs (GPTQ), so that ``X @ W`` moves least on inputs like the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layerwise import upper_cholesky_of_inverse

__all__ = ["BlockCodes", "BlockScheme", "clipped_to_least_error", "gptq", "pack_low_first", "round_to_nearest"]


@dataclass(frozen=True)
class BlockScheme:
    """How a weight is quantized: bits per code, rows of K per block, symmetric or with zero points."""

    bits: int = 4
    block: int = 32
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ValueError(f"bits {self.bits}: 2, 4 or 8")
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"block {self.block}: a power of two, at least 16 (onnxruntime's MatMulNBits kernels)")

    @property
    def top(self) -> int:
        """The largest code."""
        return (1 << self.bits) - 1

    @property
    def middle(self) -> int:
        """The zero point of a symmetric block (and MatMulNBits' default when it has none)."""
        return 1 << (self.bits - 1)


@dataclass
class BlockCodes:
    """A quantized weight: codes [N, blocks, block] (uint8, the padding rows of K at 0), scales and zero points [N, blocks], and the K of the weight it came from."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    k: int

    def dequantized(self) -> np.ndarray:
        """The float32 weight [K, N] the codes stand for."""
        values = (self.codes.astype(np.float32) - self.zero_points[..., None]) * self.scales[..., None]
        return np.ascontiguousarray(values.reshape(len(self.codes), -1)[:, : self.k].T)


def _blocks(weight: np.ndarray, block: int) -> np.ndarray:
    """W [K, N] as float64 blocks [N, blocks, block] of its transpose, K padded with zeros."""
    k, n = weight.shape
    blocks = -(-k // block)
    columns = np.zeros((n, blocks * block), dtype=np.float64)
    columns[:, :k] = weight.T
    return columns.reshape(n, blocks, block)


def _parameters(values: np.ndarray, scheme: BlockScheme, shrink: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(scales, zero points) of blocks [..., block] over their last axis, each range times ``shrink``.
    In float32 arithmetic as onnxruntime's quantizer does it, so that the codes are its codes."""
    values = values.astype(np.float32, copy=False)
    if scheme.symmetric:
        # the signed extreme maps to code 0: exact whichever its sign (the negative one on a tie)
        high, low = values.max(axis=-1), values.min(axis=-1)
        peak = np.where(np.abs(high) > np.abs(low), high, low) * np.float32(shrink)
        return peak / np.float32(-scheme.middle), np.full(peak.shape, scheme.middle, dtype=np.float32)
    low = np.minimum(values.min(axis=-1), np.float32(0)) * np.float32(shrink)
    high = np.maximum(values.max(axis=-1), np.float32(0)) * np.float32(shrink)
    scales = (high - low) / np.float32(scheme.top)
    zero_points = np.clip(_round_half_away(-low / np.where(scales == 0, np.float32(1), scales)), 0, scheme.top)  # divided, as onnxruntime does
    return scales, np.where(scales == 0, np.float32(scheme.middle), zero_points)


def _reciprocal(scales: np.ndarray) -> np.ndarray:
    """1 / scale in float32, 0 where the scale is 0 (an all-zero block)."""
    safe = np.where(scales == 0, np.float32(1), scales)
    return np.where(scales == 0, np.float32(0), np.float32(1) / safe)


def _round_half_away(values: np.ndarray) -> np.ndarray:
    """Round to nearest, ties away from zero (C's roundf; numpy's round goes to even)."""
    whole = np.trunc(values)
    return np.where(np.abs(values - whole) == 0.5, whole + np.sign(values), np.round(values))


def _codes(values: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, top: int) -> np.ndarray:
    """Codes of blocks [..., block] under per-block scales and zero points: value x (1 / scale) +
    zero point, rounded, in float32 (an all-zero block's codes are its zero point)."""
    scaled = values.astype(np.float32) * _reciprocal(scales.astype(np.float32))[..., None] + zero_points.astype(np.float32)[..., None]
    return np.clip(_round_half_away(scaled), 0, top)


def _finished(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int) -> BlockCodes:
    """The codes as uint8 with the padding rows of K at 0: never read. (onnxruntime's quantizer writes 0 there
    too, except in the half byte an odd K shares with its last code, which it fills from a neighbouring column.)"""
    codes = codes.astype(np.uint8).reshape(len(codes), -1)
    codes[:, k:] = 0
    return BlockCodes(codes.reshape(len(codes), len(scales[0]), -1), scales.astype(np.float32), zero_points.astype(np.uint8), k)


def round_to_nearest(weight: np.ndarray, scheme: BlockScheme) -> BlockCodes:
    """Each block's codes by rounding, its range from its own extremes."""
    values = _blocks(weight, scheme.block)
    scales, zero_points = _parameters(values, scheme)
    return _finished(_codes(values, scales, zero_points, scheme.top), scales, zero_points, weight.shape[0])


# The fractions of each block's range tried by clipped_to_least_error (1.0 first: ties keep the full range).
SHRINK_GRID = tuple(1.0 - 0.025 * step for step in range(13))  # 1.0 .. 0.7


def clipped_to_least_error(weight: np.ndarray, scheme: BlockScheme) -> BlockCodes:
    """Each block's range shrunk by the fraction of SHRINK_GRID that gives the least squared error
    between the block's weights and what its codes stand for; data-free, one weight at a time."""
    values = _blocks(weight, scheme.block)
    best = None
    for shrink in SHRINK_GRID:
        scales, zero_points = _parameters(values, scheme, shrink)
        codes = _codes(values, scales, zero_points, scheme.top)
        error = np.sum(((codes - zero_points[..., None]) * scales[..., None].astype(np.float64) - values) ** 2, axis=-1)
        if best is None:
            best = [error, codes, scales, zero_points]
            continue
        better = error < best[0]
        best[0] = np.where(better, error, best[0])
        best[1] = np.where(better[..., None], codes, best[1])
        best[2] = np.where(better, scales, best[2])
        best[3] = np.where(better, zero_points, best[3])
    assert best is not None
    return _finished(best[1], best[2], best[3], weight.shape[0])


def gptq(weight: np.ndarray, gram: np.ndarray, scheme: BlockScheme, damp: float = 0.01, lazy: int = 128, *,
         act_order: bool = False, ranges: BlockCodes | None = None) -> BlockCodes:
    """GPTQ: the rows of K rounded one at a time, each one's error compensated by the rows not yet
    rounded, so that ``X @ W`` changes least for inputs X with Gram matrix ``gram`` = XᵀX [K, K].

    In order, a block's range comes from its weights as the earlier rows' compensation left them,
    when its first row is reached. With ``act_order`` the rows go largest input energy first (the
    Gram diagonal), and every block's range is fixed beforehand (each block's own extremes), so the
    codes keep whole blocks of K (no reordering for the kernel). ``ranges`` fixes the blocks' scales
    and zero points to a given quantization's (e.g. :func:`clipped_to_least_error`'s). Rows that
    never see a non-zero input (a zero diagonal) are rounded as they are and compensate nothing;
    ``damp`` adds that fraction of the mean diagonal."""
    k, n = weight.shape
    block = scheme.block
    padded = -(-k // block) * block
    w = np.zeros((n, padded), dtype=np.float64)
    w[:, :k] = weight.T
    h = np.eye(padded, dtype=np.float64)  # padding rows: independent, never read
    h[:k, :k] = gram
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)[:k]))
    fixed = ranges is not None or act_order
    if ranges is not None:
        scales, zero_points = ranges.scales.astype(np.float64), ranges.zero_points.astype(np.float64)
    elif fixed:
        scales, zero_points = _parameters(w.reshape(n, -1, block), scheme)
    else:
        scales, zero_points = np.zeros((n, padded // block)), np.zeros((n, padded // block))
    order = np.argsort(-np.diag(h)[:k], kind="stable") if act_order else np.arange(k)
    order = np.concatenate([order, np.arange(k, padded)])
    w, h = w[:, order], h[np.ix_(order, order)]
    u = upper_cholesky_of_inverse(h)
    lazy = -(-max(lazy, block) // block) * block  # whole blocks per chunk: a block's range sees all its rows
    codes = np.zeros((n, padded), dtype=np.float64)
    for start in range(0, padded, lazy):
        end = min(start + lazy, padded)
        chunk = w[:, start:end].copy()
        errors = np.zeros_like(chunk)
        for i in range(end - start):
            row = int(order[start + i])
            group = row // block
            if not fixed and row % block == 0:
                scales[:, group], zero_points[:, group] = _parameters(chunk[:, i : i + block], scheme)
            code = _codes(chunk[:, i, None], scales[:, group], zero_points[:, group], scheme.top)[:, 0]
            codes[:, row] = code
            error = (chunk[:, i] - (code - zero_points[:, group]) * scales[:, group]) / u[start + i, start + i]
            chunk[:, i:] -= np.outer(error, u[start + i, start + i : end])
            errors[:, i] = error
        w[:, end:] -= errors @ u[start:end, end:]
    return _finished(codes.reshape(n, -1, block), scales, zero_points, k)


def pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (uint8, last axis a multiple of 8 / bits) packed 8 / bits to a byte, the first code in
    the lowest bits: MatMulNBits' B and zero points, and ONNX's int4/uint4 tensors."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    per_byte = 8 // bits
    grouped = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    packed = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for position in range(per_byte):
        packed |= grouped[..., position] << np.uint8(position * bits)
    return packed
