"""Compute matching: what each method computes on training batches before the main run, and the
plain-LoRA arm that gets the same number of optimizer steps instead (HRP spec, section 7).

A method's *extra* work is counted from its init options, by the kind of init its registry row
builds (:class:`~lightning_hrp.inits.LoraInit`), never by its label:

* HRP (:class:`~lightning_hrp.HRPPreheatCallback`, or :class:`~lightning_hrp.inits.HRPInit` with a
  rank budget): ``preheat_steps`` optimizer steps of
  ``accumulate_grad_batches`` batches each, forward and backward: ``preheat_steps x accumulate``
  batches. With ``drift_tolerance`` it may stop earlier; the budget ``preheat_steps`` is matched
  (the runs' diagnostics say how many it took).
* LoRA-GA and LoRA-One (:class:`~lightning_hrp.inits.gradient_inits.GradientInit`): ``gradient_batches``
  batches, forward and backward (the gradient w.r.t. the full base weights), no optimizer step.
* EVA: forward-only batches until its input PCA converges (at most ``max_batches``), a number known
  only after the run: counted separately, from each run's diagnostics, and not matched.
* The oracle reads the task's true update and no batch; the other inits compute nothing on data.

A data-driven init of a kind not listed here is refused rather than counted as free.

The matched arm of a method with ``b`` extra forward-and-backward batches is plain LoRA (peft's
default init) trained for ``max_steps + ceil(b / accumulate)`` optimizer steps at its own tuned
learning rate, labelled ``lora_matched_<total steps>``; methods with equal totals share one. A
method with per-method ``overrides`` (other than its ``trainer.max_steps``, e.g. a linear-probe
head) is matched by plain LoRA with the same overrides, ``lora_matched_<total steps>_<its label>``.
A plain-LoRA method of the comparison (``method: lora``, no options) is the match of every method
with its overrides and total steps, e.g. ``lora`` for the methods that compute nothing before training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning_hrp import HRPPreheatCallback
from lightning_hrp.inits import HRPInit, InitMethod, LoraInit
from lightning_hrp.inits.eva import EvaInit
from lightning_hrp.inits.gradient_inits import GradientInit
from lightning_hrp.inits.oracle import OracleInit
from lightning_hrp.recipes.compare.settings import MATCHED_PREFIX, CompareSettings, MethodSpec
from lightning_hrp.recipes.runs import with_overrides, without_outputs


@dataclass(frozen=True)
class ExtraCompute:
    """What one method computes on training batches before its main run.

    Attributes:
        backward_batches: Batches with a forward and a backward pass (matched by plain-LoRA steps).
        forward_only: Whether it runs forward-only batches whose number is known only after the run (EVA).
        how: One line on how the batches were counted.
    """

    backward_batches: int
    forward_only: bool
    how: str

    def extra_steps(self, accumulate: int) -> int:
        """The main-run optimizer steps that hold as many forward-and-backward batches."""
        return math.ceil(self.backward_batches / accumulate)


def extra_compute(spec: MethodSpec, accumulate: int) -> ExtraCompute:
    """How many batches ``spec``'s init computes on before the main run (see the module docstring).

    Raises:
        ValueError: A data-driven init whose batches this module does not know how to count.
    """
    init = LoraInit(spec.method, spec.options)
    callback = init.callback
    if isinstance(callback, (HRPPreheatCallback, HRPInit)):  # HRPInit: HRP with a rank budget, at setup
        steps = callback.options.preheat_steps
        return ExtraCompute(
            steps * accumulate, False, f"preheat_steps={steps} x accumulate_grad_batches={accumulate} batches, forward and backward"
        )
    if isinstance(callback, GradientInit):
        batches = callback.gradient_batches
        return ExtraCompute(batches, False, f"gradient_batches={batches}, forward and backward (full-weight gradients)")
    if isinstance(callback, EvaInit):
        return ExtraCompute(
            0, True, f"forward-only batches until the input PCA converges (at most max_batches={callback.max_batches}); not matched"
        )
    if isinstance(callback, OracleInit):
        return ExtraCompute(0, False, "none (reads the task's true update)")
    if init.info.data_driven:
        raise ValueError(
            f"compute_matched: there is no rule for counting the batches init_method={spec.method.value!r} computes on "
            "before training; add one to lightning_hrp.recipes.compare.matching, or set compute_matched=false."
        )
    return ExtraCompute(0, False, "none")


@dataclass(frozen=True)
class MatchingPlan:
    """The comparison's arms with the added compute-matched ones, and which arm matches which method.

    Attributes:
        main_steps: The main run's optimizer steps (``trainer.max_steps``).
        accumulate: ``trainer.accumulate_grad_batches``.
        arms: The comparison's methods, then the added plain-LoRA arms.
        extra: Per label of the comparison's own methods, its extra compute.
        matched: Per label of the comparison's own methods, the label of its compute-matched arm
            (absent for a plain-LoRA arm at the main budget: it is its own match).
        total_steps: Per arm label, its optimizer steps.
    """

    main_steps: int
    accumulate: int
    arms: list[MethodSpec]
    extra: dict[str, ExtraCompute]
    matched: dict[str, str]
    total_steps: dict[str, int]


def step_budget(config: Mapping[str, Any]) -> tuple[int, int]:
    """``(max_steps, accumulate_grad_batches)`` of a run config; refuses a budget not given in steps."""
    trainer = config.get("trainer") or {}
    max_steps = trainer.get("max_steps")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(
            f"compute_matched: the main runs need their budget as trainer.max_steps (a positive int), found {max_steps!r}; "
            "set it in overrides (e.g. trainer.max_steps: 40), or set compute_matched=false."
        )
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"compute_matched: trainer.accumulate_grad_batches must be a positive int, found {accumulate!r}.")
    return max_steps, accumulate


def is_plain_lora(spec: MethodSpec) -> bool:
    """Plain LoRA: peft's default init, no options (per-method overrides allowed)."""
    return spec.method is InitMethod.lora and not spec.options


