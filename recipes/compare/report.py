"""What a comparison leaves behind: ``runs.csv``, ``summary.csv``, ``paired.csv``, ``equivalent_steps.csv``,
``report.md`` with the plots, and a W&B summary run."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from lightning_hrp.recipes.compare.analysis import paired_table, reach_step, runs_frame, selection_means, summarise
from lightning_hrp.recipes.compare.folders import require_marker
from lightning_hrp.recipes.compare.matching import MatchingPlan, is_plain_lora, plan_matching, recipe_overrides
from lightning_hrp.recipes.compare.plots import write_plots
from lightning_hrp.recipes.compare.running import read_learning_curve, work_before_training
from lightning_hrp.recipes.compare.settings import CompareSettings, Direction, MethodSpec, run_dir

SUMMARY_COLUMNS = ["method", "chosen_lr", "val_mean", "val_std", "test_mean", "test_std", "seeds"]


def summary_table(summary: pd.DataFrame, settings: CompareSettings) -> pd.DataFrame:
    """``summary`` with its statistics named by their metric (``val/loss_mean``, ...), as ``summary.csv`` holds it."""
    metric, test_metric = settings.selection_metric, settings.reported_test_metric
    names = {"val_mean": f"{metric}_mean", "val_std": f"{metric}_std", "test_mean": f"{test_metric}_mean", "test_std": f"{test_metric}_std"}
    return summary[SUMMARY_COLUMNS].rename(columns=names).reset_index()


def comparison_arms(settings: CompareSettings, base: Mapping[str, Any]) -> tuple[list[MethodSpec], MatchingPlan | None]:
    """The arms a comparison runs, and its matching plan (None with ``compute_matched`` off)."""
    if not settings.compute_matched:
        return list(settings.methods), None
    plan = plan_matching(settings, base)
    return plan.arms, plan


def judged_pairs(settings: CompareSettings, plan: MatchingPlan | None, labels: Sequence[str]) -> list[tuple[str, str]]:
    """(method, reference) pairs the report judges: each method against its matched arm, then against each reference."""
    pairs: list[tuple[str, str]] = []
    for label in labels:
        if plan is not None and label in plan.matched:
            pairs.append((label, plan.matched[label]))
        pairs += [(label, reference) for reference in settings.references if reference != label and (label, reference) not in pairs]
    return pairs


def judged_metrics(settings: CompareSettings) -> dict[str, Direction]:
    """The test metric (primary) and the secondary ones, each with its direction."""
    return {settings.reported_test_metric: settings.selection_mode, **settings.secondary_metrics}


def write_report(results: Sequence[dict[str, Any]], settings: CompareSettings, command: str, base: Mapping[str, Any]) -> Path:
    """Write ``runs.csv``, ``summary.csv``, ``paired.csv``, ``report.md`` and the PNG plots; return the report's path.

    Args:
        results: The finished runs.
        settings: The comparison.
        command: The command that runs it, quoted in the report.
        base: The recipe config (for the step budget of compute matching).
    """
    output = Path(settings.output_dir)
    require_marker(output, "comparison")  # never report.md or runs.csv over a user's own files
    arms, plan = comparison_arms(settings, base)
    runs = runs_frame(results)
    summary = summarise(results, settings, arms)
    paired = paired_table(runs, summary, judged_pairs(settings, plan, list(summary.index)), judged_metrics(settings))
    steps = equivalent_steps_table(summary, runs, settings, arms, plan)
    curves = mean_curves_table(summary, runs, settings)
    curves.to_csv(output / "learning_curves.csv")
    runs.assign(fit_seconds=runs["fit_seconds"].map("{:.2f}".format)).to_csv(output / "runs.csv", index=False)
    summary_table(summary, settings).to_csv(output / "summary.csv", index=False)
    paired.to_csv(output / "paired.csv", index=False)
    if not steps.empty:
        steps.to_csv(output / "equivalent_steps.csv", index=False)
    plots = write_plots(results, summary, settings, paired)
    report = output / "report.md"
    report.write_text("\n".join(report_lines(runs, summary, settings, command, plots, plan, paired, steps, curves)) + "\n")
    return report


def equivalent_steps_table(
    summary: pd.DataFrame, runs: pd.DataFrame, settings: CompareSettings, arms: Sequence[MethodSpec], plan: MatchingPlan | None
) -> pd.DataFrame:
    """Per method but plain LoRA: the plain-LoRA steps that reach its final validation value.

    Read off the seed-mean validation curve (at its chosen rate) of the longest plain-LoRA arm with
    the method's recipe overrides, against the method's seed-mean final ``selection_metric``.
    ``equivalent_extra_steps`` is that step minus the method's own main steps: what its start is
    worth in plain-LoRA steps, to set against its ``extra_steps``. Empty without compute matching.
    """
    columns = ["label", "extra_steps", "final_val", "lora_arm", "reached_at", "bound", "equivalent_extra_steps"]
    if plan is None:
        return pd.DataFrame(columns=columns)
    plain = [spec for spec in arms if is_plain_lora(spec) and spec.label in summary.index]
    curves: dict[str, pd.Series] = {}
    rows = []
    for spec in arms:
        extra = plan.extra.get(spec.label)
        if extra is None or is_plain_lora(spec) or spec.label not in summary.index:
            continue
        candidates = [arm.label for arm in plain if recipe_overrides(arm) == recipe_overrides(spec)]
        if not candidates:
            continue
        longest = max(candidates, key=lambda label: plan.total_steps[label])
        if longest not in curves:
            lr = float(summary.loc[longest, "chosen_lr"])
            seeds = sorted(runs.loc[(runs["label"] == longest) & (runs["learning_rate"] == lr), "seed"])
            curves[longest] = mean_curve(settings, longest, lr, seeds, settings.selection_metric)
        final = float(summary.loc[spec.label, "val_mean"])
        step, bound = reach_step(curves[longest], final, settings.selection_mode)
        rows.append(
            {
                "label": spec.label,
                "extra_steps": extra.extra_steps(plan.accumulate),
                "final_val": final,
                "lora_arm": longest,
                "reached_at": step,
                "bound": bound,
                "equivalent_extra_steps": step - plan.total_steps[spec.label],
            }
        )
    return pd.DataFrame(rows, columns=columns)


def mean_curves_table(summary: pd.DataFrame, runs: pd.DataFrame, settings: CompareSettings) -> pd.DataFrame:
    """Each method's seed-mean validation curve at its chosen rate: one column per method, indexed by step."""
    curves = {}
    for label, s in summary.iterrows():
        seeds = sorted(runs.loc[(runs["label"] == label) & (runs["learning_rate"] == s.chosen_lr), "seed"])
        curves[label] = mean_curve(settings, label, float(s.chosen_lr), seeds, settings.selection_metric)
    table = pd.concat(curves, axis=1).sort_index() if curves else pd.DataFrame()
    table.index.name = "step"
    return table


