"""onnxsparse tune: the search over pipelines, its cache, its choice, and the report it writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from xml.etree import ElementTree

import numpy as np
import onnx
import pytest
from conftest import MODELS, run, screenshot_pixels

from onnxsparse.cli import main
from onnxsparse.tuner import search, tune

CNN = MODELS / "digits_cnn.onnx"
DATA = {"calibration": str(MODELS / "digits_cnn.calibration.npz"), "inputs": str(MODELS / "digits_cnn.inputs.npz")}
SVG = "{http://www.w3.org/2000/svg}"


def _bytes(model: onnx.ModelProto) -> int:
    return sum(t.ByteSize() for t in model.graph.initializer) + sum(n.ByteSize() for n in model.graph.node)


@pytest.fixture
def latency_by_size(monkeypatch):
    """A stand-in for onnxruntime timing that ranks candidates the same on every machine: a
    candidate's "latency" is its bytes over the input's (int8 and removed channels are "faster")."""
    timed: list[int] = []

    def by_size(reference, candidate, feed, **options):
        timed.append(options.get("threads", 1))
        return _bytes(candidate) / _bytes(reference)

    monkeypatch.setattr(search, "relative_latency", by_size)
    return timed


def test_tune_climbs_each_family_until_the_budget_breaks_and_writes_the_best_within_it(tmp_path, latency_by_size):
    output = tmp_path / "out.onnx"
    result = tune(CNN, output, objective="latency", budget="min_top1=0.95", **DATA, report_path=tmp_path / "r.html",
                  json_path=tmp_path / "r.json")
    by_pipeline = {r.pipeline: r for r in result.records}
    # channel ratio 0.25 removes nothing (blocks of 8), 0.5 breaks the budget, so 0.7 is never built
    assert by_pipeline["channel-prune{ratio=0.25 refit=true never_slower=false}"].status == "unchanged"
    assert by_pipeline["channel-prune{ratio=0.5 refit=true never_slower=false}"].status == "over"
    assert not any("ratio=0.7" in p for p in by_pipeline)
    within = [r for r in result.records if r.status == "within" and not r.peer]
    assert result.chosen is not None and result.chosen.status == "within"
    assert result.chosen.latency == min(r.objective("latency") for r in within) < 1.0
    assert result.chosen.latency_all_cores is not None and 0 in latency_by_size  # finalists timed on every core too
    # what was written is the chosen candidate: checked, loadable, the same outputs
    written = onnx.load(output)
    onnx.checker.check_model(written, full_check=True)
    feed = {"input": np.load(MODELS / "digits_cnn.inputs.npz")["input"][:8]}
    np.testing.assert_array_equal(run(output, feed)[0], run(result.chosen.file, feed)[0])
    figures = json.loads((tmp_path / "r.json").read_text())
    assert figures["chosen"]["pipeline"] == result.chosen.pipeline and len(figures["records"]) == len(result.records)


def test_a_second_run_builds_nothing_and_chooses_the_same(tmp_path, latency_by_size, monkeypatch):
    first = tune(CNN, tmp_path / "a.onnx", budget="min_top1=0.95", cache=tmp_path / "cache", **DATA)
    real_build = search.build_candidate
    built: list[str] = []
    monkeypatch.setattr(search, "build_candidate", lambda job: built.append(job.pipeline) or real_build(job))
    latency_by_size.clear()
    second = tune(CNN, tmp_path / "b.onnx", budget="min_top1=0.95", cache=tmp_path / "cache", **DATA)
    assert built == [] and all(r.reused for r in second.records)
    assert [r.pipeline for r in second.records] == [r.pipeline for r in first.records]
    assert second.chosen is not None and first.chosen is not None and second.chosen.pipeline == first.chosen.pipeline
    assert latency_by_size == []  # the latencies measured on this machine were reused too
    tune(CNN, tmp_path / "c.onnx", budget="min_top1=0.8", cache=tmp_path / "cache", **DATA)
    assert built  # another budget is another search


def test_the_report_draws_every_measured_candidate_and_rings_the_chosen_one(tmp_path, latency_by_size):
    result = tune(CNN, tmp_path / "out.onnx", budget="min_top1=0.95", **DATA, report_path=tmp_path / "r.html")
    text = (tmp_path / "r.html").read_text()
    page = ElementTree.fromstring(text.split("\n", 1)[1])  # well-formed XML once the doctype line is off
    circles = list(page.iter(f"{SVG}circle"))
    diamonds = [d for d in page.iter(f"{SVG}rect") if "peer" in d.get("class", "")]  # onnxruntime's quantizer
    points = [c for c in circles if "candidate" in c.get("class", "")] + diamonds
    measured = [r for r in result.records if r.objective("latency") is not None and r.quality is not None]
    assert len(points) == len(measured) >= 5
    assert len(diamonds) == len([r for r in measured if r.peer]) == 2
    assert [c.get("class") for c in circles].count("chosen-ring") == 1
    assert any(line.get("class") == "budget" for line in page.iter(f"{SVG}line"))
    assert result.chosen is not None and result.chosen.pipeline in text
    # the int8 candidate's per-node scan as bars, one per node it quantized, and what the chosen pipeline did to each node
    bars = [r for r in page.iter(f"{SVG}rect") if "bar" in r.get("class", "")]
    assert len(bars) == len(result.sensitivity) >= 5
    assert result.layers and all(row["target"] in text for row in result.layers[:10])
    assert "http" not in text.replace("http://www.w3.org/2000/svg", "")  # nothing fetched from a network


def test_without_a_candidate_that_beats_the_input_only_the_reports_are_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(search, "relative_latency", lambda *args, **options: 1.2)
    output = tmp_path / "out.onnx"
    status = main(["tune", str(CNN), "-o", str(output), "--budget", "min_top1=0.95", "--calibration", DATA["calibration"],
                   "--inputs", DATA["inputs"], "--report", str(tmp_path / "r.html")])
    assert status == 4
    assert not output.exists() and (tmp_path / "r.html").exists()
    assert "no candidate within the budget is faster than the input" in capsys.readouterr().out


def test_combinations_pair_the_channels_that_held_with_int8_and_for_size_with_mixed_precision():
    from onnxsparse.tuner.candidates import combinations

    held = {"channels": "channel-prune{ratio=0.7 refit=true never_slower=false}",
            "int8 static": "qdq{mode=static never_slower=false sensitivity=true}", "mixed precision": "mixed-precision"}
    size = {c.family: c.pipeline for c in combinations(held, "size")}
    assert size == {"channels + int8 static": "channel-prune{ratio=0.7 refit=true never_slower=false},qdq{mode=static never_slower=false}",
                    "channels + mixed precision": "channel-prune{ratio=0.7 refit=true never_slower=false},mixed-precision"}
    assert [c.family for c in combinations(held, "latency")] == ["channels + int8 static"]  # a smaller file is no faster
    assert combinations({k: v for k, v in held.items() if k != "channels"}, "size") == []  # nothing to pair with
    # pruned weights, then codebooks (or each tensor's own format), then encoded as masks
    held |= {"sparse": "magnitude-prune{sparsity=0.5 criterion=wanda},sparse-encode{format=auto}", "codebook": "cluster{bits=4}"}
    size = {c.family: c.pipeline for c in combinations(held, "size")}
    assert size["sparse + codebook"] == "magnitude-prune{sparsity=0.5 criterion=wanda},cluster{bits=4},sparse-encode{format=auto}"
    assert size["sparse + mixed precision"] == "magnitude-prune{sparsity=0.5 criterion=wanda},mixed-precision,sparse-encode{format=auto}"
    assert "sparse + codebook" not in {c.family for c in combinations(held, "latency")}


def test_the_families_follow_the_model_the_data_and_the_objective():
    from onnxsparse.tuner.candidates import families

    def names(model: str, objective: str, calibration: bool) -> dict[str, tuple[str, ...]]:
        return {f.name: f.rungs for f in families(onnx.load(MODELS / model), objective, calibration=calibration)}  # type: ignore[arg-type]

    cnn, transformer = names("digits_cnn.onnx", "latency", True), names("digits_transformer.onnx", "size", False)
    assert set(cnn) == {"int8 static", "int8 dynamic", "channels"}  # its classifier is a Gemm: dynamic int8 applies
    assert all("refit=true" in rung for rung in cnn["channels"])
    assert "int8 static" not in transformer and "refit" not in " ".join(transformer["channels"])  # no calibration data
    assert transformer["block-wise weights"] == ("weight-only{bits=8 method=mse}", "weight-only{bits=4 method=mse}")  # mild first
    assert transformer["codebook"] == ("cluster{bits=8}", "cluster{bits=4}") and "fp16" in transformer
    # with calibration, a mixed rung between them: each tensor 4 or 8 bits by its sensitivity
    assert names("digits_cnn.onnx", "size", True)["codebook"] == ("cluster{bits=8}", "cluster{bits=6 allocate=sensitivity}", "cluster{bits=4}")
    assert "block-wise weights" not in names("digits_cnn.onnx", "size", True)  # MatMulNBits reads MatMul weights only
    # each tensor in a format of its own, chosen against the budget: it needs calibration data to probe and judge on
    assert names("digits_cnn.onnx", "size", True)["mixed precision"] == ("mixed-precision",) and "mixed precision" not in transformer
    assert "mixed precision" not in cnn  # a smaller file, not a faster model
    embedder = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N, 4] ids) => (float[N, 4, 8] y) <float[10, 8] table = {0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0}, float[8, 8] w = {0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0}> {
            e = Gather (table, ids)
            y = MatMul (e, w)
        }""")
    rungs = {f.name: f.rungs for f in families(embedder, "size", calibration=False)}["int8 dynamic"]
    assert rungs == ("qdq{mode=dynamic never_slower=false}", "qdq{mode=dynamic never_slower=false embeddings=true}")  # tables too, for size
    assert {f.name: f.rungs for f in families(embedder, "latency", calibration=False)}["int8 dynamic"] == rungs[:1]


