"""Byte-mutants of the bundled models through the CLI: every run must end with exit 0, 1 or 2 (never 3,
an internal error), in bounded time, with nothing written when it fails and no leftovers.

    python tools/fuzz.py --count 3000 --seed 1            # a long run; prints a summary and reproducers
    python tools/fuzz.py --seed 1 --case 417 --keep DIR   # one case again, its mutant kept in DIR

Each case takes one bundled model, or (one case in four) its validation inputs ``.npz``, applies one
seeded mutation (bit flips, bytes set, a truncation, inserted bytes), then runs ``inspect`` and
``optimize -p cleanup -o ... --report ...`` on a mutated model, or ``optimize ... --inputs`` and
``validate`` on mutated inputs, in-process through ``onnxsparse.cli.main``. Here every case runs in a forked child, killed after ``--time-limit``
seconds (a hang), so one bad case cannot stop the run; tests/test_fuzz.py runs a few hundred in the
test process itself. A case is reproduced from (seed, case) alone: the mutation is drawn from them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from onnxsparse.cli import main

MODELS = REPO / "models"
BUNDLED = ("digits_cnn", "digits_transformer", "digits_sklearn_mlp")
KINDS = ("flip", "set", "truncate", "insert")
HANG = -1  # the status recorded for a case killed at its time limit


@dataclass(frozen=True)
class Mutant:
    """One mutation of one model, drawn from (seed, case) alone."""

    seed: int
    case: int
    model: str
    kind: str
    offset: int
    payload: bytes = b""  # flip: one byte of bit masks per flipped byte; set/insert: the bytes
    target: str = "onnx"  # the file mutated: "onnx" (the model) or "inputs.npz" (its validation inputs)

    @property
    def source(self) -> Path:
        return MODELS / f"{self.model}.{self.target}"

    def apply(self, data: bytes) -> bytes:
        if self.kind == "truncate":
            return data[: self.offset]
        if self.kind == "insert":
            return data[: self.offset] + self.payload + data[self.offset :]
        mutated = bytearray(data)
        for index, value in enumerate(self.payload):
            position = (self.offset + index) % len(mutated)
            mutated[position] = mutated[position] ^ value if self.kind == "flip" else value
        return bytes(mutated)

    def describe(self) -> str:
        what = {"flip": "xor", "set": "set to", "insert": "insert"}.get(self.kind)
        detail = f" {what} {self.payload.hex(' ')}" if what else ""
        return f"seed {self.seed} case {self.case}: {self.model}.{self.target} {self.kind} at byte {self.offset}{detail}"


def draw(seed: int, case: int) -> Mutant:
    rng = random.Random(f"{seed}:{case}")  # a str seed is hashed with sha512: the same on every run and machine
    model = rng.choice(BUNDLED)
    target = "inputs.npz" if rng.random() < 0.25 else "onnx"
    size = (MODELS / f"{model}.{target}").stat().st_size
    kind = rng.choice(KINDS)
    # Half the offsets fall in the first and last 2 KB, where the graph's structure (names, types,
    # shapes, opsets) lives; the middle is mostly weight bytes, which any value makes a valid model.
    if rng.random() < 0.5:
        offset = rng.randrange(min(2048, size)) if rng.random() < 0.5 else size - 1 - rng.randrange(min(2048, size))
    else:
        offset = rng.randrange(size)
    if kind == "flip":
        payload = bytes(1 << rng.randrange(8) for _ in range(rng.choice((1, 1, 2, 4))))
    elif kind == "set":
        payload = bytes(rng.choice((0x00, 0xFF, 0x80, 0x7F, rng.randrange(256))) for _ in range(rng.choice((1, 2, 4, 8))))
    elif kind == "insert":
        payload = bytes(rng.randrange(256) for _ in range(rng.choice((1, 2, 5, 16))))
    else:
        payload = b""
    return Mutant(seed, case, model, kind, offset, payload, target)


@dataclass
class Outcome:
    mutant: Mutant
    statuses: dict[str, int] = field(default_factory=dict)  # command -> exit status (HANG when killed)
    errors: dict[str, str] = field(default_factory=dict)  # command -> its last stderr line
    written_on_failure: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    input_changed: bool = False
    seconds: float = 0.0

    @property
    def problems(self) -> list[str]:
        found = [f"{command} exit 3: {self.errors.get(command, '')}" for command, status in self.statuses.items() if status == 3]
        found += [f"{command} hung" for command, status in self.statuses.items() if status == HANG]
        found += [f"{command} exit {status}" for command, status in self.statuses.items() if status not in (0, 1, 2, 3, HANG)]
        found += [f"written although the run failed: {', '.join(self.written_on_failure)}"] if self.written_on_failure else []
        found += [f"left behind: {', '.join(self.leftovers)}"] if self.leftovers else []
        found += ["the input model was modified"] if self.input_changed else []
        return found


Runner = Callable[[Sequence[str], float], tuple[int, str]]


def run_case(mutant: Mutant, folder: Path, runner: Runner, time_limit: float) -> Outcome:
    """Write the mutant to ``folder``, run the commands on it, and judge what they left there."""
    data = mutant.apply(mutant.source.read_bytes())
    mutated = folder / ("m.onnx" if mutant.target == "onnx" else "m.npz")
    mutated.write_bytes(data)
    output, report = folder / "out.onnx", folder / "r.json"
    outcome = Outcome(mutant)
    started = time.perf_counter()
    if mutant.target == "onnx":
        commands = {
            "inspect": ["inspect", str(mutated)],
            "optimize": ["optimize", str(mutated), "-o", str(output), "-p", "cleanup", "--report", str(report)],
        }
    else:
        original = str(MODELS / f"{mutant.model}.onnx")
        commands = {
            "validate": ["validate", original, original, "--inputs", str(mutated)],
            "optimize": ["optimize", original, "-o", str(output), "-p", "cleanup", "--report", str(report), "--inputs", str(mutated)],
        }
    for name, args in commands.items():
        status, error = runner(args, time_limit)
        outcome.statuses[name] = status
        if error:
            outcome.errors[name] = error
    outcome.seconds = time.perf_counter() - started
    optimized = outcome.statuses["optimize"] == 0
    if not optimized:
        outcome.written_on_failure = [p.name for p in (output, report) if p.exists()]
    expected = {mutated.name} | ({"out.onnx", "out.onnx.data", "r.json"} if optimized else set())
    outcome.leftovers = sorted(p.name for p in folder.iterdir() if p.name not in expected and p.name not in outcome.written_on_failure)
    outcome.input_changed = mutated.read_bytes() != data
    return outcome


# ---------------------------------------------------------------------------------------------
# running one command
# ---------------------------------------------------------------------------------------------


class CaseTimeout(BaseException):
    """Raised by the alarm in the case's own frame: a BaseException, so the CLI does not turn it into exit 3."""


