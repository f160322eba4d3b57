"""One HRP run, shared by every entry point: plain torch and peft, no Lightning, no transformers.

:func:`preheat_and_initialise` finds the LoRA layers, checks them, reads the adapters' originals,
agrees on the seed, preheats (:func:`~lightning_hrp.engine.preheat_loop.run_preheat`), decomposes
and writes the rank-r starts, restores the originals on failure, applies ``on_failure`` and
returns the report. What differs between entry points (the Lightning callback, ``hrp_init``, the
transformers callback) is an :class:`EntryPoint`: where the model and its batches are, how a batch
becomes a loss and a backward pass, and how messages reach the user.
"""

from __future__ import annotations

import logging
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from lightning_hrp.engine.decompose import energy_kept
from lightning_hrp.engine.distributed import broadcast_int, rank_and_world_size, read_lora_weights
from lightning_hrp.engine.isolation import RestoreFailedError, restore_values, restored_on_failure
from lightning_hrp.engine.lora import LoraTarget, find_lora_targets
from lightning_hrp.engine.preheat import PreheatAdapters, layer_preheat_rank
from lightning_hrp.engine.preheat_memory import FREE_MEMORY_SHARE, PreheatMemory, estimate_preheat_memory, free_memory
from lightning_hrp.engine.preheat_loop import BatchSteps, decompose_and_initialise, run_preheat
from lightning_hrp.engine.quantized import cpu_inference_packed_layers
from lightning_hrp.engine.resize import check_resizable
from lightning_hrp.engine.untrained import TrainedAdapters, find_trained_adapters, mark_initialised_by_hrp, residual_init
from lightning_hrp.errors import HRPConfigurationError
from lightning_hrp.options import HRPOptions
from lightning_hrp.report import HRPReport, LayerDiagnostics, allocation_summary, summary_metrics

log = logging.getLogger("lightning_hrp")


class EntryPoint(ABC):
    """What one entry point supplies to :func:`preheat_and_initialise`; a new one is made for every run.

    Args:
        model: Where the LoRA layers are searched: the user's module, inside any DDP wrapper.
        root: The model as the strategy wrapped it; the LoRA weights are read and written through it
            (collectively under FSDP1) and its parameters are frozen while preheating.
        device: Where the preheat adapters live; ``None``: beside each LoRA weight.
        accumulate: Batches per preheat optimizer step.
        collective_model: Whether a preheat forward and backward communicate (FSDP, SyncBatchNorm on
            several processes); see :func:`~lightning_hrp.engine.preheat_loop.run_preheat`.
    """

    def __init__(
        self,
        model: nn.Module,
        root: nn.Module,
        *,
        device: torch.device | None = None,
        accumulate: int = 1,
        collective_model: bool = False,
    ) -> None:
        self.model = model
        self.root = root
        self.device = device
        self.accumulate = accumulate
        self.collective_model = collective_model

    @abstractmethod
    def preheating(self, optimizer: Optimizer, steps: int) -> AbstractContextManager[BatchSteps]:
        """Open the batches and isolate the block from the main run; yield how one batch runs.

        Everything the block changes outside the adapters (RNG states, data iterators, logged
        values) must be as it was when the block exits, also on failure.

        Args:
            optimizer: The preheat optimizer (the backward may need it, e.g. for gradient scaling).
            steps: Preheat optimizer steps (each of ``accumulate`` batches), for messages and progress.
        """

    def main_learning_rate(self) -> float | None:
        """The main run's learning rate, the default preheat learning rate; ``None`` if there is none."""
        return None

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Tensor | None]) -> None:
        """Step the preheat optimizer once, calling ``closure`` for the step's forward and backward passes."""
        optimizer.step(closure)

    def main_optimizers(self) -> list[Optimizer]:
        """The main run's optimizers, already built (their state for the adapters is checked and, on re-initialising, cleared)."""
        return []

    def stop_requested(self) -> bool:
        """Whether this process was asked to stop (e.g. SIGTERM); polled before each batch."""
        return False

    def on_step(self, step: int, loss: float, drift: float | None) -> None:
        """After each preheat step (loss NaN if every batch was skipped; drift ``None`` unless tracked)."""

    def warn(self, message: str) -> None:
        """A warning for the user, once (from rank 0)."""
        warn_on_rank_zero(message)

    def info(self, message: str) -> None:
        """An informational message, once (from rank 0)."""
        info_on_rank_zero(message)


