"""Input sources: where the feeds come from that validation (and calibration) run the model on.

A source yields feed dicts ``{input name: array}``. It can be ``.npz`` files, a folder of them, any
iterable of feed dicts (onnxruntime's ``CalibrationDataReader`` too), or seeded synthetic data built
from the graph's input types.
"""

from __future__ import annotations

import functools
import hashlib
import numbers
import os
import re
import tokenize
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import numpy as np
import onnx
from onnx import helper

from .errors import InputDataError
from .graph import constant_value, to_gs
from .limits import (
    DEFAULT_MAX_INPUT_BYTES,
    DEFAULT_SYNTHETIC_SAMPLES,
    HELD_OUT_FRACTION,
    HELD_OUT_MAX_SAMPLES,
    HELD_OUT_RUN,
    array_bytes,
    format_bytes,
)
from .text import did_you_mean

Feed = dict[str, np.ndarray]

DEFAULT_BATCH = 1
DEFAULT_DYNAMIC_DIM = 32
DEFAULT_INT_RANGE = (0, 100)


@runtime_checkable
class InputSource(Protocol):
    """Anything that can yield feeds, again and again, and say where they come from."""

    def feeds(self) -> Iterator[Feed]: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class ModelInput:
    """A graph input the caller must feed (initializer-backed inputs are optional and left out)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


def model_inputs(model: onnx.ModelProto) -> list[ModelInput]:
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise InputDataError(f"input '{value.name}' is not a tensor; only tensor inputs are supported")
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
        )
        inputs.append(ModelInput(value.name, helper.tensor_dtype_to_np_dtype(tensor_type.elem_type), dims))
    return inputs


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NpzInputs:
    """One feed per ``.npz`` file (its keys are the input names), or per ``.npy`` file for a model
    with a single input.

    A file is refused from its headers, before anything is inflated or allocated, when it would
    unpack to more than ``max_bytes`` (see limits.py); an input holding NaN/Inf is refused when read.
    ``inputs`` names the model's inputs (None: every float array is checked for NaN/Inf)."""

    paths: tuple[Path, ...]
    single_input: str | None = None
    max_bytes: int = DEFAULT_MAX_INPUT_BYTES
    inputs: tuple[str, ...] | None = None
    # Feeds already read, kept (read-only) up to KEPT_FEED_BYTES in all: passes go over their
    # calibration data many times (qdq read MobileNetV2's 231 MB file 55 times), and each read
    # inflated, CRC-checked and scanned it for NaN again. Past the budget, files are read each time.
    _kept: dict[Path, Feed] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        for path in self.paths:  # refuse an oversized file before the run starts, not in a pass
            _check_declared_size(path, self.max_bytes)

    def feeds(self) -> Iterator[Feed]:
        for path in self.paths:
            kept = self._kept.get(path)
            yield kept if kept is not None else self._read_and_keep(path)

    def _read_and_keep(self, path: Path) -> Feed:
        feed = self._read(path)
        held = sum(array.nbytes for kept in self._kept.values() for array in kept.values())
        size = sum(np.asarray(array).nbytes for array in feed.values())
        if held + size <= KEPT_FEED_BYTES:
            for array in feed.values():
                if isinstance(array, np.ndarray):
                    array.flags.writeable = False  # shared by every later pass over the data
            self._kept[path] = feed
        return feed

    def _read(self, path: Path) -> Feed:
        _check_declared_size(path, self.max_bytes)
        try:
            loaded = np.load(path, allow_pickle=False)
        except _UNREADABLE as error:
            raise InputDataError(f"{path}: cannot be read as .npz or .npy ({' '.join(str(error).split())})") from error
        if isinstance(loaded, np.ndarray):
            if self.single_input is None:
                raise InputDataError(f"{path}: a .npy holds one array; this model has several inputs: use .npz with one key per input")
            feed = {self.single_input: loaded}
        else:
            try:
                with loaded as archive:
                    feed = {key: archive[key] for key in archive.files}
            except _UNREADABLE as error:
                raise InputDataError(f"{path}: cannot be read as .npz ({' '.join(str(error).split())})") from error
        for name, array in feed.items():
            if self.inputs is None or name in self.inputs:
                _check_finite(array, f"{path}: input '{name}'")
        return feed

    def describe(self) -> str:
        return f"{len(self.paths)} .npz file(s)" if len(self.paths) != 1 else str(self.paths[0])


