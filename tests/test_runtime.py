"""One session per model version: the runtime's memo, and what the README's main job makes of it,
counted (never timed)."""

from __future__ import annotations

import collections
import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from conftest import MODELS, bundled, parse, run

from onnxsparse import latency, load, optimize, runtime
from onnxsparse.io import tensor_bytes
from onnxsparse.runtime import Runtime, make_session
from onnxsparse.runtime import content_key as runtime_content
from onnxsparse.validation import run_feeds

TINY = """
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N, 4] x) => (float[N, 4] z) <float[4] b = {1, 2, 3, 4}> {
        y = Relu (x)
        z = Add (y, b)
    }
"""


def test_the_runtime_makes_one_session_per_model_content_and_use():
    runtime = Runtime()
    model = parse(TINY)
    first = runtime.session(model, "tiny")
    same_content = onnx.ModelProto()
    same_content.CopyFrom(model)
    assert runtime.session(same_content, "tiny") is first
    one_thread = runtime.session(model, "tiny", timing=True)
    assert one_thread is not first
    other = parse(TINY.replace("Relu", "Neg"))
    assert runtime.session(other, "neg") is not first
    assert (runtime.created, runtime.reused) == (3, 1)
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], dtype=np.float32)
    np.testing.assert_array_equal(first.run(None, {"x": x})[0], np.maximum(x, 0) + [1, 2, 3, 4])


def test_the_runtime_keeps_nothing_past_its_budget_and_nothing_it_is_told_not_to():
    model = parse(TINY)
    size = tensor_bytes(model)  # what the budget counts: the weights' bytes
    assert size == 16
    unkept = Runtime(max_bytes=2 * size - 1)  # a model of more than half the budget is never kept
    assert unkept.session(model, "tiny") is not unkept.session(model, "tiny")
    kept = Runtime(max_bytes=2 * size)
    assert kept.session(model, "tiny") is kept.session(model, "tiny")
    runtime = Runtime()
    assert runtime.session(model, "tiny", keep=False) is not runtime.session(model, "tiny", keep=False)
    kept = runtime.session(model, "tiny")
    assert runtime.session(model, "tiny") is kept
    runtime.clear()
    assert runtime.session(model, "tiny") is not kept


def _content_key(model: object) -> str:
    if isinstance(model, (str, Path)):
        data = Path(model).read_bytes()
    elif isinstance(model, bytes):
        data = model
    else:
        data = model.SerializeToString()  # type: ignore[attr-defined]
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def test_the_readme_main_job_loads_each_model_version_once_and_exports_each_once(tmp_path, monkeypatch):
    """A model version is exported from graphsurgeon once and loaded in onnxruntime once per use
    (timing on one thread, running, or writing its optimized graph for simplify); the only second
    load is the written file's, read back to prove it loads."""
    sessions: collections.Counter[tuple[str, int, bool]] = collections.Counter()
    exports: collections.Counter[str] = collections.Counter()
    real_session, real_export = ort.InferenceSession, gs.export_onnx
    output = tmp_path / "digits_cnn.opt.onnx"

    def counted_session(model, options=None, *args, **kwargs):
        if isinstance(model, str) and Path(model).name.startswith(output.name):  # the staged output, verified
            return real_session(model, options, *args, **kwargs)
        use = (options.intra_op_num_threads, bool(options.optimized_model_filepath)) if options is not None else (0, False)
        sessions[(_content_key(model), *use)] += 1
        return real_session(model, options, *args, **kwargs)

    def counted_export(*args, **kwargs):
        exported = real_export(*args, **kwargs)
        exports[_content_key(exported)] += 1
        return exported

    # the real timings (conftest pins them elsewhere): their sessions are counted too
    monkeypatch.setattr("onnxsparse.pipeline.relative_latency", latency.relative_latency)
    monkeypatch.setattr("onnxsparse.passes.channel_prune.budget.relative_latency", latency.relative_latency)
    monkeypatch.setattr(ort, "InferenceSession", counted_session)
    monkeypatch.setattr(gs, "export_onnx", counted_export)
    report = optimize(MODELS / "digits_cnn.onnx", output,
                      "fold-batchnorm,channel-prune{ratio=0.25 round_to=4 refit=true never_slower=false},qdq{mode=static}",
                      inputs=MODELS / "digits_cnn.inputs.npz", calibration=MODELS / "digits_cnn.calibration.npz", keep_worse=True)
    assert len(report.steps) == 3 and report.steps[0].status == "committed"
    assert output.exists()
    assert sessions and exports
    assert {key: count for key, count in sessions.items() if count > 1} == {}
    assert {key: count for key, count in exports.items() if count > 1} == {}