def preheat_and_initialise(options: HRPOptions, entry: EntryPoint) -> HRPReport | None:
    """Preheat the LoRA adapters of ``entry.model`` and start them from the preheated directions.

    Nothing changes before every check has passed; a failure restores the adapters bit for bit
    before it propagates; every rank takes the same path.

    Returns:
        The report, or ``None`` if preheating failed and ``options.on_failure == "continue"`` (the
        adapters then keep their untouched init, and every rank warned).

    Raises:
        HRPConfigurationError: Bad input (before anything changes, or found while preheating, after the
            restore), whatever ``on_failure`` says.
        PreheatFailedError: A failed preheat with ``on_failure="raise"``.
        RestoreFailedError: Restoring the originals failed.
        PreheatStopped: A stop was requested on some rank (after restoring).
    """
    main_lr = entry.main_learning_rate() if options.needs_main_lr else None
    if options.needs_main_lr and main_lr is None:
        raise HRPConfigurationError(
            "preheat_lr is needed: there is no main optimizer to take the learning rate from. Give preheat_lr "
            "(the main run's learning rate is a good start) or preheat_optimizer."
        )
    all_targets = find_lora_targets(entry.model, options.adapter_name)
    targets = [t for t in all_targets if t.trainable]
    check_targets(options, all_targets, targets, entry.warn)
    if options.rank_budget is not None:
        check_rank_budget(options, entry.root, targets)
    packed = cpu_inference_packed_layers(entry.model)
    if packed:
        raise HRPConfigurationError(
            f"bitsandbytes repacked {len(packed)} 4-bit layer(s) (e.g. {packed[0]}) for CPU inference at an eval-mode "
            "forward without gradients, and such a layer passes no gradient back to its input: neither preheating "
            "nor training can reach the LoRA layers before it. Call model.state_dict() once to unpack them, and run "
            "no eval-mode forward (evaluation, a sanity check, generation) before training."
        )
    frozen = [t.name for t in all_targets if not t.trainable]
    if frozen:
        entry.info(
            f"HRP: {len(frozen)} of {len(all_targets)} LoRA layers have no trainable weight (e.g. {frozen[0]}) and "
            "are left as they are; the trainable ones are preheated and initialised."
        )

    other_names, others = other_trainable_params(options, entry, all_targets)
    # Whole copies, read through the wrapped model: under FSDP1 with use_orig_params=False the weights
    # have no valid local view outside summon_full_params.
    originals = read_lora_weights(entry.root, targets)
    trained = _trained_adapters(entry, targets, originals)
    if trained and not options.reinitialise_trained:
        raise HRPConfigurationError(
            f"HRP would overwrite adapters that are not at their untrained start: {trained.describe()}. Nothing was "
            "changed. HRP initialises fresh adapters (peft's default start, B = 0): build the peft model anew (and the "
            "optimizer after HRP), or resume from the checkpoint that holds the run; to re-initialise these adapters "
            "anyway, discarding their current update, pass reinitialise_trained=True."
        )
    if trained and trained.residual_init is not None:  # with B = 0 already, the output stays the residual's
        entry.warn(
            f"reinitialise_trained=True on adapters started by the {trained.residual_init!r} init: the base weights "
            "hold the residual W0 - s B A, so after HRP writes B = 0 the model's output is the residual's, not the "
            "original model's."
        )
    saved_others = [(p, p.detach().clone()) for p in others]
    seed = options.seed if options.seed is not None else broadcast_int(torch.initial_seed() % 2**62)
    adapters = PreheatAdapters(
        targets, options.preheat_rank, options.mode, seed, device=entry.device,
        zero_updates=[not bool(B.any()) for _, B in originals], dtype=options.preheat_torch_dtype,
    )  # fmt: skip
    report = HRPReport(seed=seed, frozen_layers=frozen, other_params=other_names, rank_budget=options.rank_budget)
    try:
        with restored_on_failure(entry.root, targets, originals, saved_others) as undo_on_failure:
            _preheat(options, entry, adapters, others, main_lr, report)
            _initialise(options, entry, targets, originals, adapters, report, undo_on_failure)
            if options.other_params == "train_and_discard":
                restore_values(saved_others)
    except Exception as error:
        if isinstance(error, (HRPConfigurationError, RestoreFailedError)) or options.on_failure == "raise":
            raise
        # Every rank gets here together; each says why in its own words (a rank that failed gives its
        # reason, the others that another rank failed).
        rank, world_size = rank_and_world_size()
        message = (
            f"HRP preheating failed ({type(error).__name__}: {error}); the LoRA adapters keep their untouched "
            "default init, as on_failure='continue' asks."
        )
        warnings.warn(f"[rank: {rank}] {message}" if world_size > 1 else message, UserWarning, stacklevel=2)
        return None
    initialised = [t for t in targets if t.name not in report.learned_nothing]
    mark_initialised_by_hrp(t.lora_A for t in initialised)
    if options.reinitialise_trained:  # without it the check above found no state to clear
        _clear_optimizer_state(entry, initialised)
    mean_energy = summary_metrics(report, layer_metrics=False)["hrp/energy_kept_mean"]
    entry.info(
        f"HRP: preheated {len(report.layers)} LoRA layers for {len(report.preheat_losses)} steps in "
        f"{report.preheat_seconds:.2f} s (decomposition {report.decompose_seconds:.3f} s); the top r "
        f"directions keep {mean_energy:.1%} of the preheated update's energy on average."
    )
    if options.rank_budget is not None:
        entry.info(allocation_summary(report))
    return report


