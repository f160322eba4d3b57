"""What every benchmark script here shares: thread setting, timing with medians, the header and goal lines.

Timing synchronises the accelerator around each run with ``torch.utils.benchmark``'s own timer
function. ``torch.utils.benchmark.Timer`` itself is not used: each of its ``timeit`` calls first
runs the statement twice to warm up, which would triple the cost of the multi-second dense SVDs
that ``svd.py`` times once or twice; the scripts warm up explicitly where it matters.

Run the scripts from the repository root as modules (``python -m benchmarks.svd``), so that the
checkout's ``lightning_hrp`` and this module import without an install.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from torch.utils.benchmark.utils.timer import timer as synchronised_wall_clock

ResultT = TypeVar("ResultT")


class _Named(Protocol):
    name: str


NamedT = TypeVar("NamedT", bound=_Named)
CLOCKS = ("wall", "cpu")


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the duration (``None``: leave torch's choice); restored after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Timing:
    """Measurements of one operation, in seconds.

    Attributes:
        seconds: One entry per run, on the clock the report uses (wall, or this process's CPU time).
        wall_seconds: The same runs by the wall clock (what a repeat budget counts).
    """

    seconds: list[float]
    wall_seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall_seconds)

    @property
    def runs(self) -> int:
        return len(self.seconds)


def _timed_run(operation: Callable[[], ResultT]) -> tuple[ResultT, float, float]:
    """One run of ``operation``: its result, wall seconds and CPU seconds, the accelerator synchronised around it."""
    wall_start = synchronised_wall_clock()
    cpu_start = time.process_time()
    result = operation()
    wall = synchronised_wall_clock() - wall_start
    return result, wall, time.process_time() - cpu_start


def measure(
    operation: Callable[[], ResultT], *, repeats: int, budget_s: float, clock: str
) -> tuple[ResultT, Timing]:
    """Run ``operation`` up to ``repeats`` times, fewer once ``budget_s`` wall seconds are spent (at least once).

    Returns:
        The last run's result and the measurements; ``clock`` (``"wall"`` or ``"cpu"``) picks what
        :attr:`Timing.seconds` holds.
    """
    walls: list[float] = []
    cpus: list[float] = []
    result = None
    while len(walls) < repeats and (not walls or sum(walls) < budget_s):
        result, wall, cpu = _timed_run(operation)
        walls.append(wall)
        cpus.append(cpu)
    return result, Timing(seconds=walls if clock == "wall" else cpus, wall_seconds=walls)  # type: ignore[return-value]


def measure_interleaved(
    operations: dict[str, Callable[[], object]], *, repeats: int, budget_s: float, clock: str
) -> dict[str, Timing]:
    """Time several operations in rounds (each once per round, the order rotating), so that a busy
    machine slows them alike and their ratios hold within a round; up to ``repeats`` rounds, fewer once
    ``budget_s`` wall seconds are spent. Results are discarded."""
    names = list(operations)
    walls: dict[str, list[float]] = {name: [] for name in names}
    cpus: dict[str, list[float]] = {name: [] for name in names}
    spent = 0.0
    for round_index in range(repeats):
        if round_index and spent >= budget_s:
            break
        for offset in range(len(names)):
            name = names[(round_index + offset) % len(names)]
            _, wall, cpu = _timed_run(operations[name])
            walls[name].append(wall)
            cpus[name].append(cpu)
            spent += wall
    return {
        name: Timing(seconds=walls[name] if clock == "wall" else cpus[name], wall_seconds=walls[name]) for name in names
    }


def paired_ratio(numerator: Timing, denominator: Timing) -> float:
    """Median over rounds of ``numerator / denominator`` (both from one :func:`measure_interleaved` call)."""
    return statistics.median(n / d for n, d in zip(numerator.seconds, denominator.seconds))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line(device: torch.device, extras: Sequence[str] = ()) -> str:
    """Host CPU, threads, GPU (for a CUDA device), torch and Python versions, then ``extras``."""
    host = f"CPU {cpu_model()}, nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}"
    where = f"GPU {torch.cuda.get_device_name(device)}; host {host}" if device.type == "cuda" else host
    return "; ".join([where, f"torch {torch.__version__}", *extras, f"Python {platform.python_version()}"])


@dataclass
class RunClock:
    """The load average and the wall clock around a whole run, for the report's header."""

    load_before: float
    started: float
    load_after: float | None = None
    seconds: float | None = None

    @classmethod
    def start(cls) -> RunClock:
        return cls(load_before=os.getloadavg()[0], started=time.perf_counter())

    def stop(self) -> RunClock:
        self.load_after = os.getloadavg()[0]
        self.seconds = time.perf_counter() - self.started
        return self


def header_lines(
    script: str, argv: Sequence[str], machine: str, load_before: float, load_after: float, seconds: float
) -> list[str]:
    """The first lines of every report: the command, the machine, the load and the run time."""
    return [
        f"Command: python -m benchmarks.{script} {' '.join(argv)}".rstrip(),
        f"Machine: {machine}",
        f"1-min load average before / after: {load_before:.2f} / {load_after:.2f}; run took {seconds:.0f} s",
    ]


def by_name(*items: NamedT) -> dict[str, NamedT]:
    """The command-line table of the things a script runs (recipes, layer sets), keyed by their ``name``."""
    return {item.name: item for item in items}


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table: a header of ``columns``, then one line per row of already formatted cells."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"


def print_goal_lines(lines: Sequence[str]) -> None:
    """The verdicts that close a report, one bullet each."""
    if lines:
        print()
        for line in lines:
            print(f"- {line}")
