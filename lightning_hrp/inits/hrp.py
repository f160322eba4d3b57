"""HRP at ``setup("fit")``, before the strategy wraps the model: the Lightning path on which adapters may change shape.

:class:`~lightning_hrp.HRPPreheatCallback` preheats at ``on_train_start``, on the wrapped model, so the
adapters' shapes are fixed by then. :class:`HRPInit` runs the same HRP (one
:func:`~lightning_hrp.orchestration.preheat_and_initialise`) earlier, as the other data-driven inits do,
on the bare module: with ``rank_budget`` it allocates ranks from the preheated spectra and resizes the
adapters before DDP, FSDP or ``configure_model``'s ``fully_shard`` see them and before any optimizer
exists. A recipe's ``init_method: hrp`` uses it when ``init_options`` holds ``rank_budget``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing, contextmanager
from functools import partial
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from lightning_hrp._lightning import (
    batch_to_device,
    check_preheats_through_training_step,
    configured_learning_rate,
    generators_restored,
    grad_scaler,
    log_metrics,
    preheat_loss,
    train_dataloader_sharded_at_setup,
)
from lightning_hrp.engine.batches import CycledBatches, with_own_workers
from lightning_hrp.engine.lora import LoraTarget, find_lora_targets
from lightning_hrp.engine.preheat_loop import BatchSteps
from lightning_hrp.engine.resize import resize_on_load
from lightning_hrp.errors import HRPConfigurationError
from lightning_hrp.inits.setup_time import InitReport, SetupTimeInit
from lightning_hrp.options import HRPArguments
from lightning_hrp.orchestration import EntryPoint, forward_communicates, preheat_and_initialise
from lightning_hrp.report import HRPReport, summary_metrics


class HRPInit(HRPArguments, SetupTimeInit):
    """High-Rank Preheating at ``setup("fit")``, before the strategy wraps the model; may allocate ranks (``rank_budget``).

    The same HRP as :class:`lightning_hrp.HRPPreheatCallback` (every option means the same), run
    where the other data-driven inits run: on the bare module, after the DataModule's setup and
    before ``configure_model``, the strategy's wrap and the optimizers. The preheat batches are the
    train dataloader's first epoch as each rank will read it (with the distributed sampler the fit
    loop adds), fed to the module's own ``training_step`` under the precision plugin's autocast,
    with a plain ``backward`` (no gradient scaling, so a precision with a gradient scaler is refused;
    callbacks' backward hooks are not called). With
    several processes the preheat gradients are averaged with one all-reduce per step, as in the
    callback, and every rank takes rank 0's allocation.

    Prefer the callback without ``rank_budget``: it preheats on the model as the strategy wrapped it
    (sharded weights under FSDP, the strategy's precision and gradient scaling) and needs no learning
    rate before the optimizers exist. Here every rank holds the whole bare model while preheating.

    Its options mean what they mean for :class:`lightning_hrp.HRPPreheatCallback`, except these:

    Args:
        preheat_lr: Learning rate of the default AdamW preheat optimizer; by default the initial
            learning rate of the optimizer ``configure_optimizers`` returns (called once here, its
            optimizer dropped).
        rank_budget: The total rank of the trainable LoRA layers, allocated from the preheated
            spectra by ``allocation_rule`` (each layer between 1 and its preheat rank); the adapters are
            resized with their LoRA scale kept, and the peft config records the ranks
            (``rank_pattern``/``alpha_pattern``). ``None``: every layer keeps its rank.
        allocation_rule: ``"energy"`` (the default) or ``"energy_share"``; see :mod:`lightning_hrp.engine.allocation`.

    With ``rank_budget``, a checkpoint of the run loads into the module built afresh from the same
    config (``fit(ckpt_path=...)``, ``test(ckpt_path=...)``: from every ``setup``, the LoRA layers take
    the ranks the checkpoint's state dict holds, :func:`~lightning_hrp.engine.resize.resize_on_load`),
    where the strategy restores before it wraps the model (one device, DDP). A resumed fit preheats
    and allocates again at setup, then loads the checkpoint's weights over it.

    Attributes:
        hrp_report: The HRP report (spectra, ranks, energy kept), or ``None`` before the init ran or after a
            failure with ``on_failure="continue"``.
    """

    name = "hrp"

    def _start(self) -> None:
        # HRPArguments.__init__ stands in for SetupTimeInit's, which sets the adapter and the report.
        SetupTimeInit.__init__(self, self.options.adapter_name)
        self.hrp_report: HRPReport | None = None
        self._loads_resized: pl.LightningModule | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.options.rank_budget is not None and self._loads_resized is not pl_module:
            resize_on_load(pl_module, find_lora_targets(pl_module, self.options.adapter_name))
            self._loads_resized = pl_module
        super().setup(trainer, pl_module, stage)

    def initialise(self, trainer: pl.Trainer, pl_module: pl.LightningModule, targets: list[LoraTarget], report: InitReport) -> None:
        check_preheats_through_training_step(trainer, pl_module, "HRPInit")
        if grad_scaler(trainer) is not None:
            # Its backward is a plain one: unscaled float16 preheat gradients could underflow to zero unnoticed.
            raise HRPConfigurationError(
                "HRPInit preheats without gradient scaling, so under a precision with a gradient scaler "
                "(precision='16-mixed' on CUDA) small preheat gradients would underflow to zero; use precision="
                "'bf16-mixed' or '32-true', or HRPPreheatCallback (no rank_budget), which scales through the strategy."
            )
        main_lr = configured_learning_rate(pl_module) if self.options.needs_main_lr else None
        entry = _SetupEntry(trainer, pl_module, main_lr)
        self.hrp_report = preheat_and_initialise(self.options, entry)
        report.batches = entry.batches_fetched
        if self.hrp_report is None:
            return
        report.singular_values = {d.name: d.singular_values for d in self.hrp_report.layers}
        log_metrics(trainer, summary_metrics(self.hrp_report, self.log_layer_metrics), step=trainer.global_step)


class _SetupEntry(EntryPoint):
    """HRP on the bare module at setup: the train dataloader as each rank will read it, ``training_step``, ``backward()``."""

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule, main_lr: float | None) -> None:
        super().__init__(
            pl_module,
            pl_module,
            accumulate=trainer.accumulate_grad_batches,
            collective_model=forward_communicates(pl_module),
        )
        self.trainer = trainer
        self.main_lr = main_lr
        self.batches_fetched = 0

    def main_learning_rate(self) -> float | None:
        return self.main_lr

    @contextmanager
    def preheating(self, optimizer: Optimizer, steps: int) -> Iterator[BatchSteps]:
        loader = train_dataloader_sharded_at_setup(self.trainer)
        data = CycledBatches(with_own_workers(loader), steps * self.accumulate, self.warn)
        device = self.model.device

        def fetch() -> tuple[Any, int]:
            batch, batch_idx = next(data)
            self.batches_fetched += 1
            return batch_to_device(self.trainer, batch, device=device), batch_idx

        # The RNGs and logged values are isolated by SetupTimeInit for the whole init.
        with generators_restored([loader]), closing(data):
            yield BatchSteps(fetch=fetch, loss=partial(preheat_loss, self.trainer), backward=lambda value: value.backward())

    def warn(self, message: str) -> None:
        rank_zero_warn(message)

    def info(self, message: str) -> None:
        rank_zero_info(message)
