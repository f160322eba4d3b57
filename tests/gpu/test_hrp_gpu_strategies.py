"""HRP on CUDA: every cell of the README's support table that one GPU can test (run by tests/gpu/run_on_gpu.sh).

* One device, in this process: ``32-true``, ``16-mixed``, ``bf16-mixed``, ``bf16-true``.
* DDP, FSDP1 (``strategy="fsdp"``, ``use_orig_params`` True and False) and FSDP2
  (``ModelParallelStrategy``), each as a group of one process per GPU (one GPU is enough: the
  strategy still goes through its wrapping, sharding API and write-back path), at ``32-true``
  (against the one-device run with the whole batch), ``bf16-mixed``, ``16-mixed`` (which
  ``ModelParallelStrategy`` refuses) and ``bf16-true``.
* CPU offload: FSDP1 ``cpu_offload=True`` and FSDP2 ``CPUOffloadPolicy``, at ``32-true``.

FSDP1 runs here as Lightning ships it (Lightning refuses it on CPU, where ``tests/distributed`` goes
around that check). Shares the worker script and the checks of ``tests/distributed``: a test's id
names its strategy and precision, which is the README cell it fills.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

from hrp_dist_toy import BATCH_SIZE, assert_distributed_run, fit_then_resume, one_process_reference, run_worker  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FSDP1 in Lightning refuses CPU)"),
]
DEVICES = max(1, min(2, torch.cuda.device_count()))
# Compared with the one-device run reading DEVICES times the per-process batch.
FP32_RUNS = ("ddp", "model_parallel", "fsdp", "fsdp_flat", "fsdp_offload")
# Mixed and true half precision round differently per strategy (FSDP1 casts parameters, the others
# autocast): structural checks plus finite, nonzero adapters. ModelParallelStrategy refuses 16-mixed.
HALF_PRECISION_RUNS = (
    "ddp@bf16-mixed",
    "model_parallel@bf16-mixed",
    "fsdp@bf16-mixed",
    "fsdp_flat@bf16-mixed",
    "ddp@16-mixed",
    "fsdp@16-mixed",
    "fsdp_flat@16-mixed",
    "ddp@bf16-true",
    "model_parallel@bf16-true",
    "fsdp@bf16-true",
)
FSDP2_OFFLOAD_RUN = "model_parallel_offload"
ONE_DEVICE_PRECISIONS = ("16-mixed", "bf16-mixed", "bf16-true")
# The worker's whole run: 16 strategies, each a fit and a resumed fit (within run_on_gpu.py's cap for these tests).
WORKER_TIMEOUT_S = 110


@pytest.fixture(scope="module")
def gpu_worker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every strategy run in one worker invocation (one process group start-up)."""
    out_dir = tmp_path_factory.mktemp("hrp_gpu_worker")
    runs = (*FP32_RUNS, *HALF_PRECISION_RUNS, FSDP2_OFFLOAD_RUN)
    status = run_worker(out_dir, runs, accelerator="cuda", devices=DEVICES, precision="32-true", timeout=WORKER_TIMEOUT_S)
    assert status == 0, f"worker exited with {status}:\n{(out_dir / 'worker.log').read_text()[-6000:]}"
    return out_dir


@pytest.fixture(scope="module")
def gpu_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """One device, fp32, DEVICES times the per-process batch."""
    return one_process_reference(
        tmp_path_factory.mktemp("hrp_gpu_reference"), DEVICES, BATCH_SIZE, accelerator="cuda", precision="32-true"
    )


def test_one_device_fp32(tmp_path: Path) -> None:
    fit_then_resume(lambda: "auto", tmp_path, devices=1, batch_size=BATCH_SIZE, accelerator="cuda", precision="32-true")
    assert_distributed_run(tmp_path, 1, reference=None)


@pytest.mark.parametrize("precision", ONE_DEVICE_PRECISIONS)
def test_one_device_half_precision(precision: str, tmp_path: Path) -> None:
    fit_then_resume(lambda: "auto", tmp_path, devices=1, batch_size=BATCH_SIZE, accelerator="cuda", precision=precision)
    assert_distributed_run(tmp_path, 1, reference=None)


@pytest.mark.parametrize("run", FP32_RUNS)
def test_fp32_strategy_matches_one_device(run: str, gpu_worker: Path, gpu_reference: dict) -> None:
    assert_distributed_run(gpu_worker / run, DEVICES, gpu_reference)


@pytest.mark.parametrize("run", HALF_PRECISION_RUNS)
def test_half_precision_strategy(run: str, gpu_worker: Path) -> None:
    assert_distributed_run(gpu_worker / run, DEVICES, reference=None)


def test_fsdp2_cpu_offload(gpu_worker: Path, gpu_reference: dict) -> None:
    errors = sorted((gpu_worker / FSDP2_OFFLOAD_RUN).glob("error_rank*.json"))
    if errors:
        traceback = json.loads(errors[0].read_text())["traceback"]
        # Lightning's ModelParallelStrategy moves the whole model to the GPU after configure_model;
        # FSDP2 then refuses offloaded parameters off the CPU. That is Lightning's limit, not HRP's:
        # any other error fails.
        if "materialized on CPU when enabling CPU offloading" in traceback:
            pytest.xfail("ModelParallelStrategy moves CPU-offloaded FSDP2 parameters to the GPU, which FSDP2 refuses")
    assert_distributed_run(gpu_worker / FSDP2_OFFLOAD_RUN, DEVICES, gpu_reference)
