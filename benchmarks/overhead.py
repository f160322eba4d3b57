"""Benchmark: what High-Rank Preheating adds to a fine-tuning run, in time and in peak memory.

For each offline recipe (matrix regression; all-MiniLM-L6-v2 on Rotten Tomatoes; with
``--include-sft``, SmolLM2-135M SFT on GSM8K), every repeat fits the same main steps three
times with the same seed: plain LoRA, and with :class:`lightning_hrp.HRPPreheatCallback` at
preheat rank ``R = 4r`` and ``R = 8r`` (``--multipliers``). Validation, logging, checkpoints and
progress bars are off, so a fit is preheating (if any) plus the training loop.

Time, per HRP fit:

* ``hrp_s``: ``preheat_seconds + decompose_seconds`` from the callback's ``report``.
* ``main_s``: the training loop (``on_train_start`` after the callback to ``on_train_end``),
  measured in the same fit; ``hrp_share = hrp_s / main_s``.
* ``fit_delta_share``: (whole ``trainer.fit`` with HRP - without) / ``main_s`` of the LoRA fit of
  the same repeat, which also counts what the callback does around the two timed parts.
* ``step_cost``: seconds per preheat step over the median main step of the same fit (why a share
  is what it is); the first main step of each fit is shown apart, as it also pays one-off costs
  (memory faulted in, lazy state) that the first preheat step pays instead in an HRP fit.

Goal: ``hrp_share <= preheat_steps / main_steps + 0.01``, i.e. a preheat step costs no more than a
main step and everything else of HRP stays under 1% of the main training.

Peak memory, per phase (preheating = the callback's ``on_train_start``; main = the training loop):

* CPU: peak resident set size. At each phase start the script collects garbage, returns freed
  heap memory to the OS (glibc ``malloc_trim(0)``, so memory freed by the previous phase does not
  count as this phase's), and resets the kernel's high-water mark (``echo 5 >
  /proc/self/clear_refs``); at the phase end it reads ``VmHWM`` from ``/proc/self/status``. Exact
  peaks, no sampling thread competing for the CPU.
* CUDA: ``torch.cuda.reset_peak_memory_stats`` at each phase start, ``max_memory_allocated`` at
  the end.

``mem_ratio = preheat peak / main peak`` of the same fit (also against the LoRA fit's main
peak). Goal: at most 1.1 at ``R = 8r``. Everything is reported as medians over repeats of the
per-repeat figures.

Run ``python -m benchmarks.overhead --help`` from the repository root; results and the exact commands are in
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import logging
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

# benchmarks/ is a folder of scripts; the recipes are importable from the repository root.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import RunClock, header_lines, print_goal_lines, torch_threads, verdict  # noqa: E402
from benchmarks.harness import machine_line as harness_machine_line  # noqa: E402
from lightning_hrp import HRPPreheatCallback  # noqa: E402

MIB = 2**20
TIME_SLACK = 0.01  # the goal's "plus 1% of the main training"
MEMORY_LIMIT = 1.1  # the goal's "at most 1.1 times the main training's peak", at R = 8r


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    """Main and preheat steps of one recipe in one setting."""

    main_steps: int
    preheat_steps: int


@dataclass(frozen=True)
class Recipe:
    """One offline recipe as this benchmark runs it.

    Attributes:
        name: Command-line name.
        description: One line for the report.
        lora_rank: ``r``.
        build_data: Builds the (reusable) DataModule.
        build_model: Builds a fresh LightningModule with a fresh rank-r LoRA adapter.
        plans: Steps by setting: ``"cpu"``, ``"cuda"`` and ``"quick"``.
    """

    name: str
    description: str
    lora_rank: int
    build_data: Callable[[], pl.LightningDataModule]
    build_model: Callable[[], pl.LightningModule]
    plans: dict[str, StepPlan]


def _matrix_regression_data() -> pl.LightningDataModule:
    from lightning_hrp.recipes.matrix_regression import MatrixRegressionDataModule

    return MatrixRegressionDataModule(in_features=64, out_features=64, task_seed=0, batch_size=32)


def _matrix_regression_model() -> pl.LightningModule:
    from lightning_hrp.recipes.matrix_regression import MatrixRegressionModule

    return MatrixRegressionModule(in_features=64, out_features=64, task_seed=0, lora_rank=4, lora_alpha=4.0)


def _classification_data() -> pl.LightningDataModule:
    from lightning_hrp.recipes.classification_data import RottenTomatoesDataModule

    return RottenTomatoesDataModule(max_length=64, batch_size=32)


def _classification_model() -> pl.LightningModule:
    from lightning_hrp.recipes.classification import SequenceClassifier

    return SequenceClassifier(lora_r=8, lora_alpha=16, learning_rate=1e-3)


def _math_sft_data() -> pl.LightningDataModule:
    from lightning_hrp.recipes.math_sft_data import MathSFTDataModule

    return MathSFTDataModule(train_size=1000, val_size=64, max_length=256, batch_size=4)


def _math_sft_model() -> pl.LightningModule:
    from lightning_hrp.recipes.math_sft import MathSFTModule

    return MathSFTModule(lora_rank=8, lora_alpha=16.0)


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="matrix_regression",
            description="matrix regression 64x64 (recipes/matrix_regression.py), LoRA r=4 on one layer, batch 32",
            lora_rank=4,
            build_data=_matrix_regression_data,
            build_model=_matrix_regression_model,
            plans={"cpu": StepPlan(400, 20), "cuda": StepPlan(400, 20), "quick": StepPlan(100, 5)},
        ),
        Recipe(
            name="classification",
            description="all-MiniLM-L6-v2 on Rotten Tomatoes (recipes/classification.py), LoRA r=8 on q,k,v,o of "
            "6 blocks (24 layers 384x384), batch 32, max 64 tokens",
            lora_rank=8,
            build_data=_classification_data,
            build_model=_classification_model,
            plans={"cpu": StepPlan(100, 5), "cuda": StepPlan(300, 15), "quick": StepPlan(20, 1)},
        ),
        Recipe(
            name="math_sft",
            description="SmolLM2-135M-Instruct SFT on GSM8K (recipes/math_sft.py), LoRA r=8 on the 7 projections "
            "of 30 blocks (210 layers), batch 4, max 256 tokens",
            lora_rank=8,
            build_data=_math_sft_data,
            build_model=_math_sft_model,
            plans={"cpu": StepPlan(20, 1), "cuda": StepPlan(100, 5), "quick": StepPlan(10, 1)},
        ),
    )
}
DEFAULT_RECIPES = ("matrix_regression", "classification")


# --------------------------------------------------------------------------------------------
# Peak memory per phase
# --------------------------------------------------------------------------------------------


class MemoryMeter(Protocol):
    """Peak memory since the last :meth:`start_phase`, in bytes."""

    what: str

    def start_phase(self) -> int:
        """Reset the peak; returns the memory in use now."""

    def peak(self) -> int:
        """The peak since :meth:`start_phase`."""


class ResidentSetMeter:
    """Peak resident set size of this process through the kernel's resettable high-water mark."""

    what = "peak RSS of the process (VmHWM, reset per phase after malloc_trim)"

    def __init__(self) -> None:
        library = ctypes.util.find_library("c")
        libc = ctypes.CDLL(library) if library else None
        if libc is None or not hasattr(libc, "malloc_trim"):
            raise RuntimeError(
                "CPU peak memory needs glibc's malloc_trim (to return freed memory before each phase); this "
                "C library lacks it. Run on a glibc Linux, or use --device cuda."
            )
        self._malloc_trim = libc.malloc_trim
        try:
            self._reset_high_water_mark()
        except OSError as error:
            raise RuntimeError(
                f"CPU peak memory resets the process's RSS high-water mark through /proc/self/clear_refs, which "
                f"failed ({error}); it needs Linux >= 4.0 with /proc writable by the process. Use --device cuda "
                "elsewhere."
            ) from error

    @staticmethod
    def _reset_high_water_mark() -> None:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")

    @staticmethod
    def _status_bytes(key: str) -> int:
        with open("/proc/self/status", encoding="ascii") as status:
            match = re.search(rf"^{key}:\s+(\d+) kB", status.read(), re.MULTILINE)
        if match is None:
            raise RuntimeError(f"/proc/self/status has no {key} line.")
        return int(match.group(1)) * 1024

    def start_phase(self) -> int:
        gc.collect()
        self._malloc_trim(0)
        self._reset_high_water_mark()
        return self._status_bytes("VmRSS")

    def peak(self) -> int:
        return self._status_bytes("VmHWM")


