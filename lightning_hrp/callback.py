"""``HRPPreheatCallback``: High-Rank Preheating as one line in a Lightning ``Trainer``.

Thin Lightning glue over :mod:`lightning_hrp.engine`, in the manner of Lightning's
``LearningRateFinder`` over its tuner: arguments are checked in ``__init__``, the strategy in
``setup``, and the work happens once, at ``on_train_start``, on the already wrapped model.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import AdamW, Optimizer
from tqdm.auto import tqdm

from lightning_hrp.engine.decompose import energy_kept, subspace_drift, svd_of_products
from lightning_hrp.engine.distributed import (
    all_reduce_mean_,
    broadcast_int,
    read_lora_weights,
    shared_svd_of_products,
    write_lora_weights,
)
from lightning_hrp.engine.init_rules import DirectionScale, InitRule, new_adapter_weights
from lightning_hrp.engine.lora import LoraTarget, find_lora_targets
from lightning_hrp.engine.preheat import PreheatAdapters, PreheatMode
from lightning_hrp.errors import HRPConfigurationError, PreheatFailedError

OnFailure = Literal["raise", "continue"]
SvdDtype = Literal["float32", "float64"]
OptimizerFactory = Callable[[Iterable[Tensor]], Optimizer]


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
    """Everything one preheat produced, for logging and plots."""

    seed: int
    preheat_losses: list[float] = field(default_factory=list)
    subspace_drift: list[float] = field(default_factory=list)
    layers: list[LayerDiagnostics] = field(default_factory=list)
    preheat_seconds: float = 0.0
    decompose_seconds: float = 0.0


class HRPPreheatCallback(Callback):
    """Start the rank-r LoRA adapters from High-Rank Preheating (arXiv 2502.07739).

    At ``on_train_start`` every LoRA layer gets a temporary rank-``preheat_rank`` adapter, kept
    outside the (possibly wrapped or sharded) model. It is trained for ``preheat_steps`` optimizer
    steps through the strategy with the module's own ``training_step``; then the top singular
    directions of each preheated update initialise the rank-r adapter in place, the preheat
    adapters are removed, and training proceeds exactly as it would have otherwise: same optimizer
    objects, scheduler, data order (the global RNG is restored), ``global_step`` and epoch.

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
        seed: Seed of the preheat adapters' random start; by default rank 0's ``torch.initial_seed()``,
            so ``seed_everything`` governs it.
        svd_dtype: Dtype of the decomposition, whatever the training precision.
        on_failure: What a failed preheat does (a non-finite loss, adapter or decomposition, or an
            exception). Either way the model is first restored bit for bit. ``"raise"`` re-raises;
            ``"continue"`` warns and trains from the untouched default init. A ``KeyboardInterrupt``
            always propagates.
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
        _check_positive_int("preheat_rank", preheat_rank, minimum=2)
        _check_positive_int("preheat_steps", preheat_steps, minimum=1)
        _check_choice("mode", mode, PreheatMode)
        _check_choice("init_rule", init_rule, InitRule)
        _check_choice("direction_scale", direction_scale, DirectionScale)
        _check_choice("svd_dtype", svd_dtype, SvdDtype)
        _check_choice("on_failure", on_failure, OnFailure)
        if preheat_lr is not None and not (isinstance(preheat_lr, (int, float)) and math.isfinite(preheat_lr) and preheat_lr > 0):
            raise HRPConfigurationError(f"preheat_lr must be a positive number or None (the main optimizer's), got {preheat_lr!r}.")
        if drift_tolerance is not None and not (isinstance(drift_tolerance, float) and 0 < drift_tolerance < 1):
            raise HRPConfigurationError(f"drift_tolerance must be a float in (0, 1) or None, got {drift_tolerance!r}.")
        if preheat_lr is not None and preheat_optimizer is not None:
            raise HRPConfigurationError(
                "Give either preheat_lr (for the default AdamW) or preheat_optimizer (which sets its own "
                "learning rate), not both."
            )
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
        self._finished = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(adapter_name=self.adapter_name)

    def state_dict(self) -> dict[str, Any]:
        return {"preheat_finished": self._finished}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._finished = state_dict["preheat_finished"]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
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

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._finished:
            rank_zero_info("HRP: preheating already finished (restored from a checkpoint); not preheating again.")
            return
        targets = find_lora_targets(pl_module, self.adapter_name)
        self._check_targets(targets)
        if not trainer.optimizers:
            raise HRPConfigurationError("HRP found no optimizer: configure_optimizers must return the main optimizer.")

        # Whole copies, read through the strategy: under FSDP1 with use_orig_params=False the weights have
        # no valid local view outside summon_full_params.
        originals = read_lora_weights(trainer.strategy.model, targets)
        seed = self.seed if self.seed is not None else broadcast_int(torch.initial_seed() % 2**62)
        adapters = PreheatAdapters(targets, self.preheat_rank, self.mode, seed, device=trainer.strategy.root_device)
        report = HRPReport(seed=seed)
        try:
            self._preheat(trainer, pl_module, adapters, report)
            self._initialise(trainer, targets, originals, adapters, report)
        except BaseException as error:
            write_lora_weights(trainer.strategy.model, targets, originals)
            if not isinstance(error, Exception) or self.on_failure == "raise":
                raise
            rank_zero_warn(
                f"HRP preheating failed ({type(error).__name__}: {error}); the LoRA adapters keep their "
                "untouched default init, as on_failure='continue' asks."
            )
        else:
            self.report = report
            self._log_summary(trainer, report)
        self._finished = True

    def _check_targets(self, targets: list[LoraTarget]) -> None:
        if not any(t.trainable for t in targets):
            raise HRPConfigurationError(
                f"Adapter {targets[0].adapter_name!r} has no trainable LoRA weight; HRP initialises adapters "
                "that will be trained. Make it trainable (peft's set_adapter, or requires_grad_(True))."
            )
        too_small = sorted({t.rank for t in targets if t.rank >= self.preheat_rank})
        if too_small:
            raise HRPConfigurationError(
                f"preheat_rank={self.preheat_rank} must exceed the LoRA rank (found r={too_small}); "
                f"preheating at rank 4r to 16r is typical, e.g. preheat_rank={4 * max(too_small)}."
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
        params = adapters.trainable()
        optimizer = self._make_optimizer(trainer, params)
        batches = _preheat_batches(trainer, pl_module, self.preheat_steps * trainer.accumulate_grad_batches)
        show_progress = trainer.is_global_zero and trainer.progress_bar_callback is not None
        start = time.perf_counter()
        directions: list[Tensor] | None = None
        with closing(batches), _isolated_from_main_run(trainer, pl_module), adapters.attached(), tqdm(
            total=self.preheat_steps, desc="HRP preheat", disable=not show_progress, leave=False, dynamic_ncols=True
        ) as progress:
            for step in range(self.preheat_steps):
                step_loss: list[Tensor] = []

                def closure() -> Tensor | None:
                    loss = _accumulate_gradients(trainer, optimizer, batches, trainer.accumulate_grad_batches)
                    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                    for p, grad in zip(params, grads):
                        p.grad = grad
                    loss_buffer = torch.stack([loss.to(grads[0]) if loss is not None else grads[0].new_tensor(0.0)])
                    all_reduce_mean_([*grads, loss_buffer])
                    step_loss.append(loss_buffer[0])
                    return loss_buffer[0]

                trainer.strategy.optimizer_step(optimizer, closure=closure, model=pl_module)
                optimizer.zero_grad(set_to_none=True)
                # The main run's trainable weights got gradients too; they must not leak into its first step.
                pl_module.zero_grad(set_to_none=True)
                loss = float(step_loss[0])
                if not math.isfinite(loss):
                    raise PreheatFailedError(f"the preheat loss is {loss} at preheat step {step}.")
                report.preheat_losses.append(loss)
                metrics = {"hrp/preheat_loss": loss}
                if self.track_subspace_drift:
                    previous, directions = directions, _top_directions(adapters)
                    if previous is not None:
                        drift = sum(map(subspace_drift, previous, directions)) / len(directions)
                        report.subspace_drift.append(drift)
                        metrics["hrp/subspace_drift"] = drift
                _log(trainer, metrics, step=step)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4g}")
                settled = (
                    self.drift_tolerance is not None
                    and bool(report.subspace_drift)
                    and report.subspace_drift[-1] < self.drift_tolerance
                )
                # Each rank computes its own drift; should two ever round it differently, a rank stopping
                # alone would hang the others' next all-reduce, so rank 0 decides for all.
                if self.drift_tolerance is not None and broadcast_int(int(settled)):
                    rank_zero_info(
                        f"HRP: the top-r subspaces moved {report.subspace_drift[-1]:.2e} < drift_tolerance="
                        f"{self.drift_tolerance} at preheat step {step + 1}; preheating stops early."
                    )
                    break
        if not adapters.all_finite():
            raise PreheatFailedError("a preheat adapter holds NaN or Inf after preheating.")
        report.preheat_seconds = time.perf_counter() - start

    def _make_optimizer(self, trainer: pl.Trainer, params: list[Tensor]) -> Optimizer:
        if self.preheat_optimizer is not None:
            return self.preheat_optimizer(params)
        lr = self.preheat_lr
        if lr is None:
            group = trainer.optimizers[0].param_groups[0]
            # A warm-up scheduler may have set lr to ~0 already; initial_lr is the configured value.
            lr = group.get("initial_lr", group["lr"])
        return AdamW(params, lr=lr, weight_decay=0.0)

    @torch.no_grad()
    def _initialise(
        self,
        trainer: pl.Trainer,
        targets: list[LoraTarget],
        originals: list[tuple[Tensor, Tensor]],
        adapters: PreheatAdapters,
        report: HRPReport,
    ) -> None:
        start = time.perf_counter()
        svds = shared_svd_of_products(
            adapters.products(), [t.rank for t in targets], dtype=getattr(torch, self.svd_dtype)
        )
        if not all(bool(torch.isfinite(s.S).all() and torch.isfinite(s.Vh).all()) for s in svds):
            raise PreheatFailedError("the decomposition of a preheated update holds NaN or Inf.")
        new_weights = [
            new_adapter_weights(
                svd,
                rule=self.init_rule,
                scale=self.direction_scale,
                current_A=current_A,
                preheat_scaling=preheat_scaling,
                scaling=target.scaling,
            )
            for target, svd, preheat_scaling, (current_A, _) in zip(targets, svds, adapters.scalings, originals)
        ]
        write_lora_weights(trainer.strategy.model, targets, new_weights)
        report.decompose_seconds = time.perf_counter() - start
        report.layers = [
            LayerDiagnostics(
                name=t.name,
                rank=t.rank,
                preheat_rank=preheat_rank,
                singular_values=s.S.tolist(),
                energy_kept=energy_kept(s.S, t.rank),
            )
            for t, s, preheat_rank in zip(targets, svds, adapters.ranks)
        ]
        weak = [d.name for d in report.layers if not d.singular_values[d.rank - 1] > 1e-6 * d.singular_values[0]]
        if weak:
            rank_zero_warn(
                f"The preheated update of {len(weak)} layer(s) (e.g. {weak[0]}) has rank below the LoRA rank, so "
                "some of their directions come from the preheat adapter's random start. More preheat_steps "
                "or a higher learning rate give preheating more to go on."
            )

    def _log_summary(self, trainer: pl.Trainer, report: HRPReport) -> None:
        energies = [d.energy_kept for d in report.layers]
        metrics = {
            "hrp/preheat_seconds": report.preheat_seconds,
            "hrp/decompose_seconds": report.decompose_seconds,
            "hrp/energy_kept_mean": sum(energies) / len(energies),
            "hrp/energy_kept_min": min(energies),
        }
        if self.log_layer_metrics:
            for d in report.layers:
                metrics[f"hrp/energy_kept/{d.name}"] = d.energy_kept
                metrics[f"hrp/sigma_1/{d.name}"] = d.singular_values[0]
        _log(trainer, metrics, step=trainer.global_step)
        rank_zero_info(
            f"HRP: preheated {len(report.layers)} LoRA layers for {self.preheat_steps} steps in "
            f"{report.preheat_seconds:.2f} s (decomposition {report.decompose_seconds:.3f} s); the top r "
            f"directions keep {metrics['hrp/energy_kept_mean']:.1%} of the preheated update's energy on average."
        )


