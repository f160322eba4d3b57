"""The statistics of a comparison, as pure functions of the finished runs (no files, no plots).

Per method the learning rate is chosen on the validation split (mean over the rate-choosing seeds
of the final ``selection_metric``; a rate where any seed diverged to NaN never wins), and the test
split is summarised at that rate only, over every seed run there. Means and sample standard
deviations are over seeds.

Methods are judged *paired*: a seed fixes the task, the data order and the random starts for every
method, so each method is compared with a reference seed by seed (:func:`paired_comparison`: the
mean of the per-seed differences with a t-interval, wins/ties/losses, a verdict only when the
interval excludes zero). :func:`reach_step` reads off a learning curve where a method reaches a
given validation value, for gains stated as equivalent plain-LoRA steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from lightning_hrp.recipes.compare.settings import CompareSettings, Direction, MethodSpec

RUN_COLUMNS = ["label", "method", "options", "learning_rate", "seed", "fit_seconds"]


def runs_frame(results: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: :data:`RUN_COLUMNS`, then every ``val/`` and every ``test/`` metric (sorted).

    Rows are sorted by label, learning rate and seed; a metric a run did not log is NaN.
    """
    val_keys = sorted({key for r in results for key in r["val"]})
    test_keys = sorted({key for r in results for key in r["test"]})
    rows = [{**{column: r[column] for column in RUN_COLUMNS}, "options": json.dumps(r["options"]), **r["val"], **r["test"]} for r in results]
    frame = pd.DataFrame(rows, columns=[*RUN_COLUMNS, *val_keys, *test_keys])
    return frame.sort_values(["label", "learning_rate", "seed"], kind="stable", ignore_index=True)


def _mean(values: pd.Series) -> float:
    # NaN propagates: a diverged seed makes its rate's mean NaN instead of being skipped.
    return float(values.mean(skipna=False))


def _std(values: pd.Series) -> float:
    # Sample standard deviation; one seed has none to speak of, reported as 0.
    return float(values.std(ddof=1, skipna=False)) if len(values) > 1 else 0.0


def validation_means(runs: pd.DataFrame, metric: str) -> pd.Series:
    """Mean final ``metric`` over seeds for each (label, learning_rate) that ran, indexed by both."""
    return runs.groupby(["label", "learning_rate"], sort=True)[metric].agg(_mean)


def selection_means(runs: pd.DataFrame, settings: CompareSettings) -> pd.Series:
    """:func:`validation_means` of the selection metric over the seeds that choose the rates (``tuning_seeds``, or all)."""
    return validation_means(runs[runs["seed"].isin(settings.rate_choosing_seeds)], settings.selection_metric)


def choose_rate(by_rate: pd.Series, mode: Direction) -> float:
    """The best learning rate of one method's mean validation values (indexed by rate, sorted).

    A non-finite mean (a seed diverged) never wins; if every rate diverged, the smallest is returned.
    """
    finite = by_rate[by_rate.map(math.isfinite)]
    if finite.empty:
        return float(by_rate.index[0])
    return float(finite.idxmin() if mode == "min" else finite.idxmax())


def summarise(
    results: Sequence[dict[str, Any]], settings: CompareSettings, methods: Sequence[MethodSpec] | None = None
) -> pd.DataFrame:
    """Per method (index: label, in the order of ``methods``): the chosen rate and the statistics there.

    Columns: ``method``, ``chosen_lr``, ``val_mean``, ``val_std``, ``test_mean``, ``test_std``, ``seeds``
    (the statistics over every seed at the chosen rate). Methods without a finished run of a
    rate-choosing seed are left out.

    Args:
        results: The finished runs.
        settings: The comparison (metrics, direction).
        methods: The arms, in report order; ``settings.methods`` by default (a compute-matched
            comparison passes its plan's arms).
    """
    metric, test_metric = settings.selection_metric, settings.reported_test_metric
    for r in results:
        if metric not in r["val"]:
            raise KeyError(f"selection_metric {metric!r} is not among the logged validation metrics {sorted(r['val'])}.")
    runs = runs_frame(results)
    means = selection_means(runs, settings)
    rows = {}
    for spec in settings.methods if methods is None else methods:
        if spec.label not in means.index.get_level_values("label"):
            continue
        chosen = choose_rate(means.loc[spec.label], settings.selection_mode)  # .loc: sorted by learning rate
        at_chosen = runs[(runs["label"] == spec.label) & (runs["learning_rate"] == chosen)]
        rows[spec.label] = {
            "method": spec.method.value,
            "chosen_lr": chosen,
            "val_mean": _mean(at_chosen[metric]),
            "val_std": _std(at_chosen[metric]),
            "test_mean": _mean(at_chosen[test_metric]),
            "test_std": _std(at_chosen[test_metric]),
            "seeds": len(at_chosen),
        }
    summary = pd.DataFrame.from_dict(rows, orient="index")
    summary.index.name = "label"
    return summary