class CudaMeter:
    """Peak memory allocated by tensors on one CUDA device (the caching allocator's own count)."""

    what = "torch.cuda.max_memory_allocated, reset per phase"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start_phase(self) -> int:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


@dataclass
class PhaseRecord:
    """Wall time and peak memory of one phase of one fit (bytes; seconds)."""

    seconds: float = 0.0
    start_bytes: int = 0
    peak_bytes: int = 0
    step_seconds: list[float] = field(default_factory=list)


class PhaseClock:
    """Shared by two :class:`PhaseMarker` callbacks around the HRP callback: times and meters both phases."""

    def __init__(self, meter: MemoryMeter, device: torch.device) -> None:
        self.meter = meter
        self.device = device
        self.preheat = PhaseRecord()
        self.main = PhaseRecord()
        self._started = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def begin_preheat(self) -> None:
        self.preheat.start_bytes = self.meter.start_phase()
        self._started = self._now()

    def begin_main(self) -> None:
        self.preheat.seconds = self._now() - self._started
        self.preheat.peak_bytes = self.meter.peak()
        self.main.start_bytes = self.meter.start_phase()
        self._started = self._last_step_end = self._now()

    def end_main_step(self) -> None:
        now = self._now()
        self.main.step_seconds.append(now - self._last_step_end)
        self._last_step_end = now

    def end_main(self) -> None:
        self.main.seconds = self._now() - self._started
        self.main.peak_bytes = self.meter.peak()


