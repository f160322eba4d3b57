"""Fixtures of the distributed tests: one multi-process worker run and a one-process reference, each shared."""

from __future__ import annotations

from pathlib import Path

import pytest

from hrp_dist_toy import BATCH_SIZE, CPU_RUNS, WORLD_SIZE, one_process_reference, run_worker

@pytest.fixture(scope="session")
def cpu_worker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker's output folder after running every CPU strategy on 2 processes with gloo."""
    out_dir = tmp_path_factory.mktemp("hrp_cpu_worker")
    status = run_worker(out_dir, CPU_RUNS, accelerator="cpu", devices=WORLD_SIZE, precision="32-true", timeout=300)
    log = (out_dir / "worker.log").read_text()
    assert status == 0, f"worker exited with {status}:\n{log[-6000:]}"
    return out_dir


@pytest.fixture(scope="session")
def cpu_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """One process on the CPU reading WORLD_SIZE * BATCH_SIZE samples per batch."""
    return one_process_reference(tmp_path_factory.mktemp("hrp_cpu_reference"), WORLD_SIZE, BATCH_SIZE)
