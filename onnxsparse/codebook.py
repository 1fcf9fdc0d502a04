"""Non-uniform weight quantization: a codebook of 2^bits values per tensor (or per output channel),
found by one-dimensional k-means over the weights, and an index per weight. The arithmetic behind
the ``cluster`` pass.

Where a uniform grid spends its levels evenly between the extremes, k-means puts them where the
weights are (most weights sit near zero, a few far out), so the same bits keep more of the weight.
A weight of importance ``w_i`` (the energy of the input it multiplies, when calibration data says
so) pulls its centroid by that much: the error k-means minimises is sum_i w_i (x_i - c(x_i))².
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .layerwise import upper_cholesky_of_inverse

__all__ = ["Codebook", "Codebooks", "compensated", "fit_codebooks", "kmeans", "nearest_rows"]

SCOPES = ("tensor", "channel", "scaled")


@dataclass
class Codebook:
    """Centroids (ascending, float32) and, per value, the index of its centroid (uint8)."""

    centroids: np.ndarray
    indices: np.ndarray

    def decoded(self) -> np.ndarray:
        return self.centroids[self.indices]


@dataclass
class Codebooks:
    """A weight's codebooks: ``centroids`` [books, levels] (one book per tensor, or per channel along
    ``axis``), ``scales`` [channels] when one shared book is scaled per channel, and the weight's
    ``indices`` (its shape, uint8). A weight stands for ``centroids[book, index] * scale``."""

    centroids: np.ndarray
    scales: np.ndarray | None
    indices: np.ndarray
    axis: int

    def decoded(self) -> np.ndarray:
        if len(self.centroids) == 1:  # one book (scaled per channel or not): a lookup, then each channel's scale
            values = self.centroids[0].astype(np.float64)[self.indices]
            if self.scales is not None:
                shape = [1] * values.ndim
                shape[self.axis] = len(self.scales)
                values *= self.scales.astype(np.float64).reshape(shape)
            return values.astype(np.float32)
        rows = self.row_centroids(self.indices.shape[self.axis])
        moved = np.moveaxis(self.indices, self.axis, 0).reshape(self.indices.shape[self.axis], -1)
        values = np.take_along_axis(rows, moved.astype(np.intp), axis=1)
        return np.moveaxis(values.reshape(np.moveaxis(self.indices, self.axis, 0).shape), 0, self.axis).astype(np.float32)

    def row_centroids(self, channels: int) -> np.ndarray:
        """[channels, levels]: what each channel's indices stand for (scale included)."""
        rows = np.broadcast_to(self.centroids, (channels, self.centroids.shape[1])).astype(np.float64)
        return rows * self.scales[:, None] if self.scales is not None else rows


def zero_first(books: Codebooks) -> Codebooks:
    """The same weights with each book's exact-zero centroid (pruned weights keep one) at index 0 and
    its other centroids rotated after it, the indices moved with them: a pruned weight's index is then
    0, which sparse-encode's bit mask stores in one bit. A book without a zero stays as it is."""
    levels = books.centroids.shape[1]
    shifts = np.array([int(np.flatnonzero(row == 0)[0]) if np.any(row == 0) else 0 for row in books.centroids])
    if not shifts.any():
        return books
    centroids = np.stack([np.roll(row, -int(shift)) for row, shift in zip(books.centroids, shifts)])
    if len(shifts) == 1:
        moved = shifts[0]
    else:  # a book per channel along the axis
        shape = [1] * books.indices.ndim
        shape[books.axis] = len(shifts)
        moved = shifts.reshape(shape)
    indices = ((books.indices.astype(np.int16) - moved) % levels).astype(np.uint8)
    return replace(books, centroids=centroids, indices=indices)