def _trained_adapters(entry: EntryPoint, targets: list[LoraTarget], originals: list[tuple[Tensor, Tensor]]) -> TrainedAdapters:
    with_state = [t.name for t in targets if any(_has_state(opt, t) for opt in entry.main_optimizers())]
    return find_trained_adapters(
        targets, originals, residual=residual_init(entry.model, targets), optimizer_state=with_state
    )


def _has_state(optimizer: Optimizer, target: LoraTarget) -> bool:
    return bool(optimizer.state.get(target.lora_A)) or bool(optimizer.state.get(target.lora_B))


def _clear_optimizer_state(entry: EntryPoint, targets: list[LoraTarget]) -> None:
    """Drop the main optimizers' state of the re-initialised weights: old moments do not fit the new start."""
    for optimizer in entry.main_optimizers():
        for t in targets:
            optimizer.state.pop(t.lora_A, None)
            optimizer.state.pop(t.lora_B, None)


def check_targets(
    options: HRPOptions, all_targets: list[LoraTarget], targets: list[LoraTarget], warn: Callable[[str], None]
) -> None:
    """Refuse what HRP cannot initialise (raising :class:`HRPConfigurationError`); warn about clamped ranks."""
    if not targets:
        raise HRPConfigurationError(
            f"Adapter {all_targets[0].adapter_name!r} has no trainable LoRA weight; HRP initialises adapters "
            "that will be trained. Make it trainable (peft's set_adapter, or requires_grad_(True))."
        )
    too_small = sorted({t.rank for t in targets if t.rank >= options.preheat_rank})
    if too_small:
        raise HRPConfigurationError(
            f"preheat_rank={options.preheat_rank} must exceed the LoRA rank (found r={too_small}); "
            f"e.g. preheat_rank={4 * max(too_small)} (4r)."
        )
    too_narrow = [t for t in targets if t.rank > min(t.in_features, t.out_features)]
    if too_narrow:
        t = too_narrow[0]
        raise HRPConfigurationError(
            f"LoRA rank r={t.rank} exceeds min(in, out)={min(t.in_features, t.out_features)} of {t.name} "
            f"({len(too_narrow)} such layer(s)): no r independent directions exist there for HRP to choose. "
            "Lower r or leave the layer out of LoraConfig(target_modules=...)."
        )
    if options.init_rule == "keep_progress" and any(t.use_dora for t in targets):
        raise HRPConfigurationError(
            "init_rule='keep_progress' would change a DoRA adapter's weight norm after peft computed its "
            "magnitude; use init_rule='direction' with DoRA."
        )
    clamped = [t.name for t in targets if options.preheat_rank > min(t.in_features, t.out_features)]
    if clamped:
        warn(
            f"preheat_rank={options.preheat_rank} exceeds min(in, out) of {len(clamped)} layer(s) "
            f"(e.g. {clamped[0]}); their preheat adapters use rank min(in, out), the most they can express."
        )


