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

Peak memory, per phase (preheating = the callback's ``on_train_start``; main = the training loop),
as :mod:`benchmarks.overhead_memory` measures it (CPU: the process's resident set; CUDA: the allocator).

``mem_ratio = preheat peak / main peak`` of the same fit (also against the LoRA fit's main
peak). Goal: at most 1.1 at ``R = 8r``. Everything is reported as medians over repeats of the
per-repeat figures.

Each recipe is its bundled ``*_lora.yaml`` config, built as ``lightning-hrp fit`` builds it
(:mod:`benchmarks.overhead_fits`); the figures and tables: :mod:`benchmarks.overhead_report`.
Run ``python -m benchmarks.overhead --help`` from the repository root; results and the exact commands are in
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

if not __package__:
    sys.exit("Run this benchmark from the repository root as a module: python -m benchmarks.overhead --help")

import lightning.pytorch as pl
import torch
import yaml

from benchmarks.harness import RunClock, header_lines, print_goal_lines, torch_threads
from benchmarks.harness import machine_line as harness_machine_line
from benchmarks.overhead_fits import DEFAULT_RECIPES, RECIPES, FitResult, Recipe, StepPlan, run_recipe
from benchmarks.overhead_memory import make_meter
from benchmarks.overhead_report import OverheadRow, goal_lines, memory_table, step_table, summarise, time_table
from lightning_hrp.recipes.runs import quiet_libraries


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
    parser.add_argument(
        "--override",
        dest="overrides",
        action="append",
        default=[],
        type=parse_override,
        metavar="KEY=VALUE",
        help="set a dotted key of every recipe's config (VALUE read as YAML), e.g. "
        "model.init_args.model_name_or_path=/models/minilm for a model kept outside the offline packages; "
        "the benchmark's own settings (steps, device, precision, callbacks) still win",
    )
    parser.add_argument("--json", dest="json_path", help="also write all rows and per-repeat fits as JSON here")
    parser.add_argument(
        "--from-json",
        dest="from_json",
        help="fit nothing: print the report of an earlier run from the JSON it wrote with --json (its per-repeat "
        "fits, summarised by this version of the script)",
    )
    return parser


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--override``: the dotted key and the value read as YAML."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. data.init_args.data_path=/data/rt.csv.bz2, got {text!r}")
    return key, yaml.safe_load(value)


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


def machine_line(args: argparse.Namespace) -> str:
    return harness_machine_line(torch.device(args.device), [f"lightning {pl.__version__}", f"precision {args.precision}"])


def main(argv: Sequence[str] | None = None) -> list[OverheadRow]:
    """Run the benchmark, print markdown tables to stdout and return the rows.

    ``--threads`` applies for the run only; the previous torch thread count is restored after.
    """
    args = parse_args(argv)
    with torch_threads(args.threads), quiet_libraries(), warnings.catch_warnings():
        # Lightning's advice (more dataloader workers, a logger) is noise in a benchmark report.
        warnings.simplefilter("ignore")
        return run_and_report(args, list(sys.argv[1:] if argv is None else argv))


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
        recipe = RECIPES[name]
        for rank, pairs in run_recipe(recipe, plans[name], args).items():
            rows.append(summarise(recipe.name, recipe.lora_rank, plans[name], rank, pairs))
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
                row["recipe"],
                row["lora_rank"],
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
