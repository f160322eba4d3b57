"""How tests/gpu/run_on_gpu.py runs its steps: each a process with a time cap, its results in ``$OUT`` the moment it ends.

A step is one command. Steps run in groups: the steps of a group run at the same time, the groups
one after another. Each step has its own cap and the whole run a deadline; a step still running at
its cap (or at the deadline) is ended with its whole process group and counts as ``TIMEOUT``.
When a step ends, its ``collect`` function turns what it left behind into a markdown section and
files in ``$OUT``, and :class:`Results` rewrites ``results.json`` and appends to ``results.md`` and
``log.txt`` at once, so a later timeout, or the machine going away, loses nothing already done.

``$OUT`` comes back from the GPU machine only as at most 8 files, so :class:`Results` writes only
the names in :data:`OUT_FILES`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Every file the run may leave in $OUT (the device tool brings back at most 8).
OUT_FILES = ("results.md", "results.json", "log.txt", "gpu_tests.xml", "compare_report.md", "compare_runs.csv", "compare.tar.gz")
PASS, FAIL, TIMEOUT, SKIP = "PASS", "FAIL", "TIMEOUT", "SKIP"
# An uncapped step (cap_s None) that was still running at the deadline: planned, not a failure.
STOPPED = "STOPPED"
# After SIGTERM, how long a step's processes get to exit before SIGKILL.
KILL_GRACE_S = 5.0
POLL_S = 0.25


@dataclass
class StepResult:
    """What one step did. ``status`` is PASS, FAIL, TIMEOUT, STOPPED or SKIP; ``note`` says why, briefly."""

    name: str
    status: str
    seconds: float = 0.0
    cap_s: float | None = None
    returncode: int | None = None
    note: str = ""
    stdout: Path | None = field(default=None, repr=False)
    stderr: Path | None = field(default=None, repr=False)

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") if self.stdout and self.stdout.exists() else ""

    def errors(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr and self.stderr.exists() else ""


# collect(result, results) -> markdown for results.md (may copy files into $OUT, fill results.json).
Collect = Callable[[StepResult, "Results"], str]


def default_collect(step_result: StepResult, results: Results) -> str:
    """The step's standard output, as it printed it."""
    return fenced(step_result.output())


def fenced(text: str, limit: int = 20_000) -> str:
    text = text.rstrip()
    if len(text) > limit:
        text = f"[... {len(text) - limit} characters left out; all of it is in log.txt]\n" + text[-limit:]
    return f"```\n{text}\n```" if text else "(no output)"


@dataclass
class Step:
    """One command of the run.

    Attributes:
        name: Short, unique; the table's row.
        what: One line for the report.
        command: The command (run from the repository root), or None with ``skip`` set.
        cap_s: Seconds it may run; None: until the run's deadline, less the reserve of the later steps
            (ending there is STOPPED, not a failure: such a step keeps what it finished, e.g. a resumable sweep).
        collect: Turns its outputs into its report section (and files in ``$OUT``).
        skip: Why it does not run (then it is recorded as SKIP and not started).
        env: Variables added to the run's environment for this step.
    """

    name: str
    what: str
    command: list[str] | None
    cap_s: float | None
    collect: Collect = default_collect
    skip: str | None = None
    env: dict[str, str] = field(default_factory=dict)