def _top_directions(adapters: PreheatAdapters) -> list[Tensor]:
    tops = [target.rank for target in adapters.targets]
    return [svd.Vh for svd in svd_of_products(adapters.products(), tops)]


def _check_positive_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise HRPConfigurationError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_choice(name: str, value: Any, choices: Any) -> None:
    if value not in get_args(choices):
        raise HRPConfigurationError(f"{name} must be one of {list(get_args(choices))}, got {value!r}.")


def _log(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(dict(metrics), step=step)


def _preheat_batches(trainer: pl.Trainer, pl_module: pl.LightningModule, needed: int) -> Iterator[tuple[Any, int]]:
    """``(batch, batch_idx)`` on the device from a fresh pass over the train dataloader, cycled if short.

    A fresh iterator leaves the main loop's own iteration untouched.
    """
    loaders = trainer.train_dataloader
    if loaders is None:
        raise HRPConfigurationError("HRP needs a train dataloader to preheat on; none is set for this fit.")
    batch_idx = 0
    while True:
        produced = 0
        for batch, _, dataloader_idx in CombinedLoader(loaders, "max_size_cycle"):
            batch = trainer.precision_plugin.convert_input(batch)
            batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=dataloader_idx)
            batch = call._call_strategy_hook(trainer, "batch_to_device", batch, dataloader_idx=dataloader_idx)
            yield batch, batch_idx
            batch_idx += 1
            produced += 1
        if produced == 0:
            raise HRPConfigurationError("The train dataloader is empty; HRP has nothing to preheat on.")
        if batch_idx == produced and produced < needed:
            rank_zero_warn(
                f"The train dataloader has {produced} batches but preheating needs {needed} "
                "(preheat_steps x accumulate_grad_batches); it is cycled."
            )


