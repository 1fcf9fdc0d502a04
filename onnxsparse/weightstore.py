"""Tensors kept outside the protobuf message: a folder per run, memory-mapped reads.

protobuf refuses to serialize, or even size, a message over 2 GB, and reading a model's external
data into its ModelProto holds every weight in memory (twice while it is parsed). So a run over a
model with external data leaves its tensors where they are:

- the store's folder takes the input's data files in (copies, made when onnxruntime or the checker
  first needs a model file: the onnx checker refuses data reached through a hard link, and both onnx
  and onnxruntime a symbolic link or a file outside the model's folder; until then, and for reads,
  the input's own files serve), and the tensors passes write are appended to one file of its own.
  A model that reads little of an input file (quantized, its big weights rewritten) gets only its
  tensors' byte ranges, at their offsets in a sparse file of the input's size; the input model
  itself, unchanged, is given out as the user's own file (:meth:`WeightStore.given_as`);
- each tensor's ``location`` names a file in the store under a name that begins with the store's
  token, so a ModelProto says where its data is with no folder travelling beside it
  (:func:`store_of`); a model keeps its store's tensors as long as the store is open;
- values are read as read-only memory maps (:func:`read_external`), so a pass that reads every
  weight costs page cache, not a copy;
- onnxruntime and the onnx checker get the model as a small file in the store (:meth:`model_file`),
  its data beside it, which is how both read models past 2 GB.

The copies cost disk, not memory. The folder is named like a staging folder (files.py), so one left
by a killed run is removed by the next run writing there (on Linux and macOS: Windows cannot tell
whether its run is alive).
"""

from __future__ import annotations

import contextlib
import gc
import io
import itertools
import logging
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from .errors import ExternalDataError, OutputPathError
from .files import WEIGHTS_PREFIX, describe_os_error, remove_stale_staging, staging_prefix
from .limits import format_bytes
from .walk import iter_all_tensors, iter_model_graphs

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

# Inline tensors from this size up are moved into the store by :meth:`WeightStore.spill`; smaller
# ones (scales, shapes, axes) stay in the message, where shape inference reads their values.
SPILL_MIN_BYTES = 4096
# Tensors of this size start on a 64 KiB boundary in every data file we write: onnxruntime maps
# an aligned tensor instead of reading it (64 KiB is Windows' granularity, a multiple of pages).
ALIGN_MIN_BYTES = 2**20
_ALIGNMENT = 2**16
_SMALL_ALIGNMENT = 16
_COPY_CHUNK = 2**26

_OPEN: dict[str, WeightStore] = {}  # token -> the open store


