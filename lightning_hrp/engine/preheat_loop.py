"""The preheat loop and the decomposition step, shared by every entry point: plain torch, no Lightning.

An entry point (through :mod:`lightning_hrp.orchestration`) supplies what one batch is and how it
becomes a loss and a backward pass (:class:`BatchSteps`). This module does the rest:
optimizer steps with gradient accumulation, one all-reduce per step of the preheat gradients that
also carries every rank's failure flags, agreement on failure so that no rank is left waiting in a
collective, the finite and "learned something" checks, subspace-drift tracking, and leaving the
main run's model exactly as it was (no gradient, no gradient synchronisation, no buffer change,
no partial restore even under a second Ctrl-C).

What "every rank agrees" covers, per kind of model (``collective_model``):

* One process, or DDP when the entry point runs the forward outside DDP's wrapper (the callback
  does): a preheat forward and backward issue no collective, so every failure (a batch that cannot
  be fetched, an exception in the forward or backward, a missing loss) is agreed on at the step's
  gradient all-reduce, and every rank then raises or restores together.
* FSDP1/FSDP2 (``collective_model=True``): the forward and backward themselves all-gather. Ranks
  agree before each forward (fetch failures, a stop request) and after it (exceptions in the
  forward, a missing or skipped loss), so a failure there never strands a rank. A failure *inside*
  the sharded model's forward or backward on one rank only cannot be agreed on: the other ranks
  wait in FSDP's all-gather until the process group's timeout ends the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_hrp.engine.allocation import RankBudget, agreed_ranks
from lightning_hrp.engine.decompose import ProductSVD, subspace_drift, svd_of_products
from lightning_hrp.engine.distributed import (
    all_reduce_mean_,
    broadcast_int,
    mean_over_ranks,
    rank_and_world_size,
    shared_svd_of_products,
    write_lora_weights,
)
from lightning_hrp.engine.init_rules import DirectionScale, InitRule, new_adapter_weights
from lightning_hrp.engine.isolation import main_run_untouched
from lightning_hrp.engine.lora import LoraTarget
from lightning_hrp.engine.preheat import PreheatAdapters
from lightning_hrp.engine.resize import guard_against_stale_optimizers, resize_adapters
from lightning_hrp.errors import HRPConfigurationError, PreheatFailedError, reevaluating_optimizer_refused

# A layer whose preheated update has a singular value r below this share of its largest has fewer
# than r directions of its own.
WEAK_DIRECTION = 1e-6


class PreheatStopped(BaseException):
    """A stop was requested (e.g. SIGTERM) on some rank; every rank stopped at the same point.

    A ``BaseException``, like ``KeyboardInterrupt``: no ``on_failure`` setting swallows it.
    """


@dataclass
class BatchSteps:
    """How one batch of preheating runs, supplied by the entry point.

    Attributes:
        fetch: The next ``(batch, batch_idx)``, on the device; raises if there is none.
        loss: The batch's loss from the model's own forward, or ``None`` to skip the batch.
        backward: Backpropagates a loss (already divided by the accumulation count).
    """

    fetch: Callable[[], tuple[Any, int]]
    loss: Callable[[Any, int], Tensor | None]
    backward: Callable[[Tensor], None]


@dataclass
class PreheatHistory:
    """What the loop saw, identical on every rank.

    Attributes:
        losses: Mean preheat loss per optimizer step (over its batches and the ranks); NaN for a
            step whose batches were all skipped.
        subspace_drift: Drift of the top-r subspaces after each step but the first, if tracked.
        batches_with_loss: Batches that gave a loss, summed over ranks.
        skipped_batches: Batches the model skipped (loss ``None``), summed over ranks.
        last_loss: The latest step's mean loss (NaN if all its batches were skipped).
    """

    losses: list[float] = field(default_factory=list)
    subspace_drift: list[float] = field(default_factory=list)
    batches_with_loss: int = 0
    skipped_batches: int = 0
    last_loss: float = math.nan


# Positions of the flags each rank adds to its step's gradient all-reduce (means over ranks).
_LOSS_SUM, _LOSSES, _SKIPPED, _FAILED, _CONFIG_ERROR, _STOP = range(6)


def run_preheat(
    adapters: PreheatAdapters,
    optimizer: Optimizer,
    batch_steps: BatchSteps,
    model: nn.Module,
    *,
    steps: int,
    accumulate: int = 1,
    optimizer_step: Callable[[Optimizer, Callable[[], Tensor | None]], Any] | None = None,
    collective_model: bool = False,
    stop_requested: Callable[[], bool] = lambda: False,
    track_drift: bool = False,
    drift_tolerance: float | None = None,
    on_step: Callable[[int, float, float | None], None] | None = None,
    other_params: Sequence[Tensor] = (),
) -> PreheatHistory:
    """Train the preheat adapters for ``steps`` optimizer steps; leave ``model`` as it was.

    For the duration, every parameter of ``model`` stops requiring gradients (so backward computes
    none for them and no DDP/FSDP gradient synchronisation has anything to do), FSDP1's gradient
    synchronisation is off, and its buffers are restored afterwards (a preheat forward in training
    mode moves BatchNorm statistics). All of it is restored exactly, also on failure or interrupt.

    Args:
        adapters: The preheat adapters; attached to their layers while the loop runs.
        optimizer: Steps ``adapters.trainable()``.
        batch_steps: Fetch, forward and backward of one batch.
        model: The main run's model as the strategy wrapped it.
        steps: Optimizer steps.
        accumulate: Batches per optimizer step.
        optimizer_step: ``(optimizer, closure)`` -> steps once, calling the closure (default
            ``optimizer.step(closure)``); the Lightning callback goes through the precision plugin.
        collective_model: The model's forward and backward communicate (FSDP); see the module docstring.
        stop_requested: Polled before each batch; ``True`` on any rank stops every rank.
        track_drift: Record the top-r subspace drift after each step.
        drift_tolerance: Stop once the drift falls below this (rank 0 decides for all).
        on_step: Called after each step with ``(step, loss, drift)`` (loss NaN if all skipped).
        other_params: Parameters of ``model`` trained with the adapters (``optimizer`` steps them
            too; ``other_params="train_and_discard"`` or ``"train_and_keep"``): they keep requiring
            gradients, and their gradients join the adapters' all-reduce. Keeping or restoring their
            values is the caller's.

    Returns:
        The loss and drift history.

    Raises:
        PreheatFailedError: A non-finite loss or adapter, a loss that does not depend on the
            adapters, every batch skipped, or a failure on another rank.
        HRPConfigurationError: A configuration error here or on another rank.
        PreheatStopped: A stop request on some rank.
    """
    params = [*adapters.trainable(), *other_params]
    history = PreheatHistory()
    step_optimizer = optimizer_step or (lambda opt, closure: opt.step(closure))
    agreement = _Agreement(collective_model, stop_requested)
    directions: list[Tensor] | None = None
    # An error in this rank's own work between steps (drift, logging) is carried into the next
    # agreement, so that a rank failing alone there never leaves the others in a collective.
    carried: Exception | None = None
    with main_run_untouched(model, trained=other_params), adapters.attached():
        for step in range(steps):
            outcome: list[Tensor | None] = []

            def closure() -> Tensor | None:
                if outcome:  # refused on every rank alike: they run the same optimizer
                    raise reevaluating_optimizer_refused(type(optimizer).__name__)
                outcome.append(_accumulate_and_reduce(params, batch_steps, accumulate, agreement, history, carried))
                return outcome[0]

            step_optimizer(optimizer, closure)
            optimizer.zero_grad(set_to_none=True)
            history.losses.append(history.last_loss)
            drift = None
            try:
                if track_drift:
                    previous, directions = directions, top_directions(adapters)
                    if previous is not None:
                        drift = sum(map(subspace_drift, previous, directions)) / len(directions)
                        history.subspace_drift.append(drift)
                if on_step is not None:
                    on_step(step, history.last_loss, drift)
            except Exception as error:
                carried = error
            settled = drift_tolerance is not None and drift is not None and drift < drift_tolerance
            # Each rank computes its own drift; should two ever round it differently, a rank stopping
            # alone would hang the others' next all-reduce, so rank 0 decides for all.
            if drift_tolerance is not None and broadcast_int(int(settled)):
                break
        failed, config = mean_over_ranks([_failed(carried), _config(carried)])
        _raise_agreed(carried, failed, config, 0.0)
    if history.batches_with_loss == 0:
        raise PreheatFailedError(
            f"every preheat batch was skipped ({history.skipped_batches} batches: the model returned no loss), "
            "so preheating saw no loss and learned nothing."
        )
    if not adapters.all_finite():
        raise PreheatFailedError("a preheat adapter holds NaN or Inf after preheating.")
    return history


def top_directions(adapters: PreheatAdapters) -> list[Tensor]:
    """The current top-r right singular vectors of every preheat adapter's update."""
    tops = [target.rank for target in adapters.targets]
    return [svd.Vh for svd in svd_of_products(adapters.products(), tops)]