class PhaseMarker(Callback):
    """Marks a phase boundary at ``on_train_start``; callbacks run in list order, so one goes before
    the HRP callback (preheating starts) and one after it (main training starts, and ends at
    ``on_train_end``)."""

    def __init__(self, clock: PhaseClock, *, before_hrp: bool) -> None:
        self.clock = clock
        self.before_hrp = before_hrp

    @property
    def state_key(self) -> str:
        # Two markers in one Trainer need distinct keys.
        return self._generate_state_key(before_hrp=self.before_hrp)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.before_hrp:
            self.clock.begin_preheat()
        else:
            self.clock.begin_main()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self.before_hrp:
            self.clock.end_main_step()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.before_hrp:
            self.clock.end_main()


# --------------------------------------------------------------------------------------------
# Fits
# --------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """One fit: ``preheat_rank`` None for plain LoRA."""

    preheat_rank: int | None
    fit_seconds: float
    main_seconds: float
    main_step_seconds: list[float]
    main_start_bytes: int
    main_peak_bytes: int
    hrp_phase_seconds: float = 0.0
    preheat_seconds: float = 0.0
    decompose_seconds: float = 0.0
    preheat_start_bytes: int = 0
    preheat_peak_bytes: int = 0


def run_fit(
    recipe: Recipe,
    datamodule: pl.LightningDataModule,
    plan: StepPlan,
    preheat_rank: int | None,
    args: argparse.Namespace,
    seed: int,
) -> FitResult:
    """Fit ``plan.main_steps`` steps from a fresh model, with HRP at ``preheat_rank`` unless None."""
    device = torch.device(args.device)
    pl.seed_everything(seed, verbose=False)
    model = recipe.build_model()
    clock = PhaseClock(make_meter(device), device)
    hrp = None
    callbacks: list[Callback] = [PhaseMarker(clock, before_hrp=True)]
    if preheat_rank is not None:
        hrp = HRPPreheatCallback(preheat_rank, plan.preheat_steps, mode=args.mode)
        callbacks.append(hrp)
    callbacks.append(PhaseMarker(clock, before_hrp=False))
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision=args.precision,
        max_steps=plan.main_steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    fit_seconds = time.perf_counter() - started
    if trainer.global_step != plan.main_steps:
        raise RuntimeError(f"{recipe.name}: the fit ran {trainer.global_step} main steps, not {plan.main_steps}.")
    result = FitResult(
        preheat_rank=preheat_rank,
        fit_seconds=fit_seconds,
        main_seconds=clock.main.seconds,
        main_step_seconds=clock.main.step_seconds,
        main_start_bytes=clock.main.start_bytes,
        main_peak_bytes=clock.main.peak_bytes,
    )
    if hrp is not None:
        if hrp.report is None:
            raise RuntimeError(f"{recipe.name}: HRP at R={preheat_rank} left no report; preheating failed.")
        result.hrp_phase_seconds = clock.preheat.seconds
        result.preheat_seconds = hrp.report.preheat_seconds
        result.decompose_seconds = hrp.report.decompose_seconds
        result.preheat_start_bytes = clock.preheat.start_bytes
        result.preheat_peak_bytes = clock.preheat.peak_bytes
    del trainer, model, hrp, callbacks
    gc.collect()
    return result


