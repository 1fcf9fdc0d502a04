"""onnxruntime sessions: made once per model version and kind, not once per question asked of it.

A run asks many times for a session of the same model: the original gives the validation reference
and the reference a pass's trials are judged by; a pass's trial that becomes its result is validated
again by the manager; the model a step starts from was timed as the result of the step before. A
:class:`Runtime` keeps the sessions it made, keyed by the model's content (the serialized message: a
store-held model's message holds where its tensors are, and the store never rewrites those bytes)
and its use (timing or not), within a memory budget (:data:`~onnxsparse.limits.SESSION_CACHE_BYTES`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError, Message

from .errors import RuntimeLoadError
from .io import load, tensor_bytes
from .limits import SESSION_CACHE_BYTES
from .weightstore import store_of

log = logging.getLogger(__name__)

# Above this, a model is handed to onnxruntime as a file with external data (protobuf's 2 GB limit).
_SESSION_FROM_FILE_BYTES = 2**31 - 256 * 2**20

PROVIDERS = ["CPUExecutionProvider"]


def make_session(model: onnx.ModelProto, label: str, *, timing: bool = False, threads: int = 1,
                 serialized: bytes | None = None) -> ort.InferenceSession:
    """A new onnxruntime session on the CPU, or a RuntimeLoadError naming the model and the problem.
    ``timing``: a session to time the model with, on ``threads`` threads (0: onnxruntime's choice, one
    per core) and with onnxruntime's defaults, as a deployment runs it; otherwise onnxruntime's
    threads, and no memory pattern (see below). ``serialized``: the model's message, when the caller
    has it (a model held by a weight store goes by path whatever it is)."""
    return _session(model, serialized, label, timing, threads)


def _session(model: onnx.ModelProto, serialized: bytes | None, label: str, timing: bool, threads: int = 1) -> ort.InferenceSession:
    if tensor_bytes(model) >= _TRIM_BEFORE_BYTES:
        return_freed_memory()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if timing:
        options.intra_op_num_threads = threads
    else:
        # Without a memory pattern a session's second run reuses the arena its first run grew; with one
        # it first allocates (and page-faults) a second block that size. Our sessions mostly run a few
        # times (segment runs, trials, validation), where that doubled the page faults: MobileNetV2's
        # qdq{mode=static} 21.3 -> 17.3 s CPU, 1.2 GB fewer page faults. Timing sessions keep it.
        options.enable_mem_pattern = False
        # onnxruntime's pool threads spin between kernels, waiting for the next one: right for a
        # deployment timing one run, CPU burnt for ours, which run a model a few times and then do
        # numpy work while the spinning continues. MobileNetV2's qdq{mode=static}: 43 -> 37 s of CPU
        # (user + sys), the same wall time.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return _loaded(model, serialized, label, options)


def _loaded(model: onnx.ModelProto, serialized: bytes | None, label: str, options: ort.SessionOptions) -> ort.InferenceSession:
    """``model`` loaded in onnxruntime with ``options``: by path when a weight store holds its tensors
    or it is too big for one message, else from its bytes (``serialized`` when the caller has them)."""
    try:
        store = store_of(model)
        if store is not None:  # by path: onnxruntime reads the store's files beside the model
            with store.model_file(model) as path:
                return ort.InferenceSession(str(path), options, providers=PROVIDERS)
        if serialized is None:
            serialized = _serialized_if_small(model)
        if serialized is not None:
            return ort.InferenceSession(serialized, options, providers=PROVIDERS)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            # onnx.save_model moves the tensors of the model it is given out to the (temporary) file:
            # give it a copy, or the caller's model would point into a deleted folder.
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, str(path), save_as_external_data=True, location="model.onnx.data")
            return ort.InferenceSession(str(path), options, providers=PROVIDERS)
    except Exception as error:  # noqa: BLE001 - onnxruntime raises several private exception types
        raise RuntimeLoadError(f"{label}: onnxruntime cannot load it: {_load_failure(error)}") from error


# A session whose weights take this much is made after the freed heap has gone back to the system.
_TRIM_BEFORE_BYTES = 32 * 2**20


def return_freed_memory() -> None:
    """Give the heap memory freed so far back to the system (glibc's ``malloc_trim``; nothing where
    the C library has none). glibc keeps freed memory for reuse, and once it has returned one big
    block it serves blocks of up to 32 MB from the heap: a big model's freed session (its packed
    weights), or a pass's arrays, then stay in the process's resident memory while the next step
    maps weights or loads a session. The 168 MB test model's `magnitude-prune,sparse-encode` peaked
    at 321 MiB (2.00x the model) with its validated session freed but kept; 305 MiB when trimmed."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (OSError, AttributeError, TypeError):  # macOS and musl have no malloc_trim; Windows no CDLL(None)
        return None
    return trim


