"""The user's task metric: loaded from a module or a file, judged beside the tolerances by the qdq
guard, by every step and by the final validation; its failures are the user's input errors."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS, bundled

from onnxsparse import optimize
from onnxsparse.cli import main
from onnxsparse.errors import InputDataError
from onnxsparse.pipeline import PassManager
from onnxsparse.spec import parse_pipeline
from onnxsparse.validation import TaskMetric

STRICT_COSINE = 0.99995  # digits_transformer quantized whole stays below this (tests/test_qdq.py's guard test)


def logits_cosine(reference, candidate, feeds):
    """A task metric: the cosine of all logits together, within budget at STRICT_COSINE."""
    ref = np.concatenate([r["logits"].ravel() for r in reference]).astype(np.float64)
    cand = np.concatenate([c["logits"].ravel() for c in candidate]).astype(np.float64)
    cosine = float(ref @ cand / np.sqrt((ref @ ref) * (cand @ cand)))
    return cosine, cosine >= STRICT_COSINE


def test_a_task_metric_makes_the_guard_keep_nodes_the_default_tolerance_would_quantize():
    model, inputs, calibration = bundled("digits_transformer")
    _, default = PassManager(parse_pipeline("qdq{mode=static}"), inputs=inputs, calibration=calibration).run(model)
    assert default.steps[0].status == "committed" and not default.steps[0].figures.get("guard_kept_float")
    assert default.steps[0].validation.metric is None
    _, guarded = PassManager(parse_pipeline("qdq{mode=static}"), inputs=inputs, calibration=calibration,
                             metric=TaskMetric(logits_cosine)).run(model)
    step = guarded.steps[0]
    assert step.status == "committed" and step.figures["guard_kept_float"] > 0
    assert step.validation.metric is not None and step.validation.metric.within_budget
    assert guarded.final_validation.metric.value >= STRICT_COSINE


def test_a_metric_outside_its_budget_fails_the_step_and_says_so():
    model, inputs, _ = bundled("digits_cnn")
    never = TaskMetric(lambda reference, candidate, feeds: (0.5, False), "never")
    _, report = PassManager(parse_pipeline("fold-batchnorm"), inputs=inputs, metric=never).run(model)
    step = report.steps[0]
    assert step.status == "rolled-back" and "task metric never: 0.5 is outside its budget" in step.reason


def _metric_file(folder: Path, body: str) -> Path:
    path = folder / "my_metric.py"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def test_the_metric_comes_from_a_file_on_the_command_line_and_in_a_recipe(tmp_path, capsys):
    path = _metric_file(tmp_path, """
        import numpy as np
        def agreement(reference, candidate, feeds):
            same = np.mean([np.mean(r["logits"].argmax(-1) == c["logits"].argmax(-1)) for r, c in zip(reference, candidate)])
            return float(same), bool(same >= 0.9)
        """)
    status = main(["optimize", str(MODELS / "digits_cnn.onnx"), "-o", str(tmp_path / "out.onnx"), "-p", "fold-batchnorm",
                   "--inputs", str(MODELS / "digits_cnn.inputs.npz"), "--metric", f"{path}:agreement"])
    assert status == 0 and "metric " in capsys.readouterr().out
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('metric = "my_metric.py:agreement"\n[[pass]]\nname = "fold-batchnorm"\n', encoding="utf-8")
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    report = optimize(MODELS / "digits_cnn.onnx", elsewhere / "out.onnx", recipe=recipe, inputs=MODELS / "digits_cnn.inputs.npz")
    assert report.final_validation.metric is not None and report.final_validation.metric.value == 1.0
    assert main(["validate", str(MODELS / "digits_cnn.onnx"), str(elsewhere / "out.onnx"), "--inputs", str(MODELS / "digits_cnn.inputs.npz"),
                 "--metric", f"{path}:agreement"]) == 0
    assert "metric /" in capsys.readouterr().out  # the validate table's line names the metric and its value



@pytest.mark.parametrize(("body", "spec", "message"), [
    ("def f(r, c, x):\n    return 1.0, True\n", "my_metric.py", "expected module:function"),
    ("def f(r, c, x):\n    return 1.0, True\n", "my_metric.py:g", "has no function 'g'"),
    ("import no_such_module_here\n", "my_metric.py:f", "cannot import"),
    ("def f(r, c, x):\n    raise KeyError('labels')\n", "my_metric.py:f", "raised KeyError"),
    ("def f(r, c, x):\n    return 'good'\n", "my_metric.py:f", "raised ValueError"),
    ("def f(r, c, x):\n    return 1.0, 'yes'\n", "my_metric.py:f", "expected (a number, whether it is within the budget)"),
])
def test_a_broken_metric_is_one_line_exit_2_and_nothing_is_written(tmp_path, capsys, body, spec, message):
    _metric_file(tmp_path, body)
    shutil.copy(MODELS / "digits_cnn.onnx", tmp_path / "model.onnx")
    status = main(["optimize", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "out.onnx"), "-p", "fold-batchnorm",
                   "--inputs", str(MODELS / "digits_cnn.inputs.npz"), "--metric", str(tmp_path / spec)])
    err = capsys.readouterr().err
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.onnx").exists()


def test_a_metric_given_as_module_function_is_imported():
    metric = TaskMetric.load("test_metric:logits_cosine")
    assert metric.function is logits_cosine
    with pytest.raises(InputDataError, match="cannot import"):
        TaskMetric.load("no_such_module_here:f")


def accuracy_drop(reference, candidate, feeds):
    """Task accuracy against the labels stored beside the inputs: the candidate's drop in points, within 1."""
    def accuracy(outputs):
        return 100 * np.mean(np.concatenate([o["logits"].argmax(-1) == f["labels"] for o, f in zip(outputs, feeds)]))
    drop = accuracy(reference) - accuracy(candidate)
    return drop, drop <= 1.0