def test_onnxruntimes_calibrator_gets_runs_of_a_few_samples_and_the_models_inputs_only():
    """A calibration file of many samples reaches onnxruntime's quantizer in runs of RUN_SAMPLES: it runs
    each feed as one batch (MobileNetV2's 384 images in one: 20.5 GB); labels stay out."""
    from onnxsparse.calibration import IterableInputs
    from onnxsparse.tuner.peers import _Reader

    model = onnx.load(CNN)
    images = np.zeros((40, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]), np.float32)
    reader = _Reader(IterableInputs([{"input": images, "label": np.zeros(40)}]), model)
    sizes = []
    while (feed := reader.get_next()) is not None:
        assert list(feed) == ["input"]
        sizes.append(len(feed["input"]))
    assert sizes == [16, 16, 8]


def test_a_budget_that_is_not_tolerance_text_is_bad_input(tmp_path, capsys):
    assert main(["tune", str(CNN), "-o", str(tmp_path / "o.onnx"), "--budget", "min_top=0.9"]) == 2
    assert "min_top" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_local_ray_instance_builds_and_times_the_same_candidates(tmp_path, latency_by_size):
    """--ray local: a Ray instance of this machine, started and stopped by the run; its workers build and
    time every candidate (the timing stand-in of this process does not reach them: real timings)."""
    ray = pytest.importorskip("ray")
    here = tune(CNN, tmp_path / "a.onnx", budget="min_top1=0.95", cache=tmp_path / "here", **DATA)
    assert len(latency_by_size) > 0
    latency_by_size.clear()
    remote = tune(CNN, tmp_path / "b.onnx", budget="min_top1=0.95", cache=tmp_path / "ray", ray="local", **DATA)
    assert remote.executor.startswith("built and timed as Ray tasks") and not ray.is_initialized()
    assert latency_by_size == []  # nothing timed in this process
    assert [(r.pipeline, r.status) for r in remote.records] == [(r.pipeline, r.status) for r in here.records]
    timed = [r for r in remote.records if r.status in ("within", "over")]
    assert timed and all(r.latency_estimate is not None and r.latency_estimate > 0 for r in timed)
    # each build ran in a worker of its own, so its peak memory is the build's; built here, it is not known
    built = [r for r in remote.records if not r.peer]
    assert all(r.peak_memory is not None and r.peak_memory > 50 * 2**20 for r in built)
    assert all(r.peak_memory is None for r in here.records)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is installed by the README's test command")
