"""The oracle init: the known target update's own top directions, for tasks that know it (synthetic ones)."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_hrp._validation import check_choice
from lightning_hrp.engine.baselines import oracle_direction_init
from lightning_hrp.engine.init_rules import DirectionScale
from lightning_hrp.engine.lora import LoraTarget
from lightning_hrp.errors import HRPConfigurationError
from lightning_hrp.inits.setup_time import InitReport, SetupTimeInit


class KnownTargetUpdates:
    """Mixin for a DataModule whose task has a known ground-truth weight update (synthetic tasks).

    The ``oracle`` initialisation reads it. Subclasses implement :meth:`target_updates`.
    """

    def target_updates(self) -> Mapping[str, Tensor]:
        """The true update ``M = W_target - W0`` ``(out, in)`` per LoRA target, keyed by module name.

        A key matches the LoRA layer whose name equals it or ends with ``"." + key`` (e.g. ``"proj"``).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement target_updates() to serve the oracle init.")


class OracleInit(SetupTimeInit):
    """``A = c * V_r(M)^T``, ``B = 0`` from the task's true update ``M``: the best direction HRP can estimate.

    Args:
        direction_scale: ``c`` as in HRP (``"match_init_norm"`` keeps the norm of peft's default ``A``).
        adapter_name: See :class:`SetupTimeInit`.
    """

    name = "oracle"

    def __init__(self, direction_scale: DirectionScale = "match_init_norm", adapter_name: str | None = None) -> None:
        super().__init__(adapter_name)
        check_choice("direction_scale", direction_scale, DirectionScale)
        self.direction_scale = direction_scale

    def initialise(self, trainer: pl.Trainer, pl_module: pl.LightningModule, targets: list[LoraTarget], report: InitReport) -> None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, KnownTargetUpdates):
            raise HRPConfigurationError(
                f"The oracle init needs the true update of the task, which only a DataModule implementing "
                f"lightning_hrp.inits.KnownTargetUpdates knows (e.g. the matrix-regression recipe); got "
                f"{type(datamodule).__name__}."
            )
        updates = datamodule.target_updates()
        with torch.no_grad():
            for target in targets:
                keys = [k for k in updates if target.name == k or target.name.endswith("." + k)]
                if len(keys) != 1:
                    raise HRPConfigurationError(
                        f"oracle: LoRA layer {target.name} matches {len(keys)} of the task's target updates "
                        f"{sorted(updates)}; expected exactly one."
                    )
                M = updates[keys[0]].to(target.lora_A.device)
                A, B = oracle_direction_init(M, target.lora_A.detach(), scale=self.direction_scale)
                target.lora_A.copy_(A)
                target.lora_B.copy_(B)
                report.singular_values[target.name] = torch.linalg.svdvals(M.float()).tolist()