def other_trainable_params(
    options: HRPOptions, entry: EntryPoint, all_targets: list[LoraTarget]
) -> tuple[list[str], list[nn.Parameter]]:
    """The model's trainable parameters besides the LoRA weights (e.g. a fresh classification head), by name,
    that preheating trains with them; none with ``other_params="frozen"``.

    Raises:
        HRPConfigurationError: ``other_params`` trains them under FSDP, where they are sharded.
    """
    if options.other_params == "frozen":
        return [], []
    lora = {id(p) for t in all_targets for p in (t.lora_A, t.lora_B)}
    named = [(name, p) for name, p in entry.model.named_parameters() if p.requires_grad and id(p) not in lora]
    sharded = [name for name, p in named if isinstance(p, DTensor)] or [
        type(m).__name__ for m in entry.root.modules() if isinstance(m, (FSDPModule, FullyShardedDataParallel))
    ]
    if named and sharded:
        raise HRPConfigurationError(
            f"other_params={options.other_params!r} trains the model's other parameters (e.g. {named[0][0]}) during "
            "preheating, which HRP supports on unsharded parameters only (one process, DDP); under FSDP they are sharded "
            f"({sharded[0]}). Use other_params='frozen' with FSDP."
        )
    return [name for name, _ in named], [p for _, p in named]


def check_rank_budget(options: HRPOptions, root: nn.Module, targets: list[LoraTarget]) -> None:
    """Refuse a ``rank_budget`` that cannot be placed, or a model whose adapters cannot change shape."""
    most = sum(layer_preheat_rank(t, options.preheat_rank) for t in targets)
    if not len(targets) <= options.rank_budget <= most:
        raise HRPConfigurationError(
            f"rank_budget={options.rank_budget} must lie between the number of trainable LoRA layers ({len(targets)}: "
            f"each gets at least rank 1) and the sum of their preheat ranks ({most}: no layer can take more directions "
            f"than preheating finds); the same rank r everywhere is rank_budget={sum(t.rank for t in targets)}."
        )
    check_resizable(root, targets)


def _preheat(
    options: HRPOptions,
    entry: EntryPoint,
    adapters: PreheatAdapters,
    others: list[nn.Parameter],
    main_lr: float | None,
    report: HRPReport,
) -> None:
    optimizer = options.make_optimizer([*adapters.trainable(), *others], main_lr)
    report.preheat_memory_bytes = _check_memory(entry, adapters, others, optimizer).total
    start = time.perf_counter()
    with entry.preheating(optimizer, options.preheat_steps) as batch_steps:
        history = run_preheat(
            adapters,
            optimizer,
            batch_steps,
            entry.root,
            steps=options.preheat_steps,
            accumulate=entry.accumulate,
            optimizer_step=entry.optimizer_step,
            collective_model=entry.collective_model,
            stop_requested=entry.stop_requested,
            track_drift=options.tracks_drift,
            drift_tolerance=options.drift_tolerance,
            on_step=entry.on_step,
            other_params=others,
        )
    report.preheat_losses = history.losses
    report.subspace_drift = history.subspace_drift
    report.skipped_batches = history.skipped_batches
    report.preheat_seconds = time.perf_counter() - start
    if len(history.losses) < options.preheat_steps:
        entry.info(
            f"HRP: the top-r subspaces moved {history.subspace_drift[-1]:.2e} < drift_tolerance="
            f"{options.drift_tolerance} at preheat step {len(history.losses)}; preheating stopped early."
        )


