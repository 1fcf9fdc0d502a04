"""The pass manager: commit, roll back, raise or keep; the original model is never touched."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from conftest import BUNDLED, MODELS, bundled, bundled_inputs, run

from onnxsparse import load, optimize
from onnxsparse.calibration import IterableInputs, resolve_inputs
from onnxsparse.errors import PassFailed, RequirementError, ValidationFailed
from onnxsparse.graph import tensor_array
from onnxsparse.passes import Change, Pass, PassContext, PassResult, Requirement, Skip, register
from onnxsparse.passes.cleanup import Cleanup
from onnxsparse.pipeline import PassManager


def _first_float_weight(model: onnx.ModelProto) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2)


@register
@dataclass(frozen=True)
class CorruptWeight(Pass):
    """Test pass: negates the largest weight tensor (a new array, as the contract demands)."""

    name = "test-corrupt-weight"

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        tensor = _first_float_weight(model)
        tensor.CopyFrom(onnx.numpy_helper.from_array(-tensor_array(tensor), tensor.name))
        return PassResult(model, changes=[Change(tensor.name, "negated")])


@register
@dataclass(frozen=True)
class WriteInPlace(Pass):
    """Test pass: writes into a weight array it did not create (a contract breach)."""

    name = "test-write-in-place"

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        tensor_array(_first_float_weight(model))[...] = 0
        return PassResult(model)


@register
@dataclass(frozen=True)
class DanglingInput(Pass):
    """Test pass: leaves a node reading a tensor nobody produces (fails the checker)."""

    name = "test-dangling-input"

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        model.graph.node[0].input[0] = "no_such_tensor"
        return PassResult(model, changes=[Change(model.graph.node[0].name, "reads a tensor nobody produces")])


@register
@dataclass(frozen=True)
class NeedsCalibration(Pass):
    """Test pass: needs calibration data and does nothing with it."""

    name = "test-needs-calibration"
    requires = frozenset({Requirement.CALIBRATION})

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        assert context.calibration is not None
        return PassResult(model, skipped=[Skip("the model", "this test pass only reads calibration data")])


@pytest.fixture
def cnn() -> onnx.ModelProto:
    return load(MODELS / "digits_cnn.onnx")


def _manager(model: onnx.ModelProto, passes: list[Pass], **options) -> PassManager:
    return PassManager(passes, inputs=resolve_inputs(str(MODELS / "digits_cnn.inputs.npz"), model), **options)


@pytest.mark.parametrize("name", BUNDLED)
def test_cleanup_and_fold_batchnorm_on_bundled_models_are_exact(tmp_path, name):
    output, report_path = tmp_path / f"{name}.onnx", tmp_path / "report.json"
    report = optimize(MODELS / f"{name}.onnx", output, "cleanup,fold-batchnorm", inputs=MODELS / f"{name}.inputs.npz", report_path=report_path)

    written = onnx.load(output)
    onnx.checker.check_model(written, full_check=True)
    assert written.ir_version == onnx.load(MODELS / f"{name}.onnx").ir_version
    feed = bundled_inputs(name)
    for before, after in zip(run(MODELS / f"{name}.onnx", feed), run(output, feed)):
        scale = max(float(np.max(np.abs(before.astype(np.float64)))), 1e-12)
        assert np.max(np.abs(after.astype(np.float64) - before)) <= 1e-4 * scale
    data = json.loads(report_path.read_text())
    # the bundled models hold nothing unused; only the CNN has BatchNorms: a step that changed nothing says so and why
    assert [s["status"] for s in data["steps"]] == ["no-change", "committed" if name == "digits_cnn" else "no-change"]
    assert all(s["reason"] for s in data["steps"] if s["status"] == "no-change")
    assert all({"run", "check", "validate"} <= set(s["seconds"]) for s in data["steps"] if s["status"] == "committed")
    assert data["final_validation"]["verdict"]["passed"] is True
    assert all("max_rel" in o and "cosine" in o for s in data["steps"] if s["validation"] for o in s["validation"]["outputs"])
    assert report.final_validation.passed


def test_fold_batchnorm_on_the_cnn_removes_every_batchnorm(tmp_path):
    report = optimize(MODELS / "digits_cnn.onnx", tmp_path / "out.onnx", "fold-batchnorm")
    assert "BatchNormalization" not in report.output.op_histogram
    assert report.input.op_histogram["BatchNormalization"] == 5
    assert report.steps[0].figures["folded"] == 5
    assert report.output.parameters < report.input.parameters


def test_a_pass_that_corrupts_a_weight_is_rolled_back_and_the_original_is_unchanged(cnn):
    pristine = cnn.SerializeToString()
    final, report = _manager(cnn, [Cleanup(), CorruptWeight()]).run(cnn)

    assert cnn.SerializeToString() == pristine
    assert [s.status for s in report.steps] == ["no-change", "rolled-back"]
    assert "output 'logits'" in report.steps[1].reason and "passes with" in report.steps[1].reason
    assert report.steps[1].validation is not None and not report.steps[1].validation.passed
    assert final.SerializeToString() == pristine  # cleanup changed nothing, the corruption was undone
    assert report.final_validation.passed


def test_a_pass_writing_into_shared_weights_fails_loudly_and_is_rolled_back(cnn):
    pristine = cnn.SerializeToString()
    _, report = _manager(cnn, [WriteInPlace()]).run(cnn)
    assert report.steps[0].status == "rolled-back"
    assert "ValueError" in report.steps[0].reason and "read-only" in report.steps[0].reason
    assert cnn.SerializeToString() == pristine


def test_a_pass_that_breaks_the_graph_is_rolled_back_whatever_the_policy(cnn):
    _, report = _manager(cnn, [DanglingInput()], policy="keep").run(cnn)
    assert report.steps[0].status == "rolled-back"
    assert "fails the onnx checker" in report.steps[0].reason


def test_policy_raise_raises_on_a_tolerance_breach_and_on_a_broken_pass(cnn):
    with pytest.raises(ValidationFailed, match="test-corrupt-weight: output 'logits'"):
        _manager(cnn, [CorruptWeight()], policy="raise").run(cnn)
    with pytest.raises(PassFailed, match="test-dangling-input"):
        _manager(cnn, [DanglingInput()], policy="raise").run(cnn)


def test_policy_keep_keeps_the_failing_step_and_the_final_verdict_says_so(cnn):
    final, report = _manager(cnn, [CorruptWeight()], policy="keep").run(cnn)
    assert report.steps[0].status == "kept-failing"
    assert not report.final_validation.passed
    assert final.SerializeToString() != cnn.SerializeToString()


def test_a_missing_requirement_stops_before_any_work_with_the_way_to_provide_it(cnn):
    with pytest.raises(RequirementError, match="test-needs-calibration needs calibration data: pass --calibration"):
        _manager(cnn, [NeedsCalibration()]).run(cnn)
    calibration = resolve_inputs(str(MODELS / "digits_cnn.calibration.npz"), cnn)
    _, report = _manager(cnn, [NeedsCalibration()], calibration=calibration).run(cnn)
    assert report.steps[0].status == "no-change"
    assert report.steps[0].reason == "this test pass only reads calibration data (the model)"


def test_pass_objects_and_recipes_drive_optimize_too(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "cleanup"\n[[pass]]\nname = "fold-batchnorm"\n', encoding="utf-8")
    from_recipe = optimize(MODELS / "digits_cnn.onnx", tmp_path / "a.onnx", recipe=recipe)
    from_objects = optimize(MODELS / "digits_cnn.onnx", tmp_path / "b.onnx", [Cleanup(), CorruptWeight()])
    assert from_recipe.pipeline == "cleanup,fold-batchnorm"
    assert [s.status for s in from_objects.steps] == ["no-change", "rolled-back"]
    assert (tmp_path / "a.onnx").read_bytes() != (tmp_path / "b.onnx").read_bytes()


def test_each_model_version_runs_once_on_the_validation_feeds(cnn, monkeypatch):
    """The original (the reference), and each step's candidate: the final verdict reuses the last
    committed step's outputs instead of running that model on the same feeds again."""
    import onnxsparse.pipeline
    import onnxsparse.validation

    runs: list[int] = []
    counted = onnxsparse.validation.run_feeds

    def counting(session, feeds, label, progress=None):  # type: ignore[no-untyped-def]
        runs.append(len(feeds))
        return counted(session, feeds, label, progress)

    monkeypatch.setattr(onnxsparse.validation, "run_feeds", counting)
    monkeypatch.setattr(onnxsparse.pipeline, "run_feeds", counting)
    final, report = _manager(cnn, [Cleanup(), CorruptWeight()], policy="keep").run(cnn)
    assert [s.status for s in report.steps] == ["no-change", "kept-failing"]
    feeds = report.final_validation.feeds
    assert runs == [feeds, feeds]  # the original, the corrupted candidate; the final verdict ran nothing
    assert not report.final_validation.passed  # ... and still judges the kept, failing model, on its own outputs
    assert report.final_validation.outputs == report.steps[1].validation.outputs
    assert final.SerializeToString() != cnn.SerializeToString()


