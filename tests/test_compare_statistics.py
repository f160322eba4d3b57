"""The statistics and the compute matching of ``lightning-hrp compare``, as pure functions, on hand-computed cases."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lightning_hrp.inits import InitMethod
from lightning_hrp.recipes.compare import matching as compare_matching
from lightning_hrp.recipes.compare.analysis import paired_comparison, reach_step
from lightning_hrp.recipes.compare.matching import extra_compute, plan_matching
from lightning_hrp.recipes.compare.settings import CompareSettings, MethodSpec, check_settings

# Two-sided 95% quantiles of Student's t, from tables: t(0.975; 2 df) and t(0.975; 4 df).
T_2_DF = 4.302652729911275
T_4_DF = 2.7764451051977987


def _seeds(*values: float) -> dict[int, float]:
    return dict(enumerate(values))


def test_three_of_three_losses_with_a_wide_interval_is_a_tie() -> None:
    # Differences 1, 2, 3: mean 2, sample sd 1, half width t(2 df) / sqrt(3).
    result = paired_comparison(_seeds(1.0, 2.0, 3.0), _seeds(0.0, 0.0, 0.0), "min")
    half_width = T_2_DF / math.sqrt(3)
    assert result.seeds == 3 and result.mean_difference == pytest.approx(2.0)
    assert (result.ci_low, result.ci_high) == pytest.approx((2.0 - half_width, 2.0 + half_width))
    assert (result.wins, result.ties, result.losses) == (0, 0, 3)
    assert result.verdict == "tie"


def test_an_interval_below_zero_is_a_win_when_minimising_and_a_loss_when_maximising() -> None:
    # Differences -0.1, -0.2, -0.3, -0.2, -0.2: mean -0.2, sample sd sqrt(0.02 / 4), 4 df.
    method, reference = _seeds(0.9, 0.8, 0.7, 0.8, 0.8), _seeds(1.0, 1.0, 1.0, 1.0, 1.0)
    half_width = T_4_DF * math.sqrt(0.02 / 4) / math.sqrt(5)
    minimised = paired_comparison(method, reference, "min")
    assert minimised.mean_difference == pytest.approx(-0.2)
    assert (minimised.ci_low, minimised.ci_high) == pytest.approx((-0.2 - half_width, -0.2 + half_width))
    assert (minimised.wins, minimised.ties, minimised.losses, minimised.verdict) == (5, 0, 0, "win")
    maximised = paired_comparison(method, reference, "max")
    assert (maximised.wins, maximised.ties, maximised.losses, maximised.verdict) == (0, 0, 5, "loss")


def test_pairing_separates_a_consistent_gain_that_the_spread_between_seeds_hides() -> None:
    # The seeds differ by 1.0 from each other, the method gains 0.10-0.12 on every one of them:
    # differences -0.10, -0.11, -0.12, mean -0.11, sample sd 0.01.
    result = paired_comparison(_seeds(0.9, 1.89, 2.88), _seeds(1.0, 2.0, 3.0), "min")
    half_width = T_2_DF * 0.01 / math.sqrt(3)
    assert result.mean_difference == pytest.approx(-0.11)
    assert (result.ci_low, result.ci_high) == pytest.approx((-0.11 - half_width, -0.11 + half_width))
    assert result.verdict == "win"


def test_ties_constant_differences_unpaired_seeds_and_non_finite_values() -> None:
    tied = paired_comparison(_seeds(0.5, 0.7, 0.9), _seeds(0.5, 0.7, 0.9), "min")
    assert (tied.wins, tied.ties, tied.losses, tied.verdict) == (0, 3, 0, "tie")
    assert (tied.ci_low, tied.ci_high) == (0.0, 0.0)
    # A constant difference has no spread: the interval is the point, away from zero.
    constant = paired_comparison(_seeds(1.5, 2.5), _seeds(1.0, 2.0), "min")
    assert (constant.ci_low, constant.ci_high, constant.verdict) == (pytest.approx(0.5), pytest.approx(0.5), "loss")
    # Only the seeds both have are pairs; one pair is no interval.
    single = paired_comparison({0: 1.0, 1: 2.0}, {1: 1.0, 2: 0.0}, "min")
    assert (single.seeds, single.mean_difference, single.losses, single.verdict) == (1, 1.0, 1, "n/a")
    assert math.isnan(single.ci_low)
    diverged = paired_comparison(_seeds(1.0, float("nan"), 0.5), _seeds(1.0, 1.0, 1.0), "min")
    assert diverged.verdict == "n/a" and diverged.seeds == 3


def test_reach_step_interpolates_between_logged_steps() -> None:
    loss = pd.Series([1.0, 0.6, 0.4], index=[2, 4, 6])
    assert reach_step(loss, 0.5, "min") == (pytest.approx(5.0), "=")
    assert reach_step(loss, 0.6, "min") == (pytest.approx(4.0), "=")
    assert reach_step(loss, 1.2, "min") == (2.0, "<=")
    assert reach_step(loss, 0.3, "min") == (6.0, ">")
    accuracy = pd.Series([0.5, 0.7], index=[10, 20])
    assert reach_step(accuracy, 0.65, "max") == (pytest.approx(17.5), "=")
    step, bound = reach_step(pd.Series(dtype=float), 0.5, "min")
    assert math.isnan(step) and bound == "n/a"


def _settings(methods: list[MethodSpec]) -> CompareSettings:
    return CompareSettings(recipe_config="unused.yaml", output_dir="unused", methods=methods, learning_rates=[0.01])


BASE = {"model": {}, "trainer": {"max_epochs": 5, "accumulate_grad_batches": 2}}


def test_every_method_is_matched_by_plain_lora_with_its_extra_steps() -> None:
    methods = [
        MethodSpec("lora", InitMethod.lora),
        MethodSpec("hrp", InitMethod.hrp, {"preheat_rank": 16, "preheat_steps": 8}),
        MethodSpec("hrp_keep", InitMethod.hrp, {"preheat_rank": 16, "preheat_steps": 8, "init_rule": "keep_progress"}),
        MethodSpec("lora_one", InitMethod.lora_one, {"gradient_batches": 3}),
        MethodSpec("eva", InitMethod.eva),
        MethodSpec("oracle", InitMethod.oracle),
        MethodSpec("pissa", InitMethod.pissa),
    ]
    settings = _settings(methods)
    settings.overrides = {"trainer.max_steps": 40}
    plan = plan_matching(settings, BASE)
    assert (plan.main_steps, plan.accumulate) == (40, 2)
    # HRP: 8 preheat steps of 2 batches = 8 main steps; LoRA-One: 3 gradient batches = 2 main steps (rounded up).
    assert plan.extra["hrp"].backward_batches == 16 and plan.extra["lora_one"].backward_batches == 3
    assert plan.extra["eva"].forward_only and plan.extra["eva"].backward_batches == 0
    assert plan.matched == {
        "hrp": "lora_matched_48", "hrp_keep": "lora_matched_48", "lora_one": "lora_matched_42",
        "eva": "lora", "oracle": "lora", "pissa": "lora",
    }  # fmt: skip
    added = plan.arms[len(methods) :]
    assert [(a.label, a.method, a.options, a.overrides) for a in added] == [
        ("lora_matched_48", InitMethod.lora, {}, {"trainer.max_steps": 48}),
        ("lora_matched_42", InitMethod.lora, {}, {"trainer.max_steps": 42}),
    ]
    assert plan.total_steps["lora_matched_48"] == 48 and plan.total_steps["hrp"] == 40


def test_without_a_plain_lora_method_the_main_budget_arm_is_added_too() -> None:
    settings = _settings([MethodSpec("pissa", InitMethod.pissa), MethodSpec("lora_long", InitMethod.lora, overrides={"trainer.max_steps": 80})])
    settings.overrides = {"trainer.max_steps": 40}
    plan = plan_matching(settings, BASE)
    # A longer plain-LoRA arm is plain LoRA (its own match), not a method to match.
    assert plan.matched == {"pissa": "lora_matched_40"}
    assert plan.total_steps["lora_long"] == 80 and [a.label for a in plan.arms[2:]] == ["lora_matched_40"]


def test_a_method_with_recipe_overrides_is_matched_by_plain_lora_with_the_same_overrides() -> None:
    probe = {"model.init_args.head_init": "linear_probe"}
    settings = _settings([
        MethodSpec("lora", InitMethod.lora),
        MethodSpec("lora_probe", InitMethod.lora, overrides=probe),
        MethodSpec("pissa_probe", InitMethod.pissa, overrides=probe),
        MethodSpec("hrp_probe", InitMethod.hrp, {"preheat_rank": 16, "preheat_steps": 8}, overrides=probe),
    ])  # fmt: skip
    settings.overrides = {"trainer.max_steps": 40}
    plan = plan_matching(settings, {"model": {}, "trainer": {}})
    assert plan.matched == {"pissa_probe": "lora_probe", "hrp_probe": "lora_matched_48_hrp_probe"}
    added = plan.arms[-1]
    assert (added.label, added.overrides) == ("lora_matched_48_hrp_probe", {**probe, "trainer.max_steps": 48})


def test_matching_refuses_what_it_cannot_count() -> None:
    settings = _settings([MethodSpec("hrp", InitMethod.hrp, {"preheat_rank": 16, "preheat_steps": 8})])
    with pytest.raises(ValueError, match="max_steps"):
        plan_matching(settings, BASE)  # the budget is in epochs only
    with pytest.raises(ValueError, match="lora_matched_"):
        check_settings(_settings([MethodSpec("lora_matched_48", InitMethod.lora)]))


def test_a_data_driven_init_without_a_counting_rule_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if the oracle were a new data-driven init that compare_matching knows nothing about.
    monkeypatch.setattr(compare_matching, "OracleInit", type("SomethingElse", (), {}))
    with pytest.raises(ValueError, match="compute_matched"):
        extra_compute(MethodSpec("oracle", InitMethod.oracle), accumulate=1)
