"""What a run writes (issue 15): everything asked for or nothing, one writer per output, no leftovers
from killed runs, and the input's storage layout kept."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MODELS, REPO
from test_hardening import snapshot

from onnxsparse import io
from onnxsparse.cli import main
from onnxsparse.files import STAGING_PREFIX, OutputLock, remove_stale_staging, staging_prefix

CNN = MODELS / "digits_cnn.onnx"
TRANSFORMER = MODELS / "digits_transformer.onnx"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copy(CNN, tmp_path / "model.onnx")
    return tmp_path


def optimize_args(folder: Path, *extra: str) -> list[str]:
    return ["optimize", str(folder / "model.onnx"), "-o", str(folder / "out.onnx"), "-p", "cleanup",
            "--report", str(folder / "r.json"), "--markdown", str(folder / "r.md"), *extra]


def staging_left(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{STAGING_PREFIX}*"))


# ------------------------------------------------------------------------------ a full disk


def no_space(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_the_report_leaves_no_model_either(workdir, capsys, monkeypatch):
    """The issue's case: the model was in place before the report failed to write."""
    real_write_bytes = Path.write_bytes

    def write_bytes(self: Path, data: bytes) -> int:
        if self.name == "r.json":
            no_space()
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    before = snapshot(workdir)
    assert main(optimize_args(workdir)) == 2
    err = capsys.readouterr().err
    assert err == f"onnxsparse: error: {workdir / 'r.json'}: cannot be written (No space left on device); nothing was written\n"
    assert snapshot(workdir) == before