# What NpzInputs keeps of the files it has read, in all (see NpzInputs._kept).
KEPT_FEED_BYTES = 1 << 30


# What numpy and zipfile raise on a damaged or hostile file (zlib.error: a corrupt deflate stream;
# NotImplementedError: an unknown compression method; RuntimeError: an encrypted member;
# TokenError and SyntaxError: an .npy header that is not a Python literal, from numpy's parser).
_UNREADABLE = (OSError, ValueError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError, zlib.error, tokenize.TokenError, SyntaxError)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _check_declared_size(path: Path, budget: int) -> None:
    """Refuse a .npz/.npy from its headers alone: what its zip members inflate to (zip's own
    ``file_size``, which zipfile never reads past) and what each array header declares (numpy
    allocates that before reading a byte) must agree and fit the budget."""
    try:
        with open(path, "rb") as stream:
            magic = stream.read(len(np.lib.format.MAGIC_PREFIX))
            if magic.startswith(_ZIP_MAGIC):
                _check_archive(path, budget)
            elif magic == np.lib.format.MAGIC_PREFIX:
                stream.seek(0)
                _check_npy(stream, path.stat().st_size, str(path), budget)
            # anything else: np.load refuses it (allow_pickle=False), with its own message
    except _UNREADABLE as error:
        raise InputDataError(f"{path}: cannot be read as .npz or .npy ({' '.join(str(error).split())})") from error


def _check_archive(path: Path, budget: int) -> None:
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        inflated = sum(member.file_size for member in members)
        if inflated > budget:
            raise InputDataError(
                f"{path}: its arrays inflate to {format_bytes(inflated)} (from {format_bytes(path.stat().st_size)} on disk), "
                f"over the {format_bytes(budget)} input budget; refused before inflating (raise --max-input-bytes if that is intended)"
            )
        for member in members:
            _check_inflation(path, member, budget)
            with archive.open(member) as stream:  # inflates the header only
                if stream.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
                    continue  # not an array: numpy hands it over as bytes, bounded by file_size
                stream.seek(0)
                _check_npy(stream, member.file_size, f"{path}: member '{member.filename}'", budget)


# Real arrays deflate a few times at most (images, activations, token ids: 1-10x); deflate's ceiling
# is about 1030x, reached only by constant data. A member inflating beyond this ratio and past a
# sixteenth of the budget (256 MiB by default) is taken for a zip bomb: the 4 MB .npz
# inflating to 4 GB fits a 4 GiB budget but not this. Raising the budget raises the floor with it.
ZIP_BOMB_RATIO = 100


def _check_inflation(path: Path, member: zipfile.ZipInfo, budget: int) -> None:
    ratio = member.file_size / max(member.compress_size, 1)
    if member.file_size > budget // 16 and ratio > ZIP_BOMB_RATIO:
        raise InputDataError(
            f"{path}: member '{member.filename}' inflates {ratio:.0f} times, from {format_bytes(member.compress_size)} to "
            f"{format_bytes(member.file_size)}: a zip bomb or constant data; refused before inflating "
            "(raise --max-input-bytes to read it)"
        )


def _check_npy(stream: IO[bytes], stored_bytes: int, label: str, budget: int) -> None:
    """An .npy header's shape and dtype against the budget and against the bytes stored after it."""
    shape, dtype = _npy_header(stream, label)
    declared = array_bytes(shape, dtype)
    if declared > budget:
        raise InputDataError(
            f"{label} declares an array of shape {list(shape)} {dtype} ({format_bytes(declared)}), over the "
            f"{format_bytes(budget)} input budget; refused before reading (raise --max-input-bytes if that is intended)"
        )
    held = stored_bytes - stream.tell()
    if dtype.hasobject or held != declared:
        raise InputDataError(f"{label} declares an array of shape {list(shape)} {dtype} ({declared:,} bytes) but holds {held:,} bytes")


def _npy_header(stream: IO[bytes], label: str) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise InputDataError(f"{label}: .npy format version {version} is not supported (1.0 and 2.0 are)")
    return tuple(shape), np.dtype(dtype)


