"""``rank_budget`` on 2 CPU processes with gloo, launched by ``tests/distributed/test_rank_budget_multiprocess.py`` as a script.

Lightning's DDP strategy starts the ranks (re-running this script for rank 1) and the process group;
then HRPInit allocates the rank budget at setup under ``ddp`` and ``model_parallel`` (FSDP2, the
toy's blocks sharded in ``configure_model``, after the resize), and ``hrp_init`` allocates it on a bare
network in the same process group. Every rank writes ``{run}_rank{r}.json`` (see
:mod:`rank_budget_toy`); a failing run writes ``error_{run}_rank{r}.json``; rank 0 writes
``exit_codes.json`` last.

Usage:
    python tests/distributed/rank_budget_worker.py --out DIR
"""

from __future__ import annotations

import argparse
import traceback
from pathlib import Path

import torch.distributed as dist

from hrp_dist_toy import BATCH_SIZE, WORLD_SIZE, write_json
from hrp_dist_worker import make_strategy
from rank_budget_toy import fit_with_budget, hrp_init_with_budget

RUNS = ("ddp", "model_parallel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    strategies = []

    def strategy(name: str):
        strategies.append(make_strategy(name, "cpu", WORLD_SIZE))
        return strategies[-1]

    for run in RUNS:
        try:
            fit_with_budget(lambda: strategy(run), args.out, run, devices=WORLD_SIZE, batch_size=BATCH_SIZE,
                            fully_shard_blocks=run == "model_parallel")
        except Exception as error:  # recorded for the test; the next run still goes
            write_json(args.out / f"error_{run}_rank{dist.get_rank()}.json", {"error": repr(error), "traceback": traceback.format_exc()})
            dist.barrier()
    rank = dist.get_rank()
    try:
        hrp_init_with_budget(args.out, BATCH_SIZE)
    except Exception as error:
        write_json(args.out / f"error_hrp_init_rank{rank}.json", {"error": repr(error), "traceback": traceback.format_exc()})
    dist.barrier()
    dist.destroy_process_group()
    # Rank 0 launched the other local ranks (Lightning re-ran this script); wait for them to exit.
    if rank == 0:
        children = strategies[0].launcher.procs
        write_json(args.out / "exit_codes.json", {"0": 0, **{str(r + 1): child.wait(timeout=60) for r, child in enumerate(children)}})


if __name__ == "__main__":
    main()