_METERS: dict[str, MemoryMeter] = {}


def make_meter(device: torch.device) -> MemoryMeter:
    if device.type == "cuda":
        return CudaMeter(device)
    if "cpu" not in _METERS:  # checks the C library and /proc once
        _METERS["cpu"] = ResidentSetMeter()
    return _METERS["cpu"]


# --------------------------------------------------------------------------------------------
# Rows: medians over repeats of per-repeat figures
# --------------------------------------------------------------------------------------------


@dataclass
class OverheadRow:
    """One recipe at one preheat rank: medians over repeats (seconds, MiB, ratios)."""

    recipe: str
    lora_rank: int
    preheat_rank: int
    main_steps: int
    preheat_steps: int
    repeats: int
    budget_share: float
    main_s_lora: float
    main_s: float
    fit_s_lora: float
    fit_s: float
    preheat_s: float
    decompose_s: float
    hrp_phase_s: float
    hrp_share: float
    hrp_phase_share: float
    fit_delta_share: float
    main_step_s_lora: float
    main_step_s: float
    first_step_s_lora: float
    first_step_s: float
    preheat_step_s: float
    step_cost: float
    early_steps_s_lora: float
    early_step_cost: float
    preheat_peak_mib: float
    main_peak_mib: float
    main_peak_mib_lora: float
    mem_ratio: float
    mem_ratio_vs_lora: float
    preheat_above_start_mib: float
    main_above_start_mib: float
    per_repeat: list[dict[str, Any]] = field(default_factory=list)

    @property
    def time_goal_met(self) -> bool:
        return self.hrp_share <= self.budget_share

    @property
    def memory_goal_met(self) -> bool:
        return self.mem_ratio <= MEMORY_LIMIT


