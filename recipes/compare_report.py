"""What a comparison leaves behind: ``runs.csv``, ``summary.csv``, ``report.md`` with the plots, and a W&B summary run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from lightning_hrp.recipes.compare_analysis import runs_frame, summarise, validation_means, verdict
from lightning_hrp.recipes.compare_plots import write_plots
from lightning_hrp.recipes.compare_settings import CompareSettings

SUMMARY_COLUMNS = ["method", "chosen_lr", "val_mean", "val_std", "test_mean", "test_std", "seeds"]


def summary_table(summary: pd.DataFrame, settings: CompareSettings) -> pd.DataFrame:
    """``summary`` with its statistics named by their metric (``val/loss_mean``, ...), as ``summary.csv`` holds it."""
    metric, test_metric = settings.selection_metric, settings.reported_test_metric
    names = {"val_mean": f"{metric}_mean", "val_std": f"{metric}_std", "test_mean": f"{test_metric}_mean", "test_std": f"{test_metric}_std"}
    return summary[SUMMARY_COLUMNS].rename(columns=names).reset_index()


def write_report(results: Sequence[dict[str, Any]], settings: CompareSettings, command: str) -> Path:
    """Write ``runs.csv``, ``summary.csv``, ``report.md`` and the PNG plots; return the report's path."""
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    runs = runs_frame(results)
    summary = summarise(results, settings)
    runs.assign(fit_seconds=runs["fit_seconds"].map("{:.2f}".format)).to_csv(output / "runs.csv", index=False)
    summary_table(summary, settings).to_csv(output / "summary.csv", index=False)
    plots = write_plots(results, summary, settings)
    report = output / "report.md"
    report.write_text("\n".join(report_lines(runs, summary, settings, command, plots)) + "\n")
    return report


def report_lines(runs: pd.DataFrame, summary: pd.DataFrame, settings: CompareSettings, command: str, plots: Sequence[Path]) -> list[str]:
    """The markdown report: how the comparison was run, one table row per method, the plots."""
    metric, test_metric = settings.selection_metric, settings.reported_test_metric
    references = [label for label in settings.references if label in summary.index]
    means = validation_means(runs, metric)
    learning_rates = sorted(runs["learning_rate"].unique())
    seed_keys = f" (each also sets {', '.join(f'`{k}`' for k in settings.seed_keys)})" if settings.seed_keys else ""
    lines = [
        "# LoRA initialisations compared",
        "",
        f"Recipe: `{settings.recipe_config}`; overrides: `{json.dumps(settings.overrides)}`.",
        f"Learning rate chosen per method on the validation split (mean of the final `{metric}` over seeds, "
        f"{settings.selection_mode}imised); the test split (`{test_metric}`) is reported at that rate only. "
        f"Seeds: {settings.seeds}{seed_keys}. Mean ± sample std over seeds.",
        "",
        "Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"| method | init | chosen lr | {metric} | {test_metric} |" + "".join(f" vs {label} |" for label in references)
        + "".join(f" val @ {lr:g} |" for lr in learning_rates),
        "|---|---|---|---|---|" + "---|" * (len(references) + len(learning_rates)),
    ]
    for label, s in summary.iterrows():
        versus = "".join(
            " — |" if label == reference
            else f" {verdict(s, summary.loc[reference], settings.selection_mode)} ({s.test_mean - summary.loc[reference, 'test_mean']:+.3g}) |"
            for reference in references
        )  # fmt: skip
        per_lr = "".join(f" {means[label, lr]:.4g} |" if (label, lr) in means.index else " |" for lr in learning_rates)
        lines.append(
            f"| {label} | {s.method} | {s.chosen_lr:g} | {s.val_mean:.4g} ± {s.val_std:.2g} | "
            f"{s.test_mean:.4g} ± {s.test_std:.2g} |{versus}{per_lr}"
        )
    if references:
        lines += [
            "",
            "`vs <method>`: verdict and test difference to that method (each at its own chosen rate); `win`/`loss` "
            "only where the difference exceeds two standard errors of the difference of the seed means, otherwise `tie`.",
        ]
    lines += ["", "Plots:", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "Every run: `runs.csv`; per method: `summary.csv`; run folders: `runs/<method>/lr=<lr>/seed=<seed>/`."]
    return lines


def log_summary_to_wandb(results: Sequence[dict[str, Any]], settings: CompareSettings, plots: Sequence[Path]) -> None:
    """One ``summary`` run in the comparison's W&B group: every run and the per-method table, and the plots."""
    import wandb

    metric, test_metric = settings.selection_metric, settings.reported_test_metric
    runs = runs_frame(results).reindex(columns=["label", "method", "learning_rate", "seed", metric, test_metric, "fit_seconds"])
    summary = summary_table(summarise(results, settings), settings).drop(columns=f"{metric}_std")
    run = wandb.init(
        project=settings.wandb.project,
        entity=settings.wandb.entity,
        group=settings.group,
        name="summary",
        job_type="summary",
        dir=str(Path(settings.output_dir)),
        mode=settings.wandb.mode,
        config={"settings": json.loads(json.dumps(asdict(settings), default=str))},
    )
    tables = {"runs": wandb.Table(dataframe=runs), "summary": wandb.Table(dataframe=summary)}
    run.log({**tables, **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
    run.finish()