class WeightStore:
    """A folder holding a run's external tensors; remove it with :meth:`close` (or ``with``)."""

    def __init__(self, parent: str | os.PathLike[str] | None = None) -> None:
        folder = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        try:
            remove_stale_staging(folder)
            self.folder = Path(tempfile.mkdtemp(prefix=staging_prefix(WEIGHTS_PREFIX), dir=folder))
        except OSError as error:
            raise OutputPathError(f"{folder}: cannot hold this run's weight store ({describe_os_error(error)})") from error
        # mkdtemp's random tail: letters, digits and '_', unique among live folders of this parent
        self.token = "w" + self.folder.name.rsplit("-", 1)[-1]
        while self.token in _OPEN:  # two parents can draw the same tail
            self.token += "x"
        self._written = self.folder / f"{self.token}.written.data"
        self._handle: IO[bytes] | None = None
        self._models = itertools.count()
        self._inputs: dict[Path, str] = {}  # an input data file -> its name in the store
        self._pending: dict[str, Path] = {}  # names not copied whole yet: read in place until a model file needs them
        self._ranges: dict[str, set[tuple[int, int]]] = {}  # of a pending name: the (offset, length) copied so far
        self._origins: dict[bytes, Path] = {}  # models as loaded (serialized) -> their own files
        _OPEN[self.token] = self

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        _OPEN.pop(self.token, None)
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        gc.collect()  # arrays still mapping the store's files (a graph's cycles): Windows cannot remove a mapped file
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.folder.exists():
            log.warning("could not remove the weight store %s; delete it by hand", self.folder)

    def scratch_folder(self) -> Path:
        """A new empty folder inside the store, removed with it: for files another library writes
        (onnxruntime's optimized model and its data) that the store then takes in."""
        folder = self.folder / f"{self.token}.scratch{next(self._models)}"
        folder.mkdir()
        return folder

    # -- taking tensors in ----------------------------------------------------------------------

    def adopt(self, model: onnx.ModelProto, source: Path) -> None:
        """Point ``model``'s external tensors (locations already validated, relative to ``source``)
        at this store, which takes a copy of their files. No tensor is read into memory."""
        for tensor in iter_all_tensors(model):
            if external_data_helper.uses_external_data(tensor):
                entries = _entries(tensor)
                _set_entry(tensor, "location", self._taken_in((source / entries["location"]).resolve()))

    def _taken_in(self, path: Path) -> str:
        alias = self._inputs.get(path)
        if alias is None:
            alias = self._inputs[path] = f"{self.token}.input{len(self._inputs)}.data"
            self._pending[alias] = path  # copied when a model file first needs it (inspect never does)
        return alias

    def given_as(self, model: onnx.ModelProto, source: Path) -> None:
        """``model``, as it now is, is the file ``source`` with its data beside it (loaded, its tensors
        adopted, nothing else changed): :meth:`model_file` gives that file out for it, copying nothing."""
        self._origins[model.SerializeToString()] = source

    def file_of(self, location: str) -> Path:
        """Where the data a location names can be read now: the store's file, or the input's own."""
        return self._pending.get(location, self.folder / location)

    def _copy_needed(self, model: onnx.ModelProto) -> None:
        """Copy in what ``model`` reads of the input's data files: a file it reads mostly, whole (one
        kernel copy); of one it reads little, only its tensors' byte ranges."""
        wanted: dict[str, set[tuple[int, int]] | None] = {}  # None: the whole file
        for tensor in iter_all_tensors(model):
            if external_data_helper.uses_external_data(tensor):
                entries = _entries(tensor)
                alias = entries["location"]
                if alias in self._pending:
                    ranges = wanted.setdefault(alias, set())
                    if ranges is not None and "length" in entries:
                        ranges.add((int(entries.get("offset", 0)), int(entries["length"])))
                    else:
                        wanted[alias] = None
        for alias, ranges in wanted.items():
            path = self._pending[alias]
            done = self._ranges.setdefault(alias, set())
            size = path.stat().st_size
            if ranges is None or 2 * sum(length for _, length in ranges | done) >= size:
                self._copy_whole(alias, path)
            elif ranges - done:
                self._copy_ranges(alias, path, ranges - done, size)
                done |= ranges

    def _copy_whole(self, alias: str, path: Path) -> None:
        started = time.perf_counter()
        try:  # sendfile on Linux: no byte passes through Python's memory
            shutil.copyfile(path, self.folder / alias)
        except OSError as error:
            raise ExternalDataError(f"{path}: cannot be copied into {self.folder} ({describe_os_error(error)})") from error
        del self._pending[alias]
        self._ranges.pop(alias, None)
        log.info("copied %s (%s) into the weight store in %.1f s", path, format_bytes(path.stat().st_size), time.perf_counter() - started)

    def _copy_ranges(self, alias: str, path: Path, ranges: set[tuple[int, int]], size: int) -> None:
        """The bytes of ``ranges`` copied to the same offsets of the store's file for ``path``, a file
        of ``size`` bytes whose other bytes are holes: no disk and no copying time for the tensors the
        model no longer reads (onnxruntime and the checker read only the ranges a model names)."""
        target = self.folder / alias
        try:
            with path.open("rb") as source, target.open("r+b" if target.exists() else "wb") as out:
                out.truncate(size)
                for offset, length in sorted(ranges):
                    _copy_range(source.fileno(), out.fileno(), offset, length)
        except OSError as error:
            raise ExternalDataError(f"{path}: cannot be copied into {self.folder} ({describe_os_error(error)})") from error
        log.info("copied %s of %s (%d tensors) into the weight store", format_bytes(sum(length for _, length in ranges)), path, len(ranges))

    def put(self, array: np.ndarray, name: str) -> onnx.TensorProto | None:
        """``array`` appended to the store, as an external TensorProto named ``name``; None for
        what ONNX cannot store as raw bytes (strings, objects)."""
        try:
            data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        except (KeyError, TypeError, ValueError):
            return None
        if array.dtype.kind in "OUS" or not _raw_storable(data_type):
            return None
        contiguous = np.ascontiguousarray(array)
        offset = self._append(contiguous.reshape(-1).view(np.uint8), contiguous.nbytes)
        tensor = onnx.TensorProto(name=name, data_type=data_type, dims=list(contiguous.shape))
        _make_external(tensor, self._written.name, offset, contiguous.nbytes)
        return tensor

    def spill(self, model: onnx.ModelProto, min_bytes: int = SPILL_MIN_BYTES) -> None:
        """Move the initializers held in the message (of ``min_bytes`` or more) into the store, in
        place. Attribute tensors (Constant nodes) stay in the message."""
        for graph in iter_model_graphs(model):
            for tensor in graph.initializer:
                if inline_bytes(tensor) >= min_bytes and _raw_storable(tensor.data_type):
                    data = _taken_out(tensor)
                    _make_external(tensor, self._written.name, self._append(np.frombuffer(data, np.uint8), len(data)), len(data))

    def _append(self, data: np.ndarray, size: int) -> int:
        if self._handle is None:
            self._handle = self._written.open("ab")
        handle = self._handle
        offset = handle.seek(0, os.SEEK_END)
        padding = _padding(offset, size)
        try:
            handle.write(b"\0" * padding)
            handle.write(data.data)
            handle.flush()  # readers map the file: what is written must be there
        except OSError as error:
            raise ExternalDataError(f"{self.folder}: cannot hold {format_bytes(size)} more ({describe_os_error(error)})") from error
        return offset + padding

    # -- giving models out ----------------------------------------------------------------------

    @contextlib.contextmanager
    def model_file(self, model: onnx.ModelProto) -> Iterator[Path]:
        """``model`` as an .onnx file in the store (its tensors' files beside it), removed after the
        ``with`` block: for onnxruntime and the checker, which read models past 2 GB by path. Big
        tensors ``model`` holds in its message move into the store first (in place; same values)."""
        self.spill(model)  # a big inline tensor would make the file one message over 2 GB
        serialized = model.SerializeToString()
        origin = self._origins.get(serialized)
        if origin is not None:  # a model as it was loaded, as the user's file
            yield origin
            return
        self._copy_needed(model)  # onnxruntime and the checker read data only from the model's own folder
        path = self.folder / f"{self.token}.model{next(self._models)}.onnx"
        try:
            try:
                path.write_bytes(serialized)
            except OSError as error:
                raise ExternalDataError(f"{self.folder}: cannot write a model file ({describe_os_error(error)})") from error
            yield path
        finally:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# models and tensors in stores