class Results:
    """``$OUT``: ``results.md`` and ``log.txt`` appended to, ``results.json`` rewritten, after every step."""

    def __init__(self, out: Path, header: str) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {"steps": [], "benchmarks": {}}
        self.steps: list[StepResult] = []
        (out / "results.md").write_text(header.rstrip() + "\n")
        (out / "log.txt").write_text("")
        self._write_json()

    def path(self, name: str) -> Path:
        if name not in OUT_FILES:
            raise ValueError(f"{name!r} is not one of the files the GPU run may leave in $OUT: {OUT_FILES}")
        return self.out / name

    def copy(self, source: Path, name: str) -> None:
        shutil.copyfile(source, self.path(name))

    def append(self, name: str, text: str) -> None:
        with open(self.path(name), "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    def record(self, step: Step, step_result: StepResult, markdown: str) -> None:
        self.steps.append(step_result)
        row = {k: v for k, v in asdict(step_result).items() if k not in ("stdout", "stderr")}
        self.data["steps"].append({**row, "what": step.what, "command": step.command})
        self._write_json()
        cap = f"{step_result.cap_s:.0f} s" if step_result.cap_s is not None else "-"
        heading = f"\n## {step.name}: {step_result.status} ({step_result.seconds:.0f} s of {cap})\n\n{step.what}"
        if step.command:
            heading += f"\n\n`{' '.join(step.command)}`"
        note = f"\n\n{step_result.note}" if step_result.note else ""
        self.append("results.md", f"{heading}{note}\n\n{markdown.rstrip()}\n")
        log = f"\n===== {step.name}: {step_result.status} =====\n{step_result.output()}"
        self.append("log.txt", log + (f"\n----- stderr -----\n{step_result.errors()}" if step_result.errors() else ""))

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self._write_json()

    def _write_json(self) -> None:
        staging = self.out / ".results.json.partial"
        staging.write_text(json.dumps(self.data, indent=2, default=str))
        staging.replace(self.path("results.json"))

    def table(self) -> str:
        lines = ["| step | result | seconds | cap s | note |", "|---|---|---|---|---|"]
        for r in self.steps:
            cap = f"{r.cap_s:.0f}" if r.cap_s is not None else "-"
            lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {cap} | {r.note.splitlines()[0] if r.note else ''} |")
        return "\n".join(lines)

    def failed(self) -> list[str]:
        return [r.name for r in self.steps if r.status in (FAIL, TIMEOUT)]


def _end(process: subprocess.Popen) -> None:
    """SIGTERM to the step's whole process group, SIGKILL after the grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    process.wait()


def run_group(
    steps: list[Step],
    results: Results,
    *,
    cwd: Path,
    env: dict[str, str],
    logs: Path,
    deadline: float,
    reserve_s: float = 0.0,
    echo: Callable[[str], None] = print,
) -> list[StepResult]:
    """Run ``steps`` at the same time; record each as it ends. ``deadline`` is a ``time.monotonic()`` value.

    A step's time runs out at its ``cap_s`` or at ``deadline - reserve_s``, whichever comes first.
    """
    logs.mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[Step, subprocess.Popen, float, float, StepResult]] = {}
    done: list[StepResult] = []

    def finish(step: Step, step_result: StepResult) -> None:
        try:
            markdown = step.collect(step_result, results) if step_result.status != SKIP else ""
        except Exception as error:  # a broken report must not lose the step's row (or the next steps)
            step_result.status = FAIL if step_result.status == PASS else step_result.status
            step_result.note = f"{step_result.note} (collecting its results failed: {error!r})".strip()
            markdown = fenced(step_result.output())
        results.record(step, step_result, markdown)
        echo(f"[{time.strftime('%H:%M:%S')}] {step.name}: {step_result.status} after {step_result.seconds:.0f} s {step_result.note}".rstrip())
        if markdown:
            echo(markdown)
        done.append(step_result)

    for step in steps:
        if step.skip is not None or step.command is None:
            finish(step, StepResult(step.name, SKIP, note=step.skip or "nothing to run"))
            continue
        started = time.monotonic()
        left = deadline - reserve_s - started
        if left <= 1:
            finish(step, StepResult(step.name, SKIP, cap_s=step.cap_s, note="no time left before the run's deadline"))
            continue
        cap = left if step.cap_s is None else min(step.cap_s, left)
        out, err = logs / f"{step.name}.out", logs / f"{step.name}.err"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            process = subprocess.Popen(
                step.command, cwd=cwd, env={**env, **step.env}, stdout=stdout, stderr=stderr, start_new_session=True
            )
        echo(f"[{time.strftime('%H:%M:%S')}] {step.name}: started, cap {cap:.0f} s: {step.what}")
        running[step.name] = (step, process, started, cap, StepResult(step.name, PASS, cap_s=cap, stdout=out, stderr=err))

    try:
        while running:
            time.sleep(POLL_S)
            for name, (step, process, started, cap, step_result) in list(running.items()):
                elapsed = time.monotonic() - started
                if process.poll() is None and elapsed < cap:
                    continue
                if process.returncode is None:
                    _end(process)
                    if step.cap_s is None:
                        step_result.status, step_result.note = STOPPED, f"ran until the run's deadline ({cap:.0f} s); what it finished is kept"
                    else:
                        step_result.status, step_result.note = TIMEOUT, f"ended at its cap of {cap:.0f} s"
                else:
                    # Its children (e.g. a worker's ranks) go with it.
                    _end(process)
                    if process.returncode != 0:
                        step_result.status, step_result.note = FAIL, f"exit status {process.returncode}"
                step_result.returncode = process.returncode
                step_result.seconds = time.monotonic() - started
                del running[name]
                finish(step, step_result)
    finally:
        for step, process, *_ in running.values():  # interrupted: leave nothing running
            _end(process)
    return done