class _Agreement:
    """Where the ranks agree on failure inside one step (see the module docstring)."""

    def __init__(self, collective_model: bool, stop_requested: Callable[[], bool]) -> None:
        self.collective_model = collective_model and rank_and_world_size()[1] > 1
        self.stop_requested = stop_requested

    def before_forward(self, error: Exception | None) -> None:
        """With a collective model: nobody enters the forward unless everybody does."""
        if self.collective_model:
            stop = self.stop_requested()
            failed, config, stop_share = mean_over_ranks([_failed(error), _config(error), float(stop)])
            _raise_agreed(error, failed, config, stop_share)

    def before_backward(self, error: Exception | None, skipped: bool) -> None:
        """With a collective model: nobody enters the backward unless everybody does."""
        if not self.collective_model:
            return
        failed, config, skipped_share = mean_over_ranks([_failed(error), _config(error), float(skipped)])
        _raise_agreed(error, failed, config, 0.0)
        world_size = rank_and_world_size()[1]
        if 0 < skipped_share < 1:
            raise PreheatFailedError(
                f"the model skipped a preheat batch on {round(skipped_share * world_size)} of {world_size} ranks only; with a "
                "sharded model (FSDP) the backward is collective, so every rank must skip the same batches."
            )


def _failed(error: Exception | None) -> float:
    return float(error is not None and not isinstance(error, HRPConfigurationError))


