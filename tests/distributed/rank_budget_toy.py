"""``rank_budget`` on the distributed toy: HRPInit in a Lightning fit and ``hrp_init`` on a bare network, and the probe.

Shared by :mod:`rank_budget_worker` (2 processes with gloo) and by the test, which compares every
multi-process run with one process reading the doubled batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import Strategy
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from hrp_dist_toy import (
    ACCUMULATE,
    MAIN_STEPS,
    PREHEAT_RANK,
    PREHEAT_SGD_LR,
    PREHEAT_STEPS,
    RANK_SEED_BASE,
    ToyLoRARegression,
    _lora_local_fraction,
    lora_adapters,
    ranks_agree_bitwise,
    regression_data,
    to_json_tensors,
    toy_loss,
    toy_lora_network,
    toy_trainer,
    write_json,
)
from hrp_init_toy import whole_adapters
from lightning_hrp import hrp_init
from lightning_hrp.inits import HRPInit

# The toy has 4 LoRA layers of rank 2: the same rank everywhere would be a budget of 8.
RANK_BUDGET = 11
BUDGET_OPTIONS: dict[str, Any] = dict(
    preheat_rank=PREHEAT_RANK,
    preheat_steps=PREHEAT_STEPS,
    mode="classic",
    preheat_optimizer=functools.partial(torch.optim.SGD, lr=PREHEAT_SGD_LR),
    rank_budget=RANK_BUDGET,
)


class BudgetProbe(pl.Callback):
    """Seeds each rank differently, records the resized adapters at the first and last step, writes ``{tag}_rank{r}.json``.

    Must come before :class:`~lightning_hrp.inits.HRPInit` in the callback list, so that its seeds
    are set when HRPInit takes rank 0's.
    """

    def __init__(self, out_dir: Path, tag: str) -> None:
        self.out_dir, self.tag = Path(out_dir), tag
        self.start: dict[str, Tensor] = {}
        self.agree_start: bool | None = None
        self.optimizer_shapes: list[list[int]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.manual_seed(RANK_SEED_BASE + trainer.global_rank)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = lora_adapters(trainer)
        self.agree_start = ranks_agree_bitwise(self.start, trainer.strategy.root_device)
        # Under FSDP2 the optimizer holds the sharded DTensors; their global shapes are the resized ones.
        self.optimizer_shapes = sorted(list(p.shape) for o in trainer.optimizers for g in o.param_groups for p in g["params"])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        final = lora_adapters(trainer)
        (init,) = [c for c in trainer.callbacks if isinstance(c, HRPInit)]
        payload = {
            "strategy": type(trainer.strategy).__name__,
            "global_step": trainer.global_step,
            "ranks": [layer.rank for layer in init.hrp_report.layers],
            "rank_pattern": pl_module.model.peft_config["default"].rank_pattern,
            "agree_start": self.agree_start,
            "agree_final": ranks_agree_bitwise(final, trainer.strategy.root_device),
            "optimizer_shapes": self.optimizer_shapes,
            "lora_local_fraction": _lora_local_fraction(trainer),
            "start": to_json_tensors(self.start),
            "final_finite": all(bool(torch.isfinite(t).all()) for t in final.values()),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.out_dir / f"{self.tag}_rank{trainer.global_rank}.json", payload)


def fit_with_budget(make_strategy: Callable[[], Strategy | str], out_dir: Path, tag: str, *, devices: int, batch_size: int,
                    fully_shard_blocks: bool = False) -> None:
    """Fit the toy for ``MAIN_STEPS`` with HRPInit allocating ``RANK_BUDGET``; every rank writes ``{tag}_rank{r}.json``."""
    trainer = toy_trainer(make_strategy, out_dir, [BudgetProbe(out_dir, tag), HRPInit(**BUDGET_OPTIONS)],
                          max_steps=MAIN_STEPS, accelerator="cpu", devices=devices)
    trainer.fit(ToyLoRARegression(batch_size, fully_shard_blocks))


def hrp_init_with_budget(out_dir: Path, batch_size: int) -> None:
    """``hrp_init`` with ``RANK_BUDGET`` on the bare network (each rank its share of the data), then DDP and one step."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    network = toy_lora_network()
    torch.manual_seed(RANK_SEED_BASE + rank)
    data = regression_data()
    loader = DataLoader(data, batch_size=batch_size, sampler=DistributedSampler(data, world_size, rank, shuffle=False))
    report = hrp_init(network, loader, toy_loss, accumulate_grad_batches=ACCUMULATE, **BUDGET_OPTIONS)
    start = whole_adapters(network)
    model = DistributedDataParallel(network) if world_size > 1 else network
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-2)
    toy_loss(model, next(iter(loader))).backward()
    optimizer.step()
    final = whole_adapters(network)
    write_json(
        out_dir / f"hrp_init_rank{rank}.json",
        {
            "ranks": [layer.rank for layer in report.layers],
            "agree_start": ranks_agree_bitwise(start, torch.device("cpu")),
            "agree_final": ranks_agree_bitwise(final, torch.device("cpu")),
            "start": to_json_tensors(start),
        },
    )
