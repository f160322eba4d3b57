"""Study: which preheat dtype and optimizer find the directions the default finds, and train as well.

For each offline recipe (matrix regression; all-MiniLM-L6-v2 on Rotten Tomatoes), each seed and
each candidate (a preheat dtype and a preheat optimizer, at the main run's learning rate), one fit
of ``--main-steps`` main steps with :class:`lightning_hrp.HRPPreheatCallback` at ``R = 8r``
(classic mode, ``--preheat-steps`` steps). Per fit:

* ``overlap``: how much of the rank-r subspace the candidate chose (the row space of every LoRA
  ``A`` at the start of main training) lies in the one AdamW in float32 chose with the same seed:
  ``||Q_c^T Q_ref||_F^2 / r``, averaged over layers (1: the same subspace). The row ``adamw, other
  preheat seed`` (AdamW float32, a different random start of the preheat adapters, the same data)
  is the noise floor: two equally good preheats differ by that much.
* ``oracle overlap`` (matrix regression only): the same against the top-r right singular subspace
  of the task's true update ``M``.
* ``val loss`` (and ``val accuracy`` for classification) after the main training, and its paired
  difference to AdamW float32 over seeds; plain LoRA (no preheat) shows what preheating gains.

Run ``python -m benchmarks.preheat_choices --help`` from the repository root; the results are in
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

if not __package__:
    sys.exit("Run this benchmark from the repository root as a module: python -m benchmarks.preheat_choices --help")

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from benchmarks.harness import RunClock, header_lines, machine_line, markdown_table, torch_threads
from benchmarks.overhead_fits import RECIPES, StepPlan, fit_config, progress
from lightning_hrp import HRPPreheatCallback
from lightning_hrp.engine.decompose import subspace_drift
from lightning_hrp.engine.lean_optimizer import FactoredRMS
from lightning_hrp.engine.lora import find_lora_targets
from lightning_hrp.recipes.runs import build_run, quiet_libraries

OptimizerBuilder = Callable[[float], Callable[..., torch.optim.Optimizer]]


@dataclass(frozen=True)
class Candidate:
    """A preheat dtype and optimizer; ``optimizer`` maps the main run's learning rate to a factory."""

    name: str
    dtype: str | None
    optimizer: OptimizerBuilder | None
    seed_offset: int = 0  # a different random start of the preheat adapters


def _adamw(lr: float) -> Callable[..., torch.optim.Optimizer]:
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)


def _factored(lr: float) -> Callable[..., torch.optim.Optimizer]:
    return functools.partial(FactoredRMS, lr=lr)


def _sgd_momentum(scale: float) -> OptimizerBuilder:
    return lambda lr: functools.partial(torch.optim.SGD, lr=lr * scale, momentum=0.9)


REFERENCE = "adamw"
CANDIDATES = {
    c.name: c
    for c in (
        Candidate("adamw", "float32", _adamw),
        Candidate("adamw, other preheat seed", "float32", _adamw, seed_offset=1000),
        Candidate("adamw bf16", "bfloat16", _adamw),
        Candidate("factored", "float32", _factored),
        Candidate("factored bf16", "bfloat16", _factored),
        Candidate("sgd momentum", "float32", _sgd_momentum(1.0)),
        Candidate("sgd momentum, lr x10", "float32", _sgd_momentum(10.0)),
        Candidate("sgd momentum, lr x100", "float32", _sgd_momentum(100.0)),
        Candidate("no preheat (LoRA)", None, None),
    )
}


@dataclass
class Fit:
    recipe: str
    candidate: str
    seed: int
    overlap: float | None
    oracle_overlap: float | None
    val_loss: float | None
    val_accuracy: float | None


class DirectionsAtTrainStart(Callback):
    """The orthonormal row space of every LoRA ``A`` when main training starts (after HRP wrote it)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.bases = {t.name: torch.linalg.qr(t.lora_A.detach().double().T).Q for t in find_lora_targets(pl_module)}


def subspace_overlap(left: dict[str, Tensor], right: dict[str, Tensor]) -> float:
    """Mean over layers of ``||Q_l^T Q_r||_F^2 / r``: one minus the subspace drift between the bases."""
    return statistics.mean(1.0 - subspace_drift(left[name].T, right[name].T) for name in left)


def oracle_bases(datamodule: pl.LightningDataModule, bases: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """The top-r right singular vectors of the task's true update per layer, if the task knows it."""
    updates = getattr(datamodule, "target_updates", None)
    if updates is None:
        return None
    known = updates()
    result = {}
    for name, basis in bases.items():
        (update,) = [m for key, m in known.items() if name == key or name.endswith("." + key)]
        result[name] = torch.linalg.svd(update.double(), full_matrices=False).Vh[: basis.shape[1]].T
    return result


