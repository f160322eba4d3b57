"""``hrp_init`` on the distributed toy: one run (HRP, then one main step), the one-process reference, the checks.

Shared by :mod:`hrp_init_worker` (2 processes: a plain network, DDP, ``fully_shard``, FSDP1, Lightning Fabric)
and by the tests, which compare every multi-process run with one process reading the doubled batch.
"""

from __future__ import annotations

import functools
import json
import random
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from hrp_dist_toy import (
    ACCUMULATE,
    MATCH_ATOL,
    PREHEAT_RANK,
    PREHEAT_SGD_LR,
    PREHEAT_STEPS,
    RANK_SEED_BASE,
    assert_close_tensors,
    from_json_tensors,
    ranks_agree_bitwise,
    regression_data,
    to_json_tensors,
    toy_loss,
    toy_lora_network,
)
from lightning_hrp import hrp_init
from lightning_hrp.engine.distributed import read_full
from lightning_hrp.engine.lora import find_lora_targets

# The options of the Lightning toy's callback (hrp_dist_toy.hrp_callback): keep_progress writes both factors,
# SGD shows a wrongly scaled all-reduce, the unreachable drift tolerance makes every rank decide each step.
HRP_INIT_OPTIONS: dict[str, Any] = dict(
    preheat_rank=PREHEAT_RANK,
    preheat_steps=PREHEAT_STEPS,
    accumulate_grad_batches=ACCUMULATE,
    mode="classic",
    init_rule="keep_progress",
    preheat_optimizer=functools.partial(torch.optim.SGD, lr=PREHEAT_SGD_LR),
    drift_tolerance=1e-12,
)
MAIN_LR = 1e-2
# Cases of hrp_init_worker, each a way of holding the network on several processes.
CASES = ("plain", "ddp", "fully_shard", "fsdp1", "fabric", "ddp_failure", "ddp_other_params")


def with_trainable_bias(network: nn.Module) -> nn.Parameter:
    """Make the last block's base bias trainable (a stand-in for a fresh head) and return it; before any DDP wrap."""
    bias = network.base_model.model.blocks[1].down.base_layer.bias
    bias.requires_grad_(True)
    return bias


def hrp_init_training_other_params(network: nn.Module, model: nn.Module, loader: DataLoader) -> dict[str, Any]:
    """``hrp_init(..., other_params="train_and_keep")``: the adapters and the trained bias afterwards, as JSON-ready data."""
    bias = network.base_model.model.blocks[1].down.base_layer.bias
    before = bias.detach().clone()
    report = hrp_init(model, loader, toy_loss, **(HRP_INIT_OPTIONS | {"other_params": "train_and_keep"}))
    after = {**whole_adapters(network), "bias": bias.detach().clone()}
    return {
        "other_params": report.other_params,
        "bias_changed": not torch.equal(before, bias.detach()),
        "no_grads": all(p.grad is None for p in model.parameters()),
        "after_hrp": to_json_tensors(after),
        "agree_after_hrp": ranks_agree_bitwise(after, torch.device("cpu")),
    }


def one_process_other_params_reference(batch_size: int) -> dict[str, Any]:
    """:func:`hrp_init_training_other_params` on one process reading ``batch_size`` samples per batch, in order."""
    network = toy_lora_network()
    with_trainable_bias(network)
    torch.manual_seed(RANK_SEED_BASE)
    return hrp_init_training_other_params(network, network, DataLoader(regression_data(), batch_size=batch_size))


def whole_adapters(network: nn.Module, model: nn.Module | None = None) -> dict[str, Tensor]:
    """Every LoRA factor of ``network``, whole (gathered when sharded: a collective then), on the CPU.

    ``model``: what holds ``network`` (FSDP1 keeps only shards outside ``summon_full_params``).
    """
    holder = FullyShardedDataParallel.summon_full_params(model) if isinstance(model, FullyShardedDataParallel) else nullcontext()
    with holder:
        return {
            f"{t.name}.{name}": read_full(weight).float().cpu().clone()
            for t in find_lora_targets(network)
            for name, weight in (("lora_A", t.lora_A), ("lora_B", t.lora_B))
        }


def rng_states() -> list[Any]:
    return [torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()]


def rng_states_equal(left: list[Any], right: list[Any]) -> bool:
    return torch.equal(left[0], right[0]) and np.array_equal(left[1], right[1]) and left[2] == right[2]


