"""HRP under ``ddp_spawn`` on 2 CPU processes, started from this pytest process.

The spawned ranks unpickle the Trainer, so everything they run comes from importable modules
(``hrp_dist_toy``); each rank writes its results to files, since a spawned rank's callbacks never
come back to this process.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from hrp_dist_toy import BATCH_SIZE, WORLD_SIZE, assert_distributed_run, fit_then_resume


def test_ddp_spawn_preheats_like_one_process_with_double_batch(tmp_path: Path, cpu_reference: dict) -> None:
    fit_then_resume(
        # A rank that misses a collective fails after 90 s instead of hanging the test session.
        lambda: DDPStrategy(start_method="spawn", timeout=timedelta(seconds=90)),
        tmp_path,
        devices=WORLD_SIZE,
        batch_size=BATCH_SIZE,
    )
    assert_distributed_run(tmp_path, WORLD_SIZE, cpu_reference)
    # The ranks lived in the spawned processes; this one never joined a process group.
    assert not dist.is_initialized()