# ---------------------------------------------------------------------------------------------


def store_of(model: onnx.ModelProto) -> WeightStore | None:
    """The open store holding ``model``'s external tensors; None when it has none. An external
    tensor outside every open store (a model loaded without one) is an ExternalDataError."""
    for tensor in iter_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            return store_of_tensor(tensor)
    return None


def store_of_tensor(tensor: onnx.TensorProto) -> WeightStore:
    location = _entries(tensor).get("location", "")
    store = _OPEN.get(location.split(".", 1)[0])
    if store is None:
        raise ExternalDataError(
            f"tensor '{tensor.name}' keeps its data in '{location}', which no open weight store holds: "
            "load the model with onnxsparse.load (which reads external data), or keep its store open"
        )
    return store


def read_external(tensor: onnx.TensorProto) -> np.ndarray:
    """A store-held tensor's values, read-only: memory-mapped when large."""
    store = store_of_tensor(tensor)
    entries = _entries(tensor)
    path = store.file_of(entries["location"])
    offset = int(entries.get("offset", 0))
    length = int(entries["length"]) if "length" in entries else path.stat().st_size - offset
    if tensor.data_type in PACKED_BITS:  # sub-byte types: numpy_helper unpacks them from raw bytes
        array = numpy_helper.to_array(onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=list(tensor.dims), raw_data=_raw_bytes(tensor)))
    else:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        shape = tuple(int(d) for d in tensor.dims)
        count = int(np.prod(shape, dtype=np.int64))
        if count * dtype.itemsize != length:
            raise ExternalDataError(f"tensor '{tensor.name}' declares {count} elements of {dtype} but its external data has {length} bytes")
        if length >= SPILL_MIN_BYTES:
            array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        else:
            array = np.fromfile(path, dtype=dtype, count=count, offset=offset).reshape(shape)
    array.flags.writeable = False
    return array