def test_the_report_renders_in_a_headless_browser(tmp_path, latency_by_size):
    """The HTML as a user opens it: Chromium loads the file with no network and draws the frontier."""
    tune(CNN, tmp_path / "out.onnx", budget="min_top1=0.95", **DATA, report_path=tmp_path / "r.html")
    shot = tmp_path / "shot.png"
    completed = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=800,600", f"--screenshot={shot}",
         (tmp_path / "r.html").as_uri()],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "HOME": str(tmp_path)})
    assert shot.exists(), completed.stderr[-2000:]
    pixels = screenshot_pixels(shot)
    blue = np.all(np.abs(pixels[..., :3].astype(int) - (0x2B, 0x7B, 0xB9)) <= 8, axis=-1)  # the within-budget points
    assert blue.sum() >= 40, "no candidate point drawn"


@pytest.mark.parametrize("flag, target", [("--report", "model"), ("--figures", "calibration"), ("--report", "output")])
def test_no_report_may_replace_the_input_its_data_or_the_model_written(tmp_path, capsys, flag, target):
    model = tmp_path / "m.onnx"
    shutil.copy(CNN, model)
    calibration = tmp_path / "c.npz"
    shutil.copy(DATA["calibration"], calibration)
    output = tmp_path / "out.onnx"
    paths = {"model": model, "calibration": calibration, "output": output}
    before = {p: p.read_bytes() for p in (model, calibration)}
    status = main(["tune", str(model), "-o", str(output), "--calibration", str(calibration), flag, str(paths[target])])
    assert status == 2 and "onnxsparse: error:" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (model, calibration)} == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["c.npz", "m.onnx"]  # not even the cache folder