def mean_curve(settings: CompareSettings, label: str, lr: float, seeds: Sequence[int], metric: str) -> pd.Series:
    """The mean over ``seeds`` of one arm's validation curve, at the steps every seed logged."""
    curves = [read_learning_curve(run_dir(settings, label, lr, seed), metric) for seed in seeds]
    curves = [curve for curve in curves if not curve.empty]
    if not curves:
        return pd.Series(dtype=float)
    return pd.concat(curves, axis=1, join="inner").sort_index().mean(axis=1)


def _work_taken(settings: CompareSettings, runs: pd.DataFrame, label: str, lr: float) -> str:
    """``"; taken: preheat steps 5.2"``: the mean over seeds at the chosen rate of what the runs' diagnostics say they computed."""
    seeds = runs.loc[(runs["label"] == label) & (runs["learning_rate"] == lr), "seed"]
    found = [work_before_training(run_dir(settings, label, lr, int(seed))) for seed in seeds]
    keys = sorted({key for work in found for key in work})
    if not keys:
        return ""
    return "; taken: " + ", ".join(f"{key} {sum(work.get(key, 0) for work in found) / len(found):.3g}" for key in keys)


def _difference(value: float) -> str:
    return f"{value:+.3g}" if math.isfinite(value) else "n/a"


