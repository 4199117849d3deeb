"""``flops demo`` on an idle machine and on a loaded one, phase by phase.

Runs the demo twice, one run after the other, each with a fresh ``FLOPS_HOME`` (so each
builds the example's environment): first with nothing else started, then next to
``stress-ng --cpu 4`` (four busy workers; on a 2-core machine a CPU-bound process gets a
third of a core or less). Each run is the installed ``flops demo`` command as a user runs it,
its output read line by line as it comes (plain lines: the output is a pipe).

Reports the wall time of each phase in seconds for both runs and the ratio loaded/idle:

- the demo's own waits, from its ``done: <wait> (N s)`` lines: starting the manager, store,
  Mosquitto and MLflow; starting the data servers; the nodes' registration; the mock data
  push; stopping the suite;
- the project's phases (``pending``, ``building``, ``deploying``, ``training``,
  ``post_training``) from the final summary;
- ``aggregator start``: from the line saying the aggregator was started to the aggregator's
  ``listening`` line (part of ``training``);
- ``until result``: from the command's start to its result (the final summary);
- ``total``: the command's wall time (to its exit).

Usage: ``uv run python benchmarks/demo_under_load.py [--rounds 2] [--workers 4]
[--json FILE]``. Needs ``stress-ng`` (scripts/bootstrap installs it). Takes a few minutes.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOPS = str(Path(sys.executable).with_name("flops"))
DEMO_TIMEOUT_S = 1800.0
STEP = re.compile(r"^done: (?P<what>.+) \((?P<seconds>\d+\.\d) s\)$")
PHASES = re.compile(r"^phases\s+(?P<phases>.*)$")
PHASE = re.compile(r"(?P<name>\w+) (?P<seconds>\d+\.\d) s")
AGGREGATOR_STARTED = "started the aggregator"
RESULT = re.compile(r"^─+ result ─+$")
AGGREGATOR_LISTENING = re.compile(r"aggregator.*listening on")
STEP_NAMES = {
    "starting the manager": "manager start",
    "starting ": "data servers start",
    "waiting for": "nodes register",
    "pushing MNIST": "mock data push",
    "stopping the suite": "suite stop",
}
"""Short names of the demo's waits, by the start of their text."""


def run_demo(rounds: int, log: Path) -> dict[str, float]:
    """Run ``flops demo --rounds ROUNDS`` with a fresh ``FLOPS_HOME``; returns seconds per
    phase (see the module docstring). Raises ``RuntimeError`` when the demo fails (its
    output is in ``log``)."""
    with tempfile.TemporaryDirectory(prefix="flops-demo-bench-") as home:
        env = {**os.environ, "FLOPS_HOME": home, "COLUMNS": "200"}
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # as scripts/demo runs it
        began = time.monotonic()
        seconds: dict[str, float] = {}
        marks: dict[str, float] = {}
        with log.open("w") as out:
            process = subprocess.Popen(
                [FLOPS, "demo", "--rounds", str(rounds)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
            assert process.stdout is not None
            for line in process.stdout:
                out.write(f"{time.monotonic() - began:8.1f}  {line}")
                _read_line(line.rstrip("\n"), seconds, marks)
            code = process.wait(timeout=DEMO_TIMEOUT_S)
        seconds["total"] = time.monotonic() - began
    if code != 0:
        raise RuntimeError(f"flops demo exited with {code}; see {log}")
    if "aggregator" in marks and "listening" in marks:
        seconds["aggregator start"] = marks["listening"] - marks["aggregator"]
    if "result" in marks:
        seconds["until result"] = marks["result"] - began
    return seconds


def _read_line(line: str, seconds: dict[str, float], marks: dict[str, float]) -> None:
    """Note what ``line`` of the demo's output measures."""
    if step := STEP.match(line):
        what = step["what"]
        name = next((short for start, short in STEP_NAMES.items() if what.startswith(start)), what)
        seconds[name] = float(step["seconds"])
    elif phases := PHASES.match(line):
        for phase in PHASE.finditer(phases["phases"]):
            seconds[phase["name"]] = float(phase["seconds"])
    elif AGGREGATOR_STARTED in line:
        marks.setdefault("aggregator", time.monotonic())
    elif AGGREGATOR_LISTENING.search(line):
        marks.setdefault("listening", time.monotonic())
    elif RESULT.search(line):
        marks.setdefault("result", time.monotonic())


def under_load(workers: int, rounds: int, log: Path) -> dict[str, float]:
    """:func:`run_demo` next to ``stress-ng --cpu WORKERS`` (stopped afterwards)."""
    stress = subprocess.Popen(
        ["stress-ng", "--cpu", str(workers), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        return run_demo(rounds, log)
    finally:
        os.killpg(stress.pid, signal.SIGTERM)
        stress.wait(timeout=30)


def report(idle: dict[str, float], loaded: dict[str, float], workers: int) -> str:
    """The table of both runs: phase, idle s, loaded s, ratio."""
    order = [*STEP_NAMES.values(), "pending", "building", "deploying", "training"]
    order += ["aggregator start", "post_training", "until result", "total"]
    names = [n for n in order if n in idle or n in loaded]
    names += [n for n in {**idle, **loaded} if n not in names]
    rows = [f"{'phase':<20}{'idle s':>10}{f'stress-ng x{workers} s':>20}{'ratio':>8}"]
    for name in names:
        a, b = idle.get(name), loaded.get(name)
        ratio = f"{b / a:.1f}" if a and b is not None and a > 0.05 else "-"
        rows.append(f"{name:<20}{_num(a):>10}{_num(b):>20}{ratio:>8}")
    return "\n".join(rows)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4, help="stress-ng CPU workers")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    if shutil.which("stress-ng") is None:
        sys.exit("stress-ng is missing: run scripts/bootstrap (or apt-get install stress-ng)")
    idle = run_demo(args.rounds, args.logs / "demo-idle.log")
    loaded = under_load(args.workers, args.rounds, args.logs / "demo-loaded.log")
    print(report(idle, loaded, args.workers))
    print(f"(logs: {args.logs / 'demo-idle.log'}, {args.logs / 'demo-loaded.log'})")
    if args.json:
        args.json.write_text(json.dumps({"idle": idle, "loaded": loaded}, indent=2))


if __name__ == "__main__":
    main()
