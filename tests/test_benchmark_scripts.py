"""Smoke test of the decomposition benchmark (benchmarks/svd.py) on a tiny layer set.

It checks that the script runs end to end, reports one row per (set, R, r) and per sampled layer,
extrapolates baseline times as documented, and that every method agrees with the dense SVD. No
timing is asserted: speed figures live in BENCHMARKS.md only.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARK_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "svd.py"


@pytest.fixture(scope="module")
def svd_benchmark():
    # Loaded by path: benchmarks/ is a folder of scripts, not an installed package.
    spec = importlib.util.spec_from_file_location("benchmark_svd", BENCHMARK_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_tiny_run_reports_every_row_and_matches_the_dense_svd(svd_benchmark, tmp_path, capsys):
    threads_before = torch.get_num_threads()
    json_path = tmp_path / "svd.json"
    # float64 so that every agreement check below can be tight; q = r + 10 >= R for both r, so the
    # randomised range finder sees the whole rank-R range and must be exact as well.
    rows = svd_benchmark.main(
        ["--sets", "tiny", "--ranks", "16", "--tops", "8", "16", "--repeats", "1", "--dtype", "float64",
         "--threads", "1", "--json", str(json_path)]
    )
    assert torch.get_num_threads() == threads_before

    tiny = svd_benchmark.LAYER_SETS["tiny"]
    shapes = tiny.layer_shapes()
    assert [(row.set_name, row.preheat_rank, row.top) for row in rows] == [("tiny", 16, 8), ("tiny", 16, 16)]
    for row in rows:
        assert row.layers == len(shapes) == 14
        assert [layer.shape for layer in row.layer_rows] == ["256x256", "688x256", "256x688"]
        assert row.ours_s > 0 and row.ours_n == 1
        # Baselines ran on 3 of 14 layers: the whole-set figure is count-weighted and flagged.
        assert row.dense_extrapolated and row.lowrank_extrapolated
        counts = {label: sum(shape.label == label for shape in shapes) for label in ("256x256", "688x256", "256x688")}
        assert counts == {"256x256": 8, "688x256": 4, "256x688": 2}
        expected_dense = sum(counts[layer.shape] * layer.dense_s for layer in row.layer_rows)
        assert row.dense_s == pytest.approx(expected_dense)
        for error in (row.ours_max_sin_theta, row.lowrank_max_sin_theta, row.cholqr_max_sin_theta):
            assert error is not None and error < 1e-9
        for layer in row.layer_rows:
            assert layer.ours_sin_theta < 1e-9 and layer.ours_rel_sv_error < 1e-12
            assert layer.dense_sin_theta_vs_float64 is None  # only reported for float32 runs

    out = capsys.readouterr().out
    assert sum(line.startswith("| tiny | 14 | 16 |") for line in out.splitlines()) == 2
    assert sum(line.startswith("| tiny | 256x") or line.startswith("| tiny | 688x") for line in out.splitlines()) == 6
    payload = json.loads(json_path.read_text())
    assert len(payload["rows"]) == 2 and len(payload["rows"][0]["layer_rows"]) == 3


def test_lowrank_with_too_few_samples_misses_part_of_the_subspace(svd_benchmark, capsys):
    # q = r + 0 = 4 < R = 16 with a flat-ish spectrum: the randomised SVD is visibly off, which is
    # exactly the difference the benchmark exists to show.
    rows = svd_benchmark.main(
        ["--sets", "tiny", "--ranks", "16", "--tops", "4", "--repeats", "1", "--dtype", "float64",
         "--threads", "1", "--clock", "cpu", "--oversample", "0", "--niter", "0", "--compare", "dense", "lowrank"]
    )
    capsys.readouterr()
    (row,) = rows
    assert row.ours_max_sin_theta < 1e-9
    assert row.lowrank_max_sin_theta > 1e-3
    assert row.cholqr_s is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quick", "--ranks", "8", "--tops", "16"], "--tops"),
        (["--quick", "--repeats", "0"], "--repeats"),
        (["--quick", "--sets", "gpt-5"], "--sets"),
    ],
)
def test_bad_arguments_name_the_option(svd_benchmark, capsys, argv, message):
    with pytest.raises(SystemExit):
        svd_benchmark.main(argv)
    assert message in capsys.readouterr().err
