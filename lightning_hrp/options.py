"""HRP's options, checked once, shared by every entry point (plain torch: no Lightning, no transformers).

:class:`HRPOptions` holds what every entry point takes (the Lightning callback, :func:`lightning_hrp.hrp_init`,
:class:`lightning_hrp.inits.HRPInit`, the transformers callback); :class:`HRPArguments` is the one explicit
keyword signature the entry-point classes inherit (so that LightningCLI and jsonargparse see every option
with its type), and each builds one of these from it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import LBFGS, AdamW, Optimizer

from lightning_hrp._validation import check_bool, check_choice, check_int, is_positive_number, is_real_number
from lightning_hrp.engine.allocation import AllocationRule, RankBudget
from lightning_hrp.engine.init_rules import DirectionScale, InitRule
from lightning_hrp.engine.preheat import PreheatMode
from lightning_hrp.errors import HRPConfigurationError, reevaluating_optimizer_refused

OnFailure = Literal["raise", "continue"]
OtherParams = Literal["frozen", "train_and_discard", "train_and_keep"]
SvdDtype = Literal["float32", "float64"]
PreheatDtype = Literal["float32", "bfloat16"]
OptimizerFactory = Callable[[Iterable[Tensor]], Optimizer]


# The numeric options, each with the Python type it is stored as (NumPy scalars are converted).
_NUMBER_FIELDS = {"preheat_rank": int, "preheat_steps": int, "preheat_lr": float, "drift_tolerance": float, "seed": int, "rank_budget": int}


@dataclass(frozen=True)
class HRPOptions:
    """Every option of one HRP run, checked on construction (an :class:`HRPConfigurationError` names the argument).

    See :class:`lightning_hrp.HRPPreheatCallback` for what each option means.
    """

    preheat_rank: int
    preheat_steps: int
    mode: PreheatMode = "classic"
    init_rule: InitRule = "direction"
    direction_scale: DirectionScale = "match_init_norm"
    preheat_lr: float | None = None
    preheat_optimizer: OptimizerFactory | None = None
    adapter_name: str | None = None
    seed: int | None = None
    svd_dtype: SvdDtype = "float32"
    on_failure: OnFailure = "raise"
    track_subspace_drift: bool = False
    drift_tolerance: float | None = None
    preheat_dtype: PreheatDtype | None = None
    other_params: OtherParams = "frozen"
    rank_budget: int | None = None
    allocation_rule: AllocationRule = "energy"
    reinitialise_trained: bool = False

    def __post_init__(self) -> None:
        check_int("preheat_rank", self.preheat_rank, minimum=2)
        check_int("preheat_steps", self.preheat_steps, minimum=1)
        check_choice("mode", self.mode, PreheatMode)
        check_choice("init_rule", self.init_rule, InitRule)
        check_choice("direction_scale", self.direction_scale, DirectionScale)
        check_choice("svd_dtype", self.svd_dtype, SvdDtype)
        check_choice("on_failure", self.on_failure, OnFailure)
        check_choice("other_params", self.other_params, OtherParams)
        check_bool("track_subspace_drift", self.track_subspace_drift)
        check_bool("reinitialise_trained", self.reinitialise_trained)
        if self.preheat_dtype is not None:
            check_choice("preheat_dtype", self.preheat_dtype, PreheatDtype)
        if self.preheat_lr is not None and not is_positive_number(self.preheat_lr):
            raise HRPConfigurationError(
                f"preheat_lr must be a positive number or None (the main optimizer's), got {self.preheat_lr!r}."
            )
        if self.preheat_optimizer is not None:
            _check_optimizer_factory(self.preheat_optimizer)
        if self.preheat_lr is not None and self.preheat_optimizer is not None:
            raise HRPConfigurationError(
                "Give either preheat_lr (for the default AdamW) or preheat_optimizer (which sets its own "
                "learning rate), not both."
            )
        if self.drift_tolerance is not None and not (is_real_number(self.drift_tolerance) and 0 < self.drift_tolerance < 1):
            raise HRPConfigurationError(f"drift_tolerance must be a number in (0, 1) or None, got {self.drift_tolerance!r}.")
        seed = self.seed
        if seed is not None:
            check_int("seed", seed, minimum=0)
            if seed >= 2**63:
                raise HRPConfigurationError(f"seed must be an int in [0, 2**63) or None (seed_everything's), got {seed!r}.")
        if self.adapter_name is not None and not isinstance(self.adapter_name, str):
            raise HRPConfigurationError(f"adapter_name must be a str or None, got {self.adapter_name!r}.")
        if self.rank_budget is not None:
            check_int("rank_budget", self.rank_budget, minimum=1)
        check_choice("allocation_rule", self.allocation_rule, AllocationRule)
        # NumPy scalars are accepted above; stored as Python numbers, so that every later use sees one type.
        for name, kind in _NUMBER_FIELDS.items():
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, kind(value))

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> HRPOptions:
        """The options among an entry point's arguments (its ``locals()`` on entry), checked.

        The entry-point classes take their arguments through :class:`HRPArguments`, ``hrp_init`` through its
        own signature; ``tests/test_options.py`` checks that each one takes every option, with the same default.
        """
        return cls(**{field.name: arguments[field.name] for field in fields(cls) if field.name in arguments})

    @property
    def tracks_drift(self) -> bool:
        """Whether the subspace drift is tracked (asked for, or needed by ``drift_tolerance``)."""
        return self.track_subspace_drift or self.drift_tolerance is not None

    @property
    def needs_main_lr(self) -> bool:
        """Whether the preheat learning rate is the main optimizer's (neither ``preheat_lr`` nor ``preheat_optimizer`` given)."""
        return self.preheat_lr is None and self.preheat_optimizer is None

    @property
    def budget(self) -> RankBudget | None:
        """The rank budget to allocate after preheating; ``None``: every layer keeps its rank."""
        return None if self.rank_budget is None else RankBudget(self.rank_budget, self.allocation_rule)

    @property
    def svd_torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.svd_dtype)

    @property
    def preheat_torch_dtype(self) -> torch.dtype | None:
        """The preheat adapters' dtype; ``None``: the LoRA weights', at least float32."""
        return None if self.preheat_dtype is None else getattr(torch, self.preheat_dtype)

    def make_optimizer(self, params: list[Tensor], main_lr: float | None) -> Optimizer:
        """The preheat optimizer: ``preheat_optimizer``'s, or AdamW (no weight decay) at ``preheat_lr``, else at ``main_lr``."""
        if self.preheat_optimizer is not None:
            return _checked_optimizer(self.preheat_optimizer(params), self.preheat_optimizer)
        return AdamW(params, lr=self.preheat_lr if self.preheat_lr is not None else main_lr, weight_decay=0.0)


