"""``hrp_init``: High-Rank Preheating for a plain PyTorch loop or Lightning Fabric (no Lightning imported).

Thin glue over :func:`lightning_hrp.orchestration.preheat_and_initialise`: the same options, checks
and guarantees as :class:`lightning_hrp.HRPPreheatCallback`; only how a batch becomes a loss
differs (here the user's ``loss_fn``, and a plain ``loss.backward()``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from typing import Any

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_hrp._validation import check_int
from lightning_hrp.engine.allocation import AllocationRule
from lightning_hrp.engine.batches import CycledBatches, generators_restored, with_own_workers
from lightning_hrp.engine.init_rules import DirectionScale, InitRule
from lightning_hrp.engine.preheat import PreheatMode
from lightning_hrp.engine.isolation import isolated_rng
from lightning_hrp.engine.preheat_loop import BatchSteps
from lightning_hrp.errors import HRPConfigurationError
from lightning_hrp.options import HRPOptions, OnFailure, OptimizerFactory, OtherParams, PreheatDtype, SvdDtype
from lightning_hrp.orchestration import EntryPoint, forward_communicates, preheat_and_initialise
from lightning_hrp.report import HRPReport

LossFunction = Callable[[nn.Module, Any], "Tensor | None"]


def hrp_init(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFunction,
    *,
    preheat_rank: int,
    preheat_steps: int,
    preheat_lr: float | None = None,
    accumulate_grad_batches: int = 1,
    mode: PreheatMode = "classic",
    init_rule: InitRule = "direction",
    direction_scale: DirectionScale = "match_init_norm",
    preheat_optimizer: OptimizerFactory | None = None,
    adapter_name: str | None = None,
    seed: int | None = None,
    svd_dtype: SvdDtype = "float32",
    on_failure: OnFailure = "raise",
    track_subspace_drift: bool = False,
    drift_tolerance: float | None = None,
    preheat_dtype: PreheatDtype | None = None,
    other_params: OtherParams = "frozen",
    rank_budget: int | None = None,
    allocation_rule: AllocationRule = "energy",
    reinitialise_trained: bool = False,
) -> HRPReport | None:
    """Start the rank-r LoRA adapters of ``model`` from High-Rank Preheating (arXiv 2502.07739), in place.

    Call it once, before the first optimizer step of your own loop. Every trainable peft LoRA layer
    gets a temporary rank-``preheat_rank`` adapter outside the model (a forward hook), trained for
    ``preheat_steps`` optimizer steps on ``batches`` with ``loss_fn``; the top singular directions of
    each preheated update then initialise the rank-r adapter in place (the Parameter objects stay the
    same, so an optimizer built before still holds them). Afterwards the global RNG state (torch CPU and
    CUDA, NumPy, Python) and the shuffling generators of a DataLoader given as ``batches`` are as they
    were, the model holds no gradient, and nothing of the preheat (adapters, hooks, optimizer) remains.

    The model runs in the mode it is in (call ``model.train()`` first, as your loop would). With
    ``torch.distributed`` initialised every rank must call ``hrp_init`` with its share of the data:
    the seed is rank 0's, the preheat gradients are averaged with one flattened all-reduce per step,
    the decomposition is shared out, and every rank ends with bitwise the same adapters.

    The other options (``mode``, ``init_rule``, ``direction_scale``, ``preheat_optimizer``, ``adapter_name``,
    ``seed``, ``svd_dtype``, ``on_failure``, ``track_subspace_drift``, ``drift_tolerance``, ``preheat_dtype``,
    ``other_params``, ``reinitialise_trained``) mean what they mean for :class:`lightning_hrp.HRPPreheatCallback`.
    Build your optimizer after ``hrp_init``: HRP cannot see one built before, nor clear the moments it may hold.

    Args:
        model: A module holding peft LoRA layers: plain, wrapped in ``DistributedDataParallel``, or
            sharded with ``fully_shard`` (FSDP2) or FSDP1. Under DDP, ``loss_fn`` gets the module
            inside the wrapper (``model.module``): a forward through DDP would broadcast buffers and
            arm its reducer for a backward that brings it no gradient (preheating computes none for
            the model's own parameters), collectives HRP does not need and that a rank failing before
            its forward would leave the others waiting in. A DDP inside another wrapper (Lightning
            Fabric's) is refused: pass the wrapper's module (``fabric_model.module``).
        batches: Batches already on the model's device (a DataLoader, a list, a generator); a
            re-iterable is cycled if shorter than needed (one warning), a one-shot iterator is not.
        loss_fn: ``loss_fn(model, batch)`` returns the batch's loss as a scalar tensor, or ``None`` to
            skip the batch. It must not step an optimizer.
        preheat_rank: Rank ``R`` of the preheat adapters; must exceed the LoRA rank.
        preheat_steps: Optimizer steps of preheating.
        preheat_lr: Learning rate of the default AdamW preheat optimizer (the main run's learning rate
            is a good start); needed unless ``preheat_optimizer`` is given.
        accumulate_grad_batches: Batches per preheat optimizer step.
        rank_budget: The total rank of the trainable LoRA layers, allocated after preheating from the
            preheated spectra (``allocation_rule``) instead of the same r everywhere; each layer gets at
            least 1 and at most its preheat rank, and is resized (new ``lora_A``/``lora_B`` Parameters, the
            same LoRA scale, ``rank_pattern``/``alpha_pattern`` in the peft config so ``save_pretrained``
            records it). Only on a bare peft model: call ``hrp_init`` before wrapping the model (DDP,
            ``fully_shard``) and before building the optimizer (an optimizer built before raises at its
            first step). ``None`` (the default) keeps every rank.
        allocation_rule: How ``rank_budget`` is handed out: ``"energy"`` (the default) ranks every direction
            of every layer by its preheated energy ``s^2``, ``"energy_share"`` by its share of its own layer's
            energy (EVA's explained-variance ratio); see :mod:`lightning_hrp.engine.allocation`.

    Returns:
        The report (losses, spectra, timings); ``None`` if preheating failed and ``on_failure="continue"``
        (the adapters then keep their untouched init, and a warning says why).

    Raises:
        HRPConfigurationError: Bad input, before anything changes (or, found during preheating, after
            restoring the adapters bit for bit).
        PreheatFailedError: A failed preheat with ``on_failure="raise"``, after restoring the adapters.
    """
    options = HRPOptions.from_arguments(locals())
    check_int("accumulate_grad_batches", accumulate_grad_batches, minimum=1)
    if not isinstance(model, nn.Module):
        raise HRPConfigurationError(f"model must be a torch.nn.Module holding peft LoRA layers, got {type(model).__name__}.")
    if not callable(loss_fn):
        raise HRPConfigurationError(f"loss_fn must be a callable (model, batch) -> loss, got {loss_fn!r}.")
    if not isinstance(batches, Iterable):
        raise HRPConfigurationError(
            f"batches must be an iterable of batches (a DataLoader, a list, a generator), got {type(batches).__name__}."
        )
    return preheat_and_initialise(options, _FunctionEntry(model, batches, loss_fn, accumulate_grad_batches))


class _FunctionEntry(EntryPoint):
    """``hrp_init``'s batches, ``loss_fn`` on the module inside any DDP wrapper, and ``loss.backward()``."""

    def __init__(self, model: nn.Module, batches: Iterable[Any], loss_fn: LossFunction, accumulate: int) -> None:
        network = model.module if isinstance(model, DistributedDataParallel) else model
        nested = [name for name, m in network.named_modules() if isinstance(m, DistributedDataParallel)]
        if nested:
            raise HRPConfigurationError(
                f"model holds a DistributedDataParallel at {nested[0]!r} inside another wrapper (as Lightning Fabric's "
                "module does). hrp_init runs the preheat forward on the module inside DDP, since a forward through DDP "
                "broadcasts buffers and arms its reducer (collectives that a rank failing before its forward would "
                "leave the others waiting in), and cannot reach it here. Pass the wrapper's module instead (with "
                "Fabric: hrp_init(model.module, ...))."
            )
        super().__init__(network, model, accumulate=accumulate, collective_model=forward_communicates(network))
        self.batches = batches
        self.loss_fn = loss_fn

    @contextmanager
    def preheating(self, optimizer: Optimizer, steps: int) -> Iterator[BatchSteps]:
        data = CycledBatches(with_own_workers(self.batches), steps * self.accumulate, self.warn)
        cuda_devices = sorted({p.device for p in self.model.parameters() if p.device.type == "cuda"}, key=str)
        with generators_restored([self.batches]), isolated_rng(cuda_devices), closing(data):
            yield BatchSteps(fetch=lambda: next(data), loss=self._loss, backward=lambda loss: loss.backward())

    def _loss(self, batch: Any, batch_idx: int) -> Tensor | None:
        loss = self.loss_fn(self.model, batch)
        if loss is not None and not (isinstance(loss, Tensor) and loss.ndim == 0):
            shape = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
            raise HRPConfigurationError(
                f"loss_fn must return the batch's loss as a scalar tensor, or None to skip the batch; it returned {shape}."
            )
        return loss

