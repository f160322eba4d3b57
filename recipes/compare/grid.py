"""``lightning-hrp compare-grid``: one ``lightning-hrp compare`` per cell of a grid, and the paired gains across it.

A grid YAML names a compare YAML and two axes, each a mapping from a value's name to the dotted
overrides that value sets (several keys may move together, e.g. the LoRA rank and its alpha)::

    compare: recipes/configs/compare_theory_grid.yaml
    output_dir: runs/compare/theory_grid
    axes:
      rank: {"1": {model.init_args.lora_rank: 1, model.init_args.lora_alpha: 1.0}, "4": {...}}
      main_steps: {"20": {trainer.max_steps: 20}, "40": {trainer.max_steps: 40}}

Each cell is a whole comparison (learning rates tuned per method and cell, compute-matched arms,
paired statistics) in ``<output_dir>/<axis>=<value>/<axis>=<value>/``, resumable like ``compare``.
Axis names and value names name folders, so they are checked as method labels are (no ``/``,
no ``..``); the grid's folder is the tool's own, marked like a comparison's (``compare``). The grid's own outputs: ``grid.csv`` (every cell's paired comparisons) and ``grid.png`` (each
method's paired gain over its compute-matched arm on the test metric, with 95% t-intervals).
``--seeds`` runs a subset of the seeds (e.g. two processes on disjoint seeds); a final
``--report_only=true`` with every seed rebuilds all reports.

Run: ``lightning-hrp compare-grid --config recipes/configs/grid_theory_matrix_regression.yaml``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lightning_hrp.recipes.compare import build_parser as compare_parser
from lightning_hrp.recipes.compare import compare
from lightning_hrp.recipes.compare.plots import _pyplot, _save
from lightning_hrp.recipes.compare.report import comparison_arms
from lightning_hrp.recipes.compare.running import load_recipe_config
from lightning_hrp.recipes.compare.folders import check_output_dir, claim_output_dir
from lightning_hrp.recipes.compare.settings import CompareSettings, check_label, check_settings
from lightning_hrp.recipes.runs import quiet_libraries, settings_from_command_line, settings_parser


@dataclass
class GridSettings:
    """A grid of comparisons.

    Attributes:
        compare: The compare YAML every cell starts from (its ``output_dir`` is replaced per cell).
        output_dir: Where the cells and the grid's report go.
        axes: Exactly two axes, ``{axis: {value name: {dotted key: value}}}``, in plot order: the first
            axis gives the lines, the second the x positions.
        seeds: Run these seeds only (default: the compare YAML's).
        report_only: Run nothing; rebuild every cell's report and the grid's.
        adopt_output_dir: Take over ``output_dir``, a grid that lightning-hrp started before it marked
            its folders, with every cell in it (as ``compare``'s ``adopt_output_dir``).
    """

    compare: str
    output_dir: str
    axes: dict[str, dict[str, dict[str, Any]]]
    seeds: list[int] | None = None
    report_only: bool = False
    adopt_output_dir: bool = False


def cell_settings(grid: GridSettings) -> list[tuple[dict[str, str], CompareSettings]]:
    """The comparison of every cell, with the cell's value names per axis; checked before anything runs."""
    if len(grid.axes) != 2 or not all(grid.axes.values()):
        raise ValueError(f"axes: give exactly two axes, each with at least one value, got {list(grid.axes)}.")
    base = settings_from_command_line(compare_parser(), CompareSettings, ["--config", grid.compare])
    (first, first_values), (second, second_values) = grid.axes.items()
    for axis, values in grid.axes.items():  # each names a folder <axis>=<value>, checked as method labels are
        check_label(axis, "axes: axis", "it names the cells' folders <output_dir>/<axis>=<value>/")
        for name in values:
            check_label(name, f"axes: {axis}: value name", f"it names the cells' folders <output_dir>/{axis}=<value>/")
    cells = []
    for name_a, overrides_a in first_values.items():
        for name_b, overrides_b in second_values.items():
            cell = dataclasses.replace(
                base,
                output_dir=str(Path(grid.output_dir) / f"{first}={name_a}" / f"{second}={name_b}"),
                overrides={**base.overrides, **overrides_a, **overrides_b},
                seeds=list(grid.seeds) if grid.seeds is not None else base.seeds,
                report_only=grid.report_only,
                adopt_output_dir=grid.adopt_output_dir,
            )
            check_settings(cell)
            comparison_arms(cell, load_recipe_config(cell.recipe_config))
            cells.append(({first: name_a, second: name_b}, cell))
    return cells


def run_grid(grid: GridSettings, command: str = "") -> pd.DataFrame:
    """Run (or reuse) every cell's comparison; write ``grid.csv`` and ``grid.png``; return the grid table."""
    cells = cell_settings(grid)
    output = Path(grid.output_dir)
    claim_output_dir(output, "grid", adopt=grid.adopt_output_dir, report_only=grid.report_only)
    frames = []
    for values, cell in cells:
        where = ", ".join(f"{axis}={value}" for axis, value in values.items())
        print(f"== cell {where}", flush=True)
        compare(cell, command=f"{command}  # cell {where}")
        paired = pd.read_csv(Path(cell.output_dir) / "paired.csv")
        frames.append(paired.assign(**values))
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(output / "grid.csv", index=False)
    first_cell = cells[0][1]
    _save(plot_grid_gains(table, grid, first_cell), output / "grid.png")
    return table


def plot_grid_gains(table: pd.DataFrame, grid: GridSettings, settings: CompareSettings) -> Any:
    """One panel per method with a compute-matched arm: its paired gain over that arm across the grid."""
    metric = settings.reported_test_metric
    matched = table[(table["metric"] == metric) & table["reference"].str.startswith("lora_matched_")]
    methods = list(dict.fromkeys(matched["label"]))
    (first, first_values), (second, second_values) = grid.axes.items()
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 4), sharey=True, squeeze=False)
    sign = -1.0 if settings.selection_mode == "min" else 1.0  # gain > 0: the method is better than its matched arm
    positions = {name: i for i, name in enumerate(second_values)}
    for axis, method in zip(axes[0], methods):
        rows = matched[matched["label"] == method]
        for j, name in enumerate(first_values):
            line = rows[rows[first].astype(str) == name].assign(x=lambda f: f[second].astype(str).map(positions)).sort_values("x")
            gain = sign * line["mean_difference"]
            low = sign * (line["ci_high"] if sign < 0 else line["ci_low"])
            high = sign * (line["ci_low"] if sign < 0 else line["ci_high"])
            offset = (j - (len(first_values) - 1) / 2) * 0.08
            axis.errorbar(line["x"] + offset, gain, yerr=[gain - low, high - gain], marker="o", capsize=3, label=f"{first}={name}")
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(second_values)), list(second_values))
        axis.set_xlabel(second)
        axis.set_title(f"{method} vs its matched arm")
    axes[0][0].set_ylabel(f"paired gain in {metric}\n(matched arm - method; > 0: method better)")
    axes[0][0].legend(fontsize=8)
    figure.suptitle("Paired gain over the compute-matched plain-LoRA arm (mean over seeds, 95% t-interval)")
    return figure


def build_parser() -> Any:
    """The ``lightning-hrp compare-grid`` command line: one ``--snake_case`` option per :class:`GridSettings` field."""
    description = "Run one lightning-hrp compare per cell of a two-axis grid; tabulate and plot the paired gains across it."
    return settings_parser("lightning-hrp compare-grid", description, GridSettings, "A grid YAML (see recipes/configs/grid_*.yaml).")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-hrp compare-grid``."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    grid = settings_from_command_line(parser, GridSettings, args)
    try:
        cell_settings(grid)
        check_output_dir(Path(grid.output_dir), "grid", adopt=grid.adopt_output_dir, report_only=grid.report_only)
    except ValueError as error:
        parser.error(str(error))
    command = " ".join(["lightning-hrp compare-grid", *(a for a in args if not a.startswith(("--report_only", "--seeds", "--adopt_output_dir")))])
    with quiet_libraries():
        run_grid(grid, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