def _check_finite(array: np.ndarray, origin: str) -> None:
    """NaN/Inf in an input makes the reference meaningless and the comparison pass or fail at random."""
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating)):
        return
    # A NaN or an Inf anywhere makes the sum non-finite, and a float64 sum of float32 values cannot
    # overflow: a finite sum proves every value finite without a boolean copy of the array (passes
    # that read the calibration feeds once per layer check them each time).
    with np.errstate(over="ignore", invalid="ignore"):
        total = array.sum(dtype=np.complex128 if np.iscomplexobj(array) else np.float64)
    if np.isfinite(total):
        return
    finite = np.isfinite(array)
    if finite.all():  # the sum overflowed: every value is finite all the same
        return
    bad = np.argwhere(~finite)
    where = f", first at index {tuple(int(i) for i in bad[0])}" if array.ndim else ""
    raise InputDataError(f"{origin} holds {len(bad):,} NaN/Inf value(s){where}; give finite inputs")


@dataclass
class IterableInputs:
    """Feeds from any iterable of dicts, or from an object with ``get_next()`` (CalibrationDataReader).

    Such sources are often single-use, so the feeds are kept after the first pass over them.
    """

    source: Any
    # the feeds were checked against the model already (collect_feeds: names, dtypes, shapes, finite)
    checked: bool = False
    _kept: list[Feed] | None = field(default=None, repr=False)

    def feeds(self) -> Iterator[Feed]:
        if self._kept is None:
            self._kept = [dict(feed) for feed in _drain(self.source)]
        return iter(self._kept)

    def describe(self) -> str:
        return f"{type(self.source).__name__} ({len(self._kept) if self._kept is not None else '?'} feeds)"


def _drain(source: Any) -> Iterator[Mapping[str, np.ndarray]]:
    if hasattr(source, "get_next"):
        while (feed := source.get_next()) is not None:
            yield feed
        if hasattr(source, "rewind"):
            source.rewind()
        return
    if isinstance(source, Mapping):
        yield source
        return
    yield from source


