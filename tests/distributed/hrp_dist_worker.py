"""Multi-process HRP runs, launched by the distributed tests (and the GPU tests, tests/gpu) as a script.

Lightning's ``ddp``-style strategies start the other ranks by re-running this script, so it must not
be pytest itself. One invocation sets up the process group once and runs several strategies in turn
(each a fresh Trainer), leaving JSON files in ``--out`` for the calling test to assert on:

A run is a strategy name, optionally with its own precision: ``ddp@bf16-mixed``.

* ``{run}/first_rank{r}.json``, ``{run}/resumed_rank{r}.json``: see :func:`hrp_dist_toy.fit_then_resume`;
* ``{run}/error_rank{r}.json``: the exception a run raised, if any (the next run still goes);
* ``{strategy:failure:on_failure}/failure_rank{r}.json`` for ``--failure-runs``: see
  :func:`hrp_dist_toy.fit_with_failure` (one rank fails during preheating);
* ``engine_rank{r}.json``: the decomposition shared out over ranks against a local one;
* ``exit_codes.json`` (rank 0, last): every rank's exit status after the process group is destroyed.

Usage:
    python tests/distributed/hrp_dist_worker.py --runs ddp,model_parallel,ddp@bf16-mixed --devices 2 --batch-size 4 --out DIR
    python tests/distributed/hrp_dist_worker.py --failure-runs ddp:exception:continue --collective-timeout 20 --out DIR
"""

from __future__ import annotations

import argparse
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from hrp_dist_toy import Block, fit_then_resume, fit_with_failure, write_json
from lightning_hrp.engine.decompose import svd_of_products
from lightning_hrp.engine.distributed import _deal_out, shared_svd_of_products

