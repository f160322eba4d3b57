"""Collectives and sharded-weight access HRP needs; a single process needs no process group at all.

How the rank-r LoRA weights are read whole and written in place, per strategy:

* plain parameters (one process, DDP): directly;
* DTensors (FSDP2, ``ModelParallelStrategy``): read with ``full_tensor()``, write the local shard;
* FSDP1 (``FullyShardedDataParallel``, flat shards outside the DTensor API, ``use_orig_params`` either
  way): inside ``summon_full_params(writeback=True)`` of just the units that own the weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.hooks import RemovableHandle

from lightning_hrp.engine.batching import group_by_key, map_grouped
from lightning_hrp.engine.decompose import ProductSVD, product_group_key, svd_of_products
from lightning_hrp.engine.lora import LoraTarget
from lightning_hrp.errors import PreheatFailedError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _communication_device(fallback: torch.device) -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


def broadcast_int(value: int, src: int = 0) -> int:
    """``value`` as held by rank ``src``, on every rank."""
    return broadcast_ints([value], src)[0]


def broadcast_ints(values: Sequence[int], src: int = 0) -> list[int]:
    """``values`` as held by rank ``src``, on every rank (all ranks pass as many)."""
    if not is_distributed():
        return list(values)
    buffer = torch.tensor(list(values), dtype=torch.int64, device=_communication_device(torch.device("cpu")))
    dist.broadcast(buffer, src=src)
    return [int(v) for v in buffer.tolist()]


def all_reduce_mean_(tensors: Sequence[Tensor]) -> None:
    """Average ``tensors`` in place over all ranks with one flattened all-reduce per dtype.

    All tensors must share a device. One all-reduce in all when they share a dtype too (float32
    gradients and their float32 loss); bfloat16 gradients go in one, the float32 loss in another.
    """
    if not is_distributed() or not tensors:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same_dtype in by_dtype.values():
        _all_reduce_mean_flat_(same_dtype)


def _all_reduce_mean_flat_(tensors: list[Tensor]) -> None:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    device = flat.device
    flat = flat.to(_communication_device(device))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.to(device).div_(dist.get_world_size())  # in place: no third copy of the gradients
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def mean_over_ranks(values: Sequence[float]) -> list[float]:
    """The mean of each value over all ranks (the values themselves in a single process).

    One small all-reduce: how the ranks agree on a failure flag, so that all of them raise or
    none does and no rank is left waiting in a collective the others never join.
    """
    if not is_distributed():
        return [float(v) for v in values]
    buffer = torch.tensor(values, dtype=torch.float64, device=_communication_device(torch.device("cpu")))
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return (buffer / dist.get_world_size()).tolist()


@contextmanager
def gradient_sync_disabled(model: nn.Module) -> Iterator[None]:
    """FSDP1's ``no_sync`` on the outermost units of ``model`` for the duration; FSDP2 roots initialised first.

    HRP switches ``requires_grad`` off on the main run's parameters while preheating, so no gradient
    exists to synchronise; this is the strategies' own switch on top. DDP needs none here: the
    callback runs the preheat forward outside DDP's wrapper (no reducer, no buffer broadcast).
    FSDP2 fixes each unit's gradient dtypes from the parameters that require gradients at its first
    forward (its lazy init), so that init runs here, before any flag changes.
    """
    for module in _outermost_fsdp2(model):
        module._get_fsdp_state()._lazy_init()  # noqa: SLF001 (no public trigger; idempotent)
    with ExitStack() as stack:
        for unit in _outermost_fsdp1(model):
            stack.enter_context(unit.no_sync())
        yield


def forget_abandoned_fsdp1_forwards(model: nn.Module) -> None:
    """Drop the backward hooks FSDP1 left on its flat parameters by forwards whose backward never ran.

    A preheat forward is abandoned when its batch is skipped or a rank fails after it. FSDP1 then
    keeps the hook it registered for that backward and, seeing one registered, registers no other
    at the next forward; once ``requires_grad`` is back on, the main run's first backward would
    fail FSDP's own check (``Invalid: _post_backward_hook_state``). Call while the flags are still
    as they were during those forwards. A no-op without FSDP1.
    """
    for unit in FullyShardedDataParallel.fsdp_modules(model):
        flat_param = unit._flat_param  # noqa: SLF001 (FSDP1 has no public handle on it)
        stale = getattr(flat_param, "_post_backward_hook_state", None) if flat_param is not None else None
        if stale is None:
            continue
        for hook in stale:  # (AccumulateGrad node, handle) or (handle,)
            if isinstance(hook, RemovableHandle):
                hook.remove()
        del flat_param._post_backward_hook_state


def _outermost_fsdp2(root: nn.Module) -> list[nn.Module]:
    """The modules under ``root`` that FSDP2's ``fully_shard`` was applied to and no other such module contains."""
    if isinstance(root, FSDPModule):
        return [root]
    return [module for child in root.children() for module in _outermost_fsdp2(child)]


