"""``rank_budget`` on 2 CPU processes with gloo: HRPInit under DDP and FSDP2 (ModelParallelStrategy), ``hrp_init`` on a bare network.

Every rank must take the same decision (rank 0's allocation, bitwise the same adapters) and the
same one as one process reading the doubled batch; the strategy then wraps, shards and optimizes the
resized adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hrp_dist_toy import BATCH_SIZE, MAIN_STEPS, MATCH_ATOL, WORLD_SIZE, assert_close_tensors, from_json_tensors, run_worker_cleanly
from rank_budget_toy import RANK_BUDGET, fit_with_budget, hrp_init_with_budget

WORKER = Path(__file__).with_name("rank_budget_worker.py")


@pytest.fixture(scope="module")
def budget_worker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_worker_cleanly(WORKER, tmp_path_factory.mktemp("rank_budget_worker"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The same runs in this process, on one device reading WORLD_SIZE * BATCH_SIZE samples per batch."""
    out_dir = tmp_path_factory.mktemp("rank_budget_reference")
    fit_with_budget(lambda: "auto", out_dir, "fit", devices=1, batch_size=WORLD_SIZE * BATCH_SIZE)
    hrp_init_with_budget(out_dir, WORLD_SIZE * BATCH_SIZE)
    return {tag: json.loads((out_dir / f"{tag}_rank0.json").read_text()) for tag in ("fit", "hrp_init")}


def _payloads(out_dir: Path, tag: str) -> list[dict]:
    return [json.loads((out_dir / f"{tag}_rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize(("run", "sharded"), [("ddp", False), ("model_parallel", True)])
def test_every_rank_allocates_like_one_process_and_trains_the_resized_adapters(run, sharded, budget_worker, reference):
    expected = reference["fit"]
    assert sum(expected["ranks"]) == RANK_BUDGET and expected["ranks"] != [2] * 4
    for payload in _payloads(budget_worker, run):
        assert payload["ranks"] == expected["ranks"] and payload["rank_pattern"] == expected["rank_pattern"]
        assert payload["agree_start"] is True and payload["agree_final"] is True
        assert_close_tensors(from_json_tensors(payload["start"]), from_json_tensors(expected["start"]), MATCH_ATOL, run)
        # The strategy wrapped (and under FSDP2 sharded) the resized adapters, and the optimizer steps them.
        assert payload["optimizer_shapes"] == expected["optimizer_shapes"]
        assert payload["global_step"] == MAIN_STEPS and payload["final_finite"]
        assert (0 < payload["lora_local_fraction"] < 1) if sharded else payload["lora_local_fraction"] == 1.0


def test_hrp_init_on_a_bare_network_allocates_alike_on_every_rank(budget_worker, reference):
    expected = reference["hrp_init"]
    for payload in _payloads(budget_worker, "hrp_init"):
        assert payload["ranks"] == expected["ranks"] and sum(payload["ranks"]) == RANK_BUDGET
        assert payload["agree_start"] is True and payload["agree_final"] is True
        assert_close_tensors(from_json_tensors(payload["start"]), from_json_tensors(expected["start"]), MATCH_ATOL, "hrp_init")


def test_every_rank_exits_cleanly(budget_worker):
    codes = json.loads((budget_worker / "exit_codes.json").read_text())
    assert codes == {str(rank): 0 for rank in range(WORLD_SIZE)}
    assert "Traceback" not in (budget_worker / "worker.log").read_text()