# A rank that never joins a collective makes the others fail after this long instead of hanging
# (the first run's strategy creates the process group, so its timeout holds for the whole invocation).
COLLECTIVE_TIMEOUT = timedelta(seconds=90)
# The *_offload runs keep the sharded parameters on the CPU (FSDP1 cpu_offload, FSDP2 CPUOffloadPolicy): GPU only.
RUNS = ("ddp", "model_parallel", "fsdp", "fsdp_flat", "fsdp_offload", "model_parallel_offload")


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy (FSDP1) on CPU, for tests only.

    Lightning refuses ``strategy="fsdp"`` without a GPU, and FSDP1 itself needs ``device_id=cpu``
    on a machine without an accelerator, which Lightning never passes; this wraps the model as
    Lightning's ``_setup_model`` does, with that one argument added. Everything else (the
    Trainer, FSDPPrecision, checkpointing) is Lightning's own.
    """

    def _setup_model(self, model: nn.Module) -> nn.Module:
        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


def make_strategy(run: str, accelerator: str, world_size: int, timeout: timedelta = COLLECTIVE_TIMEOUT) -> Strategy:
    if run == "ddp":
        return DDPStrategy(timeout=timeout)
    if run in ("model_parallel", "model_parallel_offload"):
        # tensor_parallel_size defaults to the device count; here all devices shard data (FSDP2 only).
        return ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1, timeout=timeout)
    fsdp = CPUFSDPStrategy if accelerator == "cpu" else FSDPStrategy
    # FSDP1's full state dict segfaults on CPU in torch 2.13 (with or without HRP): save sharded there.
    state_dict_type = "sharded" if accelerator == "cpu" else "full"
    if run in ("fsdp", "fsdp_offload"):
        # One unit per block: frozen base weights and trainable LoRA weights share a flat parameter.
        return fsdp(
            auto_wrap_policy={Block},
            use_orig_params=True,
            cpu_offload=run == "fsdp_offload",
            state_dict_type=state_dict_type,
            timeout=timeout,
        )
    if run == "fsdp_flat":
        # use_orig_params=False needs uniform requires_grad per unit: every Linear (base, lora_A, lora_B)
        # becomes its own unit, as peft's fsdp_auto_wrap_policy does.
        return fsdp(auto_wrap_policy={nn.Linear}, use_orig_params=False, state_dict_type=state_dict_type, timeout=timeout)
    raise SystemExit(f"unknown run {run!r}; choose from {RUNS}")


def check_shared_decomposition(out_dir: Path, device: torch.device) -> None:
    """Decompose products of three shapes shared out over the ranks; compare with a local decomposition."""
    generator = torch.Generator().manual_seed(7)
    shapes = [(24, 8, 16), (16, 8, 24), (24, 8, 16), (40, 6, 12)]  # (out, R, in); two products share a shape
    products = [
        (torch.randn(o, r, generator=generator).to(device), torch.randn(r, i, generator=generator).to(device))
        for o, r, i in shapes
    ]
    tops = [3, 3, 3, 2]
    shared = shared_svd_of_products(products, tops)
    local = svd_of_products(products, tops)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    flat = torch.cat([t.reshape(-1) for s in shared for t in (s.U, s.S, s.Vh)])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    write_json(
        out_dir / f"engine_rank{rank}.json",
        {
            "owners": _deal_out([[0, 2], [1], [3]], products, world_size),
            "bitwise_equal_across_ranks": all(torch.equal(gathered[0], g) for g in gathered[1:]),
            "max_abs_diff_to_local": max(
                float((a - b).abs().max())
                for s, l in zip(shared, local)
                for a, b in ((s.U, l.U), (s.S, l.S), (s.Vh, l.Vh))
            ),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="", help=f"comma-separated, from {', '.join(RUNS)}, each optionally @precision")
    parser.add_argument(
        "--failure-runs", default="", help="comma-separated strategy:failure:on_failure (see hrp_dist_toy.FAILURE_RUNS)"
    )
    parser.add_argument("--collective-timeout", type=float, default=COLLECTIVE_TIMEOUT.total_seconds())
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = [run for run in args.runs.split(",") if run]
    failure_runs = [run for run in args.failure_runs.split(",") if run]
    unknown = sorted(({run.partition("@")[0] for run in runs} | {run.split(":")[0] for run in failure_runs}) - set(RUNS))
    if unknown or not runs + failure_runs:
        parser.error(f"give --runs or --failure-runs; unknown strategies {unknown}; choose from {RUNS}")
    timeout = timedelta(seconds=args.collective_timeout)

    strategies: list[Strategy] = []

    def strategy_maker(name: str) -> Callable[[], Strategy]:
        def strategy() -> Strategy:
            strategies.append(make_strategy(name, args.accelerator, args.devices, timeout))
            return strategies[-1]

        return strategy

    for run in runs:
        name, _, precision = run.partition("@")
        out = args.out / run
        out.mkdir(parents=True, exist_ok=True)
        try:
            fit_then_resume(
                strategy_maker(name),
                out,
                devices=args.devices,
                batch_size=args.batch_size,
                accelerator=args.accelerator,
                precision=precision or args.precision,
                fully_shard_blocks=name.startswith("model_parallel"),
                offload_to_cpu=name == "model_parallel_offload",
            )
        except Exception as error:  # recorded for the test; a config error raised on every rank leaves the group usable
            write_json(out / f"error_rank{dist.get_rank()}.json", {"error": repr(error), "traceback": traceback.format_exc()})
            dist.barrier()

    for run in failure_runs:
        name, failure, on_failure = run.split(":")
        out = args.out / run.replace(":", "-")
        out.mkdir(parents=True, exist_ok=True)
        try:
            fit_with_failure(
                strategy_maker(name),
                out,
                failure,
                on_failure,
                devices=args.devices,
                batch_size=args.batch_size,
                fully_shard_blocks=name == "model_parallel",
            )
        except Exception as error:  # e.g. a collective timed out: recorded for the test
            write_json(out / f"error_rank{dist.get_rank()}.json", {"error": repr(error), "traceback": traceback.format_exc()})

    rank = dist.get_rank()
    check_shared_decomposition(args.out, strategies[-1].root_device)
    dist.barrier()
    dist.destroy_process_group()

    # Rank 0 launched the other local ranks (Lightning re-ran this script); wait for them to exit.
    children = strategies[0].launcher.procs if rank == 0 else []
    if rank == 0:
        codes = {"0": 0, **{str(r + 1): child.wait(timeout=60) for r, child in enumerate(children)}}
        write_json(args.out / "exit_codes.json", codes)


if __name__ == "__main__":
    main()
