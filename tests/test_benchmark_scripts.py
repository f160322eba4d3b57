"""Smoke test of the decomposition benchmark (benchmarks/svd.py) on a tiny layer set.

It checks that the script runs end to end, reports one row per (set, R, r, method) and per
sampled layer, extrapolates baseline times as documented, and that every method agrees with the
dense SVD. No timing is asserted: speed figures live in BENCHMARKS.md only.
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

    shapes = svd_benchmark.LAYER_SETS["tiny"].layer_shapes()
    counts = {label: sum(shape.label == label for shape in shapes) for label in ("256x256", "688x256", "256x688")}
    assert len(shapes) == 14 and counts == {"256x256": 8, "688x256": 4, "256x688": 2}
    assert [(row.set_name, row.preheat_rank, row.top) for row in rows] == [("tiny", 16, 8), ("tiny", 16, 16)]
    for row in rows:
        assert row.layers == 14
        assert list(row.methods) == ["ours", "loop", "cholqr", "dense", "lowrank"]
        assert [layer.shape for layer in row.layer_rows] == ["256x256", "688x256", "256x688"]
        for name in ("ours", "loop", "cholqr"):
            assert not row.methods[name].extrapolated and row.methods[name].runs == 1
        # Baselines ran on 3 of 14 layers: the whole-set figure is count-weighted and flagged.
        dense = row.methods["dense"]
        assert dense.extrapolated and row.methods["lowrank"].extrapolated
        assert dense.seconds == pytest.approx(sum(counts[layer.shape] * layer.dense_s for layer in row.layer_rows))
        assert dense.max_sin_theta is None  # the reference itself
        for name in ("ours", "loop", "cholqr", "lowrank"):
            assert row.methods[name].max_sin_theta < 1e-9, name
        for layer in row.layer_rows:
            assert layer.ours_sin_theta < 1e-9 and layer.ours_rel_sv_error < 1e-12
            assert layer.ours_sin_theta_vs_float64 < 1e-12 and layer.dense_sin_theta_vs_float64 < 1e-9
            assert 0 < layer.relative_gap <= 1

    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("| tiny | 14 | 16 |") for line in out) == 2 * 5
    assert sum(line.startswith(("| tiny | 256x", "| tiny | 688x")) for line in out) == 2 * 3
    payload = json.loads(json_path.read_text())
    assert len(payload["rows"]) == 2 and len(payload["rows"][0]["layer_rows"]) == 3


def test_lowrank_with_too_few_samples_misses_part_of_the_subspace(svd_benchmark, capsys):
    # q = r + 0 = 4 < R = 16 and no power iteration: the randomised SVD is visibly off, which is
    # exactly the difference the benchmark exists to show.
    rows = svd_benchmark.main(
        ["--sets", "tiny", "--ranks", "16", "--tops", "4", "--repeats", "1", "--dtype", "float64",
         "--threads", "1", "--clock", "cpu", "--oversample", "0", "--niter", "0", "--compare", "dense", "lowrank"]
    )
    capsys.readouterr()
    (row,) = rows
    assert list(row.methods) == ["ours", "dense", "lowrank"]
    assert row.methods["ours"].max_sin_theta < 1e-9
    assert row.methods["lowrank"].max_sin_theta > 1e-3


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