def recipe_overrides(spec: MethodSpec) -> dict[str, Any]:
    """A method's overrides besides its step budget: what its matched arm must share."""
    return {k: v for k, v in spec.overrides.items() if k != "trainer.max_steps"}


def _key(spec: MethodSpec, total: int) -> tuple[str, int]:
    return json.dumps(recipe_overrides(spec), sort_keys=True, default=str), total


def plan_matching(settings: CompareSettings, base: Mapping[str, Any]) -> MatchingPlan:
    """The arms to run: ``settings.methods`` plus one plain-LoRA arm per total step count needed.

    Args:
        settings: The comparison (``compute_matched`` on).
        base: The recipe config (before the comparison's overrides).
    """
    main_steps, accumulate = step_budget(with_overrides(without_outputs(dict(base)), settings.overrides))
    arms = list(settings.methods)
    extra = {spec.label: extra_compute(spec, accumulate) for spec in settings.methods}
    total_steps = {spec.label: _own_steps(spec, main_steps) for spec in settings.methods}
    # Plain-LoRA arms by (recipe overrides, total steps): the comparison's own first, then the added ones.
    plain: dict[tuple[str, int], str] = {}
    for spec in settings.methods:
        if is_plain_lora(spec):
            plain.setdefault(_key(spec, total_steps[spec.label]), spec.label)
    matched: dict[str, str] = {}
    for spec in settings.methods:
        if is_plain_lora(spec):
            continue
        total = total_steps[spec.label] + extra[spec.label].extra_steps(accumulate)
        key = _key(spec, total)
        if key not in plain:
            shared = recipe_overrides(spec)
            label = f"{MATCHED_PREFIX}{total}" + (f"_{spec.label}" if shared else "")
            arms.append(MethodSpec(label, InitMethod.lora, {}, {**shared, "trainer.max_steps": total}))
            total_steps[label] = total
            plain[key] = label
        matched[spec.label] = plain[key]
    return MatchingPlan(main_steps, accumulate, arms, extra, matched, total_steps)


def _own_steps(spec: MethodSpec, main_steps: int) -> int:
    steps = spec.overrides.get("trainer.max_steps", main_steps)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"methods: {spec.label}'s override trainer.max_steps must be a positive int, got {steps!r}.")
    return steps
