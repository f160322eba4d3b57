"""``lightning-hrp compare``: LoRA initialisations compared fairly, methods x learning rates x seeds.

One recipe config (a ``lightning-hrp fit`` YAML) is run once per method, learning rate and seed,
with only ``model.init_args.init_method`` / ``init_options``, ``learning_rate`` and
``seed_everything`` changed. Per method the learning rate is chosen on the *validation* split
(mean over seeds of the final ``selection_metric``) and the *test* split is reported at that rate
only, so every method gets the same tuning budget ("Learning Rate Matters", arXiv 2602.04998).
With ``tuning_seeds`` only those seeds run at every rate and choose it; the other seeds run at
the chosen rate only.
With ``compute_matched`` (on by default) every method that computes on training batches before
its main run gets a plain-LoRA arm with as many more optimizer steps
(:mod:`~lightning_hrp.recipes.compare.matching`), and each method is judged against it and the
``references`` seed by seed: paired differences with a 95% t-interval
(:mod:`~lightning_hrp.recipes.compare.analysis`).

Resumable: each run writes ``result.json`` last, into its own folder
``<output_dir>/runs/<label>/lr=<lr>/seed=<seed>/`` (with ``config.yaml``, the CSV log and any HRP
or init diagnostics); a second invocation skips every run whose ``result.json`` exists for the
same configuration. A run whose ``result.json``, CSV log or diagnostics are unreadable or changed
since it finished (``result.json`` holds their SHA-256) is reported with its path and run again,
never half-used. Method labels name folders, so they must be plain names (no ``/``, no ``..``).
``output_dir`` is the tool's own: a folder it creates gets a marker (``.lightning-hrp-compare.json``),
and an existing one is used only with that marker (resumed) or empty; a run folder is deleted to
run it again only with its own marker. ``--adopt_output_dir=true`` takes over a comparison started
before the markers.
Logging goes to a CSV logger and, unless ``wandb.mode=disabled``, to Weights & Biases: offline by
default (a run folder under ``<output_dir>/wandb`` that ``wandb sync`` uploads later), online with
``--wandb.mode=online``; one W&B group per comparison, run names ``label/lr/seed``, and a
``summary`` run with the result tables and plots.

The report (``report.md``, ``runs.csv``, ``summary.csv`` and PNG plots in ``<output_dir>``) needs
no W&B; ``--report_only=true`` rebuilds it from finished runs.

This module runs the comparison; its parts: the settings and where runs go
(:mod:`~lightning_hrp.recipes.compare.settings`), running and reading back one run
(:mod:`~lightning_hrp.recipes.compare.running`), the statistics (:mod:`~lightning_hrp.recipes.compare.analysis`),
the report and W&B summary (:mod:`~lightning_hrp.recipes.compare.report`) and the figures
(:mod:`~lightning_hrp.recipes.compare.plots`).

Run: ``lightning-hrp compare --config recipes/configs/compare_matrix_regression.yaml``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_hrp.recipes.compare.analysis import choose_rate, runs_frame, selection_means
from lightning_hrp.recipes.compare.folders import check_output_dir, claim_output_dir
from lightning_hrp.recipes.compare.report import comparison_arms, log_summary_to_wandb, write_report
from lightning_hrp.recipes.compare.running import DamagedRunError, execute_run, finished_result, load_recipe_config, run_config
from lightning_hrp.recipes.compare.settings import CompareSettings, MethodSpec, WandbSettings, check_settings, run_dir
from lightning_hrp.recipes.runs import quiet_libraries, settings_from_command_line, settings_parser

__all__ = ["CompareSettings", "MethodSpec", "WandbSettings", "build_parser", "compare", "execute_run", "main", "run_dir"]


def compare(settings: CompareSettings, command: str = "") -> list[dict[str, Any]]:
    """Run (or reuse) every run of the comparison, write the report; return all results."""
    check_settings(settings)
    base = load_recipe_config(settings.recipe_config)
    arms, _ = comparison_arms(settings, base)  # refuses a budget compute matching cannot read, before anything runs
    output = Path(settings.output_dir)
    claim_output_dir(output, "comparison", adopt=settings.adopt_output_dir, report_only=settings.report_only)
    if settings.wandb.mode != "disabled":
        os.environ["WANDB_MODE"] = settings.wandb.mode
        os.environ["WANDB_DIR"] = str(output)
        os.environ.setdefault("WANDB_SILENT", "true")
    runner = _Runner(settings, base, total=_planned_runs(settings, arms))
    tuning = settings.rate_choosing_seeds
    later_seeds = [seed for seed in settings.seeds if seed not in tuning]
    waiting = []
    # Arm by arm (the YAML's priority order): its rate-choosing runs, then its other seeds at the chosen rate.
    for spec in arms:
        for lr in spec.rates(settings.learning_rates):
            for seed in settings.seeds:
                if seed in tuning:
                    runner.run(spec, lr, seed)
        if later_seeds and not runner.run_at_chosen_rate(spec, later_seeds):
            waiting.append(spec)
    # Another process may have finished a waiting arm's tuning runs meanwhile: retry while any gets ready.
    while waiting:
        ready = [spec for spec in waiting if runner.run_at_chosen_rate(spec, later_seeds)]
        if not ready:
            break
        waiting = [spec for spec in waiting if spec not in ready]
    elsewhere = [seed for seed in tuning if seed not in settings.seeds]
    for spec in waiting:
        if settings.report_only:
            then = ""
        elif elsewhere:
            then = f"; a process whose --seeds hold {elsewhere} runs them, then run this command again"
        else:
            then = "; run the same command again once they have"
        print(
            f"{spec.label}: seeds {later_seeds} not run, its learning rate is not chosen yet: its tuning runs (seeds {tuning} at "
            f"every rate) have not all finished{then}.",
            flush=True,
        )
    results = list(runner.results.values())
    if not results and waiting:
        return []  # every arm waits for another process's tuning runs: nothing to report yet
    if not results:
        raise ValueError(f"No finished run under {output}; nothing to report.")
    report = write_report(results, settings, command, base)
    if settings.wandb.mode != "disabled" and not settings.report_only:
        plots = sorted(output.glob("*.png"))
        log_summary_to_wandb(results, settings, plots, base)
    print(f"Report: {report}", flush=True)
    return results


class _Runner:
    """Runs or reuses the comparison's runs one by one and keeps their results, keyed by (label, lr, seed)."""

    def __init__(self, settings: CompareSettings, base: dict[str, Any], total: int) -> None:
        self.settings, self.base, self.total = settings, base, total
        self.results: dict[tuple[str, float, int], dict[str, Any]] = {}
        self.index = 0

    def run(self, spec: MethodSpec, lr: float, seed: int) -> dict[str, Any] | None:
        """The run's result: reused if it finished before, run now otherwise (None under ``report_only``)."""
        settings = self.settings
        config = run_config(self.base, settings, spec, lr, seed)
        self.index += 1
        tag = f"[{self.index}/{self.total}] {spec.label} lr={lr:g} seed={seed}"
        try:
            result = finished_result(settings, spec, lr, seed, config)
        except DamagedRunError as damaged:
            result = None
            action = "left out of the report (report_only)" if settings.report_only else "running it again"
            print(f"{tag}: damaged run, {damaged}; {action}", flush=True)
        else:
            if result is not None:
                print(f"{tag}: finished before, skipped", flush=True)
            elif settings.report_only:
                print(f"{tag}: not run yet (report_only)", flush=True)
        if result is None:
            if settings.report_only:
                return None
            result = execute_run(settings, spec, lr, seed, config)
            print(
                f"{tag}: {settings.selection_metric}={result['val'].get(settings.selection_metric, float('nan')):.4g} "
                f"{settings.reported_test_metric}={result['test'].get(settings.reported_test_metric, float('nan')):.4g} "
                f"({result['fit_seconds']:.0f} s)",
                flush=True,
            )
        self.results[spec.label, lr, seed] = result
        return result

    def run_at_chosen_rate(self, spec: MethodSpec, seeds: Sequence[int]) -> bool:
        """Run ``seeds`` at the rate ``spec``'s tuning runs chose; False (nothing run) while one of those is unfinished."""
        tuning_results = []
        for lr in spec.rates(self.settings.learning_rates):
            for seed in self.settings.rate_choosing_seeds:
                result = self.results.get((spec.label, lr, seed))
                if result is None:  # a tuning seed this process does not run: another one's finished run
                    try:
                        result = finished_result(self.settings, spec, lr, seed, run_config(self.base, self.settings, spec, lr, seed))
                    except DamagedRunError:
                        result = None
                if result is None:
                    return False
                self.results[spec.label, lr, seed] = result  # in the report too
                tuning_results.append(result)
        means = selection_means(runs_frame(tuning_results), self.settings)
        chosen = choose_rate(means.loc[spec.label], self.settings.selection_mode)
        for seed in seeds:
            self.run(spec, chosen, seed)
        return True


