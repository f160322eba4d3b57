"""The statistics of a comparison, as pure functions of the finished runs (no files, no plots).

Per method the learning rate is chosen on the validation split (mean over seeds of the final
``selection_metric``; a rate where any seed diverged to NaN never wins), and the test split is
summarised at that rate only. Means and sample standard deviations are over seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from lightning_hrp.recipes.compare_settings import CompareSettings, Direction

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


def summarise(results: Sequence[dict[str, Any]], settings: CompareSettings) -> pd.DataFrame:
    """Per method (index: label, in the order of ``settings.methods``): the chosen rate and the statistics there.

    Columns: ``method``, ``chosen_lr``, ``val_mean``, ``val_std``, ``test_mean``, ``test_std``, ``seeds``.
    Methods without a finished run are left out.
    """
    metric, test_metric = settings.selection_metric, settings.reported_test_metric
    for r in results:
        if metric not in r["val"]:
            raise KeyError(f"selection_metric {metric!r} is not among the logged validation metrics {sorted(r['val'])}.")
    runs = runs_frame(results)
    means = validation_means(runs, metric)
    rows = {}
    for spec in settings.methods:
        if spec.label not in means.index.get_level_values("label"):
            continue
        by_rate = means.loc[spec.label]  # sorted by learning rate
        finite = by_rate[by_rate.map(math.isfinite)]
        if finite.empty:
            chosen = float(by_rate.index[0])  # every rate diverged: report the smallest
        else:
            chosen = float(finite.idxmin() if settings.selection_mode == "min" else finite.idxmax())
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


def verdict(candidate: pd.Series, baseline: pd.Series, mode: Direction) -> str:
    """``win``, ``tie`` or ``loss`` of ``candidate`` against ``baseline`` (rows of :func:`summarise`) on the test metric.

    A difference counts only beyond two standard errors of the difference of the two seed means;
    with fewer than two seeds on either side there is no verdict (``n/a``).
    """
    if candidate["seeds"] < 2 or baseline["seeds"] < 2:
        return "n/a"
    difference = candidate["test_mean"] - baseline["test_mean"]
    stderr = math.sqrt(candidate["test_std"] ** 2 / candidate["seeds"] + baseline["test_std"] ** 2 / baseline["seeds"])
    if abs(difference) <= 2 * stderr:
        return "tie"
    improved = difference < 0 if mode == "min" else difference > 0
    return "win" if improved else "loss"
