"""The comparison's figures as PNGs (matplotlib, the ``plots`` extra): learning curves, final metric,
learning-rate sweep and HRP's preheat diagnostics."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lightning_hrp.recipes.compare.analysis import runs_frame, selection_means, values_at_chosen_rate
from lightning_hrp.recipes.compare.running import read_json, read_learning_curve
from lightning_hrp.recipes.compare.settings import CompareSettings, run_dir


def write_plots(
    results: Sequence[dict[str, Any]], summary: pd.DataFrame, settings: CompareSettings, paired: pd.DataFrame | None = None
) -> list[Path]:
    """All figures of a comparison into ``settings.output_dir``; returns their paths.

    Args:
        results: The finished runs.
        summary: :func:`~lightning_hrp.recipes.compare.analysis.summarise` of them.
        settings: The comparison.
        paired: :func:`~lightning_hrp.recipes.compare.analysis.paired_table` of them, for the paired-differences figure.
    """
    plt = _pyplot()
    # One colour per method; past ten the colours repeat and the line style tells those apart.
    styles = {label: {"color": plt.cm.tab10(i % 10), "linestyle": "-" if i < 10 else "--"} for i, label in enumerate(summary.index)}
    runs = runs_frame(results)
    output = Path(settings.output_dir)
    paths = [
        _save(plot_learning_curves(summary, runs, settings, styles), output / "learning_curves.png"),
        _save(plot_final_metric(summary, runs, settings, styles), output / "final_metric.png"),
        _save(plot_lr_sweep(runs, settings, styles), output / "lr_sweep.png"),
    ]
    if paired is not None and not paired.empty:
        paths.append(_save(plot_paired_differences(paired, runs, summary, settings), output / "paired_differences.png"))
    spectra = plot_hrp_spectra(summary, runs, settings, styles)
    if spectra is not None:
        paths.append(_save(spectra, output / "hrp_spectra.png"))
    return paths


def _pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only (imported on first use: the ``plots`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)
    return path


def _at_chosen_rate(runs: pd.DataFrame, label: str, chosen_lr: float) -> pd.DataFrame:
    return runs[(runs["label"] == label) & (runs["learning_rate"] == chosen_lr)]


def plot_learning_curves(summary: pd.DataFrame, runs: pd.DataFrame, settings: CompareSettings, styles: dict) -> Any:
    """The validation metric during training at each method's chosen rate: mean over seeds, min-max band."""
    metric = settings.selection_metric
    figure, axis = _pyplot().subplots(figsize=(9, 5))
    for label, s in summary.iterrows():
        seeds = sorted(_at_chosen_rate(runs, label, s.chosen_lr)["seed"])
        curves = [read_learning_curve(run_dir(settings, label, s.chosen_lr, seed), metric) for seed in seeds]
        curves = [curve for curve in curves if not curve.empty]
        if not curves:
            continue
        stacked = pd.concat(curves, axis=1, join="inner").sort_index()  # the steps every seed logged
        axis.plot(stacked.index, stacked.mean(axis=1), label=f"{label} (lr {s.chosen_lr:g})", **styles[label])
        axis.fill_between(stacked.index, stacked.min(axis=1), stacked.max(axis=1), color=styles[label]["color"], alpha=0.15)
    axis.set_xlabel("training step")
    axis.set_ylabel(metric)
    if settings.selection_mode == "min":
        axis.set_yscale("log")
    axis.set_title("Validation curves at each method's chosen lr\n(mean over seeds; band: min to max)")
    if axis.lines:  # runs without logged validation curves leave the plot empty, and a legend without entries warns
        axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


def plot_final_metric(summary: pd.DataFrame, runs: pd.DataFrame, settings: CompareSettings, styles: dict) -> Any:
    """The test metric at each method's chosen rate: mean and standard deviation over seeds, and every seed."""
    test_metric = settings.reported_test_metric
    figure, axis = _pyplot().subplots(figsize=(8, 4.5))
    labels = list(summary.index)
    axis.bar(labels, summary["test_mean"], yerr=summary["test_std"], capsize=4, color=[styles[label]["color"] for label in labels])
    for label, s in summary.iterrows():
        seeds = _at_chosen_rate(runs, label, s.chosen_lr)[test_metric]
        axis.scatter([label] * len(seeds), seeds, color="black", s=8, zorder=3)
    axis.set_ylabel(f"{test_metric} at the chosen lr")
    if settings.selection_mode == "min":
        axis.set_yscale("log")
    else:
        axis.set_ylim(bottom=max(0.0, runs.loc[runs["label"].isin(labels), test_metric].min() - 0.05))
    axis.set_title("Test metric at each method's validation-chosen lr\n(bar: mean, whisker: std, dots: seeds)")
    axis.tick_params(axis="x", rotation=45)
    return figure