def summarise(recipe: Recipe, plan: StepPlan, preheat_rank: int, pairs: list[tuple[FitResult, FitResult]]) -> OverheadRow:
    """Medians over repeats of the figures of each (LoRA fit, HRP fit) pair of one repeat."""

    def median(of: Callable[[FitResult, FitResult], float]) -> float:
        return statistics.median(of(lora, hrp) for lora, hrp in pairs)

    # Steady main steps: the median over the fit's steps; the first one also pays one-off costs
    # (memory faulted in, lazy state), which in an HRP fit the first preheat step pays instead.
    steady_step = lambda fit: statistics.median(fit.main_step_seconds)  # noqa: E731
    preheat_step = lambda fit: fit.preheat_seconds / plan.preheat_steps  # noqa: E731
    # The LoRA fit's first preheat_steps main steps: like the preheat steps, the first steps of a
    # phase, on the first batches of a pass.
    early_steps = lambda fit: statistics.mean(fit.main_step_seconds[: plan.preheat_steps])  # noqa: E731
    return OverheadRow(
        recipe=recipe.name,
        lora_rank=recipe.lora_rank,
        preheat_rank=preheat_rank,
        main_steps=plan.main_steps,
        preheat_steps=plan.preheat_steps,
        repeats=len(pairs),
        budget_share=plan.preheat_steps / plan.main_steps + TIME_SLACK,
        main_s_lora=median(lambda lora, hrp: lora.main_seconds),
        main_s=median(lambda lora, hrp: hrp.main_seconds),
        fit_s_lora=median(lambda lora, hrp: lora.fit_seconds),
        fit_s=median(lambda lora, hrp: hrp.fit_seconds),
        preheat_s=median(lambda lora, hrp: hrp.preheat_seconds),
        decompose_s=median(lambda lora, hrp: hrp.decompose_seconds),
        hrp_phase_s=median(lambda lora, hrp: hrp.hrp_phase_seconds),
        hrp_share=median(lambda lora, hrp: (hrp.preheat_seconds + hrp.decompose_seconds) / hrp.main_seconds),
        hrp_phase_share=median(lambda lora, hrp: hrp.hrp_phase_seconds / hrp.main_seconds),
        fit_delta_share=median(lambda lora, hrp: (hrp.fit_seconds - lora.fit_seconds) / lora.main_seconds),
        main_step_s_lora=median(lambda lora, hrp: steady_step(lora)),
        main_step_s=median(lambda lora, hrp: steady_step(hrp)),
        first_step_s_lora=median(lambda lora, hrp: lora.main_step_seconds[0]),
        first_step_s=median(lambda lora, hrp: hrp.main_step_seconds[0]),
        preheat_step_s=median(lambda lora, hrp: preheat_step(hrp)),
        step_cost=median(lambda lora, hrp: preheat_step(hrp) / steady_step(hrp)),
        early_steps_s_lora=median(lambda lora, hrp: early_steps(lora)),
        early_step_cost=median(lambda lora, hrp: preheat_step(hrp) / early_steps(lora)),
        preheat_peak_mib=median(lambda lora, hrp: hrp.preheat_peak_bytes / MIB),
        main_peak_mib=median(lambda lora, hrp: hrp.main_peak_bytes / MIB),
        main_peak_mib_lora=median(lambda lora, hrp: lora.main_peak_bytes / MIB),
        mem_ratio=median(lambda lora, hrp: hrp.preheat_peak_bytes / hrp.main_peak_bytes),
        mem_ratio_vs_lora=median(lambda lora, hrp: hrp.preheat_peak_bytes / lora.main_peak_bytes),
        preheat_above_start_mib=median(lambda lora, hrp: (hrp.preheat_peak_bytes - hrp.preheat_start_bytes) / MIB),
        main_above_start_mib=median(lambda lora, hrp: (hrp.main_peak_bytes - hrp.main_start_bytes) / MIB),
        per_repeat=[{"lora": asdict(lora), "hrp": asdict(hrp)} for lora, hrp in pairs],
    )


def run_recipe(recipe: Recipe, plan: StepPlan, args: argparse.Namespace) -> list[OverheadRow]:
    """Warm up once, then per repeat fit LoRA and HRP at every R (order rotated per repeat)."""
    datamodule = recipe.build_data()
    ranks = [multiplier * recipe.lora_rank for multiplier in args.multipliers]
    # A short untimed fit first: one-off costs (lazy initialisation, kernel selection, tokenising
    # the data) must not land in whichever fit happens to come first.
    warm_up = StepPlan(min(plan.main_steps, 3), min(plan.preheat_steps, 2))
    progress(f"{recipe.name}: warm-up fit")
    run_fit(recipe, datamodule, warm_up, max(ranks), args, seed=args.seed)
    configurations: list[int | None] = [None, *ranks]
    fits: dict[int | None, list[FitResult]] = {rank: [] for rank in configurations}
    for repeat in range(args.repeats):
        # Rotating the order spreads any drift of the machine's speed over all configurations.
        shift = repeat % len(configurations)
        for rank in configurations[shift:] + configurations[:shift]:
            label = "LoRA" if rank is None else f"HRP R={rank}"
            progress(f"{recipe.name}: repeat {repeat + 1}/{args.repeats}, {label}")
            fits[rank].append(run_fit(recipe, datamodule, plan, rank, args, seed=args.seed + repeat))
    return [summarise(recipe, plan, rank, list(zip(fits[None], fits[rank]))) for rank in ranks]