def release_pages(array: np.ndarray) -> None:
    """Done with a store-held array for now: its mapped pages leave this process's resident memory
    (they stay in the page cache, and a later read maps them back). A weight read and rewritten one
    at a time then costs one weight of memory, not the whole model. No-op for any other array."""
    base: object = array
    while isinstance(base, np.ndarray) and not isinstance(base, np.memmap):
        base = base.base
    mapped = getattr(base, "_mmap", None)
    read_only = isinstance(base, np.memmap) and base.mode == "r"  # a copy-on-write map would lose its edits
    if read_only and mapped is not None and hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            mapped.madvise(mmap.MADV_DONTNEED)  # read-only file pages: dropping them loses nothing


def inline_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes of values a tensor holds in the message (0 for an external one)."""
    if external_data_helper.uses_external_data(tensor):
        return 0
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return data_bytes(tensor)


def stored_bytes(tensor: onnx.TensorProto) -> int:
    """What a tensor takes in a file: its message, plus its values when they are external."""
    size = tensor.ByteSize()
    return size + data_bytes(tensor) if external_data_helper.uses_external_data(tensor) else size


def data_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes a tensor's values take as raw data, wherever they are stored."""
    if external_data_helper.uses_external_data(tensor):
        length = _entries(tensor).get("length")
        if length is not None:
            return int(length)
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return declared_bytes(tensor)