def test_bad_data_is_exit_2_before_any_candidate_is_built(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(search, "build_candidate", lambda job: pytest.fail("built"))
    status = main(["tune", str(CNN), "-o", str(tmp_path / "o.onnx"), "--calibration", str(tmp_path / "missing.npz")])
    assert status == 2 and "missing.npz" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_only_a_long_timing_decides_and_only_our_candidates_count_for_the_exit_status(tmp_path, monkeypatch):
    """Estimates rank, the finalists' long timings decide: here the long timings reverse the estimates."""
    def reversed_at_length(reference, candidate, feed, **options):
        ratio = _bytes(candidate) / _bytes(reference)
        return ratio if options["min_runs"] == search.ESTIMATE_RUNS else 0.5 / ratio

    monkeypatch.setattr(search, "relative_latency", reversed_at_length)
    result = tune(CNN, tmp_path / "out.onnx", budget="min_top1=0.95", finalists=2, **DATA)
    finalists = [r for r in result.records if r.latency is not None]
    assert len(finalists) == 2 and result.chosen in finalists
    assert result.chosen.latency == min(r.latency for r in finalists)
    assert all(r.latency is None for r in result.records if r not in finalists)  # never chosen on an estimate alone


def test_a_candidate_whose_pass_refuses_the_model_fails_alone(tmp_path, latency_by_size, monkeypatch):
    from onnxsparse.errors import InputDataError

    real_optimize = search.optimize

    def refusing(model, output, pipeline, **options):
        if pipeline.startswith("qdq{mode=dynamic"):
            raise InputDataError("this candidate's metric raised")
        return real_optimize(model, output, pipeline, **options)

    monkeypatch.setattr(search, "optimize", refusing)
    result = tune(CNN, tmp_path / "out.onnx", budget="min_top1=0.95", **DATA)
    failed = [r for r in result.records if r.status == "failed"]
    assert [r.pipeline for r in failed] == ["qdq{mode=dynamic never_slower=false}"] and "metric raised" in failed[0].reason
    assert result.chosen is not None  # the others went on


def test_inputs_given_as_arrays_or_a_metric_file_that_changed_are_not_reused(tmp_path, latency_by_size, monkeypatch):
    real_build = search.build_candidate
    built: list[str] = []
    monkeypatch.setattr(search, "build_candidate", lambda job: built.append(job.pipeline) or real_build(job))
    arrays = {"calibration": [dict(np.load(DATA["calibration"]))], "inputs": [dict(np.load(DATA["inputs"]))]}
    for _ in range(2):
        tune(CNN, tmp_path / "a.onnx", budget="min_top1=0.95", cache=tmp_path / "arrays", **arrays)
    assert len(built) == 2 * len(set(built))  # Python objects cannot be fingerprinted: the second run built everything again
    metric = tmp_path / "metric.py"
    metric.write_text("def m(reference, candidate, inputs):\n    return 1.0, True\n")
    built.clear()
    tune(CNN, tmp_path / "b.onnx", metric=f"{metric}:m", cache=tmp_path / "metric", **DATA)
    first = len(built)
    metric.write_text("def m(reference, candidate, inputs):\n    return 0.0, False\n")
    second = tune(CNN, tmp_path / "b.onnx", metric=f"{metric}:m", cache=tmp_path / "metric", **DATA)
    ours = [r for r in second.records if not r.peer]
    assert sorted(built[first:]) == sorted(r.pipeline for r in ours) and not any(r.reused for r in ours)  # another metric: built again


def test_a_pipeline_that_wrote_the_same_model_as_an_earlier_one_is_that_one():
    from onnxsparse.tuner.records import Record

    first = Record("channel-prune{ratio=0.5}", "channels", 1, status="within", digest="d1")
    twin = Record("channel-prune{ratio=0.7}", "channels", 2, status="within", digest="d1")
    other = Record("qdq{mode=static}", "int8 static", 0, status="over", digest="d2")
    search._mark_duplicates([first], [twin, other])
    assert (twin.status, twin.duplicate_of, twin.status_as_built) == ("duplicate", first.pipeline, "within")
    assert other.status == "over"


def test_with_a_metric_and_no_budget_the_metric_alone_judges(tmp_path, latency_by_size):
    metric = tmp_path / "metric.py"
    metric.write_text("def m(reference, candidate, inputs):\n    return 1.0, True\n")
    result = tune(CNN, tmp_path / "out.onnx", metric=f"{metric}:m", **DATA)
    by_pipeline = {r.pipeline: r for r in result.records}
    # half the channels break min_top1=0.95 (see above) and qdq's own cosine bound; the metric says yes
    assert by_pipeline["channel-prune{ratio=0.5 refit=true never_slower=false}"].status == "within"
    assert result.budget == "your metric"
