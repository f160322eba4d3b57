"""The overhead benchmark's figures: medians over repeats of per-repeat figures, the tables and the goal lines."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.harness import markdown_table, verdict
from benchmarks.overhead_fits import FitResult, StepPlan

MIB = 2**20
TIME_SLACK = 0.01  # the goal's "plus 1% of the main training"
MEMORY_LIMIT = 1.1  # the goal's "at most 1.1 times the main training's peak", at R = 8r


@dataclass
class OverheadRow:
    """One recipe at one preheat rank: medians over repeats (seconds, MiB, ratios)."""

    recipe: str
    lora_rank: int
    preheat_rank: int
    main_steps: int
    preheat_steps: int
    repeats: int
    budget_share: float
    main_s_lora: float
    main_s: float
    fit_s_lora: float
    fit_s: float
    preheat_s: float
    decompose_s: float
    hrp_phase_s: float
    hrp_share: float
    hrp_phase_share: float
    fit_delta_share: float
    main_step_s_lora: float
    main_step_s: float
    first_step_s_lora: float
    first_step_s: float
    preheat_step_s: float
    step_cost: float
    early_steps_s_lora: float
    early_step_cost: float
    preheat_peak_mib: float
    main_peak_mib: float
    main_peak_mib_lora: float
    mem_ratio: float
    mem_ratio_vs_lora: float
    preheat_above_start_mib: float
    main_above_start_mib: float
    per_repeat: list[dict[str, Any]] = field(default_factory=list)

    @property
    def time_goal_met(self) -> bool:
        return self.hrp_share <= self.budget_share

    @property
    def memory_goal_met(self) -> bool:
        return self.mem_ratio <= MEMORY_LIMIT


def summarise(recipe: str, lora_rank: int, plan: StepPlan, preheat_rank: int, pairs: list[tuple[FitResult, FitResult]]) -> OverheadRow:
    """Medians over repeats of the figures of each (LoRA fit, HRP fit) pair of one repeat."""

    def median(of: Callable[[FitResult, FitResult], float]) -> float:
        return statistics.median(of(lora, hrp) for lora, hrp in pairs)

    # Steady main steps: the median over the fit's steps; the first one also pays one-off costs
    # (memory faulted in, lazy state), which in an HRP fit the first preheat step pays instead.
    steady_step = lambda fit: statistics.median(fit.main_step_seconds)  # noqa: E731
    preheat_step = lambda fit: fit.preheat_seconds / plan.preheat_steps  # noqa: E731
    # The LoRA fit's first preheat_steps main steps: like the preheat steps, the first steps of a
    # phase, on the first batches of a pass.
    early_steps = lambda fit: statistics.mean(fit.main_step_seconds[: plan.preheat_steps])  # noqa: E731
    return OverheadRow(
        recipe=recipe,
        lora_rank=lora_rank,
        preheat_rank=preheat_rank,
        main_steps=plan.main_steps,
        preheat_steps=plan.preheat_steps,
        repeats=len(pairs),
        budget_share=plan.preheat_steps / plan.main_steps + TIME_SLACK,
        main_s_lora=median(lambda lora, hrp: lora.main_seconds),
        main_s=median(lambda lora, hrp: hrp.main_seconds),
        fit_s_lora=median(lambda lora, hrp: lora.fit_seconds),
        fit_s=median(lambda lora, hrp: hrp.fit_seconds),
        preheat_s=median(lambda lora, hrp: hrp.preheat_seconds),
        decompose_s=median(lambda lora, hrp: hrp.decompose_seconds),
        hrp_phase_s=median(lambda lora, hrp: hrp.hrp_phase_seconds),
        hrp_share=median(lambda lora, hrp: (hrp.preheat_seconds + hrp.decompose_seconds) / hrp.main_seconds),
        hrp_phase_share=median(lambda lora, hrp: hrp.hrp_phase_seconds / hrp.main_seconds),
        fit_delta_share=median(lambda lora, hrp: (hrp.fit_seconds - lora.fit_seconds) / lora.main_seconds),
        main_step_s_lora=median(lambda lora, hrp: steady_step(lora)),
        main_step_s=median(lambda lora, hrp: steady_step(hrp)),
        first_step_s_lora=median(lambda lora, hrp: lora.main_step_seconds[0]),
        first_step_s=median(lambda lora, hrp: hrp.main_step_seconds[0]),
        preheat_step_s=median(lambda lora, hrp: preheat_step(hrp)),
        step_cost=median(lambda lora, hrp: preheat_step(hrp) / steady_step(hrp)),
        early_steps_s_lora=median(lambda lora, hrp: early_steps(lora)),
        early_step_cost=median(lambda lora, hrp: preheat_step(hrp) / early_steps(lora)),
        preheat_peak_mib=median(lambda lora, hrp: hrp.preheat_peak_bytes / MIB),
        main_peak_mib=median(lambda lora, hrp: hrp.main_peak_bytes / MIB),
        main_peak_mib_lora=median(lambda lora, hrp: lora.main_peak_bytes / MIB),
        mem_ratio=median(lambda lora, hrp: hrp.preheat_peak_bytes / hrp.main_peak_bytes),
        mem_ratio_vs_lora=median(lambda lora, hrp: hrp.preheat_peak_bytes / lora.main_peak_bytes),
        preheat_above_start_mib=median(lambda lora, hrp: (hrp.preheat_peak_bytes - hrp.preheat_start_bytes) / MIB),
        main_above_start_mib=median(lambda lora, hrp: (hrp.main_peak_bytes - hrp.main_start_bytes) / MIB),
        per_repeat=[{"lora": asdict(lora), "hrp": asdict(hrp)} for lora, hrp in pairs],
    )


def _f(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}"


def time_table(rows: list[OverheadRow]) -> str:
    columns = [
        "recipe", "r", "R", "preheat / main steps", "main s (LoRA fit)", "main s (HRP fit)", "preheat s", "decompose s",
        "(preheat + decompose) / main", "whole HRP phase / main", "fit Δ / main (LoRA fit)", "budget", "goal",
    ]  # fmt: skip
    return markdown_table(
        columns,
        (
            [
                row.recipe, row.lora_rank, row.preheat_rank, f"{row.preheat_steps} / {row.main_steps}", _f(row.main_s_lora),
                _f(row.main_s), _f(row.preheat_s), f"{row.decompose_s:.2e}", f"{row.hrp_share:.2%}",
                f"{row.hrp_phase_share:.2%}", f"{row.fit_delta_share:.2%}", f"{row.budget_share:.2%}", verdict(row.time_goal_met),
            ]  # fmt: skip
            for row in rows
        ),
    )


def step_table(rows: list[OverheadRow]) -> str:
    columns = [
        "recipe", "R", "main step s, median (LoRA fit)", "main step s, median (HRP fit)", "preheat step s (mean)",
        "preheat step / main step (HRP fit)", "first main step s (LoRA fit)", "first main step s (HRP fit)",
        "first k main steps s, mean (LoRA fit; k = preheat steps)", "preheat step / those",
    ]  # fmt: skip
    return markdown_table(
        columns,
        (
            [
                row.recipe, row.preheat_rank, _f(row.main_step_s_lora), _f(row.main_step_s), _f(row.preheat_step_s),
                _f(row.step_cost), _f(row.first_step_s_lora), _f(row.first_step_s), _f(row.early_steps_s_lora),
                _f(row.early_step_cost),
            ]  # fmt: skip
            for row in rows
        ),
    )


def memory_table(rows: list[OverheadRow]) -> str:
    columns = [
        "recipe", "r", "R", "preheat peak MiB", "main peak MiB (same fit)", "preheat / main", "main peak MiB (LoRA fit)",
        "preheat / LoRA main", "preheat above its start MiB", "main above its start MiB", "goal (R = 8r)",
    ]  # fmt: skip
    return markdown_table(
        columns,
        (
            [
                row.recipe, row.lora_rank, row.preheat_rank, f"{row.preheat_peak_mib:.1f}", f"{row.main_peak_mib:.1f}",
                f"{row.mem_ratio:.3f}", f"{row.main_peak_mib_lora:.1f}", f"{row.mem_ratio_vs_lora:.3f}",
                f"{row.preheat_above_start_mib:.1f}", f"{row.main_above_start_mib:.1f}",
                verdict(row.memory_goal_met) if row.preheat_rank == 8 * row.lora_rank else "-",
            ]  # fmt: skip
            for row in rows
        ),
    )


def goal_lines(rows: list[OverheadRow]) -> list[str]:
    lines = []
    for row in rows:
        lines.append(
            f"Time, {row.recipe}, R={row.preheat_rank}: (preheat + decompose) / main = {row.hrp_share:.2%} "
            f"<= {row.preheat_steps}/{row.main_steps} + 1% = {row.budget_share:.2%}? "
            f"{verdict(row.time_goal_met)} (whole fit Δ / main = {row.fit_delta_share:.2%}; "
            f"a preheat step costs {row.step_cost:.3g} steady main steps)"
        )
    for row in rows:
        if row.preheat_rank == 8 * row.lora_rank:
            lines.append(
                f"Memory, {row.recipe}, R=8r={row.preheat_rank}: preheat peak / main peak = {row.mem_ratio:.3f} "
                f"<= {MEMORY_LIMIT}? {verdict(row.memory_goal_met)} "
                f"(against the LoRA fit's main peak: {row.mem_ratio_vs_lora:.3f})"
            )
    return lines