def _config(error: Exception | None) -> float:
    return float(isinstance(error, HRPConfigurationError))


def _raise_agreed(error: Exception | None, failed: float, config: float, stop: float) -> None:
    """Raise on every rank, in the same category, if any rank failed or asked to stop.

    The categories rank as stop > configuration error > failure, so that every rank then does the
    same thing (``on_failure`` governs failures only); a rank that failed raises its own error
    where its category is the agreed one, or chains it.
    """
    world_size = rank_and_world_size()[1]
    if stop > 0:
        raise PreheatStopped(f"a stop was requested on {round(stop * world_size)} of {world_size} rank(s).") from error
    if config > 0:
        if isinstance(error, HRPConfigurationError):
            raise error
        raise HRPConfigurationError(
            f"{round(config * world_size)} of {world_size} ranks found a configuration error during preheating "
            "(each logs its own message); stopping on every rank."
        ) from error
    if failed > 0:
        if error is not None:
            raise error
        raise PreheatFailedError(
            f"preheating failed on {round(failed * world_size)} of {world_size} ranks (each logs its own reason); "
            "stopping on every rank."
        )


def _accumulate_and_reduce(
    params: list[Tensor],
    batch_steps: BatchSteps,
    accumulate: int,
    agreement: _Agreement,
    history: PreheatHistory,
    error: Exception | None,
) -> Tensor | None:
    """One optimizer step's forward/backward passes, then the all-reduce of gradients and flags.

    ``error``, if given, is a failure of this rank since the last agreement: it runs no batch and
    reports it. Sets ``history.last_loss`` and returns the step's mean loss over ranks and batches,
    or ``None`` if every batch was skipped (the gradients are then ``None``, so the optimizer leaves
    the adapters alone, as Lightning does).
    """
    loss_sum: Tensor | None = None
    losses = skipped = 0
    stop = False
    for _ in range(accumulate):
        batch: Any = None
        batch_idx = 0
        if error is None and not agreement.collective_model and agreement.stop_requested():
            stop = True
            break
        if error is None:
            try:
                batch, batch_idx = batch_steps.fetch()
            except Exception as caught:
                error = caught
        agreement.before_forward(error)
        if error is not None:
            break
        loss: Tensor | None = None
        try:
            loss = batch_steps.loss(batch, batch_idx)
            if loss is not None and not loss.requires_grad:
                raise PreheatFailedError(
                    "the loss does not depend on any preheat adapter (it needs no gradient), so preheating "
                    "cannot learn anything: are the LoRA layers used in the forward?"
                )
        except Exception as caught:
            error = caught
        agreement.before_backward(error, skipped=error is None and loss is None)
        if error is not None:
            break
        if loss is None:
            skipped += 1
            continue
        try:
            batch_steps.backward(loss / accumulate)
        except Exception as caught:
            if agreement.collective_model:
                raise  # the other ranks wait in FSDP's backward collectives; see the module docstring
            error = caught
            break
        # Summed where the loss lives: one device sync per step (below), not one per batch.
        loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
        losses += 1

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flags = [0.0] * 6
    flags[_LOSSES], flags[_SKIPPED] = float(losses), float(skipped)
    flags[_FAILED], flags[_CONFIG_ERROR], flags[_STOP] = _failed(error), _config(error), float(stop)
    # float32 whatever the adapters' dtype, so that the loss keeps its digits.
    summary = torch.tensor(flags, dtype=torch.float32, device=grads[0].device)
    if loss_sum is not None:
        summary[_LOSS_SUM] = loss_sum
    all_reduce_mean_([*grads, summary])
    world_size = rank_and_world_size()[1]
    means = summary.tolist()
    _raise_agreed(error, means[_FAILED], means[_CONFIG_ERROR], means[_STOP])
    history.batches_with_loss += round(means[_LOSSES] * world_size)
    history.skipped_batches += round(means[_SKIPPED] * world_size)
    if means[_LOSSES] == 0:
        history.last_loss = math.nan
        for p in params:
            p.grad = None
        return None
    history.last_loss = means[_LOSS_SUM] / means[_LOSSES]
    if not math.isfinite(history.last_loss):
        raise PreheatFailedError(f"the preheat loss is {history.last_loss} at preheat step {len(history.losses)}.")
    for p, grad in zip(params, grads):
        p.grad = grad
    return summary[_LOSS_SUM] / summary[_LOSSES]