def test_labels_stored_beside_the_inputs_reach_the_metric_on_held_out_calibration_samples(tmp_path):
    from conftest import run

    from onnxsparse import load

    with np.load(MODELS / "digits_cnn.calibration.npz") as archive:
        images = archive["input"]
    labels = run(load(MODELS / "digits_cnn.onnx"), {"input": images})[0].argmax(-1)  # the original is always right
    np.savez(tmp_path / "labelled.npz", input=images, labels=labels)
    seen = []
    report = optimize(MODELS / "digits_cnn.onnx", tmp_path / "out.onnx", "fold-batchnorm,qdq{mode=static never_slower=false}",
                      calibration=tmp_path / "labelled.npz",
                      metric=lambda r, c, f: seen.append(sum(len(x["labels"]) for x in f)) or accuracy_drop(r, c, f))
    assert report.final_validation.metric is not None and report.final_validation.metric.name == "<lambda>"
    failed_on_metric = any("task metric" in failure for failure in report.final_validation.verdict.failures)
    assert failed_on_metric == (not report.final_validation.metric.within_budget)
    assert 16 in seen and 32 in seen  # the 16 held-out validation samples, the guard's 32 spread calibration samples


def test_a_metric_file_imports_its_neighbours_and_may_define_dataclasses(tmp_path):
    (tmp_path / "helpers_for_metric.py").write_text("THRESHOLD = 0.5\n", encoding="utf-8")
    path = _metric_file(tmp_path, """
        from __future__ import annotations
        from dataclasses import dataclass
        from helpers_for_metric import THRESHOLD

        @dataclass
        class Score:
            value: float

        def metric(reference, candidate, feeds):
            return Score(1.0).value, 1.0 >= THRESHOLD
        """)
    metric = TaskMetric.load(f"{path}:metric")
    assert metric.measure([], [], []).within_budget
