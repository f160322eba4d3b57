"""Where a comparison's rank budgets went: each layer's allocated rank and the energy it keeps, per method and seed.

``lightning-hrp compare`` reports the metrics (with paired differences and t-intervals); this reads the
same finished runs' HRP diagnostics (``diagnostics.json``) at each method's chosen learning rate and
writes, into the comparison's folder (or ``--out``):

* ``allocation.csv``: one row per method, seed and layer: the rank before and after the allocation and
  the share of the preheated update's energy each keeps;
* ``allocation.md``: per method and layer, the mean rank over seeds (with its range) and the mean
  energy kept at the uniform and at the allocated rank;
* ``allocation.png``: the mean allocated rank per layer, with its range over seeds (and the true ranks,
  where the task knows them).

Run: ``python -m lightning_hrp.recipes.rank_budget_report runs/compare/multi_layer_regression_rank_budget --true_ranks 1 2 4 8``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from lightning_hrp.report import LayerDiagnostics, metric_layer_names

COLUMNS = ["label", "seed", "layer", "rank_before", "rank", "energy_kept_before", "energy_kept"]


def allocation_frame(output_dir: Path) -> pd.DataFrame:
    """Every allocated layer of every run at its method's chosen learning rate (``summary.csv``), as :data:`COLUMNS`."""
    summary = pd.read_csv(output_dir / "summary.csv")
    rows = []
    for label, chosen_lr in zip(summary["label"], summary["chosen_lr"]):
        for result_path in sorted((output_dir / "runs" / label).glob("lr=*/seed=*/result.json")):
            result = json.loads(result_path.read_text())
            diagnostics_path = result_path.with_name("diagnostics.json")
            if result["learning_rate"] != chosen_lr or not diagnostics_path.is_file():
                continue
            hrp = json.loads(diagnostics_path.read_text()).get("hrp")
            if not hrp or hrp.get("rank_budget") is None:
                continue
            names = metric_layer_names([layer["name"] for layer in hrp["layers"]])
            for layer, name in zip((LayerDiagnostics(**layer) for layer in hrp["layers"]), names):
                rows.append(
                    [label, result["seed"], name, layer.rank_before, layer.rank, layer.energy_kept_before, layer.energy_kept]
                )
    return pd.DataFrame(rows, columns=COLUMNS)


def allocation_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method and layer (in the runs' layer order): mean, min and max rank over seeds, mean energy kept before and after."""
    grouped = frame.groupby(["label", "layer"], sort=False)
    table = grouped.agg(
        seeds=("seed", "nunique"),
        rank_before=("rank_before", "first"),
        rank_mean=("rank", "mean"),
        rank_min=("rank", "min"),
        rank_max=("rank", "max"),
        energy_kept_before=("energy_kept_before", "mean"),
        energy_kept=("energy_kept", "mean"),
    )
    return table.reset_index()


def markdown(table: pd.DataFrame, true_ranks: Sequence[int] | None) -> str:
    lines = ["# Rank allocations", ""]
    for label, rows in table.groupby("label", sort=False):
        lines += [
            f"## {label} ({int(rows['seeds'].max())} seeds, at its chosen learning rate)",
            "",
            "| layer | rank before | rank allocated: mean (min-max) |" + (" true rank |" if true_ranks else "")
            + " energy kept before | energy kept after |",
            "|---|---|---|" + ("---|" if true_ranks else "") + "---|---|",
        ]
        for index, row in enumerate(rows.itertuples()):
            true = f" {true_ranks[index]} |" if true_ranks else ""
            lines.append(
                f"| {row.layer} | {row.rank_before} | {row.rank_mean:.1f} ({row.rank_min}-{row.rank_max}) |{true}"
                f" {row.energy_kept_before:.1%} | {row.energy_kept:.1%} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(table: pd.DataFrame, true_ranks: Sequence[int] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    labels = list(dict.fromkeys(table["label"]))
    layers = list(dict.fromkeys(table["layer"]))
    width = 0.8 / len(labels)
    figure, axis = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) + 2), 4.0))
    for k, label in enumerate(labels):
        rows = table[table["label"] == label].set_index("layer").reindex(layers)
        x = [i + (k - (len(labels) - 1) / 2) * width for i in range(len(layers))]
        errors = [rows["rank_mean"] - rows["rank_min"], rows["rank_max"] - rows["rank_mean"]]
        axis.bar(x, rows["rank_mean"], width=width, yerr=errors, capsize=2, label=label)
    axis.axhline(table["rank_before"].iloc[0], color="black", linestyle="--", linewidth=1, label="uniform rank")
    if true_ranks:
        axis.scatter(range(len(layers)), true_ranks, color="black", marker="_", s=400, zorder=3, label="true rank")
    axis.set_xticks(range(len(layers)))
    axis.set_xticklabels(layers, rotation=90 if len(layers) > 6 else 0, fontsize=7 if len(layers) > 6 else 9)
    axis.set_ylabel("LoRA rank (mean over seeds, range)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="a finished comparison's output_dir (with summary.csv)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: output_dir)")
    parser.add_argument("--true_ranks", type=int, nargs="*", default=None, help="the task's true rank per layer, if known")
    args = parser.parse_args(argv)
    out = args.out or args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    frame = allocation_frame(args.output_dir)
    if frame.empty:
        parser.error(f"no run under {args.output_dir} allocated a rank budget (diagnostics with rank_budget).")
    frame.to_csv(out / "allocation.csv", index=False, float_format="%.6g")
    table = allocation_table(frame)
    (out / "allocation.md").write_text(markdown(table, args.true_ranks) + "\n")
    plot(table, args.true_ranks, out / "allocation.png")
    print(f"Allocations: {out / 'allocation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
