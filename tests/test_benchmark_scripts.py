"""Smoke test of the decomposition benchmark (``python -m benchmarks.svd``) on a tiny layer set.

It checks that the script runs end to end as a module of the checkout (no install), reports one row
per (set, factors, R, r, method) and per layer shape, expresses every time against the Gram floor,
extrapolates baseline times as documented, and that every method agrees with the float64 reference.
No timing is asserted: speed figures live in BENCHMARKS.md only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import svd as svd_benchmark

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_reports_every_row_against_the_gram_floor(tmp_path, capsys):
    threads_before = torch.get_num_threads()
    json_path = tmp_path / "svd.json"
    # float64 so that every agreement check below can be tight; q = r + 10 >= R for both r, so the
    # randomised range finder sees the whole rank-R range and must be exact as well.
    rows = svd_benchmark.main(
        ["--sets", "tiny", "--ranks", "16", "--tops", "8", "16", "--factors", "gaussian", "--repeats", "1",
         "--dtype", "float64", "--threads", "1", "--json", str(json_path)]
    )
    assert torch.get_num_threads() == threads_before

    shapes = svd_benchmark.LAYER_SETS["tiny"].layer_shapes()
    counts = {label: sum(shape.label == label for shape in shapes) for label in ("256x256", "688x256", "256x688")}
    assert len(shapes) == 14 and counts == {"256x256": 8, "688x256": 4, "256x688": 2}
    assert [(row.set_name, row.factors, row.preheat_rank, row.top) for row in rows] == [
        ("tiny", "gaussian", 16, 8),
        ("tiny", "gaussian", 16, 16),
    ]
    for row in rows:
        assert row.layers == 14
        assert list(row.methods) == ["grams", "ours", "loop", "qr", "dense", "lowrank"]
        for name in ("grams", "ours", "loop", "qr"):
            assert not row.methods[name].extrapolated and row.methods[name].runs == 1
        assert row.paired_ratio > 0
        # Baselines ran on 3 of 14 layers: the whole-set figure is count-weighted and flagged.
        dense = row.methods["dense"]
        assert dense.extrapolated and row.methods["lowrank"].extrapolated
        first_of_shape = {}
        for layer in row.layer_rows:
            first_of_shape.setdefault(layer.shape, layer)
        assert dense.seconds == pytest.approx(sum(counts[s] * layer.dense_s for s, layer in first_of_shape.items()))
        for name in ("ours", "loop", "qr", "dense", "lowrank"):
            assert row.methods[name].max_sin_theta < 1e-9, name
        # 3 reference layers per shape, or fewer where a shape has fewer layers.
        assert len(row.layer_rows) == 3 + 3 + 2
        for layer in row.layer_rows:
            assert layer.sin_theta["ours"] < 1e-9 and layer.ours_rel_sv_error < 1e-12
            assert 0 <= layer.relative_gap <= 1

    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Command: python -m benchmarks.svd --sets tiny")
    assert sum(line.startswith("| tiny | gaussian | 14 | 16 |") for line in out) == 2 * 6
    assert sum(line.startswith(("| tiny | gaussian | 256x", "| tiny | gaussian | 688x")) for line in out) == 2 * 3
    payload = json.loads(json_path.read_text())
    assert len(payload["rows"]) == 2 and len(payload["rows"][0]["layer_rows"]) == 8


def test_every_kind_of_factors_is_decomposed_at_least_as_accurately_as_by_the_qr_route(capsys):
    rows = svd_benchmark.main(
        ["--sets", "tiny", "--ranks", "32", "--tops", "8", "--factors", "gaussian", "preheat", "steep",
         "--repeats", "1", "--threads", "1", "--clock", "cpu", "--compare", "qr"]
    )
    capsys.readouterr()
    assert [row.factors for row in rows] == ["gaussian", "preheat", "steep"]
    for row in rows:
        assert list(row.methods) == ["grams", "ours", "qr"]
        assert row.methods["ours"].max_sin_theta <= row.methods["qr"].max_sin_theta, row.factors


def test_lowrank_with_too_few_samples_misses_part_of_the_subspace(capsys):
    # q = r + 0 = 4 < R = 16 and no power iteration: the randomised SVD is visibly off, which is
    # exactly the difference the benchmark exists to show.
    rows = svd_benchmark.main(
        ["--sets", "tiny", "--ranks", "16", "--tops", "4", "--factors", "gaussian", "--repeats", "1", "--dtype",
         "float64", "--threads", "1", "--clock", "cpu", "--oversample", "0", "--niter", "0", "--compare", "dense",
         "lowrank"]
    )
    capsys.readouterr()
    (row,) = rows
    assert list(row.methods) == ["grams", "ours", "dense", "lowrank"]
    assert row.methods["ours"].max_sin_theta < 1e-9
    assert row.methods["lowrank"].max_sin_theta > 1e-3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quick", "--ranks", "8", "--tops", "16"], "--tops"),
        (["--quick", "--repeats", "0"], "--repeats"),
        (["--quick", "--sets", "gpt-5"], "--sets"),
        (["--quick", "--factors", "uniform"], "--factors"),
    ],
)
def test_bad_arguments_name_the_option(capsys, argv, message):
    with pytest.raises(SystemExit):
        svd_benchmark.main(argv)
    assert message in capsys.readouterr().err


def test_runs_from_the_repository_root_without_an_install(tmp_path):
    # The documented command, in a fresh interpreter whose path holds only the checkout.
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.svd", "--sets", "tiny", "--ranks", "16", "--tops", "8", "--factors",
         "gaussian", "--repeats", "1", "--compare", "qr"],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Gram-floor" not in result.stdout  # no LLaMA rows, so no goal verdict
    assert "| tiny | gaussian | 14 | 16 | 8 | ours |" in result.stdout


def test_running_the_file_by_path_says_how_to_run_it():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "svd.py"), "--quick"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "python -m benchmarks.svd" in result.stderr


def test_gram_route_study_shows_the_gram_route_losing_only_on_steep_spectra(capsys):
    from benchmarks import gram_route_study

    samples = gram_route_study.main(["--tops", "16", "--decades", "1", "10", "--repeats", "1"])
    out = capsys.readouterr().out
    assert out.startswith("Command: python -m benchmarks.gram_route_study")
    flat = [(gram, qr) for steepness, gram, qr in samples if steepness < 2]
    steep = [(gram, qr) for steepness, gram, qr in samples if steepness > 100]
    assert flat and steep
    # Why svd_of_products steps steep layers up to float64 Grams: alone, the float32 Gram route is the more
    # accurate on flat spectra and far less accurate on steep ones.
    assert all(gram <= qr for gram, qr in flat)
    assert all(gram > 10 * qr for gram, qr in steep)