@dataclass(frozen=True)
class SyntheticInputs:
    """Seeded random feeds built from the graph's input types.

    Dynamic dims take ``dims[name]`` (by dim_param), else 1 on axis 0 (the batch) and 32 elsewhere.
    Where axis 0 counts samples (:func:`sample_axis`) the samples come as one feed, stacked along it.
    Floats are standard normal; integers uniform in ``int_range``, narrowed to the table size when
    the input indexes a constant embedding table through Gather (token ids); booleans are coin flips.
    A feed that would take more than ``max_bytes`` is refused before any is made.
    """

    model: onnx.ModelProto
    samples: int = DEFAULT_SYNTHETIC_SAMPLES
    seed: int = 0
    dims: Mapping[str, int] = field(default_factory=dict)
    int_range: tuple[int, int] | None = None
    max_bytes: int = DEFAULT_MAX_INPUT_BYTES

    def __post_init__(self) -> None:
        # numpy refuses a negative seed only when the first feed is drawn, as a bare ValueError
        if not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise InputDataError(f"--seed: {self.seed!r} is not a non-negative integer")

    def feeds(self) -> Iterator[Feed]:
        inputs = model_inputs(self.model)
        self._check_feed_size(inputs)
        rng = np.random.default_rng(self.seed)
        int_bounds = {i.name: self._int_bounds(i.name) for i in inputs if np.issubdtype(i.dtype, np.integer)}
        drawn = ({i.name: self._sample(rng, i, int_bounds.get(i.name)) for i in inputs} for _ in range(self.samples))
        if self.samples > 1 and sample_axis(self.model):
            # One feed of every sample stacked along the batch axis: one run of a batch of 16 instead of
            # 16 runs of one (the 168 MB transformer's reference outputs: 0.5 -> 0.2 s). A scalar input is
            # part of every sample: the first draw's.
            samples = list(drawn)
            yield {name: np.concatenate([s[name] for s in samples]) if np.ndim(value) else value for name, value in samples[0].items()}
            return
        yield from drawn

    def describe(self) -> str:
        return f"{self.samples} synthetic sample(s), seed {self.seed}"

    def resolved_shape(self, model_input: ModelInput) -> tuple[int, ...]:
        shape = []
        for axis, dim in enumerate(model_input.shape):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            elif isinstance(dim, str) and dim in self.dims:
                shape.append(int(self.dims[dim]))
            else:
                shape.append(DEFAULT_BATCH if axis == 0 else DEFAULT_DYNAMIC_DIM)
        return tuple(shape)

    def _check_feed_size(self, inputs: list[ModelInput]) -> None:
        """Declared dims (2^31 in the file) and --dims (batch=100000000) are sized before numpy
        allocates them; a float input is first drawn as float64, so it counts 8 bytes an element."""
        sizes = {i.name: (self.resolved_shape(i), array_bytes(self.resolved_shape(i), _drawn_dtype(i.dtype))) for i in inputs}
        total = sum(size for _, size in sizes.values())
        if total > self.max_bytes:
            name, (shape, size) = max(sizes.items(), key=lambda item: item[1][1])
            raise InputDataError(
                f"synthetic inputs: one feed would take {format_bytes(total)} (input '{name}' of shape {list(shape)}: "
                f"{format_bytes(size)}), over the {format_bytes(self.max_bytes)} input budget; set smaller --dims "
                "or raise --max-input-bytes"
            )

    def _sample(self, rng: np.random.Generator, model_input: ModelInput, bounds: tuple[int, int] | None) -> np.ndarray:
        shape = self.resolved_shape(model_input)
        if np.issubdtype(model_input.dtype, np.floating):
            return rng.standard_normal(shape).astype(model_input.dtype)
        if model_input.dtype == np.bool_:
            return rng.random(shape) < 0.5
        if np.issubdtype(model_input.dtype, np.integer):
            low, high = bounds or DEFAULT_INT_RANGE
            return rng.integers(low, high, size=shape).astype(model_input.dtype)
        raise InputDataError(f"input '{model_input.name}' has dtype {model_input.dtype}; give inputs for it")

    def _int_bounds(self, name: str) -> tuple[int, int]:
        if self.int_range is not None:
            return self.int_range
        table_rows = _gather_table_rows(self.model, name)
        return (0, table_rows) if table_rows else DEFAULT_INT_RANGE


def _drawn_dtype(dtype: np.dtype) -> np.dtype:
    """What numpy draws a synthetic input in before it is cast to the input's type."""
    return np.dtype(np.float64) if np.issubdtype(dtype, np.floating) else np.dtype(np.int64) if np.issubdtype(dtype, np.integer) else np.dtype(dtype)


def _gather_table_rows(model: onnx.ModelProto, input_name: str) -> int | None:
    """Rows of the smallest constant table that ``input_name`` indexes through Gather, if any."""
    graph = to_gs(model)
    tensor = graph.tensors().get(input_name)
    rows = []
    for node in tensor.outputs if tensor is not None else []:
        if node.op == "Gather" and len(node.inputs) > 1 and node.inputs[1] is tensor:
            table = constant_value(node.inputs[0])
            if table is not None and table.ndim >= 1 and node.attrs.get("axis", 0) == 0:
                rows.append(int(table.shape[0]))
    return min(rows) if rows else None


@dataclass(frozen=True)
class FirstSamples:
    """The first ``count`` samples of another source, cutting a batched feed along axis 0 where
    its inputs share a batch size (a feed of 80 images counts as 80 samples, not one). For a model
    without a sample axis (``batched`` False, see :func:`sample_axis`) a feed is one sample, never cut."""

    source: InputSource
    count: int
    batched: bool = True

    def feeds(self) -> Iterator[Feed]:
        remaining = self.count
        for feed in self.source.feeds():
            if remaining <= 0:
                return
            size = samples_in(feed) if self.batched else 1
            if size > remaining:
                # only arrays with a row per sample: a scalar or a file's extra table passes on whole
                feed = {name: _rows(value, slice(0, remaining), size) for name, value in feed.items()}
                size = remaining
            remaining -= size
            yield feed

    def describe(self) -> str:
        return f"the first {self.count} samples of {self.source.describe()}"


