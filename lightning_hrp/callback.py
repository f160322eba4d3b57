"""``HRPPreheatCallback``: High-Rank Preheating as one line in a Lightning ``Trainer``.

Thin Lightning glue over :mod:`lightning_hrp.engine` (the preheat loop, the decomposition) and
:mod:`lightning_hrp._lightning` (the Lightning internals), in the manner of Lightning's
``LearningRateFinder`` over its tuner: arguments are checked in ``__init__``, the strategy in
``setup``, and the work happens once, at ``on_train_start``, on the already wrapped model.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, ParallelStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import AdamW, Optimizer
from tqdm.auto import tqdm

from lightning_hrp._lightning import (
    PREHEAT_STEP,
    MainRunBatches,
    batch_to_device,
    define_preheat_step_axis,
    isolated_from_main_run,
    log_metrics,
    loss_of,
    metric_layer_names,
    training_step,
)
from lightning_hrp._validation import check_bool, check_choice, check_int, is_positive_number
from lightning_hrp.engine.decompose import energy_kept
from lightning_hrp.engine.distributed import broadcast_int, read_lora_weights
from lightning_hrp.engine.init_rules import DirectionScale, InitRule
from lightning_hrp.engine.lora import LoraTarget, find_lora_targets
from lightning_hrp.engine.preheat import PreheatAdapters, PreheatMode
from lightning_hrp.engine.preheat_loop import (
    BatchSteps,
    PreheatStopped,
    RestoreFailedError,
    decompose_and_initialise,
    restored_on_failure,
    run_preheat,
)
from lightning_hrp.errors import HRPConfigurationError

OnFailure = Literal["raise", "continue"]
SvdDtype = Literal["float32", "float64"]
OptimizerFactory = Callable[[Iterable[Tensor]], Optimizer]

# Metrics logged once per preheat step, charted against PREHEAT_STEP.
_PER_STEP_METRICS = ("hrp/preheat_loss", "hrp/subspace_drift")


@dataclass
class LayerDiagnostics:
    """What preheating found in one layer."""

    name: str
    rank: int
    preheat_rank: int
    singular_values: list[float]
    energy_kept: float


@dataclass
class HRPReport:
    """Everything one preheat produced, for logging and plots.

    Attributes:
        preheat_losses: Mean loss per preheat step; NaN for a step whose batches were all skipped.
        skipped_batches: Batches for which ``training_step`` returned ``None`` (over all ranks).
        frozen_layers: LoRA layers with no trainable weight, left as they were.
        learned_nothing: Layers whose preheated update was exactly zero, left at their current init.
    """

    seed: int
    preheat_losses: list[float] = field(default_factory=list)
    subspace_drift: list[float] = field(default_factory=list)
    layers: list[LayerDiagnostics] = field(default_factory=list)
    preheat_seconds: float = 0.0
    decompose_seconds: float = 0.0
    skipped_batches: int = 0
    frozen_layers: list[str] = field(default_factory=list)
    learned_nothing: list[str] = field(default_factory=list)


class HRPPreheatCallback(Callback):
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
        mode: ``"classic"`` trains both preheat factors; ``"asymmetric"`` only ``B_p``, as in the
            paper's theory.
        init_rule: ``"direction"`` (the paper): ``A = c * V_r^T``, ``B = 0``, so the model's
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
            (implies tracking). A stopping rule the paper does not have.
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
    ) -> None:
        check_int("preheat_rank", preheat_rank, minimum=2)
        check_int("preheat_steps", preheat_steps, minimum=1)
        check_choice("mode", mode, PreheatMode)
        check_choice("init_rule", init_rule, InitRule)
        check_choice("direction_scale", direction_scale, DirectionScale)
        check_choice("svd_dtype", svd_dtype, SvdDtype)
        check_choice("on_failure", on_failure, OnFailure)
        check_bool("log_layer_metrics", log_layer_metrics)
        check_bool("track_subspace_drift", track_subspace_drift)
        if preheat_lr is not None and not is_positive_number(preheat_lr):
            raise HRPConfigurationError(f"preheat_lr must be a positive number or None (the main optimizer's), got {preheat_lr!r}.")
        if preheat_optimizer is not None and not callable(preheat_optimizer):
            raise HRPConfigurationError(
                f"preheat_optimizer must be a callable params -> Optimizer (e.g. functools.partial(torch.optim.SGD, "
                f"lr=0.1)) or None, got {preheat_optimizer!r}."
            )
        if preheat_lr is not None and preheat_optimizer is not None:
            raise HRPConfigurationError(
                "Give either preheat_lr (for the default AdamW) or preheat_optimizer (which sets its own "
                "learning rate), not both."
            )
        if drift_tolerance is not None and not (isinstance(drift_tolerance, float) and 0 < drift_tolerance < 1):
            raise HRPConfigurationError(f"drift_tolerance must be a float in (0, 1) or None, got {drift_tolerance!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise HRPConfigurationError(f"seed must be an int in [0, 2**63) or None (seed_everything's), got {seed!r}.")
        if adapter_name is not None and not isinstance(adapter_name, str):
            raise HRPConfigurationError(f"adapter_name must be a str or None, got {adapter_name!r}.")
        self.preheat_rank = preheat_rank
        self.preheat_steps = preheat_steps
        self.mode = mode
        self.init_rule = init_rule
        self.direction_scale = direction_scale
        self.preheat_lr = preheat_lr
        self.preheat_optimizer = preheat_optimizer
        self.adapter_name = adapter_name
        self.seed = seed
        self.svd_dtype = svd_dtype
        self.on_failure = on_failure
        self.log_layer_metrics = log_layer_metrics
        self.track_subspace_drift = track_subspace_drift or drift_tolerance is not None
        self.drift_tolerance = drift_tolerance
        self.report: HRPReport | None = None
        # Preheating is done for this fit when it ran in it, or when the checkpoint it resumes says so.
        self._preheated_in_this_fit = False
        self._restored_as_preheated = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(adapter_name=self.adapter_name)

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
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            raise HRPConfigurationError(
                "HRPPreheatCallback does not support DeepSpeed: ZeRO partitions the LoRA weights outside "
                "torch.distributed's DTensor/FSDP APIs that HRP writes through. Use strategy='ddp', 'fsdp' "
                "or ModelParallelStrategy."
            )
        if not pl_module.automatic_optimization:
            raise HRPConfigurationError(
                "HRPPreheatCallback needs automatic optimization: with manual optimization the "
                "training_step would step the main optimizer during preheating. Set "
                "self.automatic_optimization = True or drop the callback."
            )
        if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
            raise HRPConfigurationError(
                "HRPPreheatCallback feeds training_step one batch at a time; a training_step(dataloader_iter) "
                "would draw the main run's batches itself. Take (batch, batch_idx) or drop the callback."
            )
        if 0 <= trainer.max_steps < self.preheat_steps and not trainer.fast_dev_run:
            rank_zero_warn(
                f"max_steps={trainer.max_steps} is smaller than preheat_steps={self.preheat_steps}: preheating "
                "takes more optimizer steps than the main run. Preheating is meant to be a few percent of the run."
            )

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
        all_targets = find_lora_targets(pl_module, self.adapter_name)
        targets = [t for t in all_targets if t.trainable]
        self._check_targets(all_targets, targets)
        if not trainer.optimizers:
            raise HRPConfigurationError("HRP found no optimizer: configure_optimizers must return the main optimizer.")
        frozen = [t.name for t in all_targets if not t.trainable]
        if frozen:
            rank_zero_info(
                f"HRP: {len(frozen)} of {len(all_targets)} LoRA layers have no trainable weight (e.g. {frozen[0]}) and "
                "are left as they are; the trainable ones are preheated and initialised."
            )

        root = trainer.strategy.model
        # Whole copies, read through the strategy: under FSDP1 with use_orig_params=False the weights have
        # no valid local view outside summon_full_params.
        originals = read_lora_weights(root, targets)
        seed = self.seed if self.seed is not None else broadcast_int(torch.initial_seed() % 2**62)
        adapters = PreheatAdapters(targets, self.preheat_rank, self.mode, seed, device=trainer.strategy.root_device)
        report = HRPReport(seed=seed, frozen_layers=frozen)
        try:
            with restored_on_failure(root, targets, originals):
                self._preheat(trainer, pl_module, adapters, report)
                self._initialise(trainer, targets, originals, adapters, report)
        except PreheatStopped as stop:
            # SIGTERM reached some rank: every rank restored; now exit as Lightning does on SIGTERM.
            raise SIGTERMException() from stop
        except Exception as error:
            if isinstance(error, (HRPConfigurationError, RestoreFailedError)) or self.on_failure == "raise":
                raise
            # Every rank gets here together; each says why in its own words (a rank that failed gives its
            # reason, the others that another rank failed).
            message = (
                f"HRP preheating failed ({type(error).__name__}: {error}); the LoRA adapters keep their untouched "
                "default init, as on_failure='continue' asks."
            )
            warnings.warn(rank_prefixed_message(message, trainer.global_rank) if trainer.world_size > 1 else message, UserWarning)
        else:
            self.report = report
            self._log_summary(trainer, report)
        self._preheated_in_this_fit = True

    def _check_targets(self, all_targets: list[LoraTarget], targets: list[LoraTarget]) -> None:
        if not targets:
            raise HRPConfigurationError(
                f"Adapter {all_targets[0].adapter_name!r} has no trainable LoRA weight; HRP initialises adapters "
                "that will be trained. Make it trainable (peft's set_adapter, or requires_grad_(True))."
            )
        too_small = sorted({t.rank for t in targets if t.rank >= self.preheat_rank})
        if too_small:
            raise HRPConfigurationError(
                f"preheat_rank={self.preheat_rank} must exceed the LoRA rank (found r={too_small}); "
                f"preheating at rank 4r to 16r is typical, e.g. preheat_rank={4 * max(too_small)}."
            )
        too_narrow = [t for t in targets if t.rank > min(t.in_features, t.out_features)]
        if too_narrow:
            t = too_narrow[0]
            raise HRPConfigurationError(
                f"LoRA rank r={t.rank} exceeds min(in, out)={min(t.in_features, t.out_features)} of {t.name} "
                f"({len(too_narrow)} such layer(s)): no r independent directions exist there for HRP to choose. "
                "Lower r or leave the layer out of LoraConfig(target_modules=...)."
            )
        clamped = [t.name for t in targets if self.preheat_rank > min(t.in_features, t.out_features)]
        if clamped:
            rank_zero_warn(
                f"preheat_rank={self.preheat_rank} exceeds min(in, out) of {len(clamped)} layer(s) "
                f"(e.g. {clamped[0]}); their preheat adapters use rank min(in, out), the most they can express."
            )
        if self.init_rule == "keep_progress" and any(t.use_dora for t in targets):
            raise HRPConfigurationError(
                "init_rule='keep_progress' would change a DoRA adapter's weight norm after peft computed its "
                "magnitude; use init_rule='direction' with DoRA."
            )

    def _preheat(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, adapters: PreheatAdapters, report: HRPReport
    ) -> None:
        optimizer = self._make_optimizer(trainer, adapters.trainable())
        data = MainRunBatches(trainer)
        needed = self.preheat_steps * trainer.accumulate_grad_batches
        if data.per_pass < needed:
            rank_zero_warn(
                f"The main run sees {data.per_pass} training batches per epoch but preheating needs {needed} "
                "(preheat_steps x accumulate_grad_batches); they are cycled."
            )
        batches = iter(data)

        def fetch() -> tuple[Any, int]:
            batch, batch_idx = next(batches)
            return batch_to_device(trainer, batch), batch_idx

        def loss(batch: Any, batch_idx: int) -> Tensor | None:
            if batch is None:  # Lightning's loop skips a None batch too
                return None
            return loss_of(training_step(trainer, batch, batch_idx), "HRP")

        show_progress = trainer.is_global_zero and trainer.progress_bar_callback is not None
        start = time.perf_counter()
        with closing(data), isolated_from_main_run(trainer, pl_module), tqdm(
            total=self.preheat_steps, desc="HRP preheat", disable=not show_progress, leave=False, dynamic_ncols=True
        ) as progress:

            def on_step(step: int, loss: float, drift: float | None) -> None:
                # Here rather than before the loop: the loop agrees on an error raised here (rank 0 logs alone).
                if step == 0:
                    define_preheat_step_axis(trainer, _PER_STEP_METRICS)
                metrics: dict[str, float] = {PREHEAT_STEP: step}
                if not math.isnan(loss):  # a step whose batches were all skipped has no loss
                    metrics["hrp/preheat_loss"] = loss
                    progress.set_postfix(loss=f"{loss:.4g}")
                if drift is not None:
                    metrics["hrp/subspace_drift"] = drift
                log_metrics(trainer, metrics, step=trainer.global_step)
                progress.update(1)

            history = run_preheat(
                adapters,
                optimizer,
                BatchSteps(fetch=fetch, loss=loss, backward=lambda value: trainer.strategy.backward(value, optimizer)),
                trainer.strategy.model,
                steps=self.preheat_steps,
                accumulate=trainer.accumulate_grad_batches,
                optimizer_step=lambda opt, closure: trainer.strategy.optimizer_step(opt, closure=closure, model=pl_module),
                collective_model=_forward_communicates(trainer),
                stop_requested=lambda: trainer.received_sigterm,
                track_drift=self.track_subspace_drift,
                drift_tolerance=self.drift_tolerance,
                on_step=on_step,
            )
        report.preheat_losses = history.losses
        report.subspace_drift = history.subspace_drift
        report.skipped_batches = history.skipped_batches
        report.preheat_seconds = time.perf_counter() - start
        if len(history.losses) < self.preheat_steps:
            rank_zero_info(
                f"HRP: the top-r subspaces moved {history.subspace_drift[-1]:.2e} < drift_tolerance="
                f"{self.drift_tolerance} at preheat step {len(history.losses)}; preheating stopped early."
            )

    def _make_optimizer(self, trainer: pl.Trainer, params: list[Tensor]) -> Optimizer:
        if self.preheat_optimizer is not None:
            return self.preheat_optimizer(params)
        lr = self.preheat_lr
        if lr is None:
            group = trainer.optimizers[0].param_groups[0]
            # A warm-up scheduler may have set lr to ~0 already; initial_lr is the configured value.
            lr = group.get("initial_lr", group["lr"])
        return AdamW(params, lr=lr, weight_decay=0.0)

    def _initialise(
        self,
        trainer: pl.Trainer,
        targets: list[LoraTarget],
        originals: list[tuple[Tensor, Tensor]],
        adapters: PreheatAdapters,
        report: HRPReport,
    ) -> None:
        start = time.perf_counter()
        result = decompose_and_initialise(
            trainer.strategy.model,
            targets,
            adapters,
            originals,
            rule=self.init_rule,
            scale=self.direction_scale,
            dtype=getattr(torch, self.svd_dtype),
        )
        report.decompose_seconds = time.perf_counter() - start
        report.layers = [
            LayerDiagnostics(
                name=t.name,
                rank=t.rank,
                preheat_rank=preheat_rank,
                singular_values=s.S.tolist(),
                energy_kept=energy_kept(s.S, t.rank),
            )
            for t, s, preheat_rank in zip(targets, result.svds, adapters.ranks)
        ]
        report.learned_nothing = [t.name for t in result.learned_nothing]
        if result.learned_nothing:
            rank_zero_warn(
                f"The preheated update of {len(result.learned_nothing)} of {len(targets)} layer(s) (e.g. "
                f"{result.learned_nothing[0].name}) is exactly zero: the loss has no gradient through them. They keep "
                "their current init; the other layers start from HRP."
            )
        if result.weak and self.init_rule == "direction":
            rank_zero_warn(
                f"The preheated update of {len(result.weak)} layer(s) (e.g. {result.weak[0].name}) has rank below the "
                "LoRA rank, so some of their directions come from the preheat adapter's random start. More "
                "preheat_steps or a higher learning rate give preheating more to go on."
            )
        elif result.weak:
            rank_zero_warn(
                f"The preheated update of {len(result.weak)} layer(s) (e.g. {result.weak[0].name}) has rank below the "
                "LoRA rank: with init_rule='keep_progress' their directions beyond that rank start at zero in both A "
                "and B and get no gradient in the main run. Use init_rule='direction', or more preheat_steps."
            )

    def _log_summary(self, trainer: pl.Trainer, report: HRPReport) -> None:
        learned = [d for d in report.layers if d.name not in set(report.learned_nothing)]
        energies = [d.energy_kept for d in learned]
        metrics = {
            "hrp/preheat_seconds": report.preheat_seconds,
            "hrp/decompose_seconds": report.decompose_seconds,
            "hrp/energy_kept_mean": sum(energies) / len(energies),
            "hrp/energy_kept_min": min(energies),
        }
        if self.log_layer_metrics:
            for d, name in zip(report.layers, metric_layer_names([d.name for d in report.layers])):
                metrics[f"hrp/energy_kept/{name}"] = d.energy_kept
                metrics[f"hrp/sigma_1/{name}"] = d.singular_values[0]
        log_metrics(trainer, metrics, step=trainer.global_step)
        rank_zero_info(
            f"HRP: preheated {len(report.layers)} LoRA layers for {len(report.preheat_losses)} steps in "
            f"{report.preheat_seconds:.2f} s (decomposition {report.decompose_seconds:.3f} s); the top r "
            f"directions keep {metrics['hrp/energy_kept_mean']:.1%} of the preheated update's energy on average."
        )


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