def fit_codebooks(weight: np.ndarray, levels: int, scope: str, axis: int, importance: np.ndarray | None = None, *,
                  iterations: int = 30, keep_zero: bool = True) -> Codebooks:
    """Codebooks for ``weight`` by k-means: one for the tensor (``tensor``), one per channel along
    ``axis`` (``channel``), or one for the weights divided by their channel's largest magnitude, each
    channel scaling it back (``scaled``: a channel's book costs one float, not ``levels``)."""
    importance = None if importance is None else np.broadcast_to(importance, weight.shape)
    if scope == "tensor":
        book = kmeans(weight, levels, importance, iterations=iterations, keep_zero=keep_zero)
        return Codebooks(_padded(book.centroids, levels)[None], None, book.indices, axis)
    if scope == "scaled":
        scales = np.max(np.abs(np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)), axis=1).astype(np.float64)
        scales[scales == 0] = 1.0
        shape = [1] * weight.ndim
        shape[axis] = len(scales)
        book = kmeans(weight / scales.reshape(shape), levels, importance, iterations=iterations, keep_zero=keep_zero)
        return Codebooks(_padded(book.centroids, levels)[None], scales.astype(np.float32), book.indices, axis)
    books = [kmeans(np.take(weight, channel, axis=axis), levels, None if importance is None else np.take(importance, channel, axis=axis),
                    iterations=iterations, keep_zero=keep_zero) for channel in range(weight.shape[axis])]
    indices = np.stack([book.indices for book in books], axis=axis)
    return Codebooks(np.stack([_padded(book.centroids, levels) for book in books]), None, indices, axis)


def _padded(centroids: np.ndarray, levels: int) -> np.ndarray:
    """A book of fewer distinct values than levels, its last value repeated (never indexed)."""
    return np.pad(centroids, (0, levels - len(centroids)), mode="edge")