@dataclass(frozen=True)
class SpreadSamples:
    """``count`` samples evenly spaced over all of another source's, cut out of its batched feeds.

    Calibration files list several views of one photo side by side: the first 16 samples can be two
    photos, 16 spread ones are 16 photos. ``others`` yields every sample but those: data to fit on
    whose fit the spread samples then judge out of sample. The source is counted on first use."""

    source: InputSource
    count: int
    others: bool = False
    batched: bool = True  # axis 0 counts samples (see sample_axis); else a feed is one sample, never cut

    @functools.cached_property
    def _sizes(self) -> list[int]:
        """Samples per feed of the source, counted once: a scan asks for the feeds once per trial."""
        return [samples_in(feed) if self.batched else 1 for feed in self.source.feeds()]

    @property
    def total(self) -> int:
        """How many samples this yields."""
        everything = sum(self._sizes)
        spread = min(self.count, everything)
        return everything - spread if self.others else spread

    def feeds(self) -> Iterator[Feed]:
        total = sum(self._sizes)
        spread = np.unique(np.linspace(0, total - 1, min(self.count, total)).round().astype(np.int64))
        wanted = np.setdiff1d(np.arange(total), spread) if self.others else spread
        yield from select_samples(self.source.feeds(), self._sizes, wanted)

    def describe(self) -> str:
        return f"{'all but ' if self.others else ''}{self.count} samples spread over {self.source.describe()}"


def select_samples(feeds: Iterable[Feed], sizes: Sequence[int], wanted: np.ndarray) -> Iterator[Feed]:
    """The samples numbered ``wanted`` (sorted, counted across feeds whose sample counts are
    ``sizes``), cut out of the feeds along axis 0; a feed wanted whole is passed on as it is. Only
    arrays with one row per sample are cut: a scalar input or a file's extra key (a version number,
    a table of class names) is passed on whole."""
    start = 0
    for feed, size in zip(feeds, sizes):
        picked = wanted[(wanted >= start) & (wanted < start + size)] - start
        start += size
        if len(picked) == size:
            yield feed
        elif len(picked):
            ranges = _consecutive_ranges(picked)
            if all((stop - begin) % RUN_SAMPLES == 0 for begin, stop in ranges[:-1]):
                # Views, not copies (a held-out split's ranges are runs of RUN_SAMPLES): the runs a pass
                # cuts them into are those it cut from one copied feed, and a pass that reads the data
                # once per layer no longer copies it each time (MobileNetV2's qdq: 2.8 s of 12).
                for begin, stop in ranges:
                    yield {name: _rows(value, slice(begin, stop), size) for name, value in feed.items()}
            else:
                yield {name: _rows(value, picked, size) for name, value in feed.items()}


def _consecutive_ranges(picked: np.ndarray) -> list[tuple[int, int]]:
    """Sorted sample numbers as [begin, stop) ranges of consecutive ones."""
    breaks = np.flatnonzero(np.diff(picked) != 1) + 1
    return [(int(part[0]), int(part[-1]) + 1) for part in np.split(picked, breaks)]


def _rows(value: Any, picked: np.ndarray | slice, size: int) -> Any:
    array = np.asarray(value)
    return array[picked] if array.ndim and array.shape[0] == size else value


@dataclass(frozen=True)
class SelectedSamples:
    """The samples of another source numbered ``indices`` (counted across its feeds, see
    :func:`samples_in`): one side of a split. ``sizes`` are the source's samples per feed."""

    source: InputSource
    indices: tuple[int, ...]
    sizes: tuple[int, ...]
    label: str

    def feeds(self) -> Iterator[Feed]:
        yield from select_samples(self.source.feeds(), self.sizes, np.asarray(self.indices, dtype=np.int64))

    def describe(self) -> str:
        return self.label


# ---------------------------------------------------------------------------------------------
# held out by construction: content hashes and the calibration split
# ---------------------------------------------------------------------------------------------