_FACTORY_HINT = "e.g. functools.partial(torch.optim.SGD, lr=0.1) or lambda params: torch.optim.SGD(params, lr=0.1)"


def _check_optimizer_factory(factory: Any) -> None:
    """``factory`` is a callable ``params -> Optimizer``: not an optimizer class that still needs arguments."""
    if not callable(factory):
        raise HRPConfigurationError(f"preheat_optimizer must be a callable params -> Optimizer ({_FACTORY_HINT}) or None, got {factory!r}.")
    if isinstance(factory, type) and issubclass(factory, Optimizer):
        signature = inspect.signature(factory)
        needed = [
            name for name, parameter in list(signature.parameters.items())[1:]
            if parameter.default is inspect.Parameter.empty and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        ]  # fmt: skip
        if needed:
            raise HRPConfigurationError(
                f"preheat_optimizer={factory.__name__} is an optimizer class that also needs {', '.join(needed)}; give "
                f"functools.partial({factory.__name__}, {needed[0]}=...) (or a lambda params: {factory.__name__}(params, ...))."
            )
    if factory is LBFGS:
        raise reevaluating_optimizer_refused(factory.__name__)


def _checked_optimizer(optimizer: Any, factory: Any) -> Optimizer:
    """What ``preheat_optimizer`` built, refused unless it is one ``torch.optim.Optimizer`` that evaluates once a step."""
    if not isinstance(optimizer, Optimizer):
        raise HRPConfigurationError(
            f"preheat_optimizer={factory!r} returned {type(optimizer).__name__} ({optimizer!r:.80}), not a torch.optim.Optimizer; "
            f"it must build one optimizer over the tensors it is given ({_FACTORY_HINT})."
        )
    if isinstance(optimizer, LBFGS):
        raise reevaluating_optimizer_refused(type(optimizer).__name__)
    return optimizer


def initial_learning_rate(optimizer: Optimizer) -> float:
    """The configured learning rate of ``optimizer``'s first parameter group.

    A warm-up scheduler may have set ``lr`` to about 0 already; ``initial_lr`` (set by every torch
    scheduler) is the configured value.
    """
    group = optimizer.param_groups[0]
    return group.get("initial_lr", group["lr"])


class HRPArguments:
    """The keyword signature of every HRP option, written once for the entry-point classes.

    :class:`~lightning_hrp.HRPPreheatCallback`, :class:`~lightning_hrp.inits.HRPInit` and the transformers
    ``HRPTrainerCallback`` inherit this ``__init__`` (LightningCLI and jsonargparse read it, types included);
    :func:`~lightning_hrp.hrp_init`, a function, repeats it. ``tests/test_options.py`` holds every entry point
    to every option with its default. Each subclass refuses what it cannot do and sets its own state in
    :meth:`_start`.
    """

    def __init__(
        self,
        preheat_rank: int,
        preheat_steps: int,
        *,
        mode: PreheatMode = "classic",
        init_rule: InitRule = "direction",
        direction_scale: DirectionScale = "match_init_norm",
        preheat_lr: float | None = None,
        preheat_optimizer: OptimizerFactory | None = None,
        adapter_name: str | None = None,
        seed: int | None = None,
        svd_dtype: SvdDtype = "float32",
        on_failure: OnFailure = "raise",
        log_layer_metrics: bool = True,
        track_subspace_drift: bool = False,
        drift_tolerance: float | None = None,
        preheat_dtype: PreheatDtype | None = None,
        other_params: OtherParams = "frozen",
        rank_budget: int | None = None,
        allocation_rule: AllocationRule = "energy",
        reinitialise_trained: bool = False,
    ) -> None:
        self.options = HRPOptions.from_arguments(locals())
        check_bool("log_layer_metrics", log_layer_metrics)
        self.log_layer_metrics = log_layer_metrics
        self._start()

    def _start(self) -> None:
        """Refuse what this entry point cannot do with ``self.options``; set up its own state."""
