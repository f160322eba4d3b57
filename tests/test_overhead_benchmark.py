"""Smoke test of the overhead benchmark (``python -m benchmarks.overhead``) on the matrix-regression recipe.

It checks that the script runs real fits end to end, reports one row per preheat rank with both
phases measured, that the figures fit together as documented, and that bad options are refused.
No speed or memory threshold is asserted: those figures live in BENCHMARKS.md only.
"""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def overhead_benchmark():
    # A module of the checkout's benchmarks package (pytest puts the repository root on sys.path).
    from benchmarks import overhead

    return overhead


def test_tiny_matrix_regression_run_reports_both_ranks_and_phases(overhead_benchmark, tmp_path, capsys):
    threads_before = torch.get_num_threads()
    json_path = tmp_path / "overhead.json"
    rows = overhead_benchmark.main(
        ["--recipes", "matrix_regression", "--main-steps", "6", "--preheat-steps", "2", "--repeats", "2",
         "--threads", "1", "--json", str(json_path)]
    )
    assert torch.get_num_threads() == threads_before

    assert [(row.recipe, row.lora_rank, row.preheat_rank) for row in rows] == [
        ("matrix_regression", 4, 16),
        ("matrix_regression", 4, 32),
    ]
    for row in rows:
        assert (row.main_steps, row.preheat_steps, row.repeats) == (6, 2, 2)
        assert row.budget_share == pytest.approx(2 / 6 + 0.01)
        for name in ("main_s_lora", "main_s", "fit_s_lora", "fit_s", "preheat_s", "decompose_s", "hrp_phase_s",
                     "hrp_share", "step_cost", "preheat_peak_mib", "main_peak_mib", "main_peak_mib_lora",
                     "mem_ratio", "mem_ratio_vs_lora"):
            assert getattr(row, name) > 0, name
        assert len(row.per_repeat) == 2
        for fits in row.per_repeat:
            lora, hrp = fits["lora"], fits["hrp"]
            assert lora["preheat_rank"] is None and hrp["preheat_rank"] == row.preheat_rank
            assert lora["preheat_seconds"] == 0 and lora["preheat_peak_bytes"] == 0
            # The callback's own timings lie inside the phase the markers time around it, which lies inside the fit.
            assert hrp["preheat_seconds"] + hrp["decompose_seconds"] <= hrp["hrp_phase_seconds"]
            assert hrp["hrp_phase_seconds"] + hrp["main_seconds"] < hrp["fit_seconds"]
            # A peak is never below what was in use when its phase started.
            assert hrp["preheat_peak_bytes"] >= hrp["preheat_start_bytes"] > 0
            assert hrp["main_peak_bytes"] >= hrp["main_start_bytes"] > 0
        # Medians of the per-repeat figures, as the report says.
        shares = sorted((f["hrp"]["preheat_seconds"] + f["hrp"]["decompose_seconds"]) / f["hrp"]["main_seconds"]
                        for f in row.per_repeat)
        assert row.hrp_share == pytest.approx(sum(shares) / 2)

    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("| matrix_regression | 4 | ") for line in out) == 2 * 2  # time and memory tables
    assert sum(line.startswith("- Time, matrix_regression") for line in out) == 2
    assert sum(line.startswith("- Memory, matrix_regression, R=8r=32") for line in out) == 1
    payload = json.loads(json_path.read_text())
    assert [row["preheat_rank"] for row in payload["rows"]] == [16, 32]

    # The report of a saved run, re-rendered without fitting: the same rows, the same tables.
    assert overhead_benchmark.main(["--from-json", str(json_path)]) == rows
    rendered = capsys.readouterr().out.splitlines()
    assert rendered[1].startswith("(Report rendered from that run's JSON by:")
    assert [line for line in rendered if line.startswith("|")] == [line for line in out if line.startswith("|")]


def test_cpu_clock_counts_the_whole_hrp_phase_as_preheating_with_the_lean_settings(overhead_benchmark, capsys):
    (row,) = overhead_benchmark.main(
        ["--recipes", "matrix_regression", "--main-steps", "4", "--preheat-steps", "2", "--repeats", "1",
         "--multipliers", "8", "--threads", "1", "--clock", "cpu", "--preheat-dtype", "bfloat16", "--lean-optimizer"]
    )  # fmt: skip
    hrp = row.per_repeat[0]["hrp"]
    assert hrp["preheat_seconds"] == hrp["hrp_phase_seconds"] > 0 and hrp["decompose_seconds"] == 0
    assert 0 < hrp["hrp_phase_seconds"] + hrp["main_seconds"] < hrp["fit_seconds"]
    printed = capsys.readouterr().out  # the settings measured are said with the figures
    assert all(setting in printed for setting in ("bfloat16", "FactoredRMS", "clock cpu"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quick", "--multipliers", "1"], "--multipliers"),
        (["--quick", "--repeats", "0"], "--repeats"),
        (["--quick", "--recipes", "imagenet"], "--recipes"),
        (["--quick", "--main-steps", "0"], "--main-steps"),
        (["--quick", "--device", "tpu"], "--device"),
        (["--from-json", "/nonexistent/overhead.json"], "--from-json"),
    ],
)
def test_bad_arguments_name_the_option(overhead_benchmark, capsys, argv, message):
    with pytest.raises(SystemExit):
        overhead_benchmark.main(argv)
    assert message in capsys.readouterr().err
