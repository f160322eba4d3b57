"""``HRPTrainerCallback``: High-Rank Preheating in a transformers ``Trainer`` (and trainers built on it).

Thin glue over :func:`lightning_hrp.orchestration.preheat_and_initialise`, with the options, checks
and guarantees of :class:`lightning_hrp.HRPPreheatCallback`. Importing this module imports
transformers; nothing else in lightning_hrp does.

Why :meth:`HRPTrainerCallback.attach`: a ``TrainerCallback`` receives the model, the optimizer, the
scheduler and the train dataloader, but not the ``Trainer``, and HRP must compute the loss exactly
as the Trainer does: through ``Trainer.compute_loss`` (which users and libraries such as TRL
override, and which applies ``compute_loss_func`` and label smoothing), on inputs prepared by the
Trainer, under its autocast context. Computing ``model(**inputs).loss`` instead would silently
preheat on a different loss. ``attach`` hands the callback its Trainer explicitly (and registers it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any

from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard
from torch import Tensor
from torch.optim import Optimizer
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lightning_hrp.engine.batches import CycledBatches, generators_restored
from lightning_hrp.engine.isolation import interrupts_deferred, isolated_rng
from lightning_hrp.engine.preheat_loop import BatchSteps
from lightning_hrp.errors import HRPConfigurationError
from lightning_hrp.options import HRPArguments, initial_learning_rate
from lightning_hrp.orchestration import (
    EntryPoint,
    forward_communicates,
    info_on_rank_zero,
    preheat_and_initialise,
    warn_on_rank_zero,
)
from lightning_hrp.report import HRPReport, step_metrics, summary_metrics

__all__ = ["HRPTrainerCallback"]

# Logged once a preheat finished (or failed with on_failure="continue"): a run resumed from a
# checkpoint finds it in the checkpoint's log history and does not preheat again.
PREHEAT_FINISHED = "hrp/preheat_finished"


class HRPTrainerCallback(HRPArguments, TrainerCallback):
    """Start the rank-r LoRA adapters from High-Rank Preheating (arXiv 2502.07739) in a transformers ``Trainer``.

    At ``on_train_begin`` (after the Trainer built its optimizer and scheduler and wrapped the model,
    before the first optimizer step) every trainable peft LoRA layer gets a temporary
    rank-``preheat_rank`` adapter outside the model, trained for ``preheat_steps`` optimizer steps
    of ``gradient_accumulation_steps`` batches each on the Trainer's own train dataloader with the
    Trainer's own ``compute_loss`` (the per-batch mean loss; ``num_items_in_batch`` is not passed);
    the top singular directions of each preheated update then initialise the rank-r adapters in
    place. The Trainer's optimizer, scheduler, ``global_step``, data order (every RNG and the
    loader's generators and epoch are restored) and each module's train/eval mode are left as
    they were. Under DDP the preheat forward runs on the module inside the DDP wrapper (preheating
    computes no gradient for the model's own parameters, so DDP has nothing to synchronise).

    Use::

        trainer = Trainer(model=model, args=args, train_dataset=data)
        hrp = HRPTrainerCallback(preheat_rank=64, preheat_steps=10).attach(trainer)
        trainer.train()  # hrp.report holds what preheating found

    The preheat losses and, once, the summary (``hrp/energy_kept_mean`` ...) go through
    ``Trainer.log`` to the Trainer's integrations and its log history (at step 0). A run resumed
    from a checkpoint of an HRP run (``hrp/preheat_finished`` in its log history) does not preheat
    again; resuming a checkpoint of a run without HRP with this callback is refused.

    Its options are :class:`lightning_hrp.HRPPreheatCallback`'s; ``preheat_lr`` defaults to the Trainer
    optimizer's initial learning rate. ``rank_budget`` is refused, as there: the Trainer has built its
    optimizer (and any wrapper) by ``on_train_begin``, so shapes can no longer change; call
    :func:`lightning_hrp.hrp_init` with ``rank_budget`` on the model before creating the Trainer instead.
    """

    def _start(self) -> None:
        if self.options.rank_budget is not None:
            raise HRPConfigurationError(
                "HRPTrainerCallback cannot take rank_budget: it preheats at on_train_begin, after the Trainer has built "
                "its optimizer (and any DDP/FSDP wrapper) around the adapters, so their shapes can no longer change. "
                "Call lightning_hrp.hrp_init(model, batches, loss_fn, ..., rank_budget=...) on the peft model before "
                "creating the Trainer instead."
            )
        self.report: HRPReport | None = None
        self._trainer: Trainer | None = None

    def attach(self, trainer: Trainer) -> HRPTrainerCallback:
        """Give the callback its Trainer (whose ``compute_loss`` it preheats with) and add it to the Trainer's callbacks.

        Returns:
            The callback itself.

        Raises:
            HRPConfigurationError: Not a transformers ``Trainer``, already attached to another one, or a
                Trainer setup HRP cannot work with (DeepSpeed, ``torch.nn.DataParallel`` over several GPUs).
        """
        if not isinstance(trainer, Trainer):
            raise HRPConfigurationError(f"attach needs a transformers Trainer, got {type(trainer).__name__}.")
        if self._trainer is not None and self._trainer is not trainer:
            raise HRPConfigurationError("This HRPTrainerCallback is attached to another Trainer already; make one per Trainer.")
        if trainer.is_deepspeed_enabled:
            raise HRPConfigurationError(
                "HRPTrainerCallback does not support DeepSpeed: ZeRO partitions the LoRA weights outside "
                "torch.distributed's DTensor/FSDP APIs that HRP writes through. Use DDP (torchrun) or FSDP."
            )
        if trainer.args.n_gpu > 1:
            raise HRPConfigurationError(
                f"The Trainer would run torch.nn.DataParallel over {trainer.args.n_gpu} GPUs in one process, which HRP "
                "does not support; launch one process per GPU (torchrun), i.e. DDP."
            )
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer = trainer
        return self

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        trainer = self._trainer
        if trainer is None or trainer.args is not args:
            raise HRPConfigurationError(
                "HRPTrainerCallback needs its Trainer, to preheat with the Trainer's own compute_loss: add it with "
                "HRPTrainerCallback(...).attach(trainer) instead of Trainer(callbacks=[...])."
            )
        self.report = None
        if state.global_step > 0:
            if any(PREHEAT_FINISHED in entry for entry in state.log_history):
                info_on_rank_zero("HRP: preheating already finished (the checkpoint's log history says so); not preheating again.")
                return
            raise HRPConfigurationError(
                f"HRP would preheat at global_step={state.global_step} and overwrite adapters that have already been "
                "trained: this run resumes a checkpoint saved without HRP. Resume without HRPTrainerCallback."
            )
        if 0 < state.max_steps < self.options.preheat_steps:
            warn_on_rank_zero(
                f"max_steps={state.max_steps} is smaller than preheat_steps={self.options.preheat_steps}: preheating "
                "takes more optimizer steps than the main run. Preheating is meant to be a few percent of the run."
            )
        self.report = preheat_and_initialise(self.options, _TrainerEntry(trainer, kwargs["train_dataloader"]))
        metrics = {} if self.report is None else summary_metrics(self.report, self.log_layer_metrics)
        trainer.log({**metrics, PREHEAT_FINISHED: 1.0})


class _TrainerEntry(EntryPoint):
    """The Trainer's train dataloader, inputs prepared by the Trainer, its ``compute_loss`` under its autocast context."""

    def __init__(self, trainer: Trainer, train_dataloader: Any) -> None:
        # trainer.model: the module inside a DDP wrapper; under FSDP the wrapped (sharded) model.
        super().__init__(
            trainer.model,
            trainer.model_wrapped,
            accumulate=trainer.args.gradient_accumulation_steps,
            collective_model=forward_communicates(trainer.model),
        )
        self.trainer = trainer
        self.train_dataloader = train_dataloader

    def main_optimizers(self) -> list[Optimizer]:
        # A second train() without resume reuses the optimizer it built the first time, moments included.
        return [] if self.trainer.optimizer is None else [self.trainer.optimizer]

    def main_learning_rate(self) -> float:
        return initial_learning_rate(self.trainer.optimizer)

    @contextmanager
    def preheating(self, optimizer: Optimizer, steps: int) -> Iterator[BatchSteps]:
        loader = self.train_dataloader
        data = CycledBatches(loader, steps * self.accumulate, self.warn)
        device = self.trainer.args.device
        modes = [(module, module.training) for module in self.model.modules()]
        try:
            with generators_restored([loader]), isolated_rng([device] if device.type == "cuda" else []), closing(data):
                self.model.train()  # as the Trainer's training_step does
                yield BatchSteps(fetch=lambda: next(data), loss=self._loss, backward=lambda loss: loss.backward())
        finally:
            with interrupts_deferred():
                for module, training in modes:
                    module.train(training)
                if isinstance(loader, (DataLoaderShard, DataLoaderDispatcher)):
                    # A pass left unfinished never unregisters the loader from accelerate's GradientState (its
                    # end-of-dataloader bookkeeping). (The epoch a finished pass counts is set back by the
                    # Trainer, which sets the loader's epoch before each of its own.)
                    loader.end()

    def _loss(self, batch: Any, batch_idx: int) -> Tensor:
        trainer = self.trainer
        inputs = trainer._prepare_inputs(batch)  # private: moves the batch as the Trainer's training_step does
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(self.model, inputs)
        if not (isinstance(loss, Tensor) and loss.ndim == 0):
            raise HRPConfigurationError(
                f"Trainer.compute_loss returned {type(loss).__name__}; HRP needs the batch's loss as a scalar tensor."
            )
        return loss

    def on_step(self, step: int, loss: float, drift: float | None) -> None:
        self.trainer.log(step_metrics(step, loss, drift))