@dataclass
class Initialisation:
    """What the decomposition found and which layers it wrote.

    Attributes:
        svds: One per target: ``S`` (all singular values) and the top-r vectors.
        written: Targets whose adapter got its HRP start.
        learned_nothing: Targets whose preheated update is exactly zero; left at their current init
            (with a rank budget: its leading rows, at the rank allocated).
        weak: Written targets whose preheated update has rank below r.
        ranks_before: With a rank budget, each target's rank before the allocation; else ``None``.
    """

    svds: list[ProductSVD]
    written: list[LoraTarget]
    learned_nothing: list[LoraTarget]
    weak: list[LoraTarget]
    ranks_before: list[int] | None = None


@torch.no_grad()
def decompose_and_initialise(
    root: nn.Module,
    targets: Sequence[LoraTarget],
    adapters: PreheatAdapters,
    originals: Sequence[tuple[Tensor, Tensor]],
    *,
    rule: InitRule,
    scale: DirectionScale,
    dtype: torch.dtype,
    budget: RankBudget | None = None,
    undo_on_failure: list[Callable[[], None]],
) -> Initialisation:
    """Decompose every preheated update (shared out over ranks) and write the rank-r starts in place.

    With a ``budget``, the ranks are first allocated from the spectra
    (:func:`~lightning_hrp.engine.allocation.agreed_ranks`: rank 0's decision on every rank), and the
    adapters given new ranks are resized (new parameters: ``root`` must be a bare model, see
    :func:`lightning_hrp.engine.resize.check_resizable`). Putting the old adapters back is appended to
    ``undo_on_failure`` (from :func:`~lightning_hrp.engine.isolation.restored_on_failure`), so that a
    failure here or anywhere later in the block undoes the resize before the old values are restored.

    Raises:
        PreheatFailedError: A non-finite decomposition, or a preheated update that is exactly zero
            in every layer (preheating learned nothing; nothing is written).
    """
    ranks_before = [t.rank for t in targets]
    tops = adapters.ranks if budget is not None else ranks_before
    svds = shared_svd_of_products(adapters.products(), tops, dtype=dtype)
    if not all(bool(torch.isfinite(s.S).all() and torch.isfinite(s.Vh).all()) for s in svds):
        raise PreheatFailedError("the decomposition of a preheated update holds NaN or Inf.")
    learned = [i for i, s in enumerate(svds) if s.S[0] > 0]
    if not learned:
        raise PreheatFailedError(
            "preheating learned nothing: the preheated update is exactly zero in every layer (the loss has no "
            "gradient with respect to the adapters: is the learning rate 0, or are the LoRA layers unused?)."
        )
    nothing = [i for i in range(len(targets)) if i not in learned]
    ranks = ranks_before
    if budget is not None:
        # A layer takes at most the directions preheating found; one that learned nothing, the rows of its own init.
        most = [before if i in nothing else top for i, (top, before) in enumerate(zip(adapters.ranks, ranks_before))]
        ranks = agreed_ranks(budget, [s.S.tolist() for s in svds], most, layers_without_update=len(nothing))
    svds = [ProductSVD(s.U[:, :rank], s.S, s.Vh[:rank]) for s, rank in zip(svds, ranks)]
    new_weights = [
        new_adapter_weights(
            svds[i],
            rule=rule,
            scale=scale,
            current_A=originals[i][0],
            preheat_scaling=adapters.scalings[i],
            scaling=targets[i].scaling,
        )
        for i in learned
    ]
    # A layer that learned nothing keeps its init: the leading rows of it where its rank changed.
    kept = [i for i in nothing if ranks[i] != ranks_before[i]]
    new_weights += [(originals[i][0][: ranks[i]], originals[i][1][:, : ranks[i]]) for i in kept]
    if budget is not None:
        resizing = resize_adapters(root, targets, ranks)
        undo_on_failure.append(resizing.undo)
        guard_against_stale_optimizers(resizing.replaced_parameters())
    write_lora_weights(root, [targets[i] for i in (*learned, *kept)], new_weights)
    weak = [targets[i] for i in learned if not svds[i].S[ranks[i] - 1] > WEAK_DIRECTION * svds[i].S[0]]
    return Initialisation(
        svds=svds,
        written=[targets[i] for i in learned],
        learned_nothing=[targets[i] for i in nothing],
        weak=weak,
        ranks_before=ranks_before if budget is not None else None,
    )