def _accumulate_gradients(
    trainer: pl.Trainer, optimizer: Optimizer, batches: Iterator[tuple[Any, int]], accumulate: int
) -> Tensor | None:
    """Forward and backward ``accumulate`` batches through the strategy; the mean loss, or None if all skipped."""
    total: Tensor | None = None
    for _ in range(accumulate):
        batch, batch_idx = next(batches)
        output = call._call_strategy_hook(trainer, "training_step", batch, batch_idx)
        loss = _loss_of(output)
        if loss is None:
            continue
        loss = loss / accumulate
        trainer.strategy.backward(loss, optimizer)
        total = loss.detach() if total is None else total + loss.detach()
    return total


def _loss_of(output: Any) -> Tensor | None:
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "loss" in output:
        return output["loss"]
    raise HRPConfigurationError(
        f"training_step returned {type(output).__name__}; HRP preheats on its loss, so it must return the loss "
        "tensor, a dict with key 'loss', or None to skip the batch."
    )


@contextmanager
def _isolated_from_main_run(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Leave no trace of preheating in the main run's metrics, RNG, grad scaler or gradients."""
    epoch_loop = trainer.fit_loop.epoch_loop
    main_results = epoch_loop._results
    # What training_step logs with self.log during preheating goes to a throwaway collection.
    epoch_loop._results = _ResultCollection(training=True)
    # MixedPrecision and FSDPPrecision hold a GradScaler (for 16-mixed), whose scale preheating adjusts.
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    scaler_state = scaler.state_dict() if scaler is not None else None
    python_rng = random.getstate()
    cuda_devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        epoch_loop._results = main_results
        if scaler is not None:
            scaler.load_state_dict(scaler_state)
        random.setstate(python_rng)
        pl_module.zero_grad(set_to_none=True)
