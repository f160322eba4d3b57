"""One rank fails during preheating under DDP, FSDP2 and FSDP1 on 2 CPU processes with gloo: no hang.

The worker runs with a 20 s process-group timeout, so a rank left waiting in a collective that
another never joins fails the run fast instead of hanging the test session for 30 minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hrp_dist_toy import FAILURE_RUNS, WORLD_SIZE, assert_failure_run, run_worker

COLLECTIVE_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def failure_worker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("hrp_failure_worker")
    status = run_worker(
        out_dir,
        (),
        failure_runs=FAILURE_RUNS,
        accelerator="cpu",
        devices=WORLD_SIZE,
        precision="32-true",
        timeout=300,
        collective_timeout=COLLECTIVE_TIMEOUT_S,
    )
    log = (out_dir / "worker.log").read_text()
    assert status == 0, f"worker exited with {status}:\n{log[-6000:]}"
    return out_dir


@pytest.mark.parametrize("run", FAILURE_RUNS)
def test_a_failure_on_one_rank_ends_preheating_on_every_rank_together(run: str, failure_worker: Path) -> None:
    out_dir = failure_worker / run.replace(":", "-")
    errors = sorted(out_dir.glob("error_rank*.json"))
    assert not errors, json.loads(errors[0].read_text())["traceback"]
    assert_failure_run(out_dir, run, WORLD_SIZE)


def test_every_rank_exits_cleanly_after_the_failures(failure_worker: Path) -> None:
    codes = json.loads((failure_worker / "exit_codes.json").read_text())
    assert codes == {str(rank): 0 for rank in range(WORLD_SIZE)}