def test_a_timing_session_serves_the_validation_of_the_same_model_and_shapes_do_not_count():
    """A model timed and validated is loaded once: a validation takes the timing session of the
    same content (never the other way round: a timing needs one thread), and a pass's copy with
    inferred shapes (value_info) is the same content."""
    runtime = Runtime()
    model = parse(TINY)
    timing = runtime.session(model, "tiny", timing=True)
    shaped = onnx.shape_inference.infer_shapes(parse(TINY.replace("y = Relu (x)", "h = Relu (x)\n        y = Relu (h)")))
    assert len(shaped.graph.value_info) == 2  # h and y
    assert runtime.session(model, "tiny") is timing
    assert runtime.session(parse(TINY), "tiny", timing=True) is timing
    plain = runtime.session(shaped, "two relus")
    assert runtime.session(shaped, "two relus", timing=True) is not plain  # a validation session has onnxruntime's threads
    del shaped.graph.value_info[:]
    assert runtime.session(shaped, "two relus") is plain
    assert (runtime.created, runtime.reused) == (3, 3)


def test_a_one_thread_session_runs_its_feeds_side_by_side_with_the_same_outputs_in_order(monkeypatch):
    monkeypatch.setattr("onnxsparse.validation.usable_cores", lambda: 2)
    model = bundled("digits_cnn")[0]
    feeds = [{"input": np.random.default_rng(seed).random((3, 1, 8, 8), dtype=np.float32)} for seed in range(7)]
    seen: list[int] = []
    threaded = run_feeds(make_session(model, "digits"), feeds, "digits")
    timed = run_feeds(make_session(model, "digits", timing=True), feeds, "digits", lambda label, done, total: seen.append(done))
    assert seen == list(range(1, 8))
    assert len(timed) == len(threaded) == 7
    for ours, theirs, feed in zip(timed, threaded, feeds):
        np.testing.assert_allclose(next(iter(ours.values())), next(iter(theirs.values())), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(next(iter(ours.values())), run(model, feed)[0], rtol=1e-5, atol=1e-5)


def _counted_loads(monkeypatch, counted) -> collections.Counter[str]:
    """onnxruntime loads per model content (runtime.content_key) of the models ``counted(model, options)``
    accepts, from here on; qdq's timing really runs (its sessions counted) and is judged faster
    whatever the noise."""
    loads: collections.Counter[str] = collections.Counter()
    real_session = ort.InferenceSession

    def counted_session(model, options=None, *args, **kwargs):
        if counted(model, options):
            loads[runtime_content(onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model))] += 1
        return real_session(model, options, *args, **kwargs)

    def timed_as_faster(*args, **kwargs):
        latency.relative_latency(*args, **kwargs)
        return 0.5

    monkeypatch.setattr("onnxsparse.passes.qdq.quantize.relative_latency", timed_as_faster)
    monkeypatch.setattr(ort, "InferenceSession", counted_session)
    return loads