# --------------------------------------------------------------------------------------------
# Command line and report
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time and peak memory of HRP's preheating + decomposition against the main training.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer main steps, one repeat (minutes on a CPU)")
    parser.add_argument(
        "--recipes", nargs="+", choices=sorted(RECIPES), help=f"recipes to run (default: {' '.join(DEFAULT_RECIPES)})"
    )
    parser.add_argument("--include-sft", action="store_true", help="also run math_sft (SmolLM2-135M; slow on a CPU)")
    parser.add_argument(
        "--multipliers", nargs="+", type=int, default=[4, 8], help="preheat ranks as multiples of the LoRA rank"
    )
    parser.add_argument("--repeats", type=int, help="fits per configuration (medians reported); default 3, quick 1")
    parser.add_argument("--main-steps", type=int, help="main steps of every recipe (default: per recipe and device)")
    parser.add_argument(
        "--preheat-steps", type=int, help="preheat steps of every recipe (default: per recipe, 5%% of the main steps)"
    )
    parser.add_argument("--mode", choices=["classic", "asymmetric"], default="classic", help="HRP preheat mode")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. 32-true, bf16-mixed")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", help="also write all rows and per-repeat fits as JSON here")
    parser.add_argument(
        "--from-json",
        dest="from_json",
        help="fit nothing: print the report of an earlier run from the JSON it wrote with --json (its per-repeat "
        "fits, summarised by this version of the script)",
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_json is not None:
        if not Path(args.from_json).is_file():
            parser.error(f"--from-json: no file at {args.from_json}; give the JSON an earlier run wrote with --json.")
        return args
    fill_defaults(args)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}.")
    if min(args.multipliers) < 2:
        args.recipes = list(DEFAULT_RECIPES)
    if min(args.multipliers) < 2:
        parser.error(f"--multipliers must be >= 2 (the preheat rank must exceed the LoRA rank), got {args.multipliers}.")
    for name in ("main_steps", "preheat_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}.")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} was asked for but torch.cuda.is_available() is False; use --device cpu.")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}.")
    return args


def fill_defaults(args: argparse.Namespace) -> None:
    """The defaults that depend on other options (recipes, repeats)."""
    if args.recipes is None:
        args.recipes = list(DEFAULT_RECIPES)
    if args.include_sft and "math_sft" not in args.recipes:
        args.recipes.append("math_sft")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3


def plan_for(recipe: Recipe, args: argparse.Namespace) -> StepPlan:
    setting = "quick" if args.quick else torch.device(args.device).type
    plan = recipe.plans[setting]
    main_steps = args.main_steps if args.main_steps is not None else plan.main_steps
    if args.preheat_steps is not None:
        preheat_steps = args.preheat_steps
    elif args.main_steps is not None:
        preheat_steps = max(1, round(0.05 * main_steps))
    else:
        preheat_steps = plan.preheat_steps
    return StepPlan(main_steps, preheat_steps)


def progress(message: str) -> None:
    # On stderr, so that stdout stays a clean report.
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_line(args: argparse.Namespace) -> str:
    return harness_machine_line(torch.device(args.device), [f"lightning {pl.__version__}", f"precision {args.precision}"])


def _f(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}"


