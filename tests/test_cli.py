"""The command line: what users see, exit codes, and that bad input loses nothing."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, REPO, parse

from onnxsparse.cli import main

CNN = MODELS / "digits_cnn.onnx"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copy(CNN, tmp_path / "model.onnx")
    return tmp_path


def _outside_data_model(folder: Path) -> Path:
    """A model whose weight's external data location escapes its folder (path traversal)."""
    (folder / "inner").mkdir()
    (folder / "secret.bin").write_bytes(np.ones(4, np.float32).tobytes())
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[4] x) => (float[4] y) { y = Add (x, w) }
    """.replace("{ y", "<float[4] w = {1.0, 1.0, 1.0, 1.0}> { y"))
    weight = model.graph.initializer[0]
    weight.ClearField("float_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../secret.bin")
    path = folder / "inner" / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


BAD_INPUTS = {
    "missing file": (lambda d: ["optimize", str(d / "nope.onnx"), "-o", str(d / "out.onnx"), "-p", "cleanup"], "nope.onnx: no such file"),
    "not onnx": (lambda d: ["optimize", str(_write(d / "text.onnx", b"hello, I am not a model\n")), "-o", str(d / "out.onnx"), "-p", "cleanup"], "text.onnx: not an ONNX model"),
    "truncated": (lambda d: ["optimize", str(_write(d / "cut.onnx", CNN.read_bytes()[:12000])), "-o", str(d / "out.onnx"), "-p", "cleanup"], "cut.onnx: "),
    "fails checker": (lambda d: ["optimize", str(_write(d / "bad.onnx", _checker_failure())), "-o", str(d / "out.onnx"), "-p", "cleanup"], "bad.onnx: fails the onnx checker"),
    "external outside": (lambda d: ["optimize", str(_outside_data_model(d)), "-o", str(d / "out.onnx"), "-p", "cleanup"], "outside the model's folder"),
    "unknown pass": (lambda d: ["optimize", str(d / "model.onnx"), "-o", str(d / "out.onnx"), "-p", "cleanup,fold-batchnrom"], "unknown pass 'fold-batchnrom'"),
    "unknown option": (lambda d: ["optimize", str(d / "model.onnx"), "-o", str(d / "out.onnx"), "-p", "cleanup{drop_unused=true}"], "unknown option(s) drop_unused"),
    "mistyped option": (lambda d: ["optimize", str(d / "model.onnx"), "-o", str(d / "out.onnx"), "-p", "cleanup{drop_unused_inputs=perhaps}"], "'perhaps' is not true or false"),
    "output is input": (lambda d: ["optimize", str(d / "model.onnx"), "-o", str(d / "." / "model.onnx"), "-p", "cleanup"], "output path is the input model"),
    "inputs mismatch": (lambda d: ["optimize", str(d / "model.onnx"), "-o", str(d / "out.onnx"), "-p", "cleanup", "--inputs", str(MODELS / "digits_transformer.inputs.npz")], "input 'input' has shape (32, 8, 8)"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _checker_failure() -> bytes:
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["undefined"], ["y"])], "g", [],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8,
    )
    return model.SerializeToString()


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_no_output_input_untouched(workdir, capsys, case):
    build_args, expected = BAD_INPUTS[case]
    args = build_args(workdir)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}

    status = main(args)

    err = capsys.readouterr().err
    assert status == 2
    assert expected in err
    assert err.count("\n") == 1 and err.startswith("onnxsparse: error: ")
    after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert after == before  # no output, no temporary file, every input byte-identical


def test_optimize_prints_a_table_and_writes_model_and_report(workdir, capsys):
    status = main(["optimize", str(workdir / "model.onnx"), "-o", str(workdir / "out.onnx"), "-p", "cleanup,fold-batchnorm",
                   "--inputs", str(MODELS / "digits_cnn.inputs.npz"), "--report", str(workdir / "r.json"), "--markdown", str(workdir / "r.md")])
    out = capsys.readouterr().out
    assert status == 0
    assert re.search(r"fold-batchnorm\s+committed\s+5\s+0", out)
    assert "nodes 19 -> 14" in out and "final validation on" in out and "passed" in out
    report = json.loads((workdir / "r.json").read_text())
    assert report["output"]["op_histogram"].get("BatchNormalization") is None
    assert "| `fold-batchnorm` | committed | 5 |" in (workdir / "r.md").read_text()
    onnx.checker.check_model(str(workdir / "out.onnx"), full_check=True)


def test_optimize_json_output_is_machine_readable(workdir, capsys):
    assert main(["optimize", str(workdir / "model.onnx"), "-o", str(workdir / "out.onnx"), "-p", "cleanup", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["steps"][0]["pass_name"] == "cleanup" and data["inputs"].startswith("16 synthetic")


def test_validate_exits_1_and_names_the_output_when_the_tolerance_breaks(workdir, capsys):
    model = onnx.load(workdir / "model.onnx")
    weight = next(t for t in model.graph.initializer if t.name == "fc.weight")
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 1.01, "fc.weight"))
    onnx.save(model, workdir / "scaled.onnx")
    assert main(["validate", str(workdir / "model.onnx"), str(workdir / "model.onnx")]) == 0
    out = capsys.readouterr().out
    assert "passed" in out and "note: validated on 16 seeded synthetic sample(s)" in out and "real data may tell another story" in out
    assert main(["validate", str(workdir / "model.onnx"), str(workdir / "scaled.onnx"), "--inputs", str(MODELS / "digits_cnn.inputs.npz")]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "output 'logits': rel" in out and "passes with max_rel=" in out
    assert "synthetic" not in out
    assert main(["validate", str(workdir / "model.onnx"), str(workdir / "scaled.onnx"), "--tolerance", "min_cosine=0.999 min_top1=1"]) == 0


def test_inspect_shows_ops_tensors_bytes_and_sparsity(workdir, capsys):
    assert main(["inspect", str(workdir / "model.onnx"), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"BatchNormalization\s+5", out)
    assert re.search(r"block\.conv1\.weight\s+float32\s+16x16x3x3\s+9\.0 KB\s+0\.0%\s+initializer\s+Conv", out)
    assert "smaller tensor(s) not shown" in out
    assert main(["inspect", str(workdir / "model.onnx"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["op_histogram"]["Conv"] == 5 and data["parameters"] == 6138


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int8, np.bool_])
def test_zero_counts_take_negative_zero_nan_and_chunk_edges_as_numpy_does(monkeypatch, rng, dtype):
    from onnxsparse import inspect_model

    monkeypatch.setattr(inspect_model, "ZERO_COUNT_CHUNK", 7)  # chunk edges inside the array
    values = np.where(rng.random(50) < 0.3, 0.0, rng.standard_normal(50))
    if np.dtype(dtype).kind == "f":
        values[[3, 21]] = -0.0, np.nan
    array = values.astype(dtype).reshape(5, 10)
    assert inspect_model.zero_count(array) == array.size - np.count_nonzero(array) > 0


def test_passes_lists_every_pass_with_options_and_defaults(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "cleanup: Remove unused" in out and "drop_unused_inputs = false  [bool]" in out and "fold-batchnorm:" in out
    assert re.search(r"^qdq: .*\(needs --calibration with its default options\)$", out, re.MULTILINE)  # its default mode=auto calibrates
    assert not re.search(r"^cleanup: .*needs", out, re.MULTILINE)
    assert main(["passes", "--json"]) == 0
    catalogue = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert {"cleanup", "fold-batchnorm"} <= set(catalogue) and catalogue["qdq"]["requires"] == ["calibration"]


def _readme_command(marker: str) -> str:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index(f"<!-- ci:{marker} -->")
    return next(line for line in lines[start + 2 :] if line.strip())


def test_the_readme_main_job_runs_as_written(tmp_path):
    """The README's first command, minus its venv/pip prefix, run by the installed console script."""
    command = _readme_command("main-job")
    job = command.split("&&")[-1].strip()
    assert job.startswith(".venv/bin/onnxsparse optimize models/")
    shutil.copytree(MODELS, tmp_path / "models")
    args = shlex.split(job)[1:]
    completed = subprocess.run([sys.executable, "-m", "onnxsparse", *args], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "final validation on" in completed.stdout and "passed" in completed.stdout
    output = tmp_path / args[args.index("-o") + 1]
    onnx.checker.check_model(str(output), full_check=True)


def test_every_pipeline_the_readme_quotes_parses():
    """A pipeline quoted in the README (a backticked pass list with options) is one users paste: it
    must name real passes and options."""
    from onnxsparse.passes import registered_passes
    from onnxsparse.spec import parse_pipeline

    text = (REPO / "README.md").read_text(encoding="utf-8")
    names = set(registered_passes())
    candidates = re.findall(r"`([^`\n]+)`", text) + re.findall(r'-p "([^"]+)"', text)
    quoted = [q for q in candidates if "{" in q and re.match(r"[a-z-]+", q).group(0) in names]  # type: ignore[union-attr]
    assert len(quoted) >= 5  # the main job and the structured-pruning table
    for pipeline in quoted:
        parse_pipeline(pipeline)


def test_library_warnings_go_to_the_log_shown_from_v_on():
    """numpy's RuntimeWarnings (and onnxruntime's log lines) are library noise: hidden by default, logged with -v."""
    script = textwrap.dedent(f"""
        import sys, warnings
        from onnxsparse import cli
        real = cli._COMMANDS["inspect"]
        def noisy(args):
            warnings.warn("overflow encountered in cast", RuntimeWarning)
            return real(args)
        cli._COMMANDS["inspect"] = noisy
        sys.exit(cli.main(sys.argv[1:] + ["inspect", {str(MODELS / "digits_cnn.onnx")!r}]))
    """)
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert quiet.returncode == 0 and "overflow" not in quiet.stderr and "\x1b[" not in quiet.stderr
    verbose = subprocess.run([sys.executable, "-c", script, "-v"], capture_output=True, text=True, timeout=120, check=False)
    assert verbose.returncode == 0 and "py.warnings" in verbose.stderr and "overflow encountered in cast" in verbose.stderr


def test_the_version_and_the_package_answer_without_importing_onnx():
    """onnx takes 0.6 s to import: `onnxsparse --version` and `import onnxsparse` leave it (and onnxruntime) until a command needs them."""
    script = ("import sys, onnxsparse, onnxsparse.cli\n"
              "try:\n    onnxsparse.cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
              "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnx_graphsurgeon') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith("[]"), done.stdout + done.stderr
    assert done.stdout.startswith("onnxsparse 0.1.0")
    import onnxsparse

    assert onnxsparse.validate.__name__ == "validate" and onnxsparse.Tolerance.__name__ == "Tolerance"
    assert typing.get_type_hints(onnxsparse.list_passes)["return"] == dict[str, type[onnxsparse.Pass]]


def test_v_logs_a_line_per_phase_of_a_run(tmp_path):
    """Outside a terminal there are no progress bars: -v says what the run is doing, phase by phase."""
    done = subprocess.run([sys.executable, "-m", "onnxsparse", "-v", "optimize", str(MODELS / "digits_cnn.onnx"), "-o", str(tmp_path / "o.onnx"),
                           "-p", "cleanup,fold-batchnorm", "--inputs", str(MODELS / "digits_cnn.inputs.npz")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    phases = [line.split(": ", 1)[1].split(" ")[0].rstrip(":") for line in done.stderr.splitlines() if line.startswith("INFO onnxsparse.pipeline: ")]
    assert phases[0] == "loaded" and phases[1] == "reference" and phases[-2:] == ["final", "wrote"]
    assert "step 1/2 cleanup: no-change" in done.stderr and "step 2/2 fold-batchnorm: committed (run" in done.stderr