def test_qdq_dynamic_loads_the_original_and_its_result_once_each_for_timing_and_validation(tmp_path, monkeypatch):
    """The README's transformer through qdq{mode=dynamic}: the original is run for the reference
    and timed on one session, the int8 result timed and validated on one session."""
    output = tmp_path / "transformer.int8.onnx"
    loads = _counted_loads(monkeypatch, lambda model, options: not (isinstance(model, str) and Path(model).name.startswith(output.name)))
    report = optimize(MODELS / "digits_transformer.onnx", output, "qdq{mode=dynamic}", inputs=MODELS / "digits_transformer.inputs.npz")
    assert report.steps[0].status == "committed"
    original = runtime_content(onnx.load(MODELS / "digits_transformer.onnx"))
    assert loads[original] == 1
    assert loads[runtime_content(onnx.load(output))] == 1


def test_a_model_too_big_to_hold_is_pinned_for_its_timing_and_let_go_after():
    """A model past the budget is never held, except the original a first step will time: its
    reference session is a timing one, found again by that timing, and let go by unpin()."""
    model = parse(TINY)
    runtime = Runtime(max_bytes=1)  # every model is "big"
    assert runtime.session(model, "tiny") is not runtime.session(model, "tiny")
    assert runtime.session(model, "tiny (original)", timed_later=True) is not runtime.session(model, "tiny", timing=True)  # not pinned
    pinned = runtime.session(model, "tiny (original)", timed_later=True, pin=True)
    assert pinned.get_session_options().intra_op_num_threads == 1
    runtime.session(parse(TINY.replace("Relu", "Neg")), "other")  # not held, and trims nothing pinned
    assert runtime.session(model, "latency probe", timing=True) is pinned
    assert runtime.session(model, "validation") is pinned
    runtime.unpin()
    assert runtime.session(model, "latency probe", timing=True) is not pinned


def test_a_big_session_handed_over_is_held_until_it_is_next_asked_for():
    """A pass's result too big to hold, timed and handed over: the manager's validation gets that
    session, and from then on the runtime holds it no longer; one nobody asks for is dropped."""
    model, other = parse(TINY), parse(TINY.replace("Relu", "Neg"))
    runtime = Runtime(max_bytes=1)  # every model is "big"
    handed = runtime.session(model, "latency probe", timing=True, hand_over=True)
    runtime.session(other, "other")  # not held, and trims nothing handed over
    runtime.unpin()  # what the manager does once the pass returns: not a pin
    assert runtime.session(model, "validation") is handed
    assert runtime.session(model, "validation") is not handed
    dropped = runtime.session(other, "latency probe", timing=True, hand_over=True)
    runtime.drop_handed()
    assert runtime.session(other, "validation") is not dropped


@pytest.mark.parametrize("spec, loads_of_the_original, loads_of_the_result",
                         [("qdq{mode=dynamic guard=false}", 1, 1), ("qdq{mode=dynamic}", 4, 3), ("qdq{mode=static}", 4, 3)])
def test_a_big_original_is_held_for_its_timing_only_when_the_pass_runs_no_sessions_of_its_own(tmp_path, monkeypatch, spec,
                                                                                             loads_of_the_original, loads_of_the_result):
    """Every model counts as big here (a budget of 1 byte). qdq{mode=dynamic guard=false} runs nothing
    between the reference and its timing: the original is loaded once. qdq{mode=static} calibrates in
    sessions of its own, and the guard (dynamic mode's too, given calibration data) judges trials: the
    original is not held through that (two copies of a big model's weights), so it is loaded for the
    reference, the guard's judge, the judge's confirming samples and the timing (simplify's offline
    optimizer aside). The result is timed by the pass and handed over to the manager's validation:
    loaded once, and twice more where the guard judged it before on the judge's samples and on the
    confirming ones (on all cores, not one thread)."""
    import onnxsparse.pipeline as pipeline_module
    from onnxsparse.calibration import resolve_inputs
    from onnxsparse.spec import parse_pipeline

    # simplify's offline optimizer (a session writing its optimized graph) is not counted
    loads = _counted_loads(monkeypatch, lambda model, options: options is None or not options.optimized_model_filepath)
    model = load(MODELS / "digits_transformer.onnx")
    manager = pipeline_module.PassManager(parse_pipeline(spec), inputs=resolve_inputs(str(MODELS / "digits_transformer.inputs.npz"), model),
                                          calibration=resolve_inputs(str(MODELS / "digits_transformer.calibration.npz"), model))
    manager.runtime = Runtime(max_bytes=1)
    result, report = manager.run(model)
    assert report.steps[0].status == "committed"
    original = runtime_content(model)
    assert loads[original] == loads_of_the_original, loads[original]
    assert loads[runtime_content(result)] == loads_of_the_result, loads[runtime_content(result)]