def sample_digests(source: InputSource, names: Sequence[str], batched: bool, *, hashed: bool = True) -> tuple[list[bytes], list[int]]:
    """A content hash per sample of ``source`` over the model's inputs ``names`` (other keys, such as
    labels, are not part of a sample), read once and streamed (none when not ``hashed``), and its
    samples per feed. A feed is cut along axis 0 where the model has a sample axis (``batched``, see
    :func:`sample_axis`) and the feed's inputs of rank 1 or more agree on its length; a scalar input
    is part of every sample; otherwise the feed is one sample."""
    digests: list[bytes] = []
    sizes: list[int] = []
    for feed in source.feeds():
        arrays = {name: np.asarray(feed[name]) for name in names if name in feed}
        lengths = {a.shape[0] for a in arrays.values() if a.ndim}
        cut = batched and len(lengths) == 1
        count = lengths.pop() if cut else 1
        sizes.append(count)
        if not hashed:
            continue
        for index in range(count):
            digest = hashlib.blake2b(digest_size=16)
            for name in sorted(arrays):
                value = np.ascontiguousarray(arrays[name][index] if cut and arrays[name].ndim else arrays[name])
                digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
                digest.update(value.tobytes())
            digests.append(digest.digest())
    return digests, sizes


# A dynamic axis 0 named like time is a sequence, not a pile of samples: cutting it would cut a sentence
# or a clip into pieces.
TIME_DIM_NAME = re.compile(r"(?i)(seq|time|len|frame|step|token|sample_rate|^t$)")


def sample_axis(model: onnx.ModelProto) -> bool:
    """Whether axis 0 of the model's inputs counts samples: every input of rank 1 or more has a
    dynamic axis 0, all with one name or none, and that axis is the batch: unnamed (skl2onnx writes
    none), or named by any exporter's convention ('batch', 'N', tf2onnx's 'unk__3', paddle2onnx's
    'p2o.DynamicDimension.0') unless the name says time ('seq_len') or another axis is named as the
    batch (a time-major [seq, batch, features] input). A scalar input (a sample rate) is no obstacle."""
    shapes = [i.shape for i in model_inputs(model) if i.shape]
    firsts = [shape[0] for shape in shapes]
    if not firsts or any(isinstance(d, int) and d > 0 for d in firsts):
        return False
    names = {d for d in firsts if isinstance(d, str) and d}
    if len(names) > 1:
        return False
    name = names.pop() if names else ""
    if BATCH_DIM_NAME.match(name) or not name:
        return True
    batch_elsewhere = any(isinstance(d, str) and BATCH_DIM_NAME.match(d) for shape in shapes for d in shape[1:])
    return not TIME_DIM_NAME.search(name) and not batch_elsewhere


@dataclass(frozen=True)
class Split:
    """Calibration samples cut in two: ``fit`` for the passes, ``held_out`` for validation."""

    fit: SelectedSamples
    held_out: SelectedSamples


