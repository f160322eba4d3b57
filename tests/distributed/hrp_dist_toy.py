"""A tiny LoRA regression model and probes shared by the distributed tests (importable by spawned workers).

The network is two residual MLP blocks with peft LoRA on both linears of each block (4 LoRA layers of
two shapes), so FSDP2's ``fully_shard`` can be applied per block, to modules that hold LoRA layers.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy, ParallelStrategy, Strategy
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_hrp import HRPPreheatCallback
from lightning_hrp.engine.distributed import read_full
from lightning_hrp.engine.lora import find_lora_targets

WIDTH = 16
HIDDEN = 24
DATASET_SIZE = 64
LORA_RANK = 2
PREHEAT_RANK = 8
PREHEAT_STEPS = 3
ACCUMULATE = 2
MAIN_STEPS = 2
PREHEAT_SGD_LR = 0.3
# Per-process batch size of the multi-process runs (the one-process reference reads world size times as many).
BATCH_SIZE = 4
WORKER = Path(__file__).with_name("hrp_dist_worker.py")
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
# Processes of the CPU runs.
WORLD_SIZE = 2
# Strategy names of hrp_dist_worker, each optionally @precision (default 32-true).
CPU_RUNS = (
    "ddp",
    "model_parallel",
    "fsdp",
    "fsdp_flat",
    "ddp@bf16-mixed",
    "model_parallel@bf16-mixed",
    "fsdp@bf16-mixed",
    "ddp@bf16-true",
    "model_parallel@bf16-true",
)
# The seed each rank's global RNG gets in ``setup`` is this plus its rank, so only a broadcast of rank 0's
# seed can make the preheat adapters agree.
RANK_SEED_BASE = 1000


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, HIDDEN)
        self.down = nn.Linear(HIDDEN, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def regression_data(seed: int = 0) -> TensorDataset:
    """Inputs and targets of a smooth random map, fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(DATASET_SIZE, WIDTH, generator=generator)
    mixing = torch.randn(WIDTH, WIDTH, generator=generator) / WIDTH**0.5
    return TensorDataset(x, torch.sin(x @ mixing) + 0.5 * x)


def toy_lora_network() -> nn.Module:
    """Two residual blocks with peft LoRA on both linears: the same base weights and LoRA init in every process and call."""
    torch.manual_seed(0)
    config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["up", "down"], lora_dropout=0.0)
    return get_peft_model(_Net(), config)


def toy_loss(model: nn.Module, batch: list[Tensor]) -> Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


class ToyLoRARegression(pl.LightningModule):
    """Two LoRA-adapted residual blocks fitting :func:`regression_data` with a mean squared error.

    Args:
        batch_size: Per-process batch size.
        fully_shard_blocks: Apply FSDP2's ``fully_shard`` to each block and the root in
            ``configure_model`` (for ``ModelParallelStrategy``).
        offload_to_cpu: With ``fully_shard_blocks``, shard with FSDP2's ``CPUOffloadPolicy`` (GPU only).
    """

    def __init__(self, batch_size: int, fully_shard_blocks: bool = False, offload_to_cpu: bool = False) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.fully_shard_blocks = fully_shard_blocks
        self.offload_to_cpu = offload_to_cpu
        self.model = toy_lora_network()
        self.training_step_calls = 0

    def configure_model(self) -> None:
        if not self.fully_shard_blocks:
            return
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        mesh = self.device_mesh["data_parallel"]
        policy = CPUOffloadPolicy() if self.offload_to_cpu else OffloadPolicy()
        for block in self.model.base_model.model.blocks:
            fully_shard(block, mesh=mesh, offload_policy=policy)
        fully_shard(self.model, mesh=mesh, offload_policy=policy)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        self.training_step_calls += 1
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self) -> DataLoader:
        # Lightning's automatic DistributedSampler always shuffles the training set, so the trainer
        # runs with use_distributed_sampler=False and the order is set here: rank r of W reads samples
        # r, r + W, ..., so the ranks' k-th batches together hold exactly the k-th batch of one process
        # reading W times as many samples in order.
        data = regression_data()
        sampler = None
        if isinstance(self.trainer.strategy, ParallelStrategy):
            sampler = DistributedSampler(data, shuffle=False, **self.trainer.strategy.distributed_sampler_kwargs)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def lora_adapters(trainer: pl.Trainer) -> dict[str, Tensor]:
    """Every rank-r LoRA factor of the trainer's module, whole (gathered when sharded), on the CPU.

    A collective under FSDP and ModelParallelStrategy: every rank must call it.
    """
    whole: AbstractContextManager = nullcontext()
    if isinstance(trainer.strategy, FSDPStrategy):
        # FSDP1 keeps flat shards outside the DTensor API; gather them whole to read.
        from torch.distributed.fsdp import FullyShardedDataParallel

        whole = FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False)
    adapters = {}
    with whole:
        for target in find_lora_targets(trainer.lightning_module):
            adapters[f"{target.name}.lora_A"] = read_full(target.lora_A).detach().float().cpu().clone()
            adapters[f"{target.name}.lora_B"] = read_full(target.lora_B).detach().float().cpu().clone()
    return adapters