def paired_lines(paired: pd.DataFrame, plan: MatchingPlan | None) -> list[str]:
    """The paired comparisons as a markdown table, one row per (method, reference, metric)."""
    if paired.empty:
        return []
    lines = [
        "| method | reference | metric | seeds | mean difference (method - reference) | 95% t-interval | wins / ties / losses | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in paired.itertuples():
        matched = " (matched)" if plan is not None and plan.matched.get(row.label) == row.reference else ""
        interval = f"[{_difference(row.ci_low)}, {_difference(row.ci_high)}]"
        lines.append(
            f"| {row.label} | {row.reference}{matched} | {row.metric} | {row.seeds} | {_difference(row.mean_difference)} | "
            f"{interval} | {row.wins} / {row.ties} / {row.losses} | {row.verdict} |"
        )
    return lines


def report_lines(
    runs: pd.DataFrame,
    summary: pd.DataFrame,
    settings: CompareSettings,
    command: str,
    plots: Sequence[Path],
    plan: MatchingPlan | None = None,
    paired: pd.DataFrame | None = None,
    steps: pd.DataFrame | None = None,
    curves: pd.DataFrame | None = None,
) -> list[str]:
    """The markdown report: how the comparison was run, one table row per method, the paired verdicts, the plots."""
    metric, test_metric = settings.selection_metric, settings.reported_test_metric
    means = selection_means(runs, settings)
    learning_rates = sorted(runs["learning_rate"].unique())
    seed_keys = f" (each also sets {', '.join(f'`{k}`' for k in settings.seed_keys)})" if settings.seed_keys else ""
    tuned_on = "over seeds" if settings.tuning_seeds is None else f"over the tuning seeds {settings.tuning_seeds}"
    others = "" if settings.tuning_seeds is None else " The other seeds ran at the chosen rate only."
    lines = [
        "# LoRA initialisations compared",
        "",
        f"Recipe: `{settings.recipe_config}`; overrides: `{json.dumps(settings.overrides)}`.",
        f"Learning rate chosen per method on the validation split (mean of the final `{metric}` {tuned_on}, "
        f"{settings.selection_mode}imised); the test split (`{test_metric}`) is reported at that rate only. "
        f"Seeds: {settings.seeds}{seed_keys}.{others} Mean ± sample std over every seed at the chosen rate.",
    ]
    if plan is not None:
        lines += [
            "",
            f"Compute-matched: the main budget is {plan.main_steps} optimizer steps of {plan.accumulate} batch(es); every "
            "method that computes on training batches before it is matched by plain LoRA trained for as many more "
            "steps (`lora_matched_<total steps>`, its learning rate tuned on the same grid).",
        ]
    lines += ["", "Command:", "", "```bash", command, "```", ""]
    extra_columns = " steps | extra compute before training |" if plan is not None else ""
    lines += [
        f"| method | init |{extra_columns} chosen lr | {metric} | {test_metric} |" + "".join(f" val @ {lr:g} |" for lr in learning_rates),
        "|---|---|" + ("---|---|" if plan is not None else "") + "---|---|---|" + "---|" * len(learning_rates),
    ]
    for label, s in summary.iterrows():
        compute = ""
        if plan is not None:
            extra = plan.extra.get(label)
            total = plan.total_steps[label]
            extra_steps = extra.extra_steps(plan.accumulate) if extra is not None else 0
            taken = _work_taken(settings, runs, label, float(s.chosen_lr))
            compute = f" {total}" + (f" + {extra_steps}" if extra_steps else "") + f" | {extra.how if extra else 'none (matched arm)'}{taken} |"
        per_lr = "".join(f" {means[label, lr]:.4g} |" if (label, lr) in means.index else " |" for lr in learning_rates)
        lines.append(
            f"| {label} | {s.method} |{compute} {s.chosen_lr:g} | {s.val_mean:.4g} ± {s.val_std:.2g} | "
            f"{s.test_mean:.4g} ± {s.test_std:.2g} |{per_lr}"
        )
    at_edge = [label for label, s in summary.iterrows() if _at_grid_edge(means.loc[label].index, float(s.chosen_lr))]
    if at_edge:
        lines += [
            "",
            f"**Chosen at the edge of the grid:** {', '.join(f'`{label}`' for label in at_edge)}: the best rate may lie "
            "outside it, so these methods may be under-tuned; widen their grid (a method's own `learning_rates`).",
        ]
    if paired is not None and not paired.empty:
        lines += [
            "",
            "## Paired comparisons",
            "",
            "Each method at its chosen rate against each reference at its own, seed by seed (a seed is the same task, "
            "data order and random start for both). Verdict from the 95% t-interval of the mean difference: `win` or "
            "`loss` only when it excludes zero, otherwise `tie`; wins/ties/losses count seeds. For "
            f"`{metric.removeprefix('val/')}`-like metrics that are minimised a negative difference is better.",
            "",
            *paired_lines(paired, plan),
        ]
    if steps is not None and not steps.empty:
        lines += [
            "",
            "## Equivalent plain-LoRA steps",
            "",
            f"Where the seed-mean validation curve (`{metric}`) of the longest plain-LoRA arm reaches each method's "
            "final validation value, minus the method's main steps: what its start is worth in plain-LoRA steps, "
            "against what it spent before training (`>`: not reached within that arm's steps; `<=`: reached by its "
            "first validation).",
            "",
            "| method | extra steps spent | final val | plain-LoRA arm | reached at step | equivalent extra steps |",
            "|---|---|---|---|---|---|",
        ]
        for row in steps.itertuples():
            bound = "" if row.bound == "=" else f"{row.bound} "
            lines.append(
                f"| {row.label} | {row.extra_steps} | {row.final_val:.4g} | {row.lora_arm} | {bound}{row.reached_at:.1f} | "
                f"{bound}{row.equivalent_extra_steps:+.1f} |"
            )
    if curves is not None and not curves.empty:
        lines += [
            "",
            "## Validation curves",
            "",
            f"Mean `{metric}` over the seeds at each method's chosen rate, by optimizer step of the main run (`learning_curves.csv`).",
            "",
            "| step | " + " | ".join(curves.columns) + " |",
            "|---|" + "---|" * len(curves.columns),
        ]
        for step, row in curves.iterrows():
            values = " | ".join("" if pd.isna(v) else f"{v:.4g}" for v in row)
            lines.append(f"| {step:g} | {values} |")
    lines += ["", "Plots:", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += [
        "",
        "Every run: `runs.csv`; per method: `summary.csv`; paired comparisons: `paired.csv`; validation curves: "
        "`learning_curves.csv`; run folders: "
        "`runs/<method>/lr=<lr>/seed=<seed>/`.",
    ]
    return lines


def _at_grid_edge(rates: Sequence[float], chosen: float) -> bool:
    """Whether ``chosen`` is the smallest or largest of a grid of several rates (not bracketed)."""
    return len(rates) > 1 and chosen in (min(rates), max(rates))


def log_summary_to_wandb(results: Sequence[dict[str, Any]], settings: CompareSettings, plots: Sequence[Path], base: Mapping[str, Any]) -> None:
    """One ``summary`` run in the comparison's W&B group: every run, the per-method and paired tables, and the plots."""
    import wandb

    metric, test_metric = settings.selection_metric, settings.reported_test_metric
    arms, plan = comparison_arms(settings, base)
    frame = runs_frame(results)
    runs = frame.reindex(columns=["label", "method", "learning_rate", "seed", metric, test_metric, "fit_seconds"])
    summarised = summarise(results, settings, arms)
    paired = paired_table(frame, summarised, judged_pairs(settings, plan, list(summarised.index)), judged_metrics(settings))
    summary = summary_table(summarised, settings).drop(columns=f"{metric}_std")
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
    tables = {"runs": wandb.Table(dataframe=runs), "summary": wandb.Table(dataframe=summary), "paired": wandb.Table(dataframe=paired)}
    run.log({**tables, **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
    run.finish()