def test_a_full_disk_while_writing_the_model_and_its_external_data(workdir, capsys, monkeypatch):
    real = io._write_model

    def half_written(model: onnx.ModelProto, path: Path, *, external: bool) -> None:
        real(model, path, external=external)
        path.write_bytes(path.read_bytes()[:100])  # what was on disk when the space ran out
        no_space()

    monkeypatch.setattr(io, "_write_model", half_written)
    before = snapshot(workdir)
    assert main(optimize_args(workdir, "--external-data")) == 2
    assert capsys.readouterr().err == f"onnxsparse: error: {workdir / 'out.onnx'}: cannot be written (No space left on device); nothing was written\n"
    assert snapshot(workdir) == before


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A real 16 KB tmpfs (needs root or CAP_SYS_ADMIN; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], check=False, capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_is_exit_2_with_nothing_written(workdir, tiny_disk, capsys):
    before = snapshot(tiny_disk)
    status = main(["optimize", str(workdir / "model.onnx"), "-o", str(tiny_disk / "out.onnx"), "-p", "cleanup", "--report", str(tiny_disk / "r.json")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "No space left on device" in err
    assert snapshot(tiny_disk) == before and not list(tiny_disk.iterdir())


# ------------------------------------------------------------------------------ all or nothing, one writer


def test_a_run_writes_model_and_reports_and_leaves_nothing_else(workdir, capsys):
    assert main(optimize_args(workdir)) == 0
    written = sorted(p.name for p in workdir.iterdir())
    assert written == ["model.onnx", "out.onnx", "r.json", "r.md"]  # no staging, no lock file
    report = json.loads((workdir / "r.json").read_text())
    assert report["output_path"] == str(workdir / "out.onnx")
    assert report["output"]["file_bytes"] == (workdir / "out.onnx").stat().st_size


def test_a_second_run_writing_the_same_output_is_refused_while_the_first_holds_it(workdir, capsys):
    with OutputLock([workdir / "out.onnx"]):  # what a first run holds from its start to its last rename
        before = snapshot(workdir)
        assert main(optimize_args(workdir)) == 2
        err = capsys.readouterr().err
        assert err == f"onnxsparse: error: {workdir / 'out.onnx'}: another onnxsparse run (pid {os.getpid()}) is writing it; wait for it to end or choose another output path\n"
        assert snapshot(workdir) == before
    assert main(optimize_args(workdir)) == 0  # released: the next run writes
    assert not list(workdir.glob(".onnxsparse-lock-*"))


def test_two_processes_writing_one_output(workdir):
    """A real second process while the first holds the output (the lock is flock: per process too)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from onnxsparse.files import OutputLock
            with OutputLock([{str(workdir / 'out.onnx')!r}]):
                print("held", flush=True)
                sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-m", "onnxsparse", *optimize_args(workdir)], check=False, capture_output=True, text=True, cwd=REPO)
        assert second.returncode == 2 and f"another onnxsparse run (pid {holder.pid}) is writing it" in second.stderr
        assert not (workdir / "out.onnx").exists()
    finally:
        holder.communicate("\n")
    assert holder.returncode == 0


def test_under_policy_raise_the_reports_say_why_and_no_model_is_written(workdir):
    status = main(["optimize", str(workdir / "model.onnx"), "-o", str(workdir / "out.onnx"), "-p", "magnitude-prune{sparsity=0.9}",
                   "--policy", "raise", "--report", str(workdir / "r.json")])
    assert status == 1
    assert sorted(p.name for p in workdir.iterdir()) == ["model.onnx", "r.json"]
    assert json.loads((workdir / "r.json").read_text())["steps"][0]["status"] == "rolled-back"


# ------------------------------------------------------------------------------ killed runs


def dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(child.stdout)


def test_a_later_run_removes_stale_staging_of_dead_processes_and_says_so(workdir, caplog):
    stale = workdir / f"{staging_prefix().replace(str(os.getpid()), str(dead_pid()))}abcd1234"
    stale.mkdir()
    (stale / "out.onnx").write_bytes(b"half a model")
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    live = workdir / f"{STAGING_PREFIX}{sleeper.pid}-efgh5678"  # a run still writing: left alone
    live.mkdir()
    elsewhere = workdir / f"{STAGING_PREFIX}{dead_pid()}@another_machine-ijkl9012"  # a shared folder: its pid means nothing here
    elsewhere.mkdir()
    (workdir / ".onnxsparse-lock-other.onnx").write_text("12345")  # a killed run's lock, on another output
    try:
        with caplog.at_level(logging.WARNING, logger="onnxsparse"):
            assert main(optimize_args(workdir)) == 0
        assert staging_left(workdir) == sorted([live, elsewhere])
        assert not list(workdir.glob(".onnxsparse-lock-*"))
        assert any(str(stale) in r.getMessage() and "ended before it finished" in r.getMessage() for r in caplog.records)
    finally:
        sleeper.communicate(b"")
    assert remove_stale_staging(workdir) == [live] and staging_left(workdir) == [elsewhere]


KILLED_WHILE_SAVING = """
import os, sys, time
from pathlib import Path
from onnxsparse import io, optimize

real = io._write_model

def slow_write(model, path, *, external):
    real(model, path, external=external)
    Path(sys.argv[3]).write_text("staged")  # tell the test the model is half-way to its target
    time.sleep(600)

io._write_model = slow_write
optimize(sys.argv[1], sys.argv[2], "cleanup", external_data=True)
"""


def test_kill_9_during_a_save_then_a_second_run_leaves_no_staging(workdir):
    signal_file = workdir / "staged.signal"
    child = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_SAVING, str(workdir / "model.onnx"), str(workdir / "out.onnx"), str(signal_file)], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not signal_file.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert signal_file.exists(), "the child never reached its save"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    (left,) = staging_left(workdir)  # what kill -9 leaves: the staged model and its data
    assert sorted(p.name for p in left.iterdir()) == ["out.onnx", "out.onnx.data"]
    assert not (workdir / "out.onnx").exists()

    assert main(optimize_args(workdir)) == 0
    assert staging_left(workdir) == [] and not list(workdir.glob(".onnxsparse-lock-*"))
    ort.InferenceSession(str(workdir / "out.onnx"), providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------ layout


def stored_with_external_data(folder: Path) -> Path:
    path = folder / "ext.onnx"
    onnx.save(onnx.load(TRANSFORMER), path, save_as_external_data=True, location="ext.onnx.data", size_threshold=1024)
    return path


def test_external_data_in_external_data_out(tmp_path, capsys):
    source = stored_with_external_data(tmp_path)
    before = snapshot(tmp_path)
    assert main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "-p", "cleanup", "--report", str(tmp_path / "r.json")]) == 0
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before
    model = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    external = [t.name for t in model.graph.initializer if onnx.external_data_helper.uses_external_data(t)]
    inline = [t for t in model.graph.initializer if not onnx.external_data_helper.uses_external_data(t)]
    assert external and all(len(t.raw_data) <= 1024 for t in inline)  # onnx's default threshold, as the input
    assert (tmp_path / "out.onnx.data").stat().st_size > (tmp_path / "out.onnx").stat().st_size
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["output"]["file_bytes"] == (tmp_path / "out.onnx").stat().st_size + (tmp_path / "out.onnx.data").stat().st_size
    feed = {"input": np.zeros((2, 8, 8), np.float32)}
    expected = ort.InferenceSession(str(TRANSFORMER), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0], expected, rtol=1e-5, atol=1e-6)


def test_no_external_data_writes_one_file(tmp_path):
    source = stored_with_external_data(tmp_path)
    assert main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "-p", "cleanup", "--no-external-data"]) == 0
    assert not (tmp_path / "out.onnx.data").exists()
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in onnx.load(tmp_path / "out.onnx").graph.initializer)


def test_densify_keeps_the_layout(tmp_path, capsys):
    source = stored_with_external_data(tmp_path)
    assert main(["densify", str(source), "-o", str(tmp_path / "dense.onnx")]) == 0
    assert (tmp_path / "dense.onnx.data").is_file()
    assert "43.3 KB -> 43.3 KB" in capsys.readouterr().out  # the model and its data, both sides


@pytest.mark.parametrize("command", ["optimize", "densify"])
def test_an_outputs_external_data_may_not_replace_the_inputs(tmp_path, capsys, command):
    source = tmp_path / "a.onnx"
    onnx.save(onnx.load(TRANSFORMER), source, save_as_external_data=True, location="b.onnx.data", size_threshold=1024)
    before = snapshot(tmp_path)
    args = [command, str(source), "-o", str(tmp_path / "b.onnx")] + (["-p", "cleanup"] if command == "optimize" else [])
    assert main(args) == 2
    assert "b.onnx.data" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