def _planned_runs(settings: CompareSettings, arms: Sequence[MethodSpec]) -> int:
    """How many runs this invocation goes through: every rate for the tuning seeds, one rate for the others."""
    tuning = settings.rate_choosing_seeds
    tuned_here = sum(seed in tuning for seed in settings.seeds)
    return sum(len(spec.rates(settings.learning_rates)) * tuned_here + len(settings.seeds) - tuned_here for spec in arms)


def build_parser() -> Any:
    """The ``lightning-hrp compare`` command line: one ``--snake_case`` option per :class:`CompareSettings` field."""
    description = (
        "Compare LoRA initialisations on one recipe: methods x learning rates x seeds, learning rate chosen per "
        "method on validation, test reported; resumable; CSV + W&B (offline by default) logging; markdown + PNG report."
    )
    return settings_parser("lightning-hrp compare", description, CompareSettings, "A compare YAML (see recipes/configs/compare_*.yaml).")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-hrp compare``."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    settings = settings_from_command_line(parser, CompareSettings, args)
    try:
        check_settings(settings)
        comparison_arms(settings, load_recipe_config(settings.recipe_config))
        check_output_dir(Path(settings.output_dir), "comparison", adopt=settings.adopt_output_dir, report_only=settings.report_only)
    except ValueError as error:  # a bad grid, method or step budget is a usage error, as a malformed option is
        parser.error(str(error))
    # The report shows the command that runs the comparison, also when only the report was rebuilt.
    command = " ".join(["lightning-hrp compare", *(a for a in args if not a.startswith(("--report_only", "--adopt_output_dir")))])
    with quiet_libraries():
        compare(settings, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