def read_full(param: Tensor) -> Tensor:
    """The whole value of a parameter (detached), gathering it if it is a sharded DTensor (FSDP2)."""
    if isinstance(param, DTensor):
        return param.detach().full_tensor()
    return param.detach()


@torch.no_grad()
def write_full_(param: Tensor, value: Tensor) -> None:
    """Copy ``value`` (the whole tensor, identical on every rank) into ``param`` in place.

    For a DTensor only the local shard is written; no communication happens because every rank
    already holds the whole value.
    """
    value = value.to(dtype=param.dtype)
    if isinstance(param, DTensor):
        shard = distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.data.copy_(value.to(param.device))


def shared_svd_of_products(
    products: Sequence[tuple[Tensor, Tensor]], tops: Sequence[int], *, dtype: torch.dtype = torch.float32
) -> list[ProductSVD]:
    """Like :func:`~lightning_hrp.engine.decompose.svd_of_products`, with the work split over ranks.

    Each group of equally shaped products is decomposed by one rank (groups are dealt out largest
    first to the least-loaded rank) and broadcast from there, stacked, so the wall time falls as the
    world grows and every rank ends with bitwise the same result.
    """
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return svd_of_products(products, tops, dtype=dtype)
    keys = [product_group_key(B, A, top) for (B, A), top in zip(products, tops)]
    groups = group_by_key(keys)
    owner_of = {indices[0]: owner for indices, owner in zip(groups, _deal_out(groups, products, world_size))}

    # Each rank first decomposes the groups it owns, then the ranks agree that all succeeded, and only
    # then broadcast: a rank whose decomposition fails (a LAPACK error, out of memory) must not leave
    # the others waiting in a broadcast it never joins.
    computed: dict[int, list[ProductSVD]] = {}
    error: Exception | None = None
    try:
        for indices in groups:
            if owner_of[indices[0]] == rank:
                group_tops = [tops[i] for i in indices]
                computed[indices[0]] = svd_of_products([products[i] for i in indices], group_tops, dtype=dtype)
    except Exception as caught:
        error = caught
    (failed,) = mean_over_ranks([float(error is not None)])
    if error is not None:
        raise error
    if failed > 0:
        raise PreheatFailedError(f"the decomposition failed on {round(failed * world_size)} of {world_size} ranks.")

    def broadcast_group(indices: list[int], group: list[tuple[Tensor, Tensor]]) -> list[ProductSVD]:
        owner, top = owner_of[indices[0]], tops[indices[0]]
        if owner == rank:
            svds = computed[indices[0]]
            U, S, Vh = (torch.stack([getattr(svd, name) for svd in svds]) for name in ("U", "S", "Vh"))
        else:
            B0, A0 = group[0]
            k = min(B0.shape[0], A0.shape[1], B0.shape[1])
            U = B0.new_empty(len(group), B0.shape[0], top, dtype=dtype)
            S = B0.new_empty(len(group), k, dtype=dtype)
            Vh = B0.new_empty(len(group), top, A0.shape[1], dtype=dtype)
        for tensor in (U, S, Vh):
            _broadcast_(tensor, src=owner)
        return [ProductSVD(U[i], S[i], Vh[i]) for i in range(len(group))]

    return map_grouped(products, keys, broadcast_group)


def _deal_out(groups: list[list[int]], products: Sequence[tuple[Tensor, Tensor]], world_size: int) -> list[int]:
    """Owner rank of each group: largest cost first, to the least-loaded rank (deterministic)."""
    def cost(indices: list[int]) -> int:
        B, A = products[indices[0]]
        return len(indices) * (B.shape[0] + A.shape[1]) * B.shape[1] ** 2

    loads = [0] * world_size
    owners = [0] * len(groups)
    for g in sorted(range(len(groups)), key=lambda g: (-cost(groups[g]), g)):
        owner = min(range(world_size), key=lambda r: (loads[r], r))
        owners[g] = owner
        loads[owner] += cost(groups[g])
    return owners


