"""One set of options for every entry point: each takes every option of ``HRPOptions``, with its default, and its checks."""

import inspect
from dataclasses import MISSING, fields

import pytest
import torch

from lightning_hrp import HRPConfigurationError, HRPOptions, HRPPreheatCallback, hrp_init
from lightning_hrp.inits import HRPInit
from lightning_hrp.integrations.transformers import HRPTrainerCallback

ENTRY_POINTS = {
    "HRPPreheatCallback": HRPPreheatCallback,
    "hrp_init": hrp_init,
    "HRPTrainerCallback": HRPTrainerCallback,
    "HRPInit": HRPInit,
}


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_every_entry_point_takes_every_option_with_its_default(entry_point):
    parameters = inspect.signature(ENTRY_POINTS[entry_point]).parameters
    for option in fields(HRPOptions):
        assert option.name in parameters, option.name
        expected = inspect.Parameter.empty if option.default is MISSING else option.default
        assert parameters[option.name].default == expected, option.name


def _construct(entry_point: str, **options) -> None:
    if entry_point == "hrp_init":
        hrp_init(torch.nn.Linear(2, 2), [], lambda model, batch: None, **options)
    else:
        ENTRY_POINTS[entry_point](**options)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize(
    ("options", "argument"),
    [
        (dict(preheat_rank=1), "preheat_rank"),
        (dict(preheat_steps=0), "preheat_steps"),
        (dict(mode="symmetric"), "mode"),
        (dict(seed=-1), "seed"),
        (dict(drift_tolerance=2.0), "drift_tolerance"),
        (dict(other_params="sometimes"), "other_params"),
        (dict(preheat_lr=1e-3, preheat_optimizer=torch.optim.SGD), "preheat_optimizer"),
        (dict(preheat_dtype="float16"), "preheat_dtype"),
        (dict(preheat_dtype=torch.bfloat16), "preheat_dtype"),
        (dict(rank_budget=0), "rank_budget"),
        (dict(allocation_rule="greedy"), "allocation_rule"),
    ],
)
def test_every_entry_point_refuses_bad_options_before_anything(entry_point, options, argument):
    with pytest.raises(HRPConfigurationError, match=argument):
        _construct(entry_point, **(dict(preheat_rank=8, preheat_steps=2, preheat_lr=1e-3) | options))


@pytest.mark.parametrize("entry_point", ["HRPPreheatCallback", "HRPTrainerCallback"])
def test_entry_points_that_preheat_after_the_wrap_refuse_a_rank_budget(entry_point):
    # Shapes cannot change once a strategy or Trainer holds the parameters; the message names the way that can.
    with pytest.raises(HRPConfigurationError, match="rank_budget") as refused:
        ENTRY_POINTS[entry_point](preheat_rank=8, preheat_steps=2, rank_budget=8)
    assert "HRPInit" in str(refused.value) or "hrp_init" in str(refused.value)
