"""What one HRP run produced, and the metrics every entry point logs from it (plain Python: no Lightning)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

# The x-axis of every per-preheat-step metric (W&B charts them against it; CSV gets a column).
PREHEAT_STEP = "hrp/preheat_step"
# Metrics logged once per preheat step, charted against PREHEAT_STEP.
PER_STEP_METRICS = ("hrp/preheat_loss", "hrp/subspace_drift")
# peft's wrappers between the user's attribute and the user's network: PeftModel.base_model
# (the LoraModel) and LoraModel.model.
_PEFT_WRAPPER = re.compile(r"^(?:.*\.)?base_model\.model\.")


@dataclass
class LayerDiagnostics:
    """What preheating found in one layer.

    Attributes:
        rank: The LoRA rank the layer trains with (with a rank budget: the rank allocated to it).
        energy_kept: Share of the preheated update's energy in the top ``rank`` directions.
        rank_before: With a rank budget, the layer's rank before the allocation; else ``None``.
    """

    name: str
    rank: int
    preheat_rank: int
    singular_values: list[float]
    energy_kept: float
    rank_before: int | None = None

    @property
    def energy_kept_before(self) -> float | None:
        """Share of the energy the rank before the allocation kept (``None`` without a rank budget)."""
        if self.rank_before is None:
            return None
        energies = [s * s for s in self.singular_values]
        total = sum(energies)
        return sum(energies[: self.rank_before]) / total if total > 0 else math.nan


@dataclass
class HRPReport:
    """Everything one preheat produced, for logging and plots.

    Attributes:
        preheat_losses: Mean loss per preheat step; NaN for a step whose batches were all skipped.
        skipped_batches: Batches that gave no loss (``None``), over all ranks.
        frozen_layers: LoRA layers with no trainable weight, left as they were.
        other_params: The model's other trainable parameters that preheating trained too (``other_params``).
        learned_nothing: Layers whose preheated update was exactly zero, left at their current init.
        preheat_memory_bytes: What preheating held per process on top of the model, as estimated from
            the layer shapes before it started (adapters, gradients, optimizer state, all-reduce buffer).
        rank_budget: The total rank allocated over the layers; ``None``: each kept its rank.
    """

    seed: int
    preheat_losses: list[float] = field(default_factory=list)
    subspace_drift: list[float] = field(default_factory=list)
    layers: list[LayerDiagnostics] = field(default_factory=list)
    preheat_seconds: float = 0.0
    decompose_seconds: float = 0.0
    skipped_batches: int = 0
    frozen_layers: list[str] = field(default_factory=list)
    other_params: list[str] = field(default_factory=list)
    learned_nothing: list[str] = field(default_factory=list)
    preheat_memory_bytes: int = 0
    rank_budget: int | None = None


def step_metrics(step: int, loss: float, drift: float | None) -> dict[str, float]:
    """The metrics of one preheat step: its index, its loss (absent if every batch was skipped), its drift if tracked."""
    metrics: dict[str, float] = {PREHEAT_STEP: step}
    if not math.isnan(loss):
        metrics["hrp/preheat_loss"] = loss
    if drift is not None:
        metrics["hrp/subspace_drift"] = drift
    return metrics


def summary_metrics(report: HRPReport, layer_metrics: bool) -> dict[str, float]:
    """The metrics logged once after preheating; with ``layer_metrics``, each layer's energy kept and ``sigma_1`` too."""
    learned_nothing = set(report.learned_nothing)
    energies = [d.energy_kept for d in report.layers if d.name not in learned_nothing]
    metrics = {
        "hrp/preheat_seconds": report.preheat_seconds,
        "hrp/decompose_seconds": report.decompose_seconds,
        "hrp/energy_kept_mean": sum(energies) / len(energies),
        "hrp/energy_kept_min": min(energies),
    }
    if layer_metrics:
        for d, name in zip(report.layers, metric_layer_names([d.name for d in report.layers])):
            metrics[f"hrp/energy_kept/{name}"] = d.energy_kept
            metrics[f"hrp/sigma_1/{name}"] = d.singular_values[0]
            if report.rank_budget is not None:
                metrics[f"hrp/rank/{name}"] = d.rank
    return metrics


def allocation_summary(report: HRPReport) -> str:
    """One line per layer: the rank it had and the rank allocated, with the energy each keeps."""
    names = metric_layer_names([d.name for d in report.layers])
    width = max(map(len, names))
    lines = [f"HRP: rank_budget={report.rank_budget} allocated over {len(report.layers)} LoRA layers (rank, energy kept):"]
    for d, name in zip(report.layers, names):
        lines.append(f"  {name:<{width}}  {d.rank_before:>3} -> {d.rank:<3}  {d.energy_kept_before:6.1%} -> {d.energy_kept:6.1%}")
    return "\n".join(lines)


def metric_layer_names(names: Sequence[str]) -> list[str]:
    """Layer names for metrics: the path inside the user's network, without peft's wrapper prefix.

    ``model.base_model.model.bert.encoder.layer.0...`` becomes ``bert.encoder.layer.0...``; where
    shortening would make two names equal, the full names are kept.
    """
    short = [_PEFT_WRAPPER.sub("", name) for name in names]
    return short if len(set(short)) == len(short) else list(names)