def _broadcast_(tensor: Tensor, src: int) -> None:
    device = tensor.device
    buffer = tensor.to(_communication_device(device))
    dist.broadcast(buffer, src=src)
    if buffer is not tensor:
        tensor.copy_(buffer.to(device))


def read_lora_weights(root: nn.Module, targets: Sequence[LoraTarget]) -> list[tuple[Tensor, Tensor]]:
    """Whole copies of every target's ``(A, B)``, identical on every rank.

    A collective under FSDP1 and FSDP2: every rank must call it with the same targets.

    Args:
        root: The model as the strategy wrapped it (``trainer.strategy.model``).
        targets: The LoRA layers, in the same order on every rank.
    """
    weights: list[tuple[Tensor, Tensor] | None] = [None] * len(targets)
    for indices, units in _fsdp1_groups(root, targets):
        with _summoned(units, writeback=False):
            for i in indices:
                weights[i] = (read_full(targets[i].lora_A).clone(), read_full(targets[i].lora_B).clone())
    return weights  # type: ignore[return-value]


@torch.no_grad()
def write_lora_weights(root: nn.Module, targets: Sequence[LoraTarget], weights: Sequence[tuple[Tensor, Tensor]]) -> None:
    """Copy whole ``(A, B)`` values (identical on every rank) into every target's weights, in place.

    The parameters keep their identity, so the strategy's wrapping and the optimizers stay bound to
    them. A collective under FSDP1: every rank must call it with the same targets.
    """
    for indices, units in _fsdp1_groups(root, targets):
        with _summoned(units, writeback=True):
            for i in indices:
                A, B = weights[i]
                write_full_(targets[i].lora_A, A)
                write_full_(targets[i].lora_B, B)


def _fsdp1_groups(root: nn.Module, targets: Sequence[LoraTarget]) -> list[tuple[list[int], tuple[nn.Module, ...]]]:
    """Targets grouped by the FSDP1 units that own their weights, in module order (the same on every rank).

    Summoning the root would unshard every unit at once, the whole model on every rank; one group at
    a time keeps the peak at about one unit, as in a forward pass. Without FSDP1: one group, no units.
    """
    owners = _fsdp1_owners(root)
    if not owners:
        return [(list(range(len(targets))), ())]
    # Summoning a nested unit before the outermost one has run its lazy init (no forward yet) would make
    # the nested unit take itself for the root and break the next forward; a brief summon of the
    # outermost units' own parameters runs that init from the right place.
    for outermost in _outermost_fsdp1(root):
        with FullyShardedDataParallel.summon_full_params(outermost, recurse=False, writeback=False):
            pass
    groups: dict[tuple[nn.Module, ...], list[int]] = {}
    for i, target in enumerate(targets):
        holders = (target.layer.lora_A[target.adapter_name], target.layer.lora_B[target.adapter_name])
        units = tuple(dict.fromkeys(owners[holder] for holder in holders))
        groups.setdefault(units, []).append(i)
    return [(indices, units) for units, indices in groups.items()]


def _fsdp1_owners(root: nn.Module) -> dict[nn.Module, FullyShardedDataParallel]:
    """For each module under ``root``, the innermost FSDP1 unit whose flat parameter holds its weights (or itself)."""
    owners: dict[nn.Module, FullyShardedDataParallel] = {}

    def visit(module: nn.Module, unit: FullyShardedDataParallel | None) -> None:
        if isinstance(module, FullyShardedDataParallel):
            unit = module
        if unit is not None:
            owners[module] = unit
        for child in module.children():
            visit(child, unit)

    visit(root, None)
    return owners


def _outermost_fsdp1(root: nn.Module) -> list[FullyShardedDataParallel]:
    """The FSDP1 units under ``root`` that no other unit contains, in module order."""
    if isinstance(root, FullyShardedDataParallel):
        return [root]
    return [unit for child in root.children() for unit in _outermost_fsdp1(child)]


@contextmanager
def _summoned(units: Sequence[nn.Module], writeback: bool) -> Iterator[None]:
    """Unshard just ``units`` (not their children) for the duration; write changes back if asked."""
    with ExitStack() as stack:
        for unit in units:
            stack.enter_context(FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=writeback))
        yield