def time_table(rows: list[OverheadRow]) -> str:
    lines = [
        "| recipe | r | R | preheat / main steps | main s (LoRA fit) | main s (HRP fit) | preheat s | decompose s "
        "| (preheat + decompose) / main | whole HRP phase / main | fit Δ / main (LoRA fit) | budget | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.recipe} | {row.lora_rank} | {row.preheat_rank} | {row.preheat_steps} / {row.main_steps} "
            f"| {_f(row.main_s_lora)} | {_f(row.main_s)} | {_f(row.preheat_s)} | {row.decompose_s:.2e} "
            f"| {row.hrp_share:.2%} | {row.hrp_phase_share:.2%} | {row.fit_delta_share:.2%} | {row.budget_share:.2%} "
            f"| {verdict(row.time_goal_met)} |"
        )
    return "\n".join(lines)


def step_table(rows: list[OverheadRow]) -> str:
    lines = [
        "| recipe | R | main step s, median (LoRA fit) | main step s, median (HRP fit) | preheat step s (mean) "
        "| preheat step / main step (HRP fit) | first main step s (LoRA fit) | first main step s (HRP fit) "
        "| first k main steps s, mean (LoRA fit; k = preheat steps) | preheat step / those |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.recipe} | {row.preheat_rank} | {_f(row.main_step_s_lora)} | {_f(row.main_step_s)} "
            f"| {_f(row.preheat_step_s)} | {_f(row.step_cost)} | {_f(row.first_step_s_lora)} | {_f(row.first_step_s)} "
            f"| {_f(row.early_steps_s_lora)} | {_f(row.early_step_cost)} |"
        )
    return "\n".join(lines)


