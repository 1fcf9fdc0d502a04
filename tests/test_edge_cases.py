"""Regressions from review: paths that must not be overwritten, awkward graphs, awkward outputs."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MODELS, parse, run, with_initializers

from onnxsparse import optimize
from onnxsparse.cli import main
from onnxsparse.errors import InputDataError, ValidationFailed
from onnxsparse.validation import Tolerance, compare

CNN = MODELS / "digits_cnn.onnx"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    shutil.copy(CNN, tmp_path / "m.onnx")
    return tmp_path


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("flags", [["--report", "m.onnx"], ["--markdown", "m.onnx"], ["--report", "out.onnx"], ["--report", "/nonexistent/r.json"]])
def test_no_output_may_replace_what_the_run_reads_or_another_output(folder, capsys, flags, monkeypatch):
    monkeypatch.chdir(folder)
    before = _snapshot(folder)
    assert main(["optimize", "m.onnx", "-o", "out.onnx", "-p", "cleanup", *flags]) == 2
    assert _snapshot(folder) == before
    assert capsys.readouterr().err.count("\n") == 1


def test_the_output_may_not_replace_the_inputs_external_data(folder, monkeypatch):
    monkeypatch.chdir(folder)
    onnx.save(onnx.load("m.onnx"), "e.onnx", save_as_external_data=True, location="e.data", size_threshold=0)
    before = _snapshot(folder)
    assert main(["optimize", "e.onnx", "-o", "e.data", "-p", "cleanup"]) == 2
    assert _snapshot(folder) == before


def test_fold_batchnorm_keeps_a_weight_that_is_also_a_graph_output(rng):
    model = with_initializers(onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[1, 2, 3, 3] x) => (float[1, 2, 3, 3] y, float[2, 2, 1, 1] w) {
        c = Conv (x, w)
        y = BatchNormalization (c, g, b, m, v)
    }"""), w=rng.standard_normal((2, 2, 1, 1)).astype(np.float32), g=np.array([2, 3], np.float32),
        b=np.array([1, -1], np.float32), m=np.array([0.5, 0.1], np.float32), v=np.array([1, 2], np.float32))
    from onnxsparse.passes import PassContext
    from onnxsparse.passes.fold_batchnorm import FoldBatchNorm

    folded = FoldBatchNorm().run(model, PassContext()).model
    onnx.checker.check_model(folded, full_check=True)
    feed = {"x": rng.standard_normal((1, 2, 3, 3)).astype(np.float32)}
    for a, b in zip(run(folded, feed), run(model, feed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_initializers_listed_as_inputs_stay_inputs_and_are_not_folded(rng, tmp_path):
    model = with_initializers(onnx.parser.parse_model("""
    <ir_version: 3, opset_import: ["" : 9]>
    agraph (float[1, 2, 3, 3] x, float[2, 2, 1, 1] w, float[2] g, float[2] b, float[2] m, float[2] v) => (float[1, 2, 3, 3] y) {
        c = Conv (x, w)
        y = BatchNormalization (c, g, b, m, v)
    }"""), w=np.ones((2, 2, 1, 1), np.float32), g=np.ones(2, np.float32), b=np.zeros(2, np.float32),
        m=np.zeros(2, np.float32), v=np.ones(2, np.float32))
    onnx.save(model, tmp_path / "ir3.onnx")
    report = optimize(tmp_path / "ir3.onnx", tmp_path / "out.onnx", "fold-batchnorm,magnitude-prune{sparsity=0.5}")
    written = onnx.load(tmp_path / "out.onnx")
    assert [i.name for i in written.graph.input] == ["x", "w", "g", "b", "m", "v"]
    assert "overridable" in report.steps[0].skipped[0].reason
    assert any("overridable" in s.reason for s in report.steps[1].skipped)


def test_dropping_an_unused_input_commits(tmp_path):
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[2] x, float[2] unused) => (float[2] y) { y = Relu (x) }""")
    onnx.save(model, tmp_path / "u.onnx")
    report = optimize(tmp_path / "u.onnx", tmp_path / "o.onnx", "cleanup{drop_unused_inputs=true}")
    assert report.steps[0].status == "committed"
    assert [i.name for i in onnx.load(tmp_path / "o.onnx").graph.input] == ["x"]


def test_sequences_compare_element_wise_and_a_changed_length_fails():
    ref = [{"s": [np.ones(3, np.float32), np.zeros(2, np.float32)]}]
    same = compare(ref, [{"s": [np.ones(3, np.float32), np.zeros(2, np.float32)]}], lambda _: Tolerance(max_abs=0))
    longer = compare(ref, [{"s": [np.ones(3, np.float32)] * 3}], lambda _: Tolerance())
    assert same.passed and same.outputs[0].compared
    assert not longer.passed and "sequence" in longer.verdict.failures[0]


def test_non_finite_mismatches_and_nan_metrics_fail():
    ref = [{"y": np.array([np.inf, 1.0], np.float32)}]
    assert not compare(ref, [{"y": np.array([5.0, 1.0], np.float32)}], lambda _: Tolerance()).passed
    assert compare(ref, [{"y": np.array([np.inf, 1.0], np.float32)}], lambda _: Tolerance(max_abs=0)).passed
    huge = [{"y": np.array([1e200, -1e200])}]
    flipped = compare(huge, [{"y": np.array([-1e200, 1e200])}], lambda _: Tolerance(min_cosine=0.99))
    assert flipped.outputs[0].cosine == pytest.approx(-1.0) and not flipped.passed
    with pytest.raises(InputDataError, match="not a number"):
        Tolerance(max_rel=float("nan"))
    with pytest.raises(InputDataError, match="temperature"):
        compare(ref, ref, lambda _: Tolerance(), temperature=0)


def test_json_output_stays_json_when_weights_live_in_constant_nodes(tmp_path, rng):
    model = onnx.load(CNN)
    weight = next(t for t in model.graph.initializer if t.name == "stem.0.weight")
    model.graph.initializer.remove(weight)
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["stem.0.weight"], value=weight))
    onnx.save(model, tmp_path / "c.onnx")
    completed = subprocess.run([sys.executable, "-m", "onnxsparse", "optimize", str(tmp_path / "c.onnx"), "-o", str(tmp_path / "o.onnx"),
                                "-p", "fold-batchnorm", "--json"], check=False, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["steps"][0]["figures"]["folded"] == 5


def test_npy_inputs_feed_a_single_input_model_and_corrupt_files_are_clean_errors(folder, capsys, monkeypatch):
    monkeypatch.chdir(folder)
    with np.load(MODELS / "digits_cnn.inputs.npz") as archive:
        np.save("x.npy", archive["input"])
    assert main(["validate", "m.onnx", "m.onnx", "--inputs", "x.npy"]) == 0
    Path("bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["validate", "m.onnx", "m.onnx", "--inputs", "bad.npz"]) == 2
    assert "bad.npz: cannot be read" in capsys.readouterr().err


@pytest.mark.parametrize(("recipe", "message"), [
    ('pass = ["cleanup"]\n', "is not a table"),
    ('tolerance = 5\n[[pass]]\nname = "cleanup"\n', "must be a table"),
    ('[tolerance]\noutputs = 5\n[[pass]]\nname = "cleanup"\n', "must be a table"),
    ('[tolerance]\nmax_rel = nan\n[[pass]]\nname = "cleanup"\n', "not a number"),
])
def test_recipes_with_wrong_types_are_one_line_errors(folder, capsys, recipe, message):
    (folder / "r.toml").write_text(recipe, encoding="utf-8")
    assert main(["optimize", str(folder / "m.onnx"), "-o", str(folder / "o.onnx"), "--recipe", str(folder / "r.toml")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_typos_in_tolerance_targets_and_dims_are_errors(folder, capsys):
    args = ["optimize", str(folder / "m.onnx"), "-o", str(folder / "o.onnx"), "-p", "cleanup"]
    assert main([*args, "--output-tolerance", "logitz:max_rel=1"]) == 2
    assert "(did you mean 'logits'?)" in capsys.readouterr().err
    assert main([*args, "--pass-tolerance", "fold-batchnorm:max_rel=1"]) == 2
    assert "not in the pipeline" in capsys.readouterr().err
    assert main([*args, "--dims", "bacth=8"]) == 2
    assert "(did you mean 'batch'?)" in capsys.readouterr().err


def test_an_ir_version_onnxruntime_cannot_read_gets_an_actionable_message(tmp_path, capsys):
    from onnxsparse.runtime import _load_failure

    # onnxruntime 1.31's own words for onnx 1.23's default IR version: always translated ...
    refusal = RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Load model from m.onnx failed:/onnxruntime_src/onnxruntime/core/graph/"
                           "model.cc:181 Unsupported model IR version: 14, max supported IR version: 13")
    assert "re-save the model with ir_version=13" in _load_failure(refusal)
    # ... and end to end where this onnxruntime really refuses the newest IR version the checker accepts
    model = onnx.load(CNN)
    model.ir_version = onnx.IR_VERSION
    with contextlib.suppress(Exception):  # onnxruntime's private exception types: it refuses the IR, as this test needs
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        pytest.skip(f"onnxruntime {ort.__version__} reads IR version {onnx.IR_VERSION}, the newest onnx {onnx.__version__} writes")
    onnx.save(model, tmp_path / "new_ir.onnx")
    assert main(["optimize", str(tmp_path / "new_ir.onnx"), "-o", str(tmp_path / "o.onnx"), "-p", "cleanup"]) == 2
    assert "re-save the model with ir_version=" in capsys.readouterr().err


def test_the_report_is_written_when_a_pass_fails_under_policy_raise(folder):
    with pytest.raises(ValidationFailed):
        optimize(folder / "m.onnx", folder / "o.onnx", "magnitude-prune{sparsity=0.9}", policy="raise", report_path=folder / "r.json")
    assert not (folder / "o.onnx").exists()
    (step,) = json.loads((folder / "r.json").read_text())["steps"]
    assert step["status"] == "rolled-back" and "cosine" in step["reason"] and step["validation"]["outputs"][0]["cosine"] < 0.99


def test_tensor_values_runs_only_what_the_asked_tensors_need_and_reads_the_same_values():
    from onnxsparse.activations import computing_only, tensor_values
    from onnxsparse.calibration import resolve_inputs

    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (bool cond, float[2, 3] x) => (float[2, 3] out) {
        w = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
        early = Mul (x, w)
        branch = If (cond) <
            then_branch = then_graph () => (float[2, 3] t) { t = Add (early, w) },
            else_branch = else_graph () => (float[2, 3] e) { e = Sub (early, w) }
        >
        late = Relu (branch)
        out = Neg (late)
    }""")
    trimmed = computing_only(model, ["early"])
    assert [n.op_type for n in trimmed.graph.node] == ["Constant", "Mul"] and [o.name for o in trimmed.graph.output] == ["early"]
    # a tensor read only inside the If body keeps the nodes that make it
    assert [n.op_type for n in computing_only(model, ["branch"]).graph.node] == ["Constant", "Mul", "If"]
    feed = {"cond": np.array(True), "x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    values = next(tensor_values(model, resolve_inputs([feed], model), ["early", "late"]))
    full = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(values["late"], -full.run(["out"], feed)[0])
    np.testing.assert_array_equal(values["early"], feed["x"] * np.array([1, 2, 3], np.float32))