def _serialized_if_small(model: onnx.ModelProto) -> bytes | None:
    """The model's message when it is small enough to hand onnxruntime as bytes, else None. Serialized
    to find out: ``ByteSize`` costs as much (it serializes to count), and the tensors' bytes alone can
    be a tenth of a message that holds integers as varints (int32_data). Those bytes still rule out
    the surely too big at once (protobuf takes 8.6 s to refuse a 2.4 GB message)."""
    if tensor_bytes(model) >= _SESSION_FROM_FILE_BYTES:
        return None
    try:
        serialized = model.SerializeToString()
    except (ValueError, EncodeError):  # past protobuf's 2 GB
        return None
    return serialized if len(serialized) < _SESSION_FROM_FILE_BYTES else None


def optimized_offline(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """``model`` as onnxruntime's basic graph optimizer leaves it: constants folded, redundant nodes
    (Identity, Dropout, no-op Slice/Cast, ...) removed, and Pad, BatchNormalization, Add and Mul fused
    into the Conv or Gemm they feed or follow. That level runs before onnxruntime picks an execution
    provider, so what it writes holds standard ops only and runs anywhere (the extended level writes
    onnxruntime's own fused ops). Big tensors go to external data in the model's weight store, which
    takes them in; a model without a store is read back whole."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    store = store_of(model)
    folder = store.scratch_folder() if store is not None else Path(tempfile.mkdtemp(prefix="onnxsparse-optimized-"))
    target = folder / "optimized.onnx"
    options.optimized_model_filepath = str(target)
    if store is not None:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", str(_OPTIMIZED_EXTERNAL_BYTES))
    try:
        _loaded(model, None, label, options)  # loading it writes the optimized model
        # the store keeps reading its scratch folder's data until a model file needs a copy of it
        return load(target, weights=store, check=False)
    finally:
        if store is None:
            shutil.rmtree(folder, ignore_errors=True)


# Tensors of at least this many bytes in onnxruntime's optimized model go to its external data file.
_OPTIMIZED_EXTERNAL_BYTES = 1024


def _load_failure(error: BaseException) -> str:
    """onnxruntime's message, made actionable where we know the cause."""
    text = " ".join(str(error).split())
    match = re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", text)
    if match:
        return (f"IR version {match.group(1)} is newer than this onnxruntime reads (at most {match.group(2)}); "
                f"re-save the model with ir_version={match.group(2)} (onnx >= 1.23 writes {match.group(1)} by default)")
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass
class _Held:
    session: ort.InferenceSession
    bytes: int


class Runtime:
    """The sessions of one run, memoized per (model content, timing or not) within ``max_bytes`` of the
    models' weights (the least recently used goes first; a model of more than half the budget is
    never held, so a big model's run holds no more than it did without the cache, except the one
    pinned for its timing, see :meth:`session`)."""

    def __init__(self, max_bytes: int = SESSION_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._held: OrderedDict[tuple[str, bool], _Held] = OrderedDict()
        self._pinned: set[tuple[str, bool]] = set()
        self._handed: set[tuple[str, bool]] = set()
        self.created = 0
        self.reused = 0

    def session(self, model: onnx.ModelProto, label: str, *, timing: bool = False, keep: bool = True,
                timed_later: bool = False, pin: bool = False, hand_over: bool = False) -> ort.InferenceSession:
        """A session of ``model``: the one made before for the same content and use, else a new
        one, held for reuse unless ``keep`` is False (a one-off trial that only takes room).
        ``timed_later``: the model will be timed too, so it gets its timing session now. With
        ``pin``, that session is held even past the budget until :meth:`unpin`: a big model is then
        loaded once for its validation and its timing, not twice (0.7 s of 5.4 s for a 504 MB one),
        and its session lives through what comes between (the caller's word that nothing between
        loads a model as big). ``hand_over``: a pass's result timed before the manager validates it;
        a big one's session is held, past the budget, until it is next asked for other than to be
        handed over again (or :meth:`drop_handed`), so the validation does not load it again."""
        size = tensor_bytes(model)  # about what the session holds of its weights
        big = size > self.max_bytes // 2
        pinned = timed_later and pin
        if big and not (pinned or hand_over) and not self._pinned and not self._handed:  # nothing to find or hold: not hashed
            self.created += 1
            return _session(model, None, label, timing)
        timing = timing or timed_later
        content = content_key(model)
        # A timing session serves a validation as well (the same outputs; run_feeds spreads the feeds
        # over the cores): a model timed and validated is loaded once. Not the other way round: a
        # timing needs one thread.
        for key in ((content, timing),) if timing else ((content, False), (content, True)):
            held = self._held.get(key)
            if held is not None:
                self._held.move_to_end(key)
                self.reused += 1
                if key in self._handed and not hand_over:  # handed over once: the receiver holds it from here
                    self._handed.discard(key)
                    del self._held[key]
                return held.session
        key = (content, timing)
        serialized = None if store_of(model) is not None or big else model.SerializeToString()
        session = _session(model, serialized, label, timing)
        self.created += 1
        if keep and (not big or pinned or hand_over):
            self._held[key] = _Held(session, size)
            if big:
                (self._pinned if pinned else self._handed).add(key)
            self._trim()
        return session

    def drop_handed(self) -> None:
        """Let go the big sessions handed over that nobody asked for (the manager chose otherwise)."""
        for key in self._handed:
            self._held.pop(key, None)
        self._handed.clear()

    def unpin(self) -> None:
        """Let the sessions pinned for a timing go (see :meth:`session`)."""
        for key in self._pinned:
            self._held.pop(key, None)
        self._pinned.clear()

    def clear(self) -> None:
        """Let every held session go (their memory with them)."""
        self._held.clear()
        self._pinned.clear()
        self._handed.clear()

    def _trim(self) -> None:
        exempt = self._pinned | self._handed
        total = sum(held.bytes for key, held in self._held.items() if key not in exempt)
        for key in [key for key in self._held if key not in exempt]:  # least recently used first
            if total <= self.max_bytes:
                break
            total -= self._held.pop(key).bytes


def content_key(model: onnx.ModelProto) -> str:
    """What a session's outputs depend on: the model without its main graph's value_info (the
    shapes a pass's copy carries change no output, and the original keeps its session for them)."""
    digest = hashlib.blake2b(digest_size=16)
    graph = model.graph
    parts: tuple[tuple[bytes, Iterable[Message]], ...] = (
        (b"opset", model.opset_import), (b"function", model.functions), (b"node", graph.node), (b"initializer", graph.initializer),
        (b"sparse", graph.sparse_initializer), (b"input", graph.input), (b"output", graph.output))
    digest.update(str(model.ir_version).encode())
    for tag, messages in parts:
        for message in messages:
            data = message.SerializeToString()
            digest.update(tag + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def single_threaded(session: ort.InferenceSession) -> bool:
    """Whether ``session`` runs on one thread (a timing session): its runs can go side by side."""
    return session.get_session_options().intra_op_num_threads == 1


def usable_cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def open_session(model: onnx.ModelProto, label: str, *, timing: bool = False, runtime: Runtime | None = None,
                 keep: bool = True, timed_later: bool = False, pin: bool = False, hand_over: bool = False) -> ort.InferenceSession:
    """A session from ``runtime`` when one is given (memoized, see :meth:`Runtime.session`), else a new one."""
    if runtime is not None:
        return runtime.session(model, label, timing=timing, keep=keep, timed_later=timed_later, pin=pin, hand_over=hand_over)
    return make_session(model, label, timing=timing)