def run_fit(
    recipe_name: str, candidate: Candidate, seed: int, plan: StepPlan, args: argparse.Namespace, datamodule: Any
) -> tuple[Fit, dict[str, Tensor]]:
    recipe = RECIPES[recipe_name]
    config = fit_config(recipe, plan, args, seed)
    probe = DirectionsAtTrainStart()
    callbacks: list[Callback] = []
    if candidate.optimizer is not None:
        lr = config["model"]["init_args"]["learning_rate"]
        callbacks.append(
            HRPPreheatCallback(
                8 * recipe.lora_rank, plan.preheat_steps, preheat_optimizer=candidate.optimizer(lr),
                preheat_dtype=candidate.dtype, seed=seed + candidate.seed_offset,
            )  # fmt: skip
        )
    callbacks.append(probe)
    run = build_run(config, callbacks=callbacks)
    run.fit(datamodule)
    metrics: dict[str, float] = {}
    if not args.directions_only:
        run.trainer.limit_val_batches = 1.0  # the fit config turns validation off during the fit
        metrics = run.validate()
    fit = Fit(
        recipe=recipe_name, candidate=candidate.name, seed=seed, overlap=None, oracle_overlap=None,
        val_loss=metrics.get("val/loss"), val_accuracy=metrics.get("val/acc"),
    )  # fmt: skip
    return fit, probe.bases


def plan_for(recipe_name: str, args: argparse.Namespace) -> StepPlan:
    default = RECIPES[recipe_name].plans["cpu"]
    return StepPlan(args.main_steps or default.main_steps, args.preheat_steps or default.preheat_steps)


def run_study(args: argparse.Namespace) -> list[Fit]:
    fits: list[Fit] = []
    for recipe_name in args.recipes:
        recipe = RECIPES[recipe_name]
        plan = plan_for(recipe_name, args)
        datamodule = build_run(fit_config(recipe, plan, args, args.seeds[0])).datamodule
        datamodule.setup("fit")
        for seed in args.seeds:
            bases: dict[str, dict[str, Tensor]] = {}
            seed_fits: list[Fit] = []
            for name in [REFERENCE, *[c for c in args.candidates if c != REFERENCE]]:
                progress(f"{recipe_name}: seed {seed}, {name}")
                fit, bases[name] = run_fit(recipe_name, CANDIDATES[name], seed, plan, args, datamodule)
                seed_fits.append(fit)
            oracle = oracle_bases(datamodule, bases[REFERENCE])
            for fit in seed_fits:
                if CANDIDATES[fit.candidate].optimizer is not None:
                    fit.overlap = subspace_overlap(bases[fit.candidate], bases[REFERENCE])
                    fit.oracle_overlap = subspace_overlap(bases[fit.candidate], oracle) if oracle is not None else None
            fits += seed_fits
    return fits


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(fits: list[Fit]) -> str:
    rows = []
    for recipe in dict.fromkeys(f.recipe for f in fits):
        of_recipe = [f for f in fits if f.recipe == recipe]
        reference = {f.seed: f for f in of_recipe if f.candidate == REFERENCE}
        for name in dict.fromkeys(f.candidate for f in of_recipe):
            group = [f for f in of_recipe if f.candidate == name]
            differences = [f.val_loss - reference[f.seed].val_loss for f in group if f.val_loss is not None]
            rows.append([
                recipe, name, len(group), _cell(_median([f.overlap for f in group]), ".4f"),
                _cell(min((f.overlap for f in group if f.overlap is not None), default=None), ".4f"),
                _cell(_median([f.oracle_overlap for f in group]), ".4f"), _cell(_median([f.val_loss for f in group]), ".5g"),
                _cell(statistics.mean(differences) if differences else None, "+.2e"),
                _cell(_median([f.val_accuracy for f in group]), ".4f"),
            ])  # fmt: skip
    columns = [
        "recipe", "candidate", "seeds", "overlap with adamw f32 (median)", "(min)", "oracle overlap (median)",
        "val loss (median)", "val loss - adamw f32 (mean, paired)", "val accuracy (median)",
    ]  # fmt: skip
    return markdown_table(columns, rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Directions and main-run results of preheat dtypes and optimizers.")
    parser.add_argument("--recipes", nargs="+", choices=["matrix_regression", "classification"], default=["matrix_regression"])
    parser.add_argument("--candidates", nargs="+", choices=sorted(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--main-steps", type=int, help="main steps (default: the recipe's CPU plan in benchmarks.overhead)")
    parser.add_argument("--preheat-steps", type=int, help="preheat steps (default: the recipe's CPU plan)")
    parser.add_argument("--directions-only", action="store_true", help="no validation after the fit (e.g. with --main-steps 1)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", dest="json_path")
    return parser


def main(argv: Sequence[str] | None = None) -> list[Fit]:
    args = build_parser().parse_args(argv)
    args.device, args.precision, args.overrides = "cpu", "32-true", []
    with torch_threads(args.threads), quiet_libraries(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clock = RunClock.start()
        fits = run_study(args)
        clock.stop()
    argv_list = list(sys.argv[1:] if argv is None else argv)
    machine = machine_line(torch.device("cpu"))
    for line in header_lines("preheat_choices", argv_list, machine, clock.load_before, clock.load_after, clock.seconds):
        print(line)
    plans = ", ".join(f"{r}: {plan_for(r, args).main_steps} / {plan_for(r, args).preheat_steps}" for r in args.recipes)
    print(f"Main steps / preheat steps: {plans}; R = 8r, classic mode, preheat lr = the main run's.\n")
    print(summary_table(fits))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump({"argv": argv_list, "fits": [asdict(f) for f in fits]}, handle, indent=2)
    return fits


if __name__ == "__main__":
    main()
