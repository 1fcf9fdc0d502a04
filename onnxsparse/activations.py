"""Statistics of intermediate tensors, streamed over calibration feeds: run the model in onnxruntime
with the wanted tensors exposed as extra outputs and reduce each batch as it comes, so memory does
not grow with the number of feeds."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .calibration import (
    InputSource,
    batch_dim,
    check_feed,
    first_samples,
    in_chunks,
    model_inputs,
    sample_axis,
    samples_in,
)
from .errors import RuntimeLoadError
from .graph import downstream_names
from .quantization import choose_range
from .runtime import make_session

log = logging.getLogger(__name__)


@dataclass
class ChannelStats:
    """Per-channel running sums of one tensor along its feature axis."""

    sum: np.ndarray
    sum_squares: np.ndarray
    sum_abs: np.ndarray
    count: int = 0

    @property
    def mean_abs(self) -> np.ndarray:
        return self.sum_abs / max(self.count, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def mean_square(self) -> np.ndarray:
        return self.sum_squares / max(self.count, 1)

    @property
    def l2_norm(self) -> np.ndarray:
        """The L2 norm of each channel over every sample and position (Wanda's ||X_j||)."""
        return np.sqrt(self.sum_squares)


@dataclass(frozen=True)
class ValueFacts:
    """What onnx's shape inference tells of a model's main-graph tensors, inferred once for every
    run of it: element types (to expose a tensor as an output) and bytes per sample (to know how many
    values fit in memory). A layer-by-layer pass edits weights, never types or shapes, so the facts
    of the model it starts from hold for every version it makes."""

    types: Mapping[str, int]
    bytes_per_sample: Mapping[str, int]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> ValueFacts:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - fall back to float for every tensor, sizes unknown
            log.debug("shape inference failed; exposing intermediate tensors as float", exc_info=True)
            return cls({}, _bytes_per_sample(model))
        values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        types = {v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")}
        return cls(types, _bytes_per_sample(inferred))


def with_extra_outputs(model: onnx.ModelProto, names: Iterable[str], facts: ValueFacts | None = None) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the given intermediate tensors of its main graph."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {output.name for output in exposed.graph.output}
    types = (facts or ValueFacts.of(model)).types
    for name in names:
        if name not in existing:
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
    return exposed


def computing_only(model: onnx.ModelProto, names: Iterable[str], given: Iterable[str] = (), facts: ValueFacts | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are the given main-graph tensors, with only the nodes and
    initializers they depend on. A layer-by-layer pass (SparseGPT, refit) asks for one early
    layer's input after another: running the whole model for each would redo every later layer.
    Tensors named in ``given`` become graph inputs where the wanted ones depend on them (their values
    are fed, not computed), unless a node that must run anyway also produces one of them."""
    wanted = list(dict.fromkeys(names))
    known = {name for name in given if name not in wanted}
    reads, cut = _needed_nodes(model, wanted, known)
    produced = {output for index in reads for output in model.graph.node[index].output}
    if cut & produced:  # a multi-output node needed for another tensor also makes a given one
        reads, cut = _needed_nodes(model, wanted, set())
    kept = [node for index, node in enumerate(model.graph.node) if index in reads]
    read = set().union(*reads.values(), wanted)
    trimmed = onnx.ModelProto()
    trimmed.CopyFrom(model)
    types = (facts or ValueFacts.of(model)).types
    del trimmed.graph.node[:]
    trimmed.graph.node.extend(kept)
    initializers = [tensor for tensor in model.graph.initializer if tensor.name in read]
    del trimmed.graph.initializer[:]
    trimmed.graph.initializer.extend(initializers)
    trimmed.graph.input.extend(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None) for name in sorted(cut))
    del trimmed.graph.output[:]
    trimmed.graph.output.extend(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None) for name in wanted)
    return trimmed


def _needed_nodes(model: onnx.ModelProto, wanted: list[str], known: set[str]) -> tuple[dict[int, set[str]], set[str]]:
    """The nodes computing ``wanted`` back to the graph inputs or to ``known`` tensors (index -> the
    names each reads), and the known tensors reached."""
    producer = {output: index for index, node in enumerate(model.graph.node) for output in node.output}
    reads: dict[int, set[str]] = {}
    cut: set[str] = set()
    pending = [producer[name] for name in wanted if name in producer]
    while pending:
        index = pending.pop()
        if index in reads:
            continue
        reads[index] = _names_read(model.graph.node[index])
        cut |= reads[index] & known
        pending.extend(producer[name] for name in reads[index] - known if name in producer)
    return reads, cut


def _names_read(node: onnx.NodeProto) -> set[str]:
    """A node's inputs and every name its subgraphs (If/Loop bodies) read, outer-scope names among them."""
    names = {name for name in node.input if name}
    for attribute in node.attribute:
        for graph in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)):
            for inner in graph.node:
                names |= _names_read(inner)
    return names


def tensor_values(
    model: onnx.ModelProto,
    source: InputSource,
    names: Iterable[str],
    *,
    limit: int | None = None,
    label: str = "calibration",
    feed_done: Callable[[int], None] | None = None,  # called with the samples read so far, after each feed
    given: Mapping[str, Sequence[np.ndarray]] | None = None,
    facts: ValueFacts | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """For each feed of ``source`` (up to ``limit`` samples), the values of the named main-graph tensors,
    in runs of at most ``RUN_SAMPLES`` samples (a large feed yields several value dicts). ``given``
    holds, per run, values of the model's tensors known already: they are fed instead of computed.
    ``facts``: the model's, when the caller has them (else inferred here)."""
    given = given or {}
    wanted = list(dict.fromkeys(names))
    graph_inputs = {i.name for i in model.graph.input}
    computed = [n for n in wanted if n not in graph_inputs and n not in given]
    session = make_session(computing_only(model, computed, given, facts), label) if computed else None
    fed = {i.name for i in session.get_inputs()} if session is not None else set()
    inputs = model_inputs(model)
    batched = batch_dim(i.shape for i in inputs) is not None
    runs = read = 0
    counted = sample_axis(model)
    # a source read once (read_once) was checked then: a layer-by-layer pass reads it once per layer
    checked_before = getattr(source, "checked", False)
    for index, feed in enumerate(first_samples(source, model, limit).feeds()):
        checked = feed if checked_before else check_feed(feed, inputs, f"{source.describe()}, feed {index}")
        for run in in_chunks(checked, batched):
            known = {name: runs_of[runs] for name, runs_of in given.items()}
            runs += 1
            feeds = {name: value for name, value in {**run, **known}.items() if name in fed}
            values = dict(zip(computed, session.run(computed, feeds))) if session is not None else {}
            values.update({n: run[n] for n in wanted if n in graph_inputs})
            values.update({n: known[n] for n in wanted if n in known})
            yield values
        read += samples_in(checked) if counted else 1
        if feed_done is not None:  # progress counts samples read, not our runs
            feed_done(read)


# Bytes of a fixed model's values held at once by FixedModelValues.
FIXED_VALUES_BYTES = 512 * 2**20


class FixedModelValues:
    """The values of a model that does not change (the original, as teacher or refit target), asked
    for tensor by tensor in a known order by a layer-by-layer pass: one run computes the values of
    as many coming tensors as fit in a share of FIXED_VALUES_BYTES, where running the model once per
    layer took half of such a pass's time (MobileNetV2's downstream refit: 53 layers, 19 runs instead
    of 53). Each run also keeps the tensors that cross from its part of the graph to the rest (its
    frontier, when it fits the remaining share), and the next run starts from them instead of the
    model's inputs: the runs add up to about one pass over the model, not one prefix per run."""

    def __init__(self, model: onnx.ModelProto, source: InputSource, limit: int | None, coming: list[str], *, label: str) -> None:
        self.model, self.source, self.limit, self.label = model, source, limit, label
        self.coming = coming  # the names in the order they will be asked for (a name may come again)
        self.asked = 0
        self.rows_read = _rows_read(source, model, limit)
        self.facts = ValueFacts.of(model)
        self.held: dict[str, list[np.ndarray]] = {}
        self.frontier: dict[str, list[np.ndarray]] = {}  # per run, the values the last run left at its cut
        self._producers = {output: index for index, node in enumerate(model.graph.node) for output in node.output if output}
        self._reads = [_names_read(node) for node in model.graph.node]

    def values(self, name: str) -> list[np.ndarray]:
        """The values of ``name``, one array per run of :func:`tensor_values` over the source."""
        upcoming = self.coming[self.asked :]
        position = self.asked + upcoming.index(name) if name in upcoming else None
        if position is not None:
            self.asked = position + 1
        if name not in self.held:
            names = [name] if position is None else self._batch_from(position)
            cut = self._cut_after(names) if position is not None and set(self.coming[position:]) - set(names) else []
            runs = list(tensor_values(self.model, self.source, [*names, *cut], limit=self.limit, label=self.label, facts=self.facts,
                                      given=self.frontier or None))
            self.held.update({n: [run[n] for run in runs] for n in names})
            if position is not None:  # in order: the next batch lies past this cut
                self.frontier = {n: [run[n] for run in runs] for n in cut}
        still_coming = set(self.coming[self.asked :])
        values = self.held[name] if name in still_coming else self.held.pop(name)
        for passed in [n for n in self.held if n not in still_coming]:  # computed with a batch, never asked for (a skipped layer)
            del self.held[passed]
        return values

    def _batch_from(self, position: int) -> list[str]:
        """The name asked for at ``position`` and those asked for after it that are not held, up to
        the batch's share of FIXED_VALUES_BYTES (the first whatever its size; one of unknown size
        ends the batch)."""
        names: list[str] = []
        held = 0
        budget = FIXED_VALUES_BYTES - FIXED_VALUES_BYTES // FRONTIER_SHARE
        for following in dict.fromkeys(self.coming[position:]):
            size = self.facts.bytes_per_sample.get(following)
            needed = size * self.rows_read if size is not None else None
            if names and (needed is None or held + needed > budget):
                break
            if following not in self.held:
                names.append(following)
            if needed is None:
                break
            held += needed
        return names

    def _cut_after(self, names: list[str]) -> list[str]:
        """The tensors made by the nodes up to the last producer of ``names`` (in the graph's node
        order, which is topological) that later nodes read: what a run for later tensors can start
        from. Empty when their values would not fit the frontier's share of FIXED_VALUES_BYTES."""
        last = max((self._producers[n] for n in names if n in self._producers), default=None)
        if last is None:
            return []
        made = {output for node in self.model.graph.node[: last + 1] for output in node.output if output}
        cut = sorted(made & set().union(*self._reads[last + 1 :]))
        sizes = [self.facts.bytes_per_sample.get(n) for n in cut]
        if not cut or None in sizes or sum(s or 0 for s in sizes) * self.rows_read > FIXED_VALUES_BYTES // FRONTIER_SHARE:
            return []
        return cut


# FixedModelValues keeps a run's frontier in 1/FRONTIER_SHARE of FIXED_VALUES_BYTES, its batches in the rest.
FRONTIER_SHARE = 4


class ChangingModelValues:
    """The values of a model that a layer-by-layer pass edits as it goes (refit, SparseGPT): values it
    asked for are kept, up to FIXED_VALUES_BYTES, until the pass edits a node upstream of them, and a
    later request runs only the nodes between kept values and the tensors asked for. Without them the
    refit ran the pruned model from its inputs up to each of its layers (MobileNetV2, channel 50% with
    refit_scope=downstream: 258 s, 146 s with them)."""

    def __init__(self, source: InputSource, limit: int | None, *, label: str) -> None:
        self.source, self.limit, self.label = source, limit, label
        self.kept: dict[str, list[np.ndarray]] = {}  # in the order they were computed
        # Of the first version asked about: edits keep its types, shapes and inputs.
        self.facts: ValueFacts | None = None
        self.rows_read = 0

    def values(self, model: onnx.ModelProto, names: Iterable[str]) -> Iterable[dict[str, np.ndarray]]:
        """The values of ``names`` in ``model``, one dict per run of :func:`tensor_values` over the
        source: held and kept when they fit FIXED_VALUES_BYTES, streamed otherwise (or when their
        size is not known)."""
        wanted = list(dict.fromkeys(names))
        if self.facts is None:
            self.facts, self.rows_read = ValueFacts.of(model), _rows_read(self.source, model, self.limit)
        runs = tensor_values(model, self.source, wanted, limit=self.limit, label=self.label, given=self.kept, facts=self.facts)
        sizes = self.facts.bytes_per_sample
        if any(name not in sizes for name in wanted) or sum(sizes[n] for n in wanted) * self.rows_read > FIXED_VALUES_BYTES:
            return runs
        held = list(runs)
        for name in wanted:
            self.kept.pop(name, None)
            self.kept[name] = [run[name] for run in held]  # the newest last: the oldest goes first
        self._trim()
        return held

    def edited(self, graph: gs.Graph, nodes: Iterable[gs.Node]) -> None:
        """Forget the values computed from the outputs of ``nodes``, which the pass has just edited in ``graph``."""
        if any(isinstance(value, gs.Graph) for node in graph.nodes for value in node.attrs.values()):
            self.kept.clear()  # a subgraph reads outer tensors that its node does not list as inputs
            return
        for name in downstream_names(nodes):
            self.kept.pop(name, None)

    def _trim(self) -> None:
        held = sum(value.nbytes for values in self.kept.values() for value in values)
        while held > FIXED_VALUES_BYTES and self.kept:
            held -= sum(value.nbytes for value in self.kept.pop(next(iter(self.kept))))


def _rows_read(source: InputSource, model: onnx.ModelProto, limit: int | None) -> int:
    """The axis-0 rows of the feeds :func:`tensor_values` reads for the first ``limit`` samples of
    ``source``: what a tensor's bytes per sample (past axis 0) are multiplied by. The same as the
    samples for a batched model; for one without a sample axis a feed is one sample of many rows."""
    return sum(samples_in(feed) for feed in first_samples(source, model, limit).feeds())


def _bytes_per_sample(model: onnx.ModelProto) -> dict[str, int]:
    """Per main-graph tensor with a known element type and a static shape past its first (batch)
    axis: bytes per sample (a float64 tensor holds twice what a float32 one of its shape does)."""
    sizes = {}
    for value in [*model.graph.value_info, *model.graph.output]:
        tensor_type = value.type.tensor_type
        dims = tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        if len(dims) > 1 and all(d.HasField("dim_value") for d in dims[1:]) and tensor_type.elem_type:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).itemsize
            sizes[value.name] = itemsize * int(np.prod([d.dim_value for d in dims[1:]]))
    return sizes


def collect_channel_stats(
    model: onnx.ModelProto,
    source: InputSource,
    feature_axes: Mapping[str, int],
    *,
    limit: int | None = None,
    label: str = "calibration",
) -> dict[str, ChannelStats]:
    """Per-channel sums and sums of squares of each named main-graph tensor along its feature axis."""
    stats: dict[str, ChannelStats] = {}
    for values in tensor_values(model, source, feature_axes, limit=limit, label=label):
        for name, axis in feature_axes.items():
            accumulate_channels(stats, name, values[name], axis)
    return stats


def channel_means(runs: Iterable[Mapping[str, np.ndarray]], feature_axes: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Per named tensor, its mean per channel along its axis over every run of :func:`tensor_values`
    (summed in float64): a third of what :func:`collect_channel_stats` computes, for a pass that needs
    no more (qdq's bias correction)."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for values in runs:
        for name, axis in feature_axes.items():
            rows = channel_rows(values[name], axis)  # rows summed in order into float64: the same sums as rows made float64 first
            sums[name] = sums.get(name, np.zeros(rows.shape[1])) + rows.sum(axis=0, dtype=np.float64)
            counts[name] = counts.get(name, 0) + rows.shape[0]
    return {name: total / max(counts[name], 1) for name, total in sums.items()}


def collect_channel_grams(
    model: onnx.ModelProto,
    source: InputSource,
    feature_axes: Mapping[str, int],
    *,
    limit: int | None = None,
    label: str = "calibration",
) -> dict[str, np.ndarray]:
    """Per named tensor, the Gram matrix of [channels, 1] over every sample and position, divided by
    their count: [[E aaᵀ, E a], [E aᵀ, 1]] (the last row is the constant a bias absorbs)."""
    grams: dict[str, np.ndarray] = {}
    for values in tensor_values(model, source, feature_axes, limit=limit, label=label):
        for name, axis in feature_axes.items():
            rows = channel_rows(values[name], axis, np.float64)
            gram = grams.setdefault(name, np.zeros((rows.shape[1] + 1, rows.shape[1] + 1)))
            # the blocks of [rows, 1]ᵀ[rows, 1], without copying the rows to append the ones column
            gram[:-1, :-1] += rows.T @ rows
            sums = rows.sum(axis=0)
            gram[:-1, -1] += sums
            gram[-1, :-1] += sums
            gram[-1, -1] += len(rows)
    return {name: gram / max(gram[-1, -1], 1.0) for name, gram in grams.items()}


def channel_rows(value: np.ndarray, axis: int, dtype: type[np.floating] | None = None) -> np.ndarray:
    """A tensor as rows [every sample and position, channels along ``axis``], in ``dtype`` if given:
    one copy at most (converting first and moving the axis then copied a large activation twice)."""
    moved = np.moveaxis(np.asarray(value), axis, -1)
    return np.asarray(moved, dtype=dtype, order="C").reshape(-1, moved.shape[-1])


def accumulate_channels(stats: dict[str, ChannelStats], name: str, value: np.ndarray, axis: int) -> None:
    """Add ``value``'s per-channel sums (along ``axis``, in float64) to ``stats[name]``."""
    moved = channel_rows(value, axis, np.float64)
    entry = stats.get(name)
    if entry is None:
        width = moved.shape[1]
        entry = stats[name] = ChannelStats(np.zeros(width), np.zeros(width), np.zeros(width))
    entry.sum += moved.sum(axis=0)
    entry.sum_abs += np.abs(moved).sum(axis=0)
    entry.sum_squares += np.square(moved).sum(axis=0)
    entry.count += moved.shape[0]


# ---------------------------------------------------------------------------------------------
# activation ranges for quantization: min/max in one streamed pass, histograms in a second
# ---------------------------------------------------------------------------------------------

HISTOGRAM_BINS = 2048  # over [-A, A] with A = max |x|: symmetric, so that |x| folds bin onto bin


@dataclass
class RangeStats:
    low: float = np.inf
    high: float = -np.inf
    histogram: np.ndarray | None = None  # counts over [-bound, bound]

    @property
    def bound(self) -> float:
        return max(abs(self.low), abs(self.high), 1e-12)


def collect_ranges(
    model: onnx.ModelProto,
    source: InputSource,
    names: Iterable[str],
    *,
    method: str,
    percentile: float = 99.999,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, tuple[float, float]]:
    """The quantization range [low, high] of each named tensor over the calibration feeds.

    ``minmax`` reads the feeds once; ``percentile``, ``entropy`` and ``mse`` read them twice (the
    second time into fixed-range histograms), so memory does not grow with the number of feeds.
    """
    wanted = list(dict.fromkeys(names))
    stats = {name: RangeStats() for name in wanted}
    facts = ValueFacts.of(model)
    try:
        extremes, not_finite = _extremes(model, source, wanted, facts, limit, progress)
    except RuntimeLoadError as error:  # onnxruntime refuses the added reductions (a model without the default domain)
        log.info("ranges read whole: %s", error)
        extremes, not_finite = {}, set()
    # A tensor whose min or max is NaN/Inf in some run is read again whole, its finite values picked out.
    read_whole = [name for name in wanted if name not in extremes or name in not_finite]
    for name, (low, high) in extremes.items():
        stats[name].low, stats[name].high = low, high
    if read_whole:
        for name in read_whole:
            stats[name] = RangeStats()
        for values in tensor_values(model, source, read_whole, limit=limit, label="calibration", facts=facts):
            for name in read_whole:
                low, high = _finite_range(np.asarray(values[name], dtype=np.float32))
                stats[name].low = min(stats[name].low, low)
                stats[name].high = max(stats[name].high, high)
    if method != "minmax":
        for values in tensor_values(model, source, wanted, limit=limit, label="calibration histograms"):
            for name in wanted:
                _add_to_histogram(stats[name], np.asarray(values[name], dtype=np.float32))
    return {name: choose_range(entry.low, entry.high, entry.histogram, method, percentile) for name, entry in stats.items()}


# Element types whose min and max onnxruntime's CPU ReduceMin/ReduceMax compute.
_REDUCIBLE = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE})


def _extremes(model: onnx.ModelProto, source: InputSource, names: list[str], facts: ValueFacts, limit: int | None,
              progress: Callable[[int], None] | None) -> tuple[dict[str, tuple[float, float]], set[str]]:
    """The min and max of each named float tensor over the feeds, taken inside onnxruntime by a
    ReduceMin and a ReduceMax added to the graph, so that no activation is copied out of it (exposing
    every activation of MobileNetV2 on runs of 16 images copied gigabytes into fresh arrays, and
    the page faults took a third of qdq's time); and the names whose min or max was not finite in a
    run. Tensors of other types (or graph inputs) are left out of the result."""
    inputs = {i.name for i in model.graph.input}
    reducible = [name for name in names if facts.types.get(name) in _REDUCIBLE and name not in inputs]
    if not reducible:
        return {}, set()
    augmented, outputs = _with_reductions(model, reducible, facts)
    low = dict.fromkeys(reducible, np.inf)
    high = dict.fromkeys(reducible, -np.inf)
    not_finite: set[str] = set()
    reduced_types = {output: facts.types[name] for name, pair in outputs.items() for output in pair}
    augmented_facts = ValueFacts({**facts.types, **reduced_types}, facts.bytes_per_sample)
    flat = list(reduced_types)
    for values in tensor_values(augmented, source, flat, limit=limit, label="calibration", feed_done=progress, facts=augmented_facts):
        for name, (smallest, largest) in outputs.items():
            run_low, run_high = float(values[smallest]), float(values[largest])
            if not (np.isfinite(run_low) and np.isfinite(run_high)):
                not_finite.add(name)
                continue
            low[name], high[name] = min(low[name], run_low), max(high[name], run_high)
    return {name: (low[name], high[name]) for name in reducible}, not_finite


def _with_reductions(model: onnx.ModelProto, names: list[str], facts: ValueFacts) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """A copy of ``model`` with a ReduceMin and a ReduceMax (over every axis, to a scalar) on each
    named tensor, and the names of their outputs per tensor."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    taken = {name for node in model.graph.node for name in node.output} | {i.name for i in model.graph.input}
    outputs: dict[str, tuple[str, str]] = {}
    for index, name in enumerate(names):
        pair = []
        for op in ("ReduceMin", "ReduceMax"):
            output = f"{name}__{op.lower()}"
            while output in taken:
                output += f"_{index}"
            taken.add(output)
            augmented.graph.node.append(onnx.helper.make_node(op, [name], [output], keepdims=0))
            augmented.graph.output.append(onnx.helper.make_tensor_value_info(output, facts.types[name], []))
            pair.append(output)
        outputs[name] = (pair[0], pair[1])
    return augmented, outputs


def _finite_range(array: np.ndarray) -> tuple[float, float]:
    """The smallest and largest finite value ((inf, -inf) when there is none). NaN and Inf make
    min or max non-finite, so the finite values are picked out only then, not on every run."""
    if not array.size:
        return np.inf, -np.inf
    low, high = float(array.min()), float(array.max())
    if np.isfinite(low) and np.isfinite(high):
        return low, high
    finite = array[np.isfinite(array)]
    return (float(finite.min()), float(finite.max())) if finite.size else (np.inf, -np.inf)


def _add_to_histogram(entry: RangeStats, values: np.ndarray) -> None:
    if not np.isfinite(entry.low):
        return
    counts, _ = np.histogram(values[np.isfinite(values)], bins=HISTOGRAM_BINS, range=(-entry.bound, entry.bound))
    entry.histogram = counts if entry.histogram is None else entry.histogram + counts