def test_a_probes_trial_of_other_weights_drifts_exactly_as_a_copy_of_the_model_with_them(tmp_path):
    """DriftProbe.drift_with joins pieces of the message instead of copying the model: onnxruntime must
    read the same model, and optimize it as usual (its own overriding initializers are not: a Conv it
    fuses with the BatchNormalization after it kept its old weight)."""
    from onnxsparse.validation import DriftProbe

    cnn, _, calibration = bundled("digits_cnn")
    probe = DriftProbe(cnn, calibration)
    moved = {}
    for name in ("pointwise.0.weight", "fc.weight"):  # fused with its BatchNormalization; the classifier
        weight = next(t for t in cnn.graph.initializer if t.name == name)
        moved[name] = onnx.numpy_helper.to_array(weight) * np.float32(0.9)
    copy = onnx.ModelProto()
    copy.CopyFrom(cnn)
    for tensor in copy.graph.initializer:
        if tensor.name in moved:
            tensor.CopyFrom(onnx.numpy_helper.from_array(moved[tensor.name], tensor.name))
    assert probe.drift(copy) > 1e-3
    assert probe.drift_with(moved) == probe.drift(copy)
    assert probe.drift_with({"pointwise.0.weight": moved["pointwise.0.weight"]}) not in (0.0, probe.drift(copy))
    with pytest.raises(ValueError, match="no main-graph initializer"):
        probe.drift_with({"logits": moved["fc.weight"]})
    # a model held by a weight store goes by path: a copy with the values, the same drift
    expected = probe.drift(copy)
    original = onnx.ModelProto()
    original.CopyFrom(cnn)
    onnx.save_model(original, tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert DriftProbe(load(tmp_path / "m.onnx"), calibration).drift_with(moved) == expected


def test_our_sessions_do_not_spin_between_runs_and_a_timing_session_runs_as_deployed():
    """Our validation and probe sessions let onnxruntime's pool threads sleep between kernels (their
    spinning burnt CPU while numpy worked); a timing session keeps onnxruntime's defaults."""
    ours = make_session(parse(TINY), "tiny").get_session_options()
    timing = make_session(parse(TINY), "tiny", timing=True).get_session_options()
    assert ours.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        timing.get_session_config_entry("session.intra_op.allow_spinning")


FREED_HEAP_SCRIPT = """
import numpy as np
from onnxsparse.runtime import return_freed_memory

def anon_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon")) // 1024

np.ones(30 * 2**20 // 8)  # made and freed, a mapped block: glibc now serves blocks up to 30 MB from the heap
blocks = [np.ones(2**20) for _ in range(20)]  # 8 MiB each, 160 MiB of heap
above = np.ones(2**16)  # held above them: the heap's top is not free, so free() alone returns nothing
del blocks
before = anon_mib()
return_freed_memory()
print(before - anon_mib())
"""


@pytest.mark.skipif(runtime._malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_freed_heap_memory_goes_back_to_the_system():
    """What a freed session or a pass's arrays held leaves the process's resident memory: glibc keeps
    freed blocks of up to 32 MB (a weight each) on the heap, where they count until trimmed."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FREED_HEAP_SCRIPT], capture_output=True, text=True, check=True)
    assert int(done.stdout.strip()) >= 128  # MiB of the 160 freed