def plot_lr_sweep(runs: pd.DataFrame, settings: CompareSettings, styles: dict) -> Any:
    """The final validation metric against the learning rate, per method (mean over the rate-choosing seeds)."""
    metric = settings.selection_metric
    means = selection_means(runs, settings)
    figure, axis = _pyplot().subplots(figsize=(8, 4.5))
    for label in styles:
        by_rate = means.loc[label]
        axis.plot(by_rate.index, by_rate, marker="o", label=label, **styles[label])
    axis.set_xscale("log")
    if settings.selection_mode == "min":
        axis.set_yscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel(f"final {metric} (mean over {'tuning ' if settings.tuning_seeds is not None else ''}seeds)")
    axis.set_title("Learning-rate sweep (validation)")
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


def plot_paired_differences(paired: pd.DataFrame, runs: pd.DataFrame, summary: pd.DataFrame, settings: CompareSettings) -> Any:
    """Per (method, reference) pair on the test metric: every seed's difference, their mean and its 95% t-interval."""
    metric = settings.reported_test_metric
    rows = paired[paired["metric"] == metric].reset_index(drop=True)
    figure, axis = _pyplot().subplots(figsize=(8, 0.45 * len(rows) + 1.6))
    for position, row in rows.iterrows():
        method = values_at_chosen_rate(runs, summary, row["label"], metric)
        reference = values_at_chosen_rate(runs, summary, row["reference"], metric)
        differences = [method[seed] - reference[seed] for seed in sorted(set(method) & set(reference))]
        axis.scatter(differences, [position] * len(differences), color="gray", s=10, zorder=2)
        colour = {"win": "tab:green", "loss": "tab:red"}.get(row["verdict"], "black")
        axis.errorbar(
            row["mean_difference"], position, xerr=[[row["mean_difference"] - row["ci_low"]], [row["ci_high"] - row["mean_difference"]]],
            fmt="o", color=colour, capsize=3, zorder=3,
        )  # fmt: skip
    axis.axvline(0.0, color="black", linewidth=0.8)
    axis.set_yticks(range(len(rows)), [f"{r.label} - {r.reference}" for r in rows.itertuples()], fontsize=8)
    axis.invert_yaxis()
    better = "left" if settings.selection_mode == "min" else "right"
    axis.set_xlabel(f"{metric}: method - reference, per seed (better: {better})")
    axis.set_title("Paired differences (dots: seeds; bar: mean and 95% t-interval;\ngreen/red: interval excludes 0)")
    return figure


def plot_hrp_spectra(summary: pd.DataFrame, runs: pd.DataFrame, settings: CompareSettings, styles: dict) -> Any | None:
    """HRP's preheat loss and normalised spectra, from the first seed at each HRP method's chosen rate (None: no HRP run)."""
    hrp_runs = []
    for label, s in summary.iterrows():
        seed = _at_chosen_rate(runs, label, s.chosen_lr)["seed"].min()
        path = run_dir(settings, label, s.chosen_lr, int(seed)) / "diagnostics.json"
        if path.is_file() and "hrp" in (diagnostics := read_json(path)):
            hrp_runs.append((label, diagnostics["hrp"]))
    if not hrp_runs:
        return None
    figure, (loss_axis, spectrum_axis) = _pyplot().subplots(1, 2, figsize=(11, 4.5))
    for label, hrp in hrp_runs:
        color = styles[label]["color"]
        loss_axis.plot(hrp["preheat_losses"], label=label, color=color)
        for i, layer in enumerate(hrp["layers"]):
            values = layer["singular_values"]
            spectrum_axis.plot(
                range(1, len(values) + 1), [v / values[0] for v in values], color=color, alpha=0.6, label=label if i == 0 else None
            )
            spectrum_axis.axvline(layer["rank"], color="gray", linestyle=":", linewidth=0.8)
    loss_axis.set_xlabel("preheat step")
    loss_axis.set_ylabel("training loss")
    loss_axis.set_title("HRP preheat loss")
    loss_axis.legend(fontsize=8)
    spectrum_axis.set_yscale("log")
    spectrum_axis.set_xlabel("singular value index (dotted: LoRA rank r)")
    spectrum_axis.set_ylabel("sigma_i / sigma_1")
    spectrum_axis.set_title("Spectra of the preheated updates (one line per layer)")
    spectrum_axis.legend(fontsize=8)
    return figure