def declared_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes a tensor's values take as raw data, from its type and shape: the values are not read
    (Python's protobuf hands out a copy of raw_data to take its length: 0.03 s for MiniLM's 90 MB)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    elements = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    bits = PACKED_BITS.get(tensor.data_type)
    if bits is not None:
        return -(-elements * bits // 8)
    try:
        return elements * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 0


def write_model_with_data(model: onnx.ModelProto, path: Path, data_name: str, min_bytes: int = 1024) -> None:
    """Write ``model`` to ``path`` and its tensors (initializers of ``min_bytes`` or more, and every
    tensor already external) to ``data_name`` beside it, streamed: never one message over 2 GB,
    never a second copy of a weight in memory. ``model`` itself is not changed."""
    header = onnx.ModelProto()
    header.CopyFrom(model)  # cheap for a store-held model: its weights are not in the message
    with (path.parent / data_name).open("wb") as data:
        for graph in iter_model_graphs(header):
            for tensor in graph.initializer:
                if external_data_helper.uses_external_data(tensor) or (inline_bytes(tensor) >= min_bytes and _raw_storable(tensor.data_type)):
                    _write_tensor_data(tensor, data, data_name)
        for tensor in iter_all_tensors(header):  # attribute tensors and sparse parts that were external
            if external_data_helper.uses_external_data(tensor) and _entries(tensor).get("location") != data_name:
                _write_tensor_data(tensor, data, data_name)
    path.write_bytes(header.SerializeToString())


def _write_tensor_data(tensor: onnx.TensorProto, data: IO[bytes], data_name: str) -> None:
    """Append ``tensor``'s values to ``data`` (aligned) and point it there."""
    size = data_bytes(tensor)
    offset = data.tell()
    padding = _padding(offset, size)
    data.write(b"\0" * padding)
    if external_data_helper.uses_external_data(tensor):
        _copy_external(tensor, data)
    else:
        data.write(_taken_out(tensor))
    _make_external(tensor, data_name, offset + padding, size)


def _padding(offset: int, size: int) -> int:
    """Zero bytes before a tensor of ``size`` bytes at ``offset`` (big ones on 64 KiB boundaries)."""
    return -offset % (_ALIGNMENT if size >= ALIGN_MIN_BYTES else _SMALL_ALIGNMENT)


def _raw_storable(data_type: int) -> bool:
    """Whether values of this type can be moved out of the message as raw bytes and read back here."""
    return data_type not in PACKED_BITS and data_type not in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED)


def _taken_out(tensor: onnx.TensorProto) -> bytes:
    """An inline tensor's values as raw bytes, its value fields cleared (it is about to become external)."""
    data = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
    for name in _VALUE_FIELDS:
        tensor.ClearField(name)
    return data


def inlined(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose store-held tensors are read back into the message (for a model
    written as one file; the caller keeps it under 2 GB)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in iter_all_tensors(copy):
        if external_data_helper.uses_external_data(tensor):
            tensor.raw_data = _raw_bytes(tensor)
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return copy


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    buffer = io.BytesIO()
    _copy_external(tensor, buffer)
    return buffer.getvalue()


def _copy_range(source: int, target: int, offset: int, length: int) -> None:
    """``length`` bytes at ``offset`` of file descriptor ``source`` to the same offset of ``target``:
    in the kernel where it can (copy_file_range), else through a buffer."""
    end = offset + length
    try:
        while offset < end:
            copied = os.copy_file_range(source, target, end - offset, offset, offset)
            if copied == 0:
                raise ExternalDataError(f"external data ends at byte {offset}, before {end}")
            offset += copied
    except (AttributeError, OSError):  # not on Linux, or a file system that refuses it: the rest by hand
        while offset < end:
            chunk = os.pread(source, min(end - offset, _COPY_CHUNK), offset)
            if not chunk:
                raise ExternalDataError(f"external data ends at byte {offset}, before {end}") from None
            offset += os.pwrite(target, chunk, offset)


def _copy_external(tensor: onnx.TensorProto, out: IO[bytes]) -> None:
    entries = _entries(tensor)
    remaining = data_bytes(tensor)
    with store_of_tensor(tensor).file_of(entries["location"]).open("rb") as source:
        source.seek(int(entries.get("offset", 0)))
        while remaining:
            chunk = source.read(min(remaining, _COPY_CHUNK))
            if not chunk:
                raise ExternalDataError(f"tensor '{tensor.name}': its external data ends early")
            out.write(chunk)
            remaining -= len(chunk)


# ---------------------------------------------------------------------------------------------
# the external-data fields of a TensorProto
# ---------------------------------------------------------------------------------------------

# Element types stored packed, with their bits per element (raw_data holds ceil(n * bits / 8) bytes).
PACKED_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
    if hasattr(onnx.TensorProto, name)
}
_VALUE_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _set_entry(tensor: onnx.TensorProto, key: str, value: str) -> None:
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            return
    tensor.external_data.add(key=key, value=value)


def _make_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
