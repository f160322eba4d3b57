"""``HRPPreheatCallback``: High-Rank Preheating as one line in a Lightning ``Trainer``.

Thin Lightning glue over :func:`lightning_hrp.orchestration.preheat_and_initialise` (the HRP run
every entry point shares) and :mod:`lightning_hrp._lightning` (the Lightning internals), in the
manner of Lightning's ``LearningRateFinder`` over its tuner: arguments are checked in ``__init__``,
the strategy in ``setup``, and the work happens once, at ``on_train_start``, on the already wrapped
model. What is Lightning's own here: the batches, ``training_step`` and the backward through the
strategy and its precision plugin, SIGTERM, logging to the Trainer's loggers, checkpointed state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, ParallelStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from tqdm.auto import tqdm

from lightning_hrp._lightning import (
    MainRunBatches,
    batch_to_device,
    check_preheats_through_training_step,
    define_preheat_step_axis,
    isolated_from_main_run,
    log_metrics,
    preheat_loss,
)
from lightning_hrp.engine.preheat_loop import BatchSteps, PreheatStopped
from lightning_hrp.errors import HRPConfigurationError
from lightning_hrp.options import HRPArguments, initial_learning_rate
from lightning_hrp.orchestration import EntryPoint, preheat_and_initialise
from lightning_hrp.report import PER_STEP_METRICS, HRPReport, LayerDiagnostics, step_metrics, summary_metrics

__all__ = ["HRPPreheatCallback", "HRPReport", "LayerDiagnostics"]


class HRPPreheatCallback(HRPArguments, Callback):
    """Start the rank-r LoRA adapters from High-Rank Preheating (arXiv 2502.07739).

    At ``on_train_start`` every trainable LoRA layer gets a temporary rank-``preheat_rank`` adapter,
    kept outside the (possibly wrapped or sharded) model. It is trained for ``preheat_steps``
    optimizer steps with the module's own ``training_step`` on the batches the main run's first
    epoch sees, while the main run's parameters compute no gradient; then the top singular
    directions of each preheated update initialise the rank-r adapter in place, the preheat
    adapters are removed, and training proceeds exactly as it would have otherwise: same optimizer
    objects, scheduler, data order (every RNG is restored), ``global_step`` and epoch.

    Args:
        preheat_rank: Rank ``R`` of the preheat adapters; must exceed the LoRA rank. Clamped per
            layer, with one warning, to ``min(in, out)``, the most such a layer can express.
        preheat_steps: Optimizer steps of preheating (each accumulates ``accumulate_grad_batches``
            batches, like a training step).
        mode: ``"classic"`` trains both preheat factors; ``"asymmetric"`` only ``B_p``, the setting of
            the theory sketched in the project's HRP spec (section 1; the paper's full text was not
            available to us).
        init_rule: ``"direction"`` (the spec's reading of the paper): ``A = c * V_r^T``, ``B = 0``, so the model's
            output at the start equals the base model's. ``"keep_progress"``: ``s * B @ A`` becomes
            the rank-r truncation of the preheated update.
        direction_scale: ``c`` for ``"direction"``: ``"unit"`` rows, or ``"match_init_norm"``,
            the Frobenius norm of the adapter's current (default) init.
        preheat_lr: Learning rate of the default AdamW preheat optimizer; by default the main
            optimizer's initial learning rate (of its first parameter group).
        preheat_optimizer: Builds the preheat optimizer from the preheat tensors, replacing the
            default AdamW (then leave ``preheat_lr`` unset).
        adapter_name: The peft adapter to initialise; needed only when the model has several.
        seed: Seed of the preheat adapters' random start, an int in ``[0, 2**63)``; by default rank
            0's ``torch.initial_seed()``, so ``seed_everything`` governs it.
        svd_dtype: Dtype of the decomposition, whatever the training precision.
        on_failure: What a failed preheat does: a non-finite loss, adapter or decomposition, a
            preheat that saw no loss or learned nothing, or an exception (on any rank; every rank
            then does the same). Either way the model is first restored bit for bit. ``"raise"``
            re-raises; ``"continue"`` warns (each failing rank says why) and trains from the
            untouched default init. An ``HRPConfigurationError``, a ``KeyboardInterrupt`` and a
            SIGTERM always propagate.
        log_layer_metrics: Also log each layer's energy kept and leading singular value.
        track_subspace_drift: After every preheat step, log ``hrp/subspace_drift``: how far the top-r
            subspaces moved since the previous step (mean over layers of ``1 - ||V_t V_{t-1}^T||_F^2 / r``;
            0 means settled). Costs one batched decomposition per step.
        drift_tolerance: Stop preheating early, before ``preheat_steps``, once the drift falls below this
            (implies tracking). This project's stopping rule: the paper's abstract and summary, all we could
            read of it, name none.
        preheat_dtype: Dtype of the preheat adapters, hence of their gradients and (for AdamW) their
            optimizer state: ``"float32"`` or ``"bfloat16"``. ``None``: the LoRA weights' dtype, at least
            float32. Whatever it is, the flags and loss are all-reduced in float32 and the decomposition
            runs in ``svd_dtype``.
        other_params: The module's other trainable parameters (e.g. a fresh classification head) while
            preheating: ``"frozen"`` at their current values; ``"train_and_discard"``: trained with the
            preheat adapters (same optimizer) and put back afterwards; ``"train_and_keep"``: trained and
            kept, so the main run starts from them (a compute-matched comparison already counts those
            steps as preheat steps). Training them is supported on unsharded parameters (one process,
            DDP: their gradients join HRP's own all-reduce), not under FSDP. Restored bit for bit on failure.
        rank_budget: Not here: allocating ranks changes adapter shapes, which is impossible at
            ``on_train_start``, after the strategy wrapped the model and the optimizers were built.
            Refused (``HRPConfigurationError``); use :class:`lightning_hrp.inits.HRPInit`, which preheats at
            ``setup``, before the wrap (a recipe's ``init_method: hrp`` with ``init_options.rank_budget``).
        allocation_rule: Taken for the same signature as every entry point; without ``rank_budget``
            it has no effect.
        reinitialise_trained: HRP refuses (``HRPConfigurationError``, nothing changed) adapters that are not
            at their untrained start: ``lora_B`` not zero (trained, or started by PiSSA, OLoRA, LoRA-GA,
            LoRA-One, ``keep_progress``), ``lora_A`` already written by HRP in this process, or moments for
            them in the main optimizer. ``True`` re-initialises them anyway: their current update is
            discarded, the main optimizer's state for them is cleared, and where the base weights hold a
            residual (PiSSA, OLoRA, ...) the model's output becomes the residual's (a warning says so).
    """

    def _start(self) -> None:
        if self.options.rank_budget is not None:
            raise HRPConfigurationError(
                "HRPPreheatCallback cannot take rank_budget: it preheats at on_train_start, after the strategy has "
                "wrapped the model and the optimizers hold its parameters, so adapter shapes can no longer change. "
                "Use lightning_hrp.inits.HRPInit(..., rank_budget=...) instead, which preheats at setup, before the "
                "wrap (in a recipe: init_method: hrp with init_options.rank_budget)."
            )
        self.report: HRPReport | None = None
        # Preheating is done for this fit when it ran in it, or when the checkpoint it resumes says so.
        self._preheated_in_this_fit = False
        self._restored_as_preheated = False
        self._rng_at_fit_start: Tensor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(adapter_name=self.options.adapter_name)

    def state_dict(self) -> dict[str, Any]:
        return {"preheat_finished": self._preheated_in_this_fit or self._restored_as_preheated}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_as_preheated = state_dict["preheat_finished"]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # A new fit: only a checkpoint restored after this point may say that preheating is done.
        self._preheated_in_this_fit = self._restored_as_preheated = False
        self.report = None
        if self.options.other_params != "frozen" and isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise HRPConfigurationError(
                f"other_params={self.options.other_params!r} trains the module's other parameters during preheating, "
                f"which HRP supports on unsharded parameters only; {type(trainer.strategy).__name__} shards them. Use "
                "other_params='frozen' (the head then preheats as it is), or DDP."
            )
        check_preheats_through_training_step(trainer, pl_module, "HRPPreheatCallback")
        if 0 <= trainer.max_steps < self.options.preheat_steps and not trainer.fast_dev_run:
            rank_zero_warn(
                f"max_steps={trainer.max_steps} is smaller than preheat_steps={self.options.preheat_steps}: preheating "
                "takes more optimizer steps than the main run. Preheating is meant to be a few percent of the run."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The global RNG state the fit loop will create the main run's train iterator from (the sanity check in
        # between is RNG-isolated): a worker-process loader's sampler draws its first-epoch permutation there.
        self._rng_at_fit_start = torch.get_rng_state()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored_as_preheated:
            rank_zero_info("HRP: preheating already finished (restored from a checkpoint); not preheating again.")
            return
        if trainer.global_step > 0:
            raise HRPConfigurationError(
                f"HRP would preheat at global_step={trainer.global_step} and overwrite adapters that have already "
                "been trained: this fit resumes a checkpoint saved without HRP (ckpt_path), or continues a finished "
                "fit. Resume without HRPPreheatCallback; or, if the checkpoint came from a run with HRP, give the "
                "callback the same adapter_name as that run so its state is found."
            )
        if not trainer.optimizers:
            raise HRPConfigurationError("HRP found no optimizer: configure_optimizers must return the main optimizer.")
        try:
            self.report = preheat_and_initialise(self.options, _TrainerEntry(trainer, pl_module, self._rng_at_fit_start))
        except PreheatStopped as stop:
            # SIGTERM reached some rank: every rank restored; now exit as Lightning does on SIGTERM.
            raise SIGTERMException() from stop
        if self.report is not None:
            log_metrics(trainer, summary_metrics(self.report, self.log_layer_metrics), step=trainer.global_step)
        self._preheated_in_this_fit = True


class _TrainerEntry(EntryPoint):
    """HRP in a Lightning ``Trainer`` at ``on_train_start``: the module's own ``training_step``, through the strategy.

    Batches are those of the main run's first epoch (:class:`~lightning_hrp._lightning.MainRunBatches`),
    moved by the module's transfer hooks; the backward and the optimizer step go through the strategy
    and its precision plugin (gradient scaling, clipping); what ``training_step`` logs is discarded;
    SIGTERM stops preheating on every rank.
    """

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rng_at_fit_start: Tensor | None = None) -> None:
        super().__init__(
            pl_module,
            trainer.strategy.model,
            device=trainer.strategy.root_device,
            accumulate=trainer.accumulate_grad_batches,
            collective_model=_forward_communicates(trainer),
        )
        self.trainer = trainer
        self.pl_module = pl_module
        self._rng_at_fit_start = rng_at_fit_start
        self._progress: tqdm | None = None

    def main_learning_rate(self) -> float:
        return initial_learning_rate(self.trainer.optimizers[0])

    @contextmanager
    def preheating(self, optimizer: Optimizer, steps: int) -> Iterator[BatchSteps]:
        trainer = self.trainer
        data = MainRunBatches(trainer, self._rng_at_fit_start, self.info)
        needed = steps * trainer.accumulate_grad_batches
        if data.per_pass < needed:
            self.warn(
                f"The main run sees {data.per_pass} training batches per epoch but preheating needs {needed} "
                "(preheat_steps x accumulate_grad_batches); they are cycled."
            )
        batches = iter(data)

        def fetch() -> tuple[Any, int]:
            batch, batch_idx = next(batches)
            return batch_to_device(trainer, batch), batch_idx

        show_progress = trainer.is_global_zero and trainer.progress_bar_callback is not None
        with closing(data), isolated_from_main_run(trainer, self.pl_module), tqdm(
            total=steps, desc="HRP preheat", disable=not show_progress, leave=False, dynamic_ncols=True
        ) as self._progress:
            yield BatchSteps(
                fetch=fetch,
                loss=partial(preheat_loss, trainer),
                backward=lambda value: trainer.strategy.backward(value, optimizer),
            )

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Tensor | None]) -> None:
        self.trainer.strategy.optimizer_step(optimizer, closure=closure, model=self.pl_module)

    def main_optimizers(self) -> list[Optimizer]:
        return list(self.trainer.optimizers)

    def stop_requested(self) -> bool:
        return self.trainer.received_sigterm

    def on_step(self, step: int, loss: float, drift: float | None) -> None:
        # Here rather than before the loop: the loop agrees on an error raised here (rank 0 logs alone).
        if step == 0:
            define_preheat_step_axis(self.trainer, PER_STEP_METRICS)
        metrics = step_metrics(step, loss, drift)
        if "hrp/preheat_loss" in metrics:
            self._progress.set_postfix(loss=f"{loss:.4g}")
        log_metrics(self.trainer, metrics, step=self.trainer.global_step)
        self._progress.update(1)

    def warn(self, message: str) -> None:
        rank_zero_warn(message)

    def info(self, message: str) -> None:
        rank_zero_info(message)


def _forward_communicates(trainer: pl.Trainer) -> bool:
    """Whether a preheat forward/backward of this model issues collectives (FSDP, SyncBatchNorm).

    DDP's own collectives do not count: the preheat forward runs outside its wrapper.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, ParallelStrategy):
        return False
    if any(isinstance(m, nn.SyncBatchNorm) for m in strategy.model.modules()):
        return True
    return not isinstance(strategy.model, DistributedDataParallel)