def held_out_split(source: InputSource, sizes: Sequence[int], seed: int = 0) -> Split:
    """Hold out a seeded :data:`HELD_OUT_FRACTION` of the samples (at most
    :data:`HELD_OUT_MAX_SAMPLES`, at least one), in runs of consecutive samples (:data:`HELD_OUT_RUN`,
    shorter for small sets); every other sample is left to fit on. Needs two samples at least."""
    total = sum(sizes)
    if total < 2:
        raise InputDataError(f"{source.describe()}: {total} calibration sample(s) cannot be split into data to fit on and data to "
                             "validate on; give more, or validation inputs of your own (--inputs)")
    wanted = min(HELD_OUT_MAX_SAMPLES, max(1, round(total * HELD_OUT_FRACTION)))
    run = max(1, min(HELD_OUT_RUN, total // 16))
    held = held_out_runs(total, run, -(-wanted // run), seed)[:wanted]
    if len(held) >= total:
        held = held[: total - 1]
    fit = np.setdiff1d(np.arange(total), held)
    origin = source.describe()
    return Split(
        fit=SelectedSamples(source, tuple(fit.tolist()), tuple(sizes), f"{len(fit)} of the {total} samples of {origin} (the rest held out)"),
        held_out=SelectedSamples(source, tuple(held.tolist()), tuple(sizes),
                                 f"{len(held)} of the {total} samples of {origin}, held out of calibration (runs of {run}, seed {seed})"),
    )


def held_out_runs(total: int, run: int, count: int, seed: int) -> np.ndarray:
    """The sorted indices of ``count`` runs of ``run`` consecutive samples out of ``total``, picked
    by a seeded permutation: neighbouring samples (views or frames of one thing) go to one side."""
    starts = np.sort(np.random.default_rng(seed).permutation(np.arange(0, total, run))[:count])
    return np.concatenate([np.arange(start, min(start + run, total)) for start in starts]) if len(starts) else np.zeros(0, np.int64)


# Samples per onnxruntime run: activation memory grows with the batch. A calibration file of 384
# images run as one batch with every activation exposed took 11.6 GB; in runs of 16 it fits in one.
RUN_SAMPLES = 16


# Names exporters give a batch axis: torch's dynamic_axes convention, transformers' "batch_size",
# "N", and tf2onnx's "unk__<n>" (Keras puts the batch first, always). A dynamic axis 0 named
# otherwise may be time (a time-major LSTM's [seq, batch, features]) and is never cut.
BATCH_DIM_NAME = re.compile(r"(?i)^(n|b|bs|batch\w*|\w*_batch|unk__\d+)$")


def batch_dim(shapes: Iterable[Sequence[int | str | None]]) -> str | None:
    """The dim name every input has on axis 0, when it names a batch (see BATCH_DIM_NAME); else None."""
    firsts = {shape[0] if len(shape) else None for shape in shapes}
    name = firsts.pop() if len(firsts) == 1 else None
    return name if isinstance(name, str) and BATCH_DIM_NAME.match(name) else None


def in_chunks(feed: Feed, batched: bool, size: int = RUN_SAMPLES) -> Iterator[Feed]:
    """``feed`` cut along axis 0 into runs of at most ``size`` samples where the model is ``batched``
    (its inputs share a :func:`batch_dim`) and the feed's arrays share that axis; else ``feed`` whole."""
    total = samples_in(feed)
    if not batched or total <= size:
        yield feed
        return
    for start in range(0, total, size):
        yield {name: value[start:start + size] for name, value in feed.items()}


def samples_in(feed: Mapping[str, Any]) -> int:
    """How many samples a feed holds: the batch size its arrays of rank 1 or more share on axis 0
    (a scalar is part of every sample), else 1."""
    sizes = {np.asarray(v).shape[0] for v in feed.values() if np.asarray(v).ndim}
    return sizes.pop() if len(sizes) == 1 else 1


# ---------------------------------------------------------------------------------------------
# resolving what the user gave
# ---------------------------------------------------------------------------------------------

InputSpec = str | os.PathLike[str] | Iterable[Mapping[str, np.ndarray]] | InputSource | None


def resolve_inputs(
    spec: InputSpec | Iterable[InputSpec],
    model: onnx.ModelProto,
    *,
    samples: int = DEFAULT_SYNTHETIC_SAMPLES,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    int_range: tuple[int, int] | None = None,
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
) -> InputSource:
    """Turn what the user gave (nothing, paths, a folder, an iterable, a source) into a source."""
    _check_dim_names(dims or {}, model)
    if spec is None:
        return SyntheticInputs(model, samples=samples, seed=seed, dims=dict(dims or {}), int_range=int_range, max_bytes=max_input_bytes)
    if isinstance(spec, InputSource):
        return spec
    names = [i.name for i in model_inputs(model)]
    single = names[0] if len(names) == 1 else None
    if isinstance(spec, (str, os.PathLike)):
        return NpzInputs(input_files(Path(spec)), single, max_input_bytes, tuple(names))
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(s, (str, os.PathLike)) for s in spec):
        return NpzInputs(tuple(p for s in spec for p in input_files(Path(s))), single, max_input_bytes, tuple(names))
    return IterableInputs(spec)


def _check_dim_names(dims: Mapping[str, int], model: onnx.ModelProto) -> None:
    """A dim name the model's inputs do not use is a typo, not a silent no-op."""

    known = sorted({d for i in model_inputs(model) for d in i.shape if isinstance(d, str)})
    for name in dims:
        if name not in known:
            raise InputDataError(f"--dims: the model's inputs have no dim '{name}'{did_you_mean(name, known)}; named dims: {known or 'none'}")


def input_files(path: Path) -> tuple[Path, ...]:
    """The files an input path stands for: itself, or a folder's .npz and .npy files."""
    if path.is_dir():
        found = tuple(sorted([*path.glob("*.npz"), *path.glob("*.npy")]))
        if not found:
            raise InputDataError(f"{path}: folder holds no .npz or .npy files")
        return found
    if not path.is_file():
        raise InputDataError(f"{path}: no such input file or folder")
    return (path,)


def parse_dims(text: str) -> dict[str, int]:
    """``"batch=4,seq=128"`` → ``{"batch": 4, "seq": 128}`` (the CLI's ``--dims``)."""
    dims = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        # at most 18 digits: an int64 numpy can take (the size itself is checked against the budget
        # when the synthetic feed is made), and Python refuses to parse numbers over 4300 digits
        match = re.fullmatch(r"([^=]+)=(\d{1,18})", item)
        if not match or int(match.group(2)) < 1:
            raise InputDataError(f"--dims: '{item}' is not NAME=POSITIVE_INTEGER (at most 18 digits)")
        dims[match.group(1).strip()] = int(match.group(2))
    return dims


# ---------------------------------------------------------------------------------------------
# checking feeds against the model
# ---------------------------------------------------------------------------------------------


def check_feed(feed: Mapping[str, np.ndarray], inputs: list[ModelInput], origin: str, *, extras: bool = False) -> Feed:
    """The feed restricted to the model's inputs, or an error naming the mismatch.

    Extra keys (labels stored beside the inputs) are dropped, or with ``extras`` kept as they are,
    for the user's task metric to read; a misspelt input name still fails, as the input it was meant
    for is then missing.
    """
    checked: Feed = {}
    for model_input in inputs:
        if model_input.name not in feed:
            raise InputDataError(
                f"{origin}: input '{model_input.name}' is missing (it has {sorted(feed)}; the model needs {[i.name for i in inputs]})"
            )
        array = np.asarray(feed[model_input.name])
        if array.dtype != model_input.dtype:
            raise InputDataError(
                f"{origin}: input '{model_input.name}' has dtype {array.dtype}, the model expects {model_input.dtype}"
            )
        if array.ndim != len(model_input.shape) or any(
            isinstance(d, int) and d > 0 and d != n for d, n in zip(model_input.shape, array.shape)
        ):
            expected = tuple(d if isinstance(d, int) and d > 0 else (d or "?") for d in model_input.shape)
            raise InputDataError(
                f"{origin}: input '{model_input.name}' has shape {array.shape}, the model expects {expected}"
            )
        _check_finite(array, f"{origin}: input '{model_input.name}'")
        checked[model_input.name] = array
    if extras:
        checked.update({name: np.asarray(value) for name, value in feed.items() if name not in checked})
    return checked


def collect_feeds(source: InputSource, model: onnx.ModelProto, *, limit: int | None = None, extras: bool = False) -> list[Feed]:
    """All feeds of a source (up to ``limit``), each checked against the model's inputs (``extras``:
    with the arrays stored beside them, such as labels, for a task metric; see :func:`check_feed`)."""
    inputs = model_inputs(model)
    collected = []
    for index, feed in enumerate(source.feeds()):
        if limit is not None and index >= limit:
            break
        collected.append(check_feed(feed, inputs, f"{source.describe()}, feed {index}", extras=extras))
    if not collected:
        raise InputDataError(f"{source.describe()}: yielded no feeds")
    return collected


def read_once(source: InputSource, model: onnx.ModelProto, *, limit: int | None = None) -> IterableInputs:
    """The source's first ``limit`` samples (all: None) held in memory, for a pass that goes over them
    once per layer: a calibration file is then read and checked once, not at every layer."""
    return IterableInputs(collect_feeds(first_samples(source, model, limit), model), checked=True)


def first_samples(source: InputSource, model: onnx.ModelProto, limit: int | None) -> InputSource:
    """The first ``limit`` samples of ``source`` as ``model`` counts them (the source itself: None)."""
    return source if limit is None else FirstSamples(source, limit, sample_axis(model))


def samples_read(source: InputSource, model: onnx.ModelProto, limit: int | None) -> int:
    """How many samples a pass over the first ``limit`` of ``source`` reads, as ``model`` counts them."""
    batched = sample_axis(model)
    return sum(samples_in(feed) if batched else 1 for feed in first_samples(source, model, limit).feeds())
