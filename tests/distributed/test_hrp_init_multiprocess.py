"""``hrp_init`` on 2 CPU processes with gloo: a bare network, DDP, ``fully_shard`` (FSDP2), FSDP1 and Lightning Fabric.

One worker run (:mod:`hrp_init_worker`, launched by Fabric with ``strategy="ddp"``) holds every case;
each test asserts on what it left behind against one process reading the doubled batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hrp_dist_toy import BATCH_SIZE, MATCH_ATOL, WORLD_SIZE, assert_close_tensors, from_json_tensors, run_worker_cleanly
from hrp_init_toy import CASES, assert_matches_reference, one_process_other_params_reference, one_process_reference, read_payloads

WORKER = Path(__file__).with_name("hrp_init_worker.py")


@pytest.fixture(scope="module")
def hrp_init_worker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_worker_cleanly(WORKER, tmp_path_factory.mktemp("hrp_init_worker"))


@pytest.fixture(scope="module")
def reference() -> dict:
    return one_process_reference(WORLD_SIZE * BATCH_SIZE)


@pytest.mark.parametrize("case", [case for case in CASES if case not in ("ddp_failure", "ddp_other_params")])
def test_hrp_init_on_two_processes_equals_one_process_with_the_doubled_batch(case: str, hrp_init_worker: Path, reference: dict) -> None:
    # A bare network's main step is each rank's own (no gradient averaging): only the preheat is compared there.
    assert_matches_reference(read_payloads(hrp_init_worker, case, WORLD_SIZE), reference, main_step_synchronised=case != "plain")


def test_a_failure_on_one_rank_restores_every_rank_and_each_warns(hrp_init_worker: Path) -> None:
    for rank, payload in enumerate(read_payloads(hrp_init_worker, "ddp_failure", WORLD_SIZE)):
        assert payload["report_is_none"] and payload["restored"] and payload["no_grads"], rank
        assert payload["agree_after_hrp"] is True
        # The failing rank gives its reason, the other that another rank failed.
        (warning,) = payload["warnings"]
        assert ("boom on rank 1" in warning) == (rank == 1), (rank, warning)


def test_other_params_trained_under_ddp_join_the_all_reduce(hrp_init_worker: Path) -> None:
    # Each rank reads other samples; only averaging the bias's gradient with the adapters' makes every rank
    # hold the bias (and the adapters) of one process reading the doubled batch.
    reference = one_process_other_params_reference(WORLD_SIZE * BATCH_SIZE)
    for payload in read_payloads(hrp_init_worker, "ddp_other_params", WORLD_SIZE):
        assert payload["other_params"] == ["base_model.model.blocks.1.down.base_layer.bias"]
        assert payload["bias_changed"] and payload["no_grads"] and payload["agree_after_hrp"] is True
        assert_close_tensors(from_json_tensors(payload["after_hrp"]), from_json_tensors(reference["after_hrp"]), MATCH_ATOL, "after_hrp")


def test_every_rank_exits_cleanly(hrp_init_worker: Path) -> None:
    codes = json.loads((hrp_init_worker / "exit_codes.json").read_text())
    assert codes == {str(rank): 0 for rank in range(WORLD_SIZE)}
    assert "Traceback" not in (hrp_init_worker / "worker.log").read_text()
