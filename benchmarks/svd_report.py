"""The decomposition benchmark's results (one row per layer set, factors and ranks) and their tables and goal lines."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from benchmarks.harness import markdown_table, verdict

METHOD_ORDER = ("grams", "ours", "loop", "qr", "dense", "lowrank")
GOAL_RATIO = 2.0  # issue 15, goal 1: at most twice the Gram floor


@dataclass
class MethodResult:
    """One method on a whole layer set at one ``(factors, R, r)``.

    Attributes:
        seconds: Whole-set time on the report's clock (median per call, or extrapolated).
        wall_seconds: The same by the wall clock.
        runs: Measurements behind each median.
        extrapolated: Whether the total was extrapolated from sampled layers.
        max_sin_theta: Largest subspace error against the float64 reference over the sampled layers.
    """

    seconds: float
    wall_seconds: float
    runs: int
    extrapolated: bool
    max_sin_theta: float | None = None


@dataclass
class LayerRow:
    """One sampled layer at one ``(factors, R, r)``: per-layer times (seconds) and errors against float64."""

    shape: str
    layer_index: int
    dense_s: float | None = None
    dense_runs: int = 0
    lowrank_s: float | None = None
    lowrank_runs: int = 0
    sin_theta: dict[str, float] = field(default_factory=dict)
    ours_rel_sv_error: float | None = None
    relative_gap: float | None = None
    steepness: float | None = None


@dataclass
class SetRow:
    """A whole layer set at one ``(factors, R, r)``: one :class:`MethodResult` per method, and the sampled layers.

    Attributes:
        paired_ratio: Median over alternating rounds of ``ours`` time / Gram-floor time.
    """

    set_name: str
    factors: str
    layers: int
    preheat_rank: int
    top: int
    methods: dict[str, MethodResult] = field(default_factory=dict)
    paired_ratio: float | None = None
    layer_rows: list[LayerRow] = field(default_factory=list)


def max_or_none(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return max(present) if present else None


def format_seconds(seconds: float | None, runs: int | None = None) -> str:
    if seconds is None:
        return "not run"
    text = f"{seconds:.3g}" if seconds >= 1e-3 else f"{seconds:.2e}"
    return text if runs is None else f"{text} [n={runs}]"


def format_error(error: float | None) -> str:
    return "-" if error is None else f"{error:.1e}"


def set_table(rows: list[SetRow], sampled: dict[str, tuple[int, int]]) -> str:
    """Whole-set times as multiples of the Gram floor, and the largest subspace error of each method."""
    lines = []
    for row in rows:
        floor = row.methods["grams"].seconds
        for name in METHOD_ORDER:
            result = row.methods.get(name)
            if result is None:
                continue
            baseline_layers, reference_layers = sampled[row.set_name]
            if result.extrapolated:
                timed_on = f"{baseline_layers} layers, extrapolated, n={result.runs}"
            else:
                timed_on = f"all {row.layers} layers, n={result.runs}"
            ratio = f"{result.seconds / floor:.3g}"
            if name == "ours" and row.paired_ratio is not None:
                ratio += f" (paired {row.paired_ratio:.3g})"
            error = "-" if name == "grams" else format_error(result.max_sin_theta)
            lines.append(
                [row.set_name, row.factors, row.layers, row.preheat_rank, row.top, name, format_seconds(result.seconds), ratio, error, timed_on]
            )
    columns = ["set", "factors", "layers", "R", "r", "method", "time (s)", "/ Gram floor", "max sin θ vs f64", "timed on"]
    return markdown_table(columns, lines)


def layer_table(rows: list[SetRow]) -> str:
    """Per layer shape: the baselines' times on its first layer, and each method's largest subspace error
    against float64 over its sampled layers."""
    lines = []
    for set_row in rows:
        by_shape: dict[str, list[LayerRow]] = {}
        for layer in set_row.layer_rows:
            by_shape.setdefault(layer.shape, []).append(layer)
        for shape, layers in by_shape.items():
            first = layers[0]
            errors = [format_error(max_or_none(layer.sin_theta.get(name) for layer in layers)) for name in ("ours", "qr", "dense", "lowrank")]
            gap = min((layer.relative_gap for layer in layers if layer.relative_gap is not None), default=None)
            steepness = max(layer.steepness for layer in layers if layer.steepness is not None)
            lines.append(
                [
                    set_row.set_name, set_row.factors, shape, set_row.preheat_rank, set_row.top,
                    format_seconds(first.dense_s, first.dense_runs or None), format_seconds(first.lowrank_s, first.lowrank_runs or None),
                    *errors, format_error(max_or_none(layer.ours_rel_sv_error for layer in layers)), format_error(gap), f"{steepness:.3g}",
                ]  # fmt: skip
            )
    columns = [
        "set", "factors", "shape (out x in)", "R", "r", "dense (s)", "lowrank (s)", "sin θ ours", "sin θ qr", "sin θ dense",
        "sin θ lowrank", "rel. σ error ours", "smallest gap", "largest s_1 / (s_r + s_r+1)",
    ]  # fmt: skip
    return markdown_table(columns, lines)


def goal_lines(rows: list[SetRow], device: torch.device, clock: str) -> list[str]:
    """Verdicts on issue 15's goal 1 and on the 1-second goal, from whatever rows this run produced."""
    lines = []
    where = f"{device.type}, {clock} clock"
    for row in rows:
        if row.set_name != "llama-7b" or row.preheat_rank != 64:
            continue
        ours = row.methods["ours"]
        ratio = ours.seconds / row.methods["grams"].seconds
        if row.top == 8 and "qr" in row.methods:
            qr_error = row.methods["qr"].max_sin_theta
            met = ratio <= GOAL_RATIO and row.paired_ratio <= GOAL_RATIO and ours.max_sin_theta <= qr_error
            lines.append(
                f"Gram-floor goal (issue 15, goal 1; all {row.layers} LLaMA-7B layers, R=64, r=8, {row.factors} factors, "
                f"{where}): ours / Gram floor = {ratio:.3g} (paired {row.paired_ratio:.3g}) (<= {GOAL_RATIO:g}?), "
                f"max sin θ vs float64 ours {ours.max_sin_theta:.1e} vs QR route {qr_error:.1e} (<=?): {verdict(met)}"
            )
        lines.append(
            f"1-second goal (all {row.layers} LLaMA-7B layers, R=64, r={row.top}, {row.factors} factors, {where}): "
            f"ours = {ours.seconds:.3g} s (< 1 s?): {verdict(ours.seconds < 1.0)} (wall clock {ours.wall_seconds:.3g} s)"
        )
    return lines