def ranks_agree_bitwise(adapters: dict[str, Tensor], device: torch.device) -> bool:
    """Whether every rank holds bitwise the same ``adapters`` (True in a single process).

    ``device`` must suit the process group's backend (the strategy's root device does).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return True
    flat = torch.cat([t.reshape(-1) for _, t in sorted(adapters.items())])
    # Compare raw bits: -0.0 and 0.0 differ, a NaN equals itself.
    bits = flat.view(torch.int32).to(device)
    gathered = [torch.empty_like(bits) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, bits)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def _parameter_identity(trainer: pl.Trainer) -> list:
    """Which Parameter objects (and shapes) the wrapped model and the optimizers hold."""
    model = [(id(p), tuple(p.shape)) for p in trainer.strategy.model.parameters()]
    optimizers = [id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]]
    return [model, optimizers]


def _lora_local_fraction(trainer: pl.Trainer) -> float:
    """Share of the LoRA elements this rank stores (1.0 unsharded, about 1/world size when sharded).

    Meaningless under FSDP1 with use_orig_params=False, whose original weights are dangling views.
    """
    local = full = 0
    for target in find_lora_targets(trainer.lightning_module):
        for param, shape in ((target.lora_A, (target.rank, target.in_features)), (target.lora_B, (target.out_features, target.rank))):
            local += (param.to_local() if isinstance(param, DTensor) else param).numel()
            full += shape[0] * shape[1]
    return local / full


class AdapterProbe(pl.Callback):
    """Seeds each rank differently, records the adapters after HRP and at the end of fit, writes them out.

    Must come after :class:`~lightning_hrp.HRPPreheatCallback` in the callback list, so its
    ``on_train_start`` sees the adapters HRP wrote. At ``on_train_end`` every rank writes
    ``{tag}_rank{r}.json`` into ``out_dir`` and, if ``checkpoint_path`` is set, the trainer saves a
    checkpoint there (after preheating and the main steps).
    """

    def __init__(self, out_dir: Path, tag: str, checkpoint_path: Path | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.tag = tag
        self.checkpoint_path = checkpoint_path
        self.after_preheat: dict[str, Tensor] = {}
        self.agree_after_preheat: bool | None = None
        self.training_step_calls_at_start = 0
        self.identity_at_fit_start: list = []
        self.identity_kept: bool | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.manual_seed(RANK_SEED_BASE + trainer.global_rank)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the strategy wrapped the model and built the optimizers, before HRP runs.
        self.identity_at_fit_start = _parameter_identity(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.identity_kept = _parameter_identity(trainer) == self.identity_at_fit_start
        self.after_preheat = lora_adapters(trainer)
        self.agree_after_preheat = ranks_agree_bitwise(self.after_preheat, trainer.strategy.root_device)
        self.training_step_calls_at_start = pl_module.training_step_calls

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        final = lora_adapters(trainer)
        (hrp,) = [c for c in trainer.callbacks if isinstance(c, HRPPreheatCallback)]
        report = hrp.report
        payload = {
            "world_size": trainer.world_size,
            "global_rank": trainer.global_rank,
            "strategy": type(trainer.strategy).__name__,
            "precision": trainer.precision,
            "global_step": trainer.global_step,
            "identity_kept": self.identity_kept,
            "lora_local_fraction": _lora_local_fraction(trainer),
            "agree_after_preheat": self.agree_after_preheat,
            "agree_final": ranks_agree_bitwise(final, trainer.strategy.root_device),
            "training_step_calls_at_start": self.training_step_calls_at_start,
            "training_step_calls_total": pl_module.training_step_calls,
            "preheat_finished": hrp.state_dict()["preheat_finished"],
            "report": None
            if report is None
            else {
                "seed": report.seed,
                "preheat_losses": report.preheat_losses,
                "layers": [layer.name for layer in report.layers],
            },
            "after_preheat": to_json_tensors(self.after_preheat),
            "final": to_json_tensors(final),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.out_dir / f"{self.tag}_rank{trainer.global_rank}.json", payload)
        if self.checkpoint_path is not None:
            trainer.save_checkpoint(self.checkpoint_path, weights_only=False)


def to_json_tensors(tensors: dict[str, Tensor]) -> dict[str, list]:
    return {name: t.tolist() for name, t in tensors.items()}


def from_json_tensors(data: dict[str, list]) -> dict[str, Tensor]:
    return {name: torch.tensor(value) for name, value in data.items()}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def hrp_callback() -> HRPPreheatCallback:
    # keep_progress writes both factors (B nonzero), so a broken write of either one shows. SGD, unlike
    # Adam, moves in proportion to the gradient, so a wrongly scaled all-reduce shows too (partial, not a
    # lambda: ddp_spawn pickles the callback). The drift tolerance is never reached; it makes every rank
    # take the early-stop decision each step, collectively.
    return HRPPreheatCallback(
        PREHEAT_RANK,
        PREHEAT_STEPS,
        mode="classic",
        init_rule="keep_progress",
        preheat_optimizer=functools.partial(torch.optim.SGD, lr=PREHEAT_SGD_LR),
        drift_tolerance=1e-12,
    )


def toy_trainer(
    make_strategy: Callable[[], Strategy | str], out_dir: Path, callbacks: list[pl.Callback], **kwargs: Any
) -> pl.Trainer:
    """A quiet Trainer for the toy: no logger, checkpoints, progress bar or sanity check; ``kwargs`` add to it."""
    return pl.Trainer(
        strategy=make_strategy(),
        accumulate_grad_batches=ACCUMULATE,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=out_dir,
        **kwargs,
    )


def fit_then_resume(
    make_strategy: Callable[[], Strategy | str],
    out_dir: Path,
    *,
    devices: int,
    batch_size: int,
    accelerator: str = "cpu",
    precision: str = "32-true",
    num_nodes: int = 1,
    fully_shard_blocks: bool = False,
    offload_to_cpu: bool = False,
) -> None:
    """Fit with HRP for ``MAIN_STEPS`` steps and checkpoint, then resume one more step from the checkpoint.

    Every rank writes ``first_rank{r}.json`` and ``resumed_rank{r}.json`` into ``out_dir``.
    """
    out_dir = Path(out_dir)
    checkpoint = out_dir / "after_preheat.ckpt"

    def trainer(tag: str, max_steps: int, checkpoint_path: Path | None) -> pl.Trainer:
        return toy_trainer(
            make_strategy,
            out_dir,
            [hrp_callback(), AdapterProbe(out_dir, tag, checkpoint_path)],
            max_steps=max_steps,
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            precision=precision,
        )

    trainer("first", MAIN_STEPS, checkpoint).fit(ToyLoRARegression(batch_size, fully_shard_blocks, offload_to_cpu))
    trainer("resumed", MAIN_STEPS + 1, None).fit(
        ToyLoRARegression(batch_size, fully_shard_blocks, offload_to_cpu), ckpt_path=checkpoint, weights_only=True
    )


# Failure runs of hrp_dist_worker: strategy:failure:on_failure. The failure strikes on FAILING_RANK only,
# at its second training_step call (during preheating). Under FSDP only failures outside the sharded
# model's forward/backward can be agreed on, and under FSDP1, whose root forward Lightning runs
# training_step in, only those outside training_step (see lightning_hrp.engine.preheat_loop); so
# only those run there.
FAILING_RANK = 1
FAILURE_RUNS = (
    "ddp:exception:continue",
    "ddp:shape:continue",
    "ddp:no_loss:continue",
    "ddp:exception:raise",
    "model_parallel:exception_after_forward:continue",
    "model_parallel:no_loss:continue",
    "fsdp:no_loss:continue",
    "fsdp:skip:continue",
)
# What the warning or error says, per failure, and whether only the failing rank says it (the others
# say that another rank failed) or every rank (a failure all ranks see alike).
FAILURE_REASONS = {
    "exception": ("boom before the forward", True),
    "exception_after_forward": ("boom after the forward", True),
    "shape": ("shape", True),
    "no_loss": ("without the key 'loss'", True),
    "skip": ("skipped a preheat batch on 1 of 2 ranks only", False),
}


class FailsOnOneRank(ToyLoRARegression):
    """:class:`ToyLoRARegression` whose ``training_step`` fails on :data:`FAILING_RANK` only, once.

    Failures: ``exception`` (raised before the model's forward), ``exception_after_forward``,
    ``shape`` (a wrongly shaped input makes the model's forward raise), ``no_loss`` (a dict without
    ``"loss"``), ``skip`` (``None``, after the forward).
    """

    def __init__(self, batch_size: int, failure: str, fully_shard_blocks: bool = False) -> None:
        super().__init__(batch_size, fully_shard_blocks)
        if failure not in FAILURE_REASONS:
            raise ValueError(f"unknown failure {failure!r}; choose from {sorted(FAILURE_REASONS)}")
        self.failure = failure

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Any:
        self.training_step_calls += 1
        fails = self.trainer.global_rank == FAILING_RANK and self.training_step_calls == 2
        x, y = batch
        if fails and self.failure == "exception":
            raise RuntimeError(FAILURE_REASONS["exception"][0])
        if fails and self.failure == "shape":
            x = x[:, :-1]
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        if fails and self.failure == "exception_after_forward":
            raise RuntimeError(FAILURE_REASONS["exception_after_forward"][0])
        if fails and self.failure == "no_loss":
            return {"mse": loss}
        if fails and self.failure == "skip":
            return None
        return loss


class AdaptersAtTrainStartAndEnd(pl.Callback):
    """Records the adapters right after HRP and at the end of training (on every rank, as a sharded read needs)."""

    def __init__(self) -> None:
        self.at_start: dict[str, Tensor] | None = None
        self.at_end: dict[str, Tensor] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_start = lora_adapters(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_end = lora_adapters(trainer)


def fit_with_failure(
    make_strategy: Callable[[], Strategy | str],
    out_dir: Path,
    failure: str,
    on_failure: str,
    *,
    devices: int,
    batch_size: int,
    fully_shard_blocks: bool = False,
) -> None:
    """Fit with HRP while one rank fails during preheating; every rank writes ``failure_rank{r}.json``.

    The JSON holds the exception the fit raised on that rank (if any), HRP's warnings on that rank,
    and the adapters before the fit, right after HRP (if training started) and after the fit or
    the failure, with whether the ranks agreed bitwise.
    """
    module = FailsOnOneRank(batch_size, failure, fully_shard_blocks)
    initial = {
        f"{target.name}.{name}": weight.detach().float().cpu().clone()
        for target in find_lora_targets(module)
        for name, weight in (("lora_A", target.lora_A), ("lora_B", target.lora_B))
    }
    probe = AdaptersAtTrainStartAndEnd()
    hrp = HRPPreheatCallback(PREHEAT_RANK, PREHEAT_STEPS, on_failure=on_failure)
    trainer = toy_trainer(make_strategy, out_dir, [hrp, probe], max_steps=MAIN_STEPS, accelerator="cpu", devices=devices)
    error: Exception | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(module)
        except Exception as raised:
            error = raised
    # After a failure every rank raised at the same point, so every rank reads (collectively if sharded).
    after = probe.at_end if error is None else lora_adapters(trainer)
    device = trainer.strategy.root_device
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        out_dir / f"failure_rank{trainer.global_rank}.json",
        {
            "error_type": type(error).__name__ if error is not None else None,
            "error": str(error) if error is not None else None,
            "hrp_warnings": [str(w.message) for w in caught if "HRP preheating failed" in str(w.message)],
            "global_step": trainer.global_step,
            "initial": to_json_tensors(initial),
            "at_train_start": to_json_tensors(probe.at_start) if probe.at_start is not None else None,
            "agree_at_train_start": ranks_agree_bitwise(probe.at_start, device) if probe.at_start is not None else None,
            "after": to_json_tensors(after),
            "agree_after": ranks_agree_bitwise(after, device),
        },
    )


def assert_failure_run(out_dir: Path, run: str, world_size: int) -> None:
    """Every rank finished together, from the restored default init, as ``on_failure`` asked."""
    _, failure, on_failure = run.split(":")
    results = read_results(out_dir, "failure", world_size)
    reason, only_failing_rank = FAILURE_REASONS[failure]
    initial = from_json_tensors(results[0]["initial"])
    for rank, payload in enumerate(results):
        assert payload["agree_after"] is True, rank
        if on_failure == "continue" and failure != "no_loss":
            assert payload["error_type"] is None, payload["error"]
            # Preheating failed on one rank; every rank restored the default init and trained on.
            assert payload["agree_at_train_start"] is True
            for name, value in from_json_tensors(payload["at_train_start"]).items():
                assert torch.equal(value, initial[name]), (rank, name)
            assert payload["global_step"] == MAIN_STEPS
            (warning,) = payload["hrp_warnings"]
            assert (reason in warning) == (rank == FAILING_RANK or not only_failing_rank), (rank, warning)
        else:
            # raise, or a configuration error (a dict without "loss"), which on_failure never swallows:
            # every rank raises, with the model restored.
            expected = "HRPConfigurationError" if failure == "no_loss" else ("RuntimeError" if rank == FAILING_RANK else "PreheatFailedError")
            assert payload["error_type"] == expected, (rank, payload["error"])
            assert (reason in payload["error"]) == (rank == FAILING_RANK), (rank, payload["error"])
            assert payload["at_train_start"] is None and payload["global_step"] == 0
            for name, value in from_json_tensors(payload["after"]).items():
                assert torch.equal(value, initial[name]), (rank, name)


def read_results(out_dir: Path, tag: str, world_size: int) -> list[dict[str, Any]]:
    """The JSON each rank wrote for ``tag``, rank order."""
    return [json.loads((Path(out_dir) / f"{tag}_rank{rank}.json").read_text()) for rank in range(world_size)]


# Two processes with per-rank batch b against one with batch 2b: the same sums in a different order,
# so agreement is to float32 rounding (about 1e-7 seen); a wrong average or a missed all-reduce moves
# the weights by about 1e-1.
MATCH_ATOL = 1e-5


def assert_close_tensors(actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    worst = {name: float((actual[name] - expected[name]).abs().max()) for name in expected}
    bad = {name: diff for name, diff in worst.items() if not diff <= atol}
    assert not bad, f"{what}: max |difference| above {atol}: {bad}"


def assert_distributed_run(
    out_dir: Path, world_size: int, reference: dict[str, dict] | None, atol: float = MATCH_ATOL
) -> None:
    """Everything a multi-process fit-then-resume must show, against a one-process ``reference``.

    ``reference`` maps ``"first"`` and ``"resumed"`` to the one-process run's payloads; ``None``
    skips the numeric comparison (for mixed precision, where strategies legitimately round differently)
    and checks instead that HRP wrote finite adapters.
    """
    errors = sorted(Path(out_dir).glob("error_rank*.json"))
    assert not errors, json.loads(errors[0].read_text())["traceback"]
    first = read_results(out_dir, "first", world_size)
    resumed = read_results(out_dir, "resumed", world_size)
    for payload in first + resumed:
        assert payload["world_size"] == world_size
        # Bitwise the same adapters on every rank, right after HRP and at the end of fit.
        assert payload["agree_after_preheat"] is True and payload["agree_final"] is True
        # The wrapped parameters and the optimizers' parameters are the very same objects after HRP.
        assert payload["identity_kept"] is True
    # Every rank preheated with rank 0's seed, for PREHEAT_STEPS steps of ACCUMULATE batches each.
    for payload in first:
        assert payload["report"]["seed"] == RANK_SEED_BASE
        assert payload["training_step_calls_at_start"] == PREHEAT_STEPS * ACCUMULATE
        assert len(payload["report"]["preheat_losses"]) == PREHEAT_STEPS
    # Resuming restores the adapters exactly, does not preheat again.
    for payload in resumed:
        assert payload["report"] is None and payload["preheat_finished"] is True
        assert payload["training_step_calls_at_start"] == 0
        assert payload["global_step"] == MAIN_STEPS + 1
    for name, value in from_json_tensors(resumed[0]["after_preheat"]).items():
        assert torch.equal(value, from_json_tensors(first[0]["final"])[name]), name
    if reference is None:
        after_preheat = from_json_tensors(first[0]["after_preheat"])
        assert all(bool(torch.isfinite(t).all()) for t in after_preheat.values())
        # keep_progress writes a nonzero B where peft starts every B at zero.
        assert all(bool(t.abs().sum() > 0) for name, t in after_preheat.items() if name.endswith("lora_B"))
        return
    # The preheat loss and the adapters equal those of one process reading twice the batch.
    assert first[0]["report"]["preheat_losses"] == pytest.approx(reference["first"]["report"]["preheat_losses"], rel=1e-5)
    for key in ("after_preheat", "final"):
        assert_close_tensors(
            from_json_tensors(first[0][key]), from_json_tensors(reference["first"][key]), atol, f"first run, {key}"
        )
    # After resuming, training goes on as in one process.
    assert_close_tensors(
        from_json_tensors(resumed[0]["final"]), from_json_tensors(reference["resumed"]["final"]), atol, "resumed run, final"
    )


def one_process_reference(out_dir: Path, world_size: int, batch_size: int, accelerator: str = "cpu", precision: str = "32-true") -> dict[str, dict]:
    """Fit-then-resume in this process on one device with ``world_size * batch_size`` samples per batch."""
    fit_then_resume(
        lambda: "auto",
        out_dir,
        devices=1,
        batch_size=world_size * batch_size,
        accelerator=accelerator,
        precision=precision,
    )
    return {tag: read_results(out_dir, tag, 1)[0] for tag in ("first", "resumed")}


def run_worker(
    out_dir: Path,
    runs: tuple[str, ...],
    *,
    accelerator: str,
    devices: int,
    precision: str,
    timeout: float,
    failure_runs: tuple[str, ...] = (),
    collective_timeout: float | None = None,
) -> int:
    """Run :mod:`hrp_dist_worker` as a script and return its exit status; its output goes to ``out_dir/worker.log``."""
    arguments = [
        "--runs", ",".join(runs), "--failure-runs", ",".join(failure_runs), "--accelerator", accelerator,
        "--devices", str(devices), "--precision", precision, "--batch-size", str(BATCH_SIZE), "--out", str(out_dir),
    ]  # fmt: skip
    if collective_timeout is not None:
        arguments += ["--collective-timeout", str(collective_timeout)]
    return run_script(WORKER, arguments, out_dir, timeout)


def run_script(script: Path, arguments: list[str], out_dir: Path, timeout: float) -> int:
    """Run a multi-process worker script and return its exit status; its output goes to ``out_dir/worker.log``.

    Lightning re-runs the script for the other ranks, as children of rank 0. The worker gets a
    session of its own, so that on timeout the whole tree is ended, not just rank 0.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(script), *arguments]
    # Without PL_GLOBAL_SEED the ranks' RNGs differ, which the seed broadcast must overcome.
    env = {k: v for k, v in os.environ.items() if k not in ("PL_GLOBAL_SEED", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    # The script's own folder comes first on its path; the repository root makes lightning_hrp importable
    # even where it is not installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY_ROOT), env.get("PYTHONPATH")]))
    with open(out_dir / "worker.log", "w") as log:
        worker = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return worker.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
            raise


def run_worker_cleanly(script: Path, out_dir: Path, timeout: float = 300) -> Path:
    """Run a worker script that writes ``error_*.json`` for a failed case; fail the test with its log or traceback.

    Returns:
        ``out_dir``, holding what the worker wrote.
    """
    status = run_script(script, ["--out", str(out_dir)], out_dir, timeout=timeout)
    log = (out_dir / "worker.log").read_text()
    assert status == 0, f"worker exited with {status}:\n{log[-6000:]}"
    errors = sorted(out_dir.glob("error_*.json"))
    assert not errors, json.loads(errors[0].read_text())["traceback"]
    return out_dir
