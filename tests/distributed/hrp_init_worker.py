"""``hrp_init`` on 2 CPU processes with gloo, launched by ``tests/distributed/test_hrp_init_multiprocess.py`` as a script.

Lightning Fabric (``strategy="ddp"``, ``accelerator="cpu"``) starts the ranks (re-running this script for
rank 1) and the process group; then each case builds the toy network and holds it its own way:

* ``plain``: the bare peft network on every rank (``hrp_init`` all-reduces the preheat gradients);
* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` around it, by hand;
* ``fully_shard``: FSDP2's ``fully_shard`` on each block and the root, by hand;
* ``fsdp1``: FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True``) around each block and the root;
* ``fabric``: ``fabric.setup`` (DDP inside Fabric's wrapper), ``hrp_init(model.module, ...)``;
* ``ddp_failure``: DDP, with rank 1's loss failing once during preheating (``on_failure="continue"``);
* ``ddp_other_params``: DDP around the network with one base bias trainable, preheated with
  ``other_params="train_and_keep"`` (:func:`hrp_init_toy.hrp_init_training_other_params`).

Each runs ``hrp_init`` and one main step (:func:`hrp_init_toy.hrp_init_then_step`; the failure case
:func:`hrp_init_toy.hrp_init_failing_on_one_rank`) and every rank
writes ``{case}_rank{r}.json``; a failing case writes ``error_rank{r}.json``; rank 0 writes
``exit_codes.json`` last.

Usage:
    python tests/distributed/hrp_init_worker.py --out DIR
"""

from __future__ import annotations

import argparse
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from hrp_dist_toy import BATCH_SIZE, RANK_SEED_BASE, WORLD_SIZE, regression_data, toy_lora_network, write_json
from hrp_init_toy import (
    CASES,
    MAIN_LR,
    hrp_init_failing_on_one_rank,
    hrp_init_then_step,
    hrp_init_training_other_params,
    with_trainable_bias,
)


def run_case(case: str, fabric: Fabric) -> dict:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    network = toy_lora_network()
    # Different global RNGs on the ranks: only hrp_init's broadcast of rank 0's seed makes the preheat agree.
    torch.manual_seed(RANK_SEED_BASE + rank)
    data = regression_data()

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=MAIN_LR)

    if case == "fabric":
        # Fabric's DistributedSampler (no shuffle for a sequential loader) gives rank r samples r, r + W, ...
        model, main_optimizer = fabric.setup(network, optimizer())
        loader = fabric.setup_dataloaders(DataLoader(data, batch_size=BATCH_SIZE))
        return hrp_init_then_step(network, model, model.module, main_optimizer, loader, backward=fabric.backward)
    # Rank r of W reads samples r, r + W, ...: the ranks' k-th batches together are one process's k-th batch of W * b.
    loader = DataLoader(data, batch_size=BATCH_SIZE, sampler=DistributedSampler(data, world_size, rank, shuffle=False))
    if case == "plain":
        model = network
    elif case == "ddp":
        model = DistributedDataParallel(network)
    elif case == "ddp_failure":
        return hrp_init_failing_on_one_rank(network, DistributedDataParallel(network), loader)
    elif case == "ddp_other_params":
        with_trainable_bias(network)  # before the wrap, so that DDP registers it as a trainable parameter
        return hrp_init_training_other_params(network, DistributedDataParallel(network), loader)
    elif case == "fully_shard":
        mesh = init_device_mesh("cpu", (world_size,))
        for block in network.base_model.model.blocks:
            fully_shard(block, mesh=mesh)
        model = fully_shard(network, mesh=mesh)
    elif case == "fsdp1":
        block_type = type(network.base_model.model.blocks[0])
        model = FullyShardedDataParallel(
            network, auto_wrap_policy=ModuleWrapPolicy({block_type}), use_orig_params=True, device_id=torch.device("cpu")
        )
    else:
        raise SystemExit(f"unknown case {case!r}; choose from {CASES}")
    return hrp_init_then_step(network, model, model, optimizer(), loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    # A rank that misses a collective fails after 90 s instead of hanging the test session.
    fabric = Fabric(strategy=DDPStrategy(timeout=timedelta(seconds=90)), devices=WORLD_SIZE, accelerator="cpu")
    fabric.launch()
    rank = dist.get_rank()
    for case in args.cases.split(","):
        try:
            write_json(args.out / f"{case}_rank{rank}.json", run_case(case, fabric))
        except Exception as error:  # recorded for the test; the next case still runs
            write_json(args.out / f"error_rank{rank}.json", {"case": case, "error": repr(error), "traceback": traceback.format_exc()})
        dist.barrier()
    dist.destroy_process_group()
    # Rank 0 launched the other local ranks (Fabric re-ran this script); wait for them to exit.
    if rank == 0:
        children = fabric.strategy.launcher.procs
        write_json(args.out / "exit_codes.json", {"0": 0, **{str(r + 1): child.wait(timeout=60) for r, child in enumerate(children)}})


if __name__ == "__main__":
    main()