def values_at_chosen_rate(runs: pd.DataFrame, summary: pd.DataFrame, label: str, metric: str) -> dict[int, float]:
    """``{seed: metric}`` of one method's runs at its chosen learning rate (rows of :func:`runs_frame`)."""
    chosen = runs[(runs["label"] == label) & (runs["learning_rate"] == summary.loc[label, "chosen_lr"])]
    return {int(seed): float(value) for seed, value in zip(chosen["seed"], chosen[metric])}


Verdict = Literal["win", "tie", "loss", "n/a"]


@dataclass(frozen=True)
class PairedComparison:
    """A method against a reference, seed by seed (differences are method minus reference).

    Attributes:
        seeds: Seeds both have (the pairs).
        mean_difference: Mean of the per-seed differences.
        ci_low: Lower end of the two-sided t-interval of the mean difference.
        ci_high: Upper end.
        wins: Seeds where the method is better (lower for ``min``, higher for ``max``).
        ties: Seeds with exactly equal values.
        losses: Seeds where the method is worse.
        verdict: ``win`` or ``loss`` when the interval excludes zero on that side, ``tie`` when it holds
            zero, ``n/a`` with fewer than two pairs or a non-finite value in a pair.
    """

    seeds: int
    mean_difference: float
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int
    verdict: Verdict


def paired_comparison(
    method: Mapping[int, float], reference: Mapping[int, float], mode: Direction, confidence: float = 0.95
) -> PairedComparison:
    """Compare ``method`` with ``reference`` seed by seed (both ``{seed: metric}``).

    The interval is ``mean ± t_{(1+confidence)/2, n-1} * sd / sqrt(n)`` over the ``n`` per-seed
    differences (``sd`` the sample standard deviation); seeds only one side has are left out.
    """
    seeds = sorted(set(method) & set(reference))
    differences = np.array([method[seed] - reference[seed] for seed in seeds], dtype=float)
    n = len(differences)
    better = -differences if mode == "min" else differences
    wins, ties, losses = int((better > 0).sum()), int((better == 0).sum()), int((better < 0).sum())
    if n < 2 or not np.isfinite(differences).all():
        mean = float(differences.mean()) if n else math.nan
        return PairedComparison(n, mean, math.nan, math.nan, wins, ties, losses, "n/a")
    mean = float(differences.mean())
    half_width = float(stats.t.ppf((1 + confidence) / 2, n - 1) * differences.std(ddof=1) / math.sqrt(n))
    low, high = mean - half_width, mean + half_width
    if low <= 0 <= high:
        verdict: Verdict = "tie"
    else:
        improved = high < 0 if mode == "min" else low > 0
        verdict = "win" if improved else "loss"
    return PairedComparison(n, mean, low, high, wins, ties, losses, verdict)


PAIRED_COLUMNS = ["label", "reference", "metric", "seeds", "mean_difference", "ci_low", "ci_high", "wins", "ties", "losses", "verdict"]


def paired_table(
    runs: pd.DataFrame, summary: pd.DataFrame, pairs: Sequence[tuple[str, str]], metrics: Mapping[str, Direction]
) -> pd.DataFrame:
    """One row per (method, reference) pair and metric: :class:`PairedComparison` at each one's chosen rate.

    Pairs whose method or reference has no finished run are left out. Columns: :data:`PAIRED_COLUMNS`.
    """
    rows = []
    for label, reference in pairs:
        if label not in summary.index or reference not in summary.index:
            continue
        for metric, mode in metrics.items():
            result = paired_comparison(
                values_at_chosen_rate(runs, summary, label, metric), values_at_chosen_rate(runs, summary, reference, metric), mode
            )
            rows.append({"label": label, "reference": reference, "metric": metric, **result.__dict__})
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def reach_step(curve: pd.Series, target: float, mode: Direction) -> tuple[float, str]:
    """The first step at which ``curve`` (a metric by step) reaches ``target``, linearly interpolated.

    Returns:
        ``(step, "=")`` where the curve crosses ``target`` between two logged steps (or at one);
        ``(first_step, "<=")`` if it is there already at its first logged step; ``(last_step, ">")``
        if it never gets there; ``(nan, "n/a")`` for an empty curve or a non-finite target.
    """
    curve = curve.dropna().sort_index()
    if curve.empty or not math.isfinite(target):
        return math.nan, "n/a"
    steps, values = curve.index.to_numpy(dtype=float), curve.to_numpy(dtype=float)
    reached = values <= target if mode == "min" else values >= target
    if not reached.any():
        return float(steps[-1]), ">"
    first = int(np.argmax(reached))
    if first == 0:
        return float(steps[0]), "<="
    (s0, s1), (v0, v1) = steps[first - 1 : first + 1], values[first - 1 : first + 1]
    return float(s0 + (s1 - s0) * (target - v0) / (v1 - v0)), "="