def memory_table(rows: list[OverheadRow]) -> str:
    lines = [
        "| recipe | r | R | preheat peak MiB | main peak MiB (same fit) | preheat / main | main peak MiB (LoRA fit) "
        "| preheat / LoRA main | preheat above its start MiB | main above its start MiB | goal (R = 8r) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        at_8r = row.preheat_rank == 8 * row.lora_rank
        goal = verdict(row.memory_goal_met) if at_8r else "-"
        lines.append(
            f"| {row.recipe} | {row.lora_rank} | {row.preheat_rank} | {row.preheat_peak_mib:.1f} "
            f"| {row.main_peak_mib:.1f} | {row.mem_ratio:.3f} | {row.main_peak_mib_lora:.1f} "
            f"| {row.mem_ratio_vs_lora:.3f} | {row.preheat_above_start_mib:.1f} | {row.main_above_start_mib:.1f} "
            f"| {goal} |"
        )
    return "\n".join(lines)


def goal_lines(rows: list[OverheadRow]) -> list[str]:
    lines = []
    for row in rows:
        lines.append(
            f"Time, {row.recipe}, R={row.preheat_rank}: (preheat + decompose) / main = {row.hrp_share:.2%} "
            f"<= {row.preheat_steps}/{row.main_steps} + 1% = {row.budget_share:.2%}? "
            f"{verdict(row.time_goal_met)} (whole fit Δ / main = {row.fit_delta_share:.2%}; "
            f"a preheat step costs {row.step_cost:.3g} steady main steps)"
        )
    for row in rows:
        if row.preheat_rank == 8 * row.lora_rank:
            lines.append(
                f"Memory, {row.recipe}, R=8r={row.preheat_rank}: preheat peak / main peak = {row.mem_ratio:.3f} "
                f"<= {MEMORY_LIMIT}? {verdict(row.memory_goal_met)} "
                f"(against the LoRA fit's main peak: {row.mem_ratio_vs_lora:.3f})"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> list[OverheadRow]:
    """Run the benchmark, print markdown tables to stdout and return the rows.

    ``--threads`` applies for the run only; the previous torch thread count is restored after.
    """
    args = parse_args(argv)
    with torch_threads(args.threads), warnings.catch_warnings(), quiet_libraries():
        # Lightning's advice (more dataloader workers, a logger) is noise in a benchmark report.
        warnings.simplefilter("ignore")
        return run_and_report(args, list(sys.argv[1:] if argv is None else argv))


class quiet_libraries:
    """Lightning and HRP info lines, transformers' load reports and progress bars off for the run (restored after)."""

    names = ("lightning.pytorch", "lightning.fabric", "lightning_hrp")

    def __enter__(self) -> None:
        from transformers.utils import logging as transformers_logging

        self.levels = {name: logging.getLogger(name).level for name in self.names}
        for name in self.names:
            logging.getLogger(name).setLevel(logging.WARNING)
        self.transformers_verbosity = transformers_logging.get_verbosity()
        self.transformers_progress = transformers_logging.is_progress_bar_enabled()
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()

    def __exit__(self, *exc_info: object) -> None:
        from transformers.utils import logging as transformers_logging

        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        transformers_logging.set_verbosity(self.transformers_verbosity)
        if self.transformers_progress:
            transformers_logging.enable_progress_bar()


def run_and_report(args: argparse.Namespace, argv: list[str]) -> list[OverheadRow]:
    if args.from_json is not None:
        return report_from_json(Path(args.from_json), argv)
    machine = machine_line(args)
    device = torch.device(args.device)
    meter_description = make_meter(device).what
    clock = RunClock.start()
    rows: list[OverheadRow] = []
    plans = {name: plan_for(RECIPES[name], args) for name in args.recipes}
    for name in args.recipes:
        rows.extend(run_recipe(RECIPES[name], plans[name], args))
    clock.stop()
    payload = {
        "argv": argv,
        "machine": machine,
        "memory": meter_description,
        "load_average_before_after": [clock.load_before, clock.load_after],
        "seconds": clock.seconds,
        "rows": [asdict(row) for row in rows],
    }
    print_report(rows, payload)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
    return rows


def report_from_json(path: Path, argv: list[str]) -> list[OverheadRow]:
    """Summarise and print the per-repeat fits an earlier run saved, without fitting anything."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        rows = [
            summarise(
                RECIPES[row["recipe"]],
                StepPlan(row["main_steps"], row["preheat_steps"]),
                row["preheat_rank"],
                [(FitResult(**fits["lora"]), FitResult(**fits["hrp"])) for fits in row["per_repeat"]],
            )
            for row in payload["rows"]
        ]
    except (ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"--from-json: {path} is not a report written by overhead.py --json ({error!r}).") from error
    print_report(rows, payload, rendered_by=argv)
    return rows


def print_report(rows: list[OverheadRow], payload: dict[str, Any], rendered_by: list[str] | None = None) -> None:
    """The markdown report of one run; ``rendered_by`` is the command that re-reads it from JSON."""
    # The run's own options, for the header (also when re-rendered from its JSON elsewhere).
    args = build_parser().parse_args(payload["argv"])
    fill_defaults(args)
    command, machine, load = header_lines("overhead", payload["argv"], payload["machine"], *payload["load_average_before_after"], payload["seconds"])
    print(command)
    if rendered_by is not None:
        print(f"(Report rendered from that run's JSON by: python -m benchmarks.overhead {' '.join(rendered_by)})")
    print(machine)
    print(load)
    for name in dict.fromkeys(row.recipe for row in rows):
        main_steps = next(row.main_steps for row in rows if row.recipe == name)
        print(f"Recipe {name}: {RECIPES[name].description}; {main_steps} main steps")
    print(
        f"HRP mode {args.mode}; medians over {args.repeats} repeat(s) of per-repeat figures (each repeat: one LoRA fit "
        f"and one HRP fit per R, same seed); memory: {payload['memory']}."
    )
    print("\nTime (budget = preheat_steps / main_steps + 1%; the goal compares (preheat + decompose) / main):\n")
    print(time_table(rows))
    print("\nSteps (the first main step of a fit also pays one-off costs; in an HRP fit the first preheat step does):\n")
    print(step_table(rows))
    print("\nPeak memory per phase (preheating = the callback's on_train_start; main = the training loop):\n")
    print(memory_table(rows))
    print_goal_lines(goal_lines(rows))


if __name__ == "__main__":
    main()