def test_shapes_are_inferred_once_per_model_version_and_kept_by_passes_that_preserve_them(monkeypatch):
    """channel-prune needs shapes: the manager infers them for the first, and the model the first
    commits (it preserves shapes), then magnitude-prune's (it changes weights only), has them still."""
    from onnxsparse import pipeline
    from onnxsparse.spec import parse_pipeline

    inferred = []
    real = pipeline.infer_shapes
    monkeypatch.setattr(pipeline, "infer_shapes", lambda model, label: inferred.append(label) or real(model, label))
    model, inputs, _ = bundled("digits_cnn")
    passes = parse_pipeline("channel-prune{ratio=0.25 round_to=4},magnitude-prune{sparsity=0.3},channel-prune{ratio=0.25 round_to=4}")
    _, report = PassManager(passes, inputs=inputs, policy="keep").run(model)
    from onnxsparse.report import KEPT

    assert all(step.status in KEPT for step in report.steps)
    assert len(inferred) == 1
    _, report = PassManager(parse_pipeline("channel-prune{ratio=0.25 round_to=4},qdq{mode=dynamic},channel-prune{ratio=0.25 round_to=4}"),
                            inputs=inputs, policy="keep", keep_worse=True).run(model)
    assert report.steps[1].status in KEPT and len(inferred) == 3  # qdq adds tensors without shapes: inferred again


def test_validation_inputs_are_counted_in_samples_whatever_the_files():
    """Three feeds of 300 images are 900 samples: the run judges on the first 512, and says so."""
    from onnxsparse.passes.cleanup import Cleanup

    model, _, _ = bundled("digits_cnn")
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.standard_normal((300, 1, 8, 8)).astype(np.float32)} for _ in range(3)]
    manager = PassManager([Cleanup()], inputs=IterableInputs(feeds))
    _, report = manager.run(model)
    assert report.inputs.endswith("(validated on the first 512 samples)")
    assert report.final_validation.feeds == 2  # 300 + 212
    _, report = PassManager([Cleanup()], inputs=IterableInputs(feeds), max_samples=None).run(model)
    assert "validated on the first" not in report.inputs and report.final_validation.feeds == 3