def run_in_process(args: Sequence[str], time_limit: float) -> tuple[int, str]:
    """``main(args)`` here, stopped by SIGALRM after ``time_limit`` (Python code only; see run_forked)."""
    stderr = io.StringIO()

    def expire(*_: object) -> None:
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, time_limit)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            status = main(list(args))
    except CaseTimeout:
        status = HANG
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return status, _last_line(stderr.getvalue())


def run_forked(args: Sequence[str], time_limit: float) -> tuple[int, str]:
    """``main(args)`` in a forked child, killed after ``time_limit``: a hang in native code too."""
    with tempfile.TemporaryFile() as stderr:
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            status = 3
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                os.dup2(stderr.fileno(), 2)
                sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # noqa: SIM115
                status = main(list(args))
                sys.stderr.flush()
            finally:
                os._exit(status)
        deadline = time.monotonic() + time_limit
        while True:
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return HANG, ""
            time.sleep(0.005)
        stderr.seek(0)
        error = _last_line(stderr.read().decode(errors="replace"))
    return (os.waitstatus_to_exitcode(wait_status), error)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------
# the long run
# ---------------------------------------------------------------------------------------------


def fuzz(seed: int, cases: Sequence[int], runner: Runner, time_limit: float, keep: Path | None = None,
         progress: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
    outcomes = []
    root = Path(tempfile.mkdtemp(prefix="onnxsparse-fuzz-"))
    try:
        for done, case in enumerate(cases, 1):
            folder = (keep / f"case{case}") if keep is not None else root / f"case{case}"
            folder.mkdir(parents=True, exist_ok=True)
            outcome = run_case(draw(seed, case), folder, runner, time_limit)
            outcomes.append(outcome)
            if keep is None:
                shutil.rmtree(folder, ignore_errors=True)
            if progress is not None:
                progress(done, outcome)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return outcomes


def summary(outcomes: Sequence[Outcome], seconds: float) -> str:
    lines = [f"{len(outcomes)} mutants in {seconds:.0f} s ({seconds / max(len(outcomes), 1) * 1000:.0f} ms each)"]
    for target in ("onnx", "inputs.npz"):
        mutants = [o for o in outcomes if o.mutant.target == target]
        for command in dict.fromkeys(c for o in mutants for c in o.statuses):
            counts = Counter(o.statuses[command] for o in mutants if command in o.statuses)
            text = ", ".join(f"{'hang' if status == HANG else f'exit {status}'}: {count}" for status, count in sorted(counts.items()))
            lines.append(f"  {command} on mutated .{target} ({len(mutants)}): {text}")
    kinds = Counter((o.mutant.kind, o.statuses["optimize"]) for o in outcomes)
    lines.append("  optimize by mutation: " + "; ".join(
        f"{kind} " + "/".join(f"{kinds[(kind, s)]}x{s}" for s in sorted({s for k, s in kinds if k == kind}))
        for kind in KINDS if any(k == kind for k, _ in kinds)))
    hangs = sum(status == HANG for o in outcomes for status in o.statuses.values())
    exit3 = sum(status == 3 for o in outcomes for status in o.statuses.values())
    written = sum(bool(o.written_on_failure) for o in outcomes)
    leftovers = sum(bool(o.leftovers) for o in outcomes)
    changed = sum(o.input_changed for o in outcomes)
    lines.append(f"  exit 3: {exit3}; hangs: {hangs}; outputs written on failure: {written}; leftovers: {leftovers}; inputs modified: {changed}")
    bad = [o for o in outcomes if o.problems]
    if bad:
        lines.append("reproducers (python tools/fuzz.py --seed SEED --case CASE --keep DIR):")
        lines.extend(f"  {o.mutant.describe()}: {'; '.join(o.problems)}" for o in bad)
    return "\n".join(lines)


def main_fuzz(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="mutants (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case", type=int, action="append", help="run only these case numbers (repeatable)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per command before it counts as a hang (default 60)")
    parser.add_argument("--keep", type=Path, help="keep each case's folder (the mutant and what was written) under DIR")
    parser.add_argument("--in-process", action="store_true", help="run in this process (as the test does) instead of forked children")
    args = parser.parse_args(argv)
    # the CLI's own logging setup is then a no-op: its warnings would go to the captured stderr of one case
    logging.basicConfig(handlers=[logging.NullHandler()])
    cases = args.case or range(args.count)
    runner = run_in_process if args.in_process else run_forked
    started = time.perf_counter()

    def progress(done: int, outcome: Outcome) -> None:
        if outcome.problems:
            print(f"{outcome.mutant.describe()}: {'; '.join(outcome.problems)}", flush=True)
        if done % 250 == 0:
            print(f"... {done} done, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    outcomes = fuzz(args.seed, cases, runner, args.time_limit, args.keep, progress)
    print(summary(outcomes, time.perf_counter() - started))
    return 1 if any(o.problems for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main_fuzz())
