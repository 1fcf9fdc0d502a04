"""How much data a run takes: the byte budget of what it unpacks, and how many samples it validates on.

The byte budget: how much a run may unpack from what it reads before it commits memory to it.

A file can declare far more than it holds: an ``.npz`` member header declaring 2^40 elements, a zip
member inflating a thousand times, a ``sparse_initializer`` of a few values with dims of 2^40, a graph
input whose synthetic feed would take 47 GiB. numpy allocates what is declared before it reads a
byte, and a ``MemoryError`` (or the machine swapping for minutes) is no answer to a user's file. So
declared sizes are checked against this budget first, and refused with the file and the figure.

The default, 4 GiB, is twice protobuf's 2 GiB cap on a model held in one message, and about 17 times
the largest input this project has measured (a calibration file of 384 images of 3x224x224 float32 is
0.23 GB), so no real input comes near it; it still fits beside a model on a 16 GB machine. A user with
bigger inputs raises it (``--max-input-bytes``, or ``max_input_bytes=`` from Python).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import numpy as np

DEFAULT_MAX_INPUT_BYTES = 4 * 2**30

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


# Synthetic samples validated on by default: with 4 a top-1 agreement can only read 0, .25, .5, .75 or 1;
# 16 moves in steps of 1/16 and keeps a run short. Synthetic data only smoke-tests: real data gives a verdict meaning.
DEFAULT_SYNTHETIC_SAMPLES = 16

# The share of the calibration samples held out for validation when the user gives no --inputs, and
# its cap. 128 held-out samples know a top-1 agreement near 0.95 to about +-0.04 (95% Wilson
# interval); more costs validation time and memory (the reference outputs are kept) for little.
HELD_OUT_FRACTION = 0.25
HELD_OUT_MAX_SAMPLES = 128
# Held-out samples are taken in runs of consecutive ones: calibration files keep related samples
# together (8 views of one photo, frames of one clip, a sentence and its paraphrase), and a split
# sample by sample would validate on near-copies of what the passes fitted.
HELD_OUT_RUN = 16



def format_bytes(count: int) -> str:
    """``4294967296`` -> ``"4.0 GiB"``: binary units, as the budget is set in them."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def parse_bytes(text: str) -> int:
    """``"4G"``, ``"512M"``, ``"1000000"`` -> bytes (binary units; a trailing ``iB``/``B`` is accepted).

    Raises ValueError for anything else, including zero and negative sizes.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"'{text}' is not a size such as 4G, 512M or 1000000")
    count = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if count <= 0:
        raise ValueError(f"'{text}' is not a positive size")
    return count


def elements_of(dims: Iterable[int]) -> int:
    """Elements a shape declares, in Python integers (numpy's int64 product wraps around silently)."""
    return math.prod(int(d) for d in dims)


def array_bytes(dims: Iterable[int], dtype: np.dtype | type) -> int:
    """Bytes an array of this shape and dtype takes once allocated."""
    return elements_of(dims) * np.dtype(dtype).itemsize


# Sparse tensors stay in a model's protobuf message (the onnx checker cannot read them from external
# data). In a model whose weights are external, sparse-encode spends at most this much of the message
# on them: every copy a run makes of a message (check, session, save) costs memory its size.
SPARSE_MESSAGE_BYTES = 256 * 2**20

# The weights of the models whose onnxruntime sessions a run keeps for reuse (runtime.Runtime): a model
# asked for again (the original, a trial that becomes the result, the model a step starts from) is not
# loaded again. A model of more than half this is never kept: it never holds memory past its use, so
# a big model's peak memory stays what it was. Measured: with 256 MiB (128 per model) the int8
# candidate of a 168 MB model (42 MB) stayed held while the original was timed, and qdq{mode=dynamic}
# peaked at 2.17x the model's size instead of 1.97x; MobileNetV2 (14 MB) and the bundled models fit.
SESSION_CACHE_BYTES = 64 * 2**20

# Calibration samples a pass reads by default (its ``calibration_samples`` option): the first ones, as
# many as a model counts (a feed of 384 images is 384 samples; a feed of a model without a sample axis
# is one). NNCF reads 300 by default, onnxruntime's quantizer all it is given; the benchmark's sets
# hold 50-384, read whole either way.
CALIBRATION_SAMPLES = 512

# Validation samples a run judges each step on, at most, when the user gives validation inputs (the
# first ones; a share of the calibration data held out for validation is capped at HELD_OUT_MAX_SAMPLES
# instead). The benchmark's eval sets hold 32-96 samples; a folder of one-sample files was cut at 64
# files when this counted feeds.
VALIDATION_SAMPLES = 512