def hrp_init_then_step(
    network: nn.Module,
    model: nn.Module,
    hrp_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    backward: Callable[[Tensor], None] = Tensor.backward,
) -> dict[str, Any]:
    """``hrp_init(hrp_model, loader, ...)``, then one main AdamW step through ``model``; what was seen, as JSON-ready data.

    Args:
        network: The peft network (inside any wrapper), where the adapters are read.
        model: What the main run calls (the network, or its DDP/Fabric wrapper).
        hrp_model: What is given to ``hrp_init``.
        optimizer: The main optimizer, built before ``hrp_init``.
        loader: This process's batches.
        backward: The main run's backward.
    """
    identity = [id(p) for p in model.parameters()]
    rng_before = rng_states()
    with ddp_forwards_counted(model) as ddp_forwards:
        report = hrp_init(hrp_model, loader, toy_loss, **HRP_INIT_OPTIONS)
    rng_unchanged = rng_states_equal(rng_before, rng_states())
    clean = all(p.grad is None for p in model.parameters()) and not optimizer.state
    after = whole_adapters(network, model)
    batch = next(iter(loader))
    backward(toy_loss(model, batch))
    optimizer.step()
    optimizer.zero_grad()
    final = whole_adapters(network, model)
    return {
        "seed": report.seed,
        "preheat_losses": report.preheat_losses,
        "rng_unchanged": rng_unchanged,
        "ddp_forwards_during_hrp": len(ddp_forwards),
        "no_grads_or_optimizer_state": clean,
        "identity_kept": identity == [id(p) for p in model.parameters()],
        "after_hrp": to_json_tensors(after),
        "final": to_json_tensors(final),
        "agree_after_hrp": ranks_agree_bitwise(after, torch.device("cpu")),
        "agree_final": ranks_agree_bitwise(final, torch.device("cpu")),
    }


@contextmanager
def ddp_forwards_counted(model: nn.Module) -> Iterator[list[None]]:
    """A list that grows by one per forward through any DistributedDataParallel in ``model`` while the block runs."""
    calls: list[None] = []
    handles = [
        m.register_forward_pre_hook(lambda module, args: calls.append(None))
        for m in model.modules()
        if isinstance(m, DistributedDataParallel)
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


class FailsOnOneRank:
    """``toy_loss``, except that on rank 1 the second call raises before the forward."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: nn.Module, batch: list[Tensor]) -> Tensor:
        self.calls += 1
        if dist.get_rank() == 1 and self.calls == 2:
            raise RuntimeError("boom on rank 1")
        return toy_loss(model, batch)


def hrp_init_failing_on_one_rank(network: nn.Module, model: nn.Module, loader: DataLoader) -> dict[str, Any]:
    """``hrp_init`` with ``on_failure="continue"`` while rank 1's loss fails once: every rank restores and warns."""
    before = whole_adapters(network)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = hrp_init(model, loader, FailsOnOneRank(), **(HRP_INIT_OPTIONS | {"on_failure": "continue"}))
    after = whole_adapters(network, model)
    return {
        "report_is_none": report is None,
        "warnings": [str(w.message) for w in caught if "HRP preheating failed" in str(w.message)],
        "restored": all(torch.equal(before[name], after[name]) for name in before),
        "no_grads": all(p.grad is None for p in model.parameters()),
        "agree_after_hrp": ranks_agree_bitwise(after, torch.device("cpu")),
    }


def one_process_reference(batch_size: int) -> dict[str, Any]:
    """:func:`hrp_init_then_step` on one process reading ``batch_size`` samples per batch, in order."""
    network = toy_lora_network()
    torch.manual_seed(RANK_SEED_BASE)  # rank 0's global seed in the multi-process runs
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=MAIN_LR)
    loader = DataLoader(regression_data(), batch_size=batch_size)
    return hrp_init_then_step(network, network, network, optimizer, loader)


def assert_matches_reference(payloads: list[dict[str, Any]], reference: dict[str, Any], main_step_synchronised: bool) -> None:
    """Every rank: bitwise the same adapters, equal to the one-process reference with the doubled batch.

    ``main_step_synchronised``: the main step averaged its gradients over the ranks (DDP, FSDP), so the
    adapters after it are compared too (a bare network's main step is each rank's own).
    """
    keys = ("after_hrp", "final") if main_step_synchronised else ("after_hrp",)
    for payload in payloads:
        assert all(payload[f"agree_{key}"] is True for key in keys)
        assert payload["rng_unchanged"] is True
        assert payload["no_grads_or_optimizer_state"] is True
        assert payload["identity_kept"] is True
        # Every rank preheated with rank 0's seed, though their global RNGs were seeded differently.
        assert payload["seed"] == reference["seed"]
        # The preheat forwards ran inside DDP's wrapper, so no reducer or buffer broadcast was involved.
        assert payload["ddp_forwards_during_hrp"] == 0
    first = payloads[0]
    assert first["preheat_losses"] == pytest.approx(reference["preheat_losses"], rel=1e-5)
    for key in keys:
        assert_close_tensors(from_json_tensors(first[key]), from_json_tensors(reference[key]), MATCH_ATOL, key)


def read_payloads(out_dir: Path, case: str, world_size: int) -> list[dict[str, Any]]:
    return [json.loads((out_dir / f"{case}_rank{rank}.json").read_text()) for rank in range(world_size)]