def _check_memory(entry: EntryPoint, adapters: PreheatAdapters, others: list[Tensor], optimizer: Optimizer) -> PreheatMemory:
    """Log what preheating will hold; warn when that exceeds ``FREE_MEMORY_SHARE`` of the free memory.

    ``others``: the module's other parameters trained while preheating (``other_params``): their gradients count too.
    """
    trained = [*adapters.trainable(), *others]
    left_out = {id(t) for t in adapters.left_out}
    skipped = [t.rank if id(t) in left_out else 0 for t in adapters.targets]
    memory = estimate_preheat_memory(adapters.A, adapters.B, trained, optimizer, skipped, rank_and_world_size()[1])
    device = adapters.B[0].device
    entry.info(f"HRP: preheating will hold {memory.describe()} per process on {device}.")
    free = free_memory(device)
    if free is not None and memory.total > FREE_MEMORY_SHARE * free:
        entry.warn(
            f"HRP: preheating will hold {memory.total / 2**30:.3g} GiB on {device}, more than {FREE_MEMORY_SHARE:.0%} of the "
            f"{free / 2**30:.3g} GiB free there ({memory.describe()}). It may run out of memory; preheat_dtype='bfloat16', "
            "preheat_optimizer=functools.partial(lightning_hrp.FactoredRMS, lr=...) (no per-entry state), a lower "
            "preheat_rank or mode='asymmetric' "
            "need less."
        )
    return memory


def _initialise(
    options: HRPOptions,
    entry: EntryPoint,
    targets: list[LoraTarget],
    originals: list[tuple[Tensor, Tensor]],
    adapters: PreheatAdapters,
    report: HRPReport,
    undo_on_failure: list[Callable[[], None]],
) -> None:
    start = time.perf_counter()
    result = decompose_and_initialise(
        entry.root,
        targets,
        adapters,
        originals,
        rule=options.init_rule,
        scale=options.direction_scale,
        dtype=options.svd_torch_dtype,
        budget=options.budget,
        undo_on_failure=undo_on_failure,
    )
    report.decompose_seconds = time.perf_counter() - start
    ranks_before = result.ranks_before or [None] * len(targets)
    report.layers = [
        LayerDiagnostics(
            name=t.name,
            rank=t.rank,
            preheat_rank=preheat_rank,
            singular_values=s.S.tolist(),
            energy_kept=energy_kept(s.S, t.rank),
            rank_before=before,
        )
        for t, s, preheat_rank, before in zip(targets, result.svds, adapters.ranks, ranks_before)
    ]
    report.learned_nothing = [t.name for t in result.learned_nothing]
    if result.learned_nothing:
        entry.warn(
            f"The preheated update of {len(result.learned_nothing)} of {len(targets)} layer(s) (e.g. "
            f"{result.learned_nothing[0].name}) is exactly zero: the loss has no gradient through them. They keep "
            "their current init; the other layers start from HRP."
        )
    if result.weak and options.init_rule == "direction":
        entry.warn(
            f"The preheated update of {len(result.weak)} layer(s) (e.g. {result.weak[0].name}) has rank below the "
            "LoRA rank, so some of their directions come from the preheat adapter's random start. More "
            "preheat_steps or a higher learning rate give preheating more to go on."
        )
    elif result.weak:
        entry.warn(
            f"The preheated update of {len(result.weak)} layer(s) (e.g. {result.weak[0].name}) has rank below the "
            "LoRA rank: with init_rule='keep_progress' their directions beyond that rank start at zero in both A "
            "and B and get no gradient in the main run. Use init_rule='direction', or more preheat_steps."
        )


def forward_communicates(network: nn.Module) -> bool:
    """Whether a forward/backward of ``network`` issues collectives: FSDP (1 or 2) or SyncBatchNorm on several processes.

    ``network`` is what the preheat forward runs through; a DDP wrapper around it does not count.
    """
    if rank_and_world_size()[1] == 1:
        return False
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel, nn.SyncBatchNorm)) for m in network.modules())


def warn_on_rank_zero(message: str) -> None:
    """``warnings.warn`` on rank 0 of the default process group (or in a single process)."""
    if rank_and_world_size()[0] == 0:
        warnings.warn(message, UserWarning, stacklevel=3)


def info_on_rank_zero(message: str) -> None:
    """Log ``message`` at INFO on the ``lightning_hrp`` logger, from rank 0 only."""
    if rank_and_world_size()[0] == 0:
        log.info(message)