def nearest_rows(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Per row of ``values`` [rows, n], the index of the nearest of that row's ``centroids`` [rows or 1, levels]
    (ascending)."""
    middles = (centroids[:, 1:] + centroids[:, :-1]) / 2  # [rows, levels - 1]
    if len(middles) == 1:
        return np.searchsorted(middles[0], values)
    step = max(1, (1 << 22) // max(values.shape[0] * middles.shape[1], 1))  # columns per comparison: a few MB of booleans
    return np.concatenate([np.sum(values[:, start : start + step, None] > middles[:, None, :], axis=2)
                           for start in range(0, values.shape[1], step)], axis=1)


def compensated(matrix: np.ndarray, gram: np.ndarray, centroids: np.ndarray, damp: float = 0.01, lazy: int = 128, *,
                act_order: bool = True) -> np.ndarray:
    """GPTQ on a given grid: ``matrix`` [outputs, inputs] rounded column by column to the nearest of each
    row's ``centroids`` [outputs or 1, levels], each column's error spread over the columns not yet
    rounded through the Cholesky factor of the inverse of ``gram`` (the layer's input XᵀX), so that
    ``X @ matrix.T`` moves least. With ``act_order`` the columns go largest input energy first (the
    Gram diagonal). Returns the rounded matrix (every value one of its row's centroids)."""
    order = np.argsort(-np.diag(gram), kind="stable") if act_order else np.arange(len(gram))
    w = matrix[:, order].astype(np.float64)
    h = gram[np.ix_(order, order)].astype(np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    u = upper_cholesky_of_inverse(h)
    rows = np.broadcast_to(centroids, (len(w), centroids.shape[1]))
    for start in range(0, w.shape[1], lazy):
        end = min(start + lazy, w.shape[1])
        chunk = w[:, start:end].copy()
        errors = np.zeros_like(chunk)
        for i in range(end - start):
            rounded = np.take_along_axis(rows, nearest_rows(chunk[:, i, None], rows), axis=1)[:, 0]
            error = (chunk[:, i] - rounded) / u[start + i, start + i]
            chunk[:, i:] -= np.outer(error, u[start + i, start + i : end])
            chunk[:, i] = rounded
            errors[:, i] = error
        w[:, start:end] = chunk
        w[:, end:] -= errors @ u[start:end, end:]
    restored = np.empty_like(w)
    restored[:, order] = w
    return restored


def kmeans(values: np.ndarray, levels: int, importance: np.ndarray | None = None, *, iterations: int = 30,
           keep_zero: bool = True) -> Codebook:
    """``levels`` centroids for ``values`` (any shape; indices come back in that shape) by Lloyd's
    algorithm in one dimension, started at the (importance-weighted) quantiles of the values.

    With ``keep_zero`` and exact zeros among the values (pruned weights), one centroid is fixed at
    0.0, so that a zero stays exactly zero. Fewer distinct values than levels: each is its own centroid."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    distinct = np.unique(flat)
    if len(distinct) <= levels:
        return Codebook(distinct.astype(np.float32), np.searchsorted(distinct, flat).astype(np.uint8).reshape(np.shape(values)))
    del distinct
    fixed_zero = keep_zero and bool(np.any(flat == 0))
    # In one dimension a cluster is a run of the sorted values: sorted once, each Lloyd step finds its
    # runs' ends among them (a search per centroid, not one per value: MiniLM's 256-level books spent
    # 51 s in those) and sums each run in place. Memory: the order and the sorted values (16 bytes per
    # value), and without importance nothing else of that size (MiniLM's table has 11.7 M values).
    order = np.argsort(flat, kind="stable")
    padded = np.empty(len(flat) + 1)  # a zero after the values lets a trailing empty run start past them
    ordered = padded[:-1]
    np.take(flat, order, out=ordered)
    padded[-1] = 0.0
    del flat
    if importance is None:
        weights = weighted = None
        targets = (np.arange(levels) + 0.5) / levels * float(len(ordered))  # the quantiles: equal shares of the values
        first = np.ceil(targets).astype(np.int64) - 1
    else:
        weight = np.broadcast_to(np.asarray(importance, dtype=np.float64), np.shape(values)).reshape(-1)[order]
        weights = np.maximum(weight, 1e-12 * max(float(weight.max(initial=0.0)), 1e-30))  # no weight ignored outright
        del weight
        cumulative = np.cumsum(weights)
        targets = (np.arange(levels) + 0.5) / levels * cumulative[-1]  # the quantiles: equal shares of the weight
        first = np.searchsorted(cumulative, targets)
        del cumulative
        weighted, weights = np.append(weights * ordered, 0.0), np.append(weights, 0.0)
    centroids = ordered[np.minimum(first, len(ordered) - 1)]
    if fixed_zero:
        centroids = _with_zero(centroids)
    ends = None
    for _ in range(iterations):
        found = _run_ends(ordered, centroids)
        if ends is not None and np.array_equal(found, ends):
            break
        ends = found
        starts = np.concatenate([[0], ends[:-1]])
        filled = ends > starts
        if weights is None or weighted is None:
            counts = (ends - starts).astype(np.float64)
            sums = np.add.reduceat(padded, starts)
        else:
            counts = np.add.reduceat(weights, starts)
            sums = np.add.reduceat(weighted, starts)
        centroids = np.where(filled, sums / np.where(filled, counts, 1.0), centroids)
        if fixed_zero:
            centroids = _with_zero(centroids)
        centroids = np.sort(centroids)
    runs = np.diff(_run_ends(ordered, centroids), prepend=0)
    indices = np.empty(len(ordered), dtype=np.uint8)
    indices[order] = np.repeat(np.arange(levels, dtype=np.uint8), runs)
    return Codebook(centroids.astype(np.float32), indices.reshape(np.shape(values)))


def _run_ends(ordered: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Where each centroid's run of the sorted values ends: a value on a midpoint goes to the lower
    centroid, as :func:`nearest_rows` puts it."""
    return np.append(np.searchsorted(ordered, (centroids[1:] + centroids[:-1]) / 2, side="right"), len(ordered))


def _with_zero(centroids: np.ndarray) -> np.ndarray:
    """The centroids with the one nearest zero moved to exactly zero."""
    moved = centroids.copy()
    moved[np.argmin(np.abs(moved))] = 0.0
    return np.sort(moved)
