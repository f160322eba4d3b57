"""The fits of the overhead benchmark: each offline recipe built from its config, with and without HRP,
both phases (preheating, main training) timed and metered in the same fit."""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.harness import by_name
from benchmarks.overhead_memory import MemoryMeter, make_meter
from lightning_hrp import HRPPreheatCallback
from lightning_hrp.recipes.runs import build_run, bundled_config, with_overrides, without_outputs


@dataclass(frozen=True)
class StepPlan:
    """Main and preheat steps of one recipe in one setting."""

    main_steps: int
    preheat_steps: int


@dataclass(frozen=True)
class Recipe:
    """One offline recipe as this benchmark runs it: its bundled plain-LoRA config, as ``lightning-hrp fit`` builds it.

    Attributes:
        name: Command-line name.
        description: One line for the report.
        config: The file in ``recipes/configs/``.
        lora_rank: ``r`` in that config (checked against the adapters HRP finds).
        plans: Steps by setting: ``"cpu"``, ``"cuda"`` and ``"quick"``.
    """

    name: str
    description: str
    config: str
    lora_rank: int
    plans: dict[str, StepPlan]


RECIPES: dict[str, Recipe] = by_name(
    Recipe(
        name="matrix_regression",
        description="matrix regression 64x64 (recipes/matrix_regression.py), LoRA r=4 on one layer, batch 32",
        config="matrix_regression_lora.yaml",
        lora_rank=4,
        plans={"cpu": StepPlan(400, 20), "cuda": StepPlan(400, 20), "quick": StepPlan(100, 5)},
    ),
    Recipe(
        name="classification",
        description="all-MiniLM-L6-v2 on Rotten Tomatoes (recipes/classification.py), LoRA r=8 on q,k,v,o of "
        "6 blocks (24 layers 384x384), batch 32, max 64 tokens",
        config="classification_rotten_tomatoes_lora.yaml",
        lora_rank=8,
        plans={"cpu": StepPlan(100, 5), "cuda": StepPlan(300, 15), "quick": StepPlan(20, 1)},
    ),
    Recipe(
        name="math_sft",
        description="SmolLM2-135M-Instruct SFT on GSM8K (recipes/math_sft.py), LoRA r=8 on the 7 projections "
        "of 30 blocks (210 layers), batch 4, max 256 tokens",
        config="math_sft_smollm2_lora.yaml",
        lora_rank=8,
        plans={"cpu": StepPlan(20, 1), "cuda": StepPlan(100, 5), "quick": StepPlan(10, 1)},
    ),
)
DEFAULT_RECIPES = ("matrix_regression", "classification")


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


def fit_config(recipe: Recipe, plan: StepPlan, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The recipe's config for one fit: ``plan.main_steps`` steps, no validation, no outputs, no callbacks of its own."""
    device = torch.device(args.device)
    overrides = {
        "seed_everything": seed,
        "trainer.accelerator": "gpu" if device.type == "cuda" else "cpu",
        "trainer.devices": [device.index or 0] if device.type == "cuda" else 1,
        "trainer.precision": args.precision,
        "trainer.max_steps": plan.main_steps,
        "trainer.max_epochs": -1,
        "trainer.limit_val_batches": 0,
        "trainer.num_sanity_val_steps": 0,
        "trainer.callbacks": [],
    }
    return with_overrides(without_outputs(bundled_config(recipe.config)), {**dict(args.overrides), **overrides})


def run_fit(
    recipe: Recipe,
    datamodule: pl.LightningDataModule,
    plan: StepPlan,
    preheat_rank: int | None,
    args: argparse.Namespace,
    seed: int,
) -> FitResult:
    """Fit ``plan.main_steps`` steps from a fresh model on ``datamodule``, with HRP at ``preheat_rank`` unless None."""
    device = torch.device(args.device)
    clock = PhaseClock(make_meter(device), device)
    hrp = None
    # HRP is a Trainer callback between the two markers (a module's callbacks would run after both).
    callbacks: list[Callback] = [PhaseMarker(clock, before_hrp=True)]
    if preheat_rank is not None:
        hrp = HRPPreheatCallback(preheat_rank, plan.preheat_steps, mode=args.mode)
        callbacks.append(hrp)
    callbacks.append(PhaseMarker(clock, before_hrp=False))
    run = build_run(fit_config(recipe, plan, args, seed), callbacks=callbacks)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    fit_seconds = run.fit(datamodule)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if run.trainer.global_step != plan.main_steps:
        raise RuntimeError(f"{recipe.name}: the fit ran {run.trainer.global_step} main steps, not {plan.main_steps}.")
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
        ranks = {layer.rank for layer in hrp.report.layers}
        if ranks != {recipe.lora_rank}:
            raise RuntimeError(f"{recipe.name}: the config's LoRA rank is {sorted(ranks)}, not the r={recipe.lora_rank} reported.")
        result.hrp_phase_seconds = clock.preheat.seconds
        result.preheat_seconds = hrp.report.preheat_seconds
        result.decompose_seconds = hrp.report.decompose_seconds
        result.preheat_start_bytes = clock.preheat.start_bytes
        result.preheat_peak_bytes = clock.preheat.peak_bytes
    del run, hrp, callbacks
    gc.collect()
    return result


def run_recipe(recipe: Recipe, plan: StepPlan, args: argparse.Namespace) -> dict[int, list[tuple[FitResult, FitResult]]]:
    """Warm up once, then per repeat fit LoRA and HRP at every R (order rotated per repeat).

    Returns:
        Per preheat rank ``R``, the (LoRA fit, HRP fit) pair of each repeat.
    """
    # One DataModule for every fit: the data are set up (tokenised) once.
    datamodule = build_run(fit_config(recipe, plan, args, args.seed)).datamodule
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
    return {rank: list(zip(fits[None], fits[rank])) for rank in ranks}


def progress(message: str) -> None:
    # On stderr, so that stdout stays a clean report.
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
