"""``lightning-hrp compare`` on a tiny matrix-regression sweep: runs, resumes, reports, logs to W&B offline."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from lightning_hrp.inits import InitMethod
from lightning_hrp.recipes import compare as compare_module
from lightning_hrp.recipes.compare import CompareSettings, MethodSpec, WandbSettings, compare, main
from lightning_hrp.recipes.compare.analysis import summarise
from lightning_hrp.recipes.compare.report import comparison_arms
from lightning_hrp.recipes.compare.running import load_recipe_config, read_learning_curve

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "configs" / "matrix_regression_lora.yaml")
TINY = {
    "model.init_args.in_features": 16,
    "model.init_args.out_features": 12,
    "model.init_args.lora_rank": 2,
    "data.init_args.in_features": 16,
    "data.init_args.out_features": 12,
    "data.init_args.train_size": 32,
    "data.init_args.val_size": 32,
    "data.init_args.test_size": 32,
    "data.init_args.batch_size": 16,
    "trainer.max_steps": 4,  # 2 epochs of 2 batches
}


@pytest.fixture
def wandb_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # compare sets these for its runs; monkeypatch restores the test process's environment afterwards.
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT"):
        monkeypatch.delenv(name, raising=False)


def _settings(output: Path, wandb_mode: str = "offline") -> CompareSettings:
    return CompareSettings(
        recipe_config=RECIPE,
        output_dir=str(output),
        methods=[
            MethodSpec("lora", InitMethod.lora),
            MethodSpec("hrp", InitMethod.hrp, {"preheat_rank": 8, "preheat_steps": 2}),
        ],
        learning_rates=[0.001, 0.03],
        seeds=[0, 1],
        overrides=TINY,
        seed_keys=["model.init_args.task_seed", "data.init_args.task_seed"],
        wandb=WandbSettings(mode=wandb_mode, project="lightning-hrp-tests"),
    )


def test_sweep_reports_resumes_and_logs_offline(tmp_path: Path, wandb_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(tmp_path)
    results = compare(settings, command="lightning-hrp compare (test)")
    # HRP's 2 preheat steps on a 4-step budget add plain LoRA trained for 6 steps, the compute-matched arm.
    assert len(results) == 3 * 2 * 2
    assert {r["label"] for r in results} == {"lora", "hrp", "lora_matched_6"}

    # Each run: its config, CSV log and result; the HRP runs their preheat diagnostics.
    for r in results:
        directory = compare_module.run_dir(settings, r["label"], r["learning_rate"], r["seed"])
        assert {"config.yaml", "result.json"} <= {p.name for p in directory.iterdir()}
        assert (directory / "logs" / "metrics.csv").is_file()
        assert (directory / "diagnostics.json").is_file() == (r["label"] == "hrp")
        # The validation curve is on the axis of optimizer steps taken, ending at the budget with the final value.
        curve = read_learning_curve(directory, "val/loss")
        steps = 6 if r["label"] == "lora_matched_6" else 4
        assert list(curve.index) == [2, 4, 6][: steps // 2]
        assert curve.iloc[-1] == pytest.approx(r["val"]["val/loss"])
    # The run config is the one that ran: the seed went into the task as well; the matched arm ran 6 steps.
    config = (compare_module.run_dir(settings, "hrp", 0.03, 1) / "config.yaml").read_text()
    assert "task_seed: 1" in config and "init_method: hrp" in config
    matched = yaml.safe_load((compare_module.run_dir(settings, "lora_matched_6", 0.03, 1) / "config.yaml").read_text())
    assert matched["trainer"]["max_steps"] == 6 and matched["trainer"]["max_epochs"] == -1
    assert matched["model"]["init_args"]["init_method"] == "lora"

    # Report files, and the chosen learning rate is the validation-best mean over seeds.
    files = ("report.md", "runs.csv", "summary.csv", "paired.csv", "equivalent_steps.csv", "learning_curves.csv")
    plots = ("learning_curves.png", "final_metric.png", "lr_sweep.png", "paired_differences.png", "hrp_spectra.png")
    for name in files + plots:
        assert (tmp_path / name).stat().st_size > 0, name
    with (tmp_path / "runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    val_by = defaultdict(lambda: defaultdict(list))
    for row in rows:
        val_by[row["label"]][float(row["learning_rate"])].append(float(row["val/loss"]))
    with (tmp_path / "summary.csv").open() as handle:
        summary = {row["label"]: row for row in csv.DictReader(handle)}
    report = (tmp_path / "report.md").read_text()
    for label, by_lr in val_by.items():
        best = min(by_lr, key=lambda lr: sum(by_lr[lr]) / len(by_lr[lr]))
        assert float(summary[label]["chosen_lr"]) == best
        test_at_best = [float(row["test/loss"]) for row in rows if row["label"] == label and float(row["learning_rate"]) == best]
        assert float(summary[label]["test/loss_mean"]) == pytest.approx(sum(test_at_best) / 2)
        assert f"| {label} | {summary[label]['method']} | " in report and f" | {best:g} | " in report
    assert "lightning-hrp compare (test)" in report
    # HRP is judged against its matched arm and against plain LoRA, seed by seed, both seeds paired.
    with (tmp_path / "paired.csv").open() as handle:
        paired = {(row["label"], row["reference"]): row for row in csv.DictReader(handle)}
    assert set(paired) == {("hrp", "lora_matched_6"), ("hrp", "lora"), ("lora_matched_6", "lora")}
    hrp_rows = {seed: float(row["test/loss"]) for row in rows for seed in [int(row["seed"])]
                if row["label"] == "hrp" and float(row["learning_rate"]) == float(summary["hrp"]["chosen_lr"])}  # fmt: skip
    matched_rows = {seed: float(row["test/loss"]) for row in rows for seed in [int(row["seed"])]
                    if row["label"] == "lora_matched_6" and float(row["learning_rate"]) == float(summary["lora_matched_6"]["chosen_lr"])}  # fmt: skip
    expected = statistics.mean(hrp_rows[seed] - matched_rows[seed] for seed in (0, 1))
    assert float(paired["hrp", "lora_matched_6"]["mean_difference"]) == pytest.approx(expected)
    assert paired["hrp", "lora_matched_6"]["seeds"] == "2"
    assert "| hrp | lora_matched_6 (matched) | test/loss | 2 |" in report
    assert "## Equivalent plain-LoRA steps" in report
    # The validation curves table: each method's mean over seeds at its chosen rate, step by step.
    with (tmp_path / "learning_curves.csv").open() as handle:
        curve_rows = {float(row["step"]): row for row in csv.DictReader(handle)}
    hrp_lr = float(summary["hrp"]["chosen_lr"])
    seed_curves = [read_learning_curve(compare_module.run_dir(settings, "hrp", hrp_lr, seed), "val/loss") for seed in (0, 1)]
    for step in (2.0, 4.0):
        assert float(curve_rows[step]["hrp"]) == pytest.approx(statistics.mean(curve[step] for curve in seed_curves))
    assert curve_rows[6.0]["hrp"] == "" and curve_rows[6.0]["lora_matched_6"] != ""  # only the matched arm ran 6 steps

    # W&B offline: one run folder per training run plus the summary run, under the output folder.
    offline_runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 12 + 1
    assert all(any(run.glob("*.wandb")) for run in offline_runs)

    # A second invocation finds every run finished and trains nothing.
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(compare_module, "execute_run", must_not_run)
    again = compare(_settings(tmp_path, wandb_mode="disabled"))
    assert sorted(json.dumps(r, sort_keys=True) for r in again) == sorted(json.dumps(r, sort_keys=True) for r in results)


def test_only_unfinished_runs_run_again_and_changed_configs_are_refused(tmp_path: Path, wandb_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(tmp_path, wandb_mode="disabled")
    settings.methods = settings.methods[:1]
    settings.learning_rates = [0.01]
    compare(settings)
    # A run interrupted before its result was written is redone; the other one is kept.
    (compare_module.run_dir(settings, "lora", 0.01, 1) / "result.json").unlink()
    executed = []
    real = compare_module.execute_run

    def counting(settings, spec, lr, seed, config):
        executed.append((spec.label, lr, seed))
        return real(settings, spec, lr, seed, config)

    monkeypatch.setattr(compare_module, "execute_run", counting)
    compare(settings)
    assert executed == [("lora", 0.01, 1)]

    settings.overrides = {**TINY, "data.init_args.noise_std": 0.2}
    with pytest.raises(ValueError, match="different configuration"):
        compare(settings)


def test_bad_input_is_refused_before_any_run(tmp_path: Path) -> None:
    settings = _settings(tmp_path, wandb_mode="disabled")
    settings.methods = [MethodSpec("hrp", InitMethod.hrp, {"preheat_rank": 8})]
    with pytest.raises(Exception, match="do not fit HRPPreheatCallback"):
        compare(settings)
    hrp_config = tmp_path / "with_hrp.yaml"  # a recipe config that brings its own HRP callback
    config = yaml.safe_load(Path(RECIPE).read_text())
    config["trainer"]["callbacks"].append({"class_path": "lightning_hrp.HRPPreheatCallback", "init_args": {"preheat_rank": 8, "preheat_steps": 2}})
    hrp_config.write_text(yaml.safe_dump(config))
    settings = _settings(tmp_path, wandb_mode="disabled")
    settings.recipe_config = str(hrp_config)
    with pytest.raises(ValueError, match="adds an HRPPreheatCallback"):
        compare(settings)
    assert not (tmp_path / "runs").exists()


def test_command_line_parses_the_bundled_configs(capsys: pytest.CaptureFixture) -> None:
    parser = compare_module.build_parser()
    bundled = sorted(path.name for path in Path(RECIPE).parent.glob("compare_*.yaml"))
    assert len(bundled) >= 5
    for name in bundled:
        path = Path(RECIPE).with_name(name)
        settings = parser.instantiate(parser.parse_args(["--config", str(path)]))
        assert all(isinstance(m, MethodSpec) for m in settings.methods)
        assert len(settings.seeds) >= 5 and len(settings.learning_rates) >= 2  # paired intervals need seeds
        # Its budget is in optimizer steps, so compute matching can add the matched arms.
        arms, plan = comparison_arms(settings, load_recipe_config(ROOT / settings.recipe_config))
        assert plan is not None and plan.matched
        assert set(plan.matched.values()) <= {arm.label for arm in arms}
    with pytest.raises(SystemExit):
        main(["--config", str(Path(RECIPE).with_name("compare_matrix_regression.yaml")), "--methods=[{\"label\": \"x\", \"method\": \"magic\"}]"])
    # Checked like any option: a bad grid or label is a usage error naming the field, before anything runs.
    for bad, field in (("--learning_rates=[0.01, -1]", "learning_rates"), ('--methods=[{"label": "../x", "method": "lora"}]', "label")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", str(Path(RECIPE).with_name("compare_matrix_regression.yaml")), "--output_dir=/nonexistent/never", bad])
        assert exit_info.value.code == 2 and field in capsys.readouterr().err


@pytest.mark.parametrize("label", ["../../victim", "..", "a/b", "/abs", ".hidden", "", "tab\there"])
def test_unsafe_labels_are_refused_before_anything_is_written(tmp_path: Path, label: str) -> None:
    output = tmp_path / "out" / "comparison"
    # Where "../../victim" would have put (and, as an unfinished run, deleted) its run folder.
    victim = tmp_path / "out" / "victim" / "lr=0.01" / "seed=0"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("not compare's")
    settings = _settings(output, wandb_mode="disabled")
    settings.methods = [MethodSpec(label, InitMethod.lora)]
    settings.learning_rates, settings.seeds = [0.01], [0]
    with pytest.raises(ValueError, match="label"):
        compare(settings)
    with pytest.raises(ValueError, match="label"):
        compare_module.run_dir(settings, label, 0.01, 0)
    assert (victim / "keep.txt").read_text() == "not compare's"
    assert not output.exists()


@pytest.mark.parametrize(
    "grid, field",
    [
        ({"learning_rates": [0.01, 0.0]}, "learning_rates"),
        ({"learning_rates": [-0.01]}, "learning_rates"),
        ({"learning_rates": [float("nan")]}, "learning_rates"),
        ({"learning_rates": [float("inf")]}, "learning_rates"),
        ({"learning_rates": [True]}, "learning_rates"),
        ({"learning_rates": ["0.01"]}, "learning_rates"),
        ({"learning_rates": [0.001, 0.0010000001]}, "learning_rates"),  # one folder lr=0.001 for both
        ({"seeds": [0, 1.5]}, "seeds"),
        ({"seeds": [True]}, "seeds"),
        ({"seeds": ["0"]}, "seeds"),
        ({"seeds": [-1]}, "seeds"),
        ({"seeds": [2**32]}, "seeds"),  # seed_everything would warn and seed 0 instead
        ({"seeds": [0, 0]}, "seeds"),
        ({"methods": [MethodSpec("lora", InitMethod.lora), MethodSpec("LoRA", InitMethod.lora)]}, "labels"),
    ],
)
def test_bad_grids_are_refused_before_any_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grid: dict, field: str) -> None:
    def must_not_run(*args, **kwargs):
        raise AssertionError("a run started on a grid that should have been refused")

    monkeypatch.setattr(compare_module, "execute_run", must_not_run)
    settings = _settings(tmp_path / "comparison", wandb_mode="disabled")
    for name, value in grid.items():
        setattr(settings, name, value)
    with pytest.raises(ValueError, match=field):
        compare(settings)
    assert not (tmp_path / "comparison").exists()


@pytest.fixture(scope="module")
def finished_hrp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A comparison of one finished HRP run (config, CSV log, diagnostics, result), to copy and damage."""
    output = tmp_path_factory.mktemp("finished") / "comparison"
    compare(_one_hrp_run(output))
    return output


def _one_hrp_run(output: Path) -> CompareSettings:
    settings = _settings(output, wandb_mode="disabled")
    settings.methods, settings.references = settings.methods[1:], []
    settings.learning_rates, settings.seeds = [0.03], [0]
    settings.compute_matched = False  # one run only
    return settings


@pytest.mark.parametrize("damaged", ["result.json", "diagnostics.json", "logs/metrics.csv"])
def test_a_damaged_run_is_reported_with_its_path_and_run_again(
    finished_hrp_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, damaged: str
) -> None:
    output = tmp_path / "comparison"
    shutil.copytree(finished_hrp_run, output)
    settings = _one_hrp_run(output)
    path = compare_module.run_dir(settings, "hrp", 0.03, 0) / damaged
    intact = path.read_bytes()
    path.write_bytes(intact[: len(intact) // 2])  # truncated, as by a full disk or an interrupted copy

    executed = []
    real = compare_module.execute_run

    def counting(*args, **kwargs):
        executed.append(args[1].label)
        return real(*args, **kwargs)

    monkeypatch.setattr(compare_module, "execute_run", counting)
    # Rebuilding the report only: the damaged run is named and not used (here: nothing left to report).
    settings.report_only = True
    with pytest.raises(ValueError, match="No finished run"):
        compare(settings)
    assert str(path) in capsys.readouterr().out
    assert executed == []

    settings.report_only = False
    results = compare(settings)
    assert str(path) in capsys.readouterr().out
    assert executed == ["hrp"]
    # The run again is whole: the next invocation uses it as it is.
    assert compare(settings) == results and executed == ["hrp"]


def _result(lr: float, seed: int, val: float, test: float) -> dict:
    return {
        "label": "lora", "method": "lora", "options": {}, "learning_rate": lr, "seed": seed, "fit_seconds": 1.0,
        "val": {"val/loss": val}, "test": {"test/loss": test},
    }  # fmt: skip


def test_a_diverged_seed_disqualifies_its_learning_rate() -> None:
    """A rate where one seed diverged (NaN) never wins, even if its other seeds are the best of all;
    if every rate diverged the smallest is reported; one seed has no spread (std 0)."""
    settings = _settings(Path("unused"), wandb_mode="disabled")
    settings.methods = [MethodSpec("lora", InitMethod.lora)]
    nan = float("nan")
    results = [_result(0.01, 0, 0.5, 0.6), _result(0.01, 1, 0.7, 0.8), _result(0.1, 0, nan, nan), _result(0.1, 1, 0.1, 0.1)]
    lora = summarise(results, settings).loc["lora"]
    assert lora["chosen_lr"] == 0.01 and lora["seeds"] == 2
    assert lora["val_mean"] == pytest.approx(0.6) and lora["test_std"] == pytest.approx(statistics.stdev([0.6, 0.8]))
    diverged = summarise([_result(0.01, 0, nan, nan), _result(0.1, 0, nan, nan)], settings).loc["lora"]
    assert diverged["chosen_lr"] == 0.01 and diverged["val_std"] == 0.0


def test_logging_to_wandb_without_wandb_installed_is_refused_before_any_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as in an install without the wandb extra
    with pytest.raises(ValueError, match="wandb"):
        compare(_settings(tmp_path / "comparison", wandb_mode="offline"))
    assert not (tmp_path / "comparison").exists()
    compare_module.check_settings(_settings(tmp_path / "comparison", wandb_mode="disabled"))  # CSV only needs no wandb


def test_the_bundled_grids_plan_every_cell_before_running(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_hrp.recipes.compare.grid import GridSettings, build_parser, cell_settings
    from lightning_hrp.recipes.runs import settings_from_command_line

    monkeypatch.chdir(ROOT)  # the configs name their files relative to the repository root
    for path in sorted((ROOT / "recipes" / "configs").glob("grid_*.yaml")):
        grid = settings_from_command_line(build_parser(), GridSettings, ["--config", str(path)])
        cells = cell_settings(grid)
        assert len(cells) == len(list(grid.axes.values())[0]) * len(list(grid.axes.values())[1])
        assert len({cell.output_dir for _, cell in cells}) == len(cells)
        assert all(len(cell.seeds) >= 5 for _, cell in cells)


def test_a_grid_runs_one_comparison_per_cell_and_tabulates_the_paired_gains(tmp_path: Path) -> None:
    from lightning_hrp.recipes.compare.grid import GridSettings, run_grid

    settings = _settings(tmp_path / "unused", wandb_mode="disabled")
    settings.learning_rates = [0.03]
    compare_yaml = tmp_path / "compare.yaml"
    compare_yaml.write_text(yaml.safe_dump({
        "recipe_config": RECIPE, "output_dir": "replaced", "learning_rates": [0.03], "seeds": [0, 1],
        "seed_keys": settings.seed_keys, "overrides": TINY, "wandb": {"mode": "disabled"},
        "methods": [{"label": "lora", "method": "lora"}, {"label": "hrp", "method": "hrp", "options": {"preheat_rank": 8, "preheat_steps": 2}}],
    }))  # fmt: skip
    grid = GridSettings(
        compare=str(compare_yaml),
        output_dir=str(tmp_path / "grid"),
        axes={"rank": {"1": {"model.init_args.lora_rank": 1}, "2": {"model.init_args.lora_rank": 2}}, "steps": {"4": {"trainer.max_steps": 4}}},
    )
    table = run_grid(grid)
    for rank in ("1", "2"):
        cell = tmp_path / "grid" / f"rank={rank}" / "steps=4"
        config = yaml.safe_load((cell / "runs" / "hrp" / "lr=0.03" / "seed=1" / "config.yaml").read_text())
        assert config["model"]["init_args"]["lora_rank"] == int(rank)
        with (cell / "paired.csv").open() as handle:
            cell_rows = [row for row in csv.DictReader(handle) if row["label"] == "hrp" and row["reference"] == "lora_matched_6"]
        grid_row = table[(table["rank"] == rank) & (table["label"] == "hrp") & (table["reference"] == "lora_matched_6")]
        assert float(grid_row["mean_difference"].iloc[0]) == pytest.approx(float(cell_rows[0]["mean_difference"]))
    assert (tmp_path / "grid" / "grid.csv").is_file() and (tmp_path / "grid" / "grid.png").stat().st_size > 0


def test_a_method_with_its_own_rates_runs_at_those_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executed = []

    def fake_run(settings, spec, lr, seed, config):
        executed.append((spec.label, lr))
        loss = 0.01 + lr + 0.001 * seed
        return {**_result(lr, seed, loss, loss), "label": spec.label, "method": spec.method.value, "options": spec.options}

    monkeypatch.setattr(compare_module, "execute_run", fake_run)
    settings = _settings(tmp_path, wandb_mode="disabled")
    settings.methods = [
        MethodSpec("lora", InitMethod.lora),
        MethodSpec("hrp_variant", InitMethod.hrp, {"preheat_rank": 8, "preheat_steps": 2}, learning_rates=[0.001]),
    ]
    compare(settings)
    assert sorted(set(executed)) == [("hrp_variant", 0.001), ("lora", 0.001), ("lora", 0.03), ("lora_matched_6", 0.001), ("lora_matched_6", 0.03)]
    settings.methods[1].learning_rates = [0.01, -1.0]
    with pytest.raises(ValueError, match="learning_rates"):
        compare_module.check_settings(settings)


# ---------------------------------------------------------------------------------------------
# compare and compare-grid own their output folder (issue 20, item 4)
# ---------------------------------------------------------------------------------------------


def _one_lora_run(output: Path) -> CompareSettings:
    settings = _settings(output, wandb_mode="disabled")
    settings.methods, settings.references = settings.methods[:1], []
    settings.learning_rates, settings.seeds = [0.03], [0, 1]
    settings.compute_matched = False
    return settings


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_folder_of_the_users_files_is_refused_and_left_as_it_was(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "mine"
    # The user's files, one where compare would take a folder for an unfinished run and delete it.
    (output / "runs" / "lora" / "lr=0.03" / "seed=0").mkdir(parents=True)
    (output / "runs" / "lora" / "lr=0.03" / "seed=0" / "notes.txt").write_text("the user's")
    (output / "report.md").write_text("the user's report")
    (output / "runs.csv").write_text("the user's table")
    before = _files(output)
    settings = _one_lora_run(output)
    with pytest.raises(ValueError, match="output_dir") as refused:
        compare(settings)
    assert str(output) in str(refused.value) and "report.md" in str(refused.value)
    settings.report_only = True
    with pytest.raises(ValueError, match="output_dir"):
        compare(settings)
    # The command line: a usage error naming output_dir.
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(Path(RECIPE).with_name("compare_matrix_regression.yaml")), f"--output_dir={output}"])
    assert exit_info.value.code == 2 and "output_dir" in capsys.readouterr().err
    assert _files(output) == before


def test_only_a_run_folder_the_tool_created_is_deleted_to_run_it_again(tmp_path: Path) -> None:
    output = tmp_path / "comparison"
    settings = _one_lora_run(output)
    compare(settings)
    assert (output / ".lightning-hrp-compare.json").is_file()
    assert (compare_module.run_dir(settings, "lora", 0.03, 0) / ".lightning-hrp-compare.json").is_file()
    # An unfinished run of its own is run again ...
    (compare_module.run_dir(settings, "lora", 0.03, 0) / "result.json").unlink()
    compare(settings)
    assert (compare_module.run_dir(settings, "lora", 0.03, 0) / "result.json").is_file()
    # ... a folder put in a run's place by someone else is not deleted.
    stranger = compare_module.run_dir(settings, "lora", 0.03, 1)
    shutil.rmtree(stranger)
    stranger.mkdir()
    (stranger / "notes.txt").write_text("the user's")
    with pytest.raises(ValueError, match="did not create"):
        compare(settings)
    assert (stranger / "notes.txt").read_text() == "the user's"


def test_a_comparison_from_before_the_markers_is_adopted_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "comparison"
    settings = _one_lora_run(output)
    results = compare(settings)
    # As the code before markers left it: no markers, and one run interrupted before its result.
    for marker in output.rglob(".lightning-hrp-compare.json"):
        marker.unlink()
    (compare_module.run_dir(settings, "lora", 0.03, 1) / "result.json").unlink()
    with pytest.raises(ValueError, match="adopt_output_dir"):
        compare(settings)
    executed = []
    real = compare_module.execute_run

    def counting(*args, **kwargs):
        executed.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(compare_module, "execute_run", counting)
    settings.adopt_output_dir = True
    again = compare(settings)
    assert executed == [1] and again[0] == results[0]  # the finished run is reused, the unfinished one run again
    settings.adopt_output_dir = False
    assert compare(settings) == again and executed == [1]  # adopted once: resumed like any of its own


@pytest.mark.parametrize(
    "axes",
    [
        {"rank": {"../../escaped": {"model.init_args.lora_rank": 1}}, "steps": {"4": {}}},
        {"rank": {"1": {}}, "steps": {"a/b": {}}},
        {"../rank": {"1": {}}, "steps": {"4": {}}},
    ],
    ids=["value up", "value with slash", "axis up"],
)
def test_unsafe_axis_names_are_refused_before_any_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, axes: dict) -> None:
    from lightning_hrp.recipes.compare.grid import GridSettings, run_grid

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cell ran on a grid that should have been refused")

    monkeypatch.setattr(compare_module, "execute_run", must_not_run)
    compare_yaml = tmp_path / "compare.yaml"
    compare_yaml.write_text(yaml.safe_dump({
        "recipe_config": RECIPE, "output_dir": "replaced", "learning_rates": [0.03], "seeds": [0],
        "overrides": TINY, "wandb": {"mode": "disabled"}, "methods": [{"label": "lora", "method": "lora"}],
    }))  # fmt: skip
    output = tmp_path / "deep" / "er" / "grid"
    with pytest.raises(ValueError, match="axes"):
        run_grid(GridSettings(compare=str(compare_yaml), output_dir=str(output), axes=axes))
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["compare.yaml"]


# ---------------------------------------------------------------------------------------------
# tuning_seeds: the rate is chosen on some seeds, the others run at the chosen rate only (issue 22)
# ---------------------------------------------------------------------------------------------


def test_the_rate_is_chosen_on_the_tuning_seeds_only() -> None:
    """A rate run by more seeds than the tuning seeds must not win or lose by them: seed 1, at 0.1 only, is bad."""
    settings = _settings(Path("unused"), wandb_mode="disabled")
    settings.methods, settings.seeds, settings.tuning_seeds = [MethodSpec("lora", InitMethod.lora)], [0, 1], [0]
    results = [_result(0.01, 0, 0.5, 0.5), _result(0.1, 0, 0.4, 0.4), _result(0.1, 1, 0.9, 0.8)]
    lora = summarise(results, settings).loc["lora"]
    assert lora["chosen_lr"] == 0.1 and lora["seeds"] == 2
    assert lora["val_mean"] == pytest.approx(0.65) and lora["test_mean"] == pytest.approx(0.6)
    settings.tuning_seeds = None  # every seed chooses: the same runs choose 0.01 then
    assert summarise(results, settings).loc["lora", "chosen_lr"] == 0.01


def test_with_tuning_seeds_the_other_seeds_run_at_the_chosen_rate_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executed = []

    def fake_run(settings, spec, lr, seed, config):
        executed.append((spec.label, lr, seed))
        loss = 1.0 - lr if seed == 0 else 1.0 + lr  # the tuning seed prefers the larger rate, the others would not
        return {**_result(lr, seed, loss, loss), "label": spec.label, "method": spec.method.value, "options": spec.options}

    monkeypatch.setattr(compare_module, "execute_run", fake_run)
    settings = _settings(tmp_path, wandb_mode="disabled")
    settings.seeds, settings.tuning_seeds = [0, 1, 2], [0]
    results = compare(settings)
    arms = ["hrp", "lora", "lora_matched_6"]
    assert sorted(executed) == sorted([(a, lr, 0) for a in arms for lr in (0.001, 0.03)] + [(a, 0.03, s) for a in arms for s in (1, 2)])
    assert len(results) == len(executed) == 12  # 3 arms x (2 rates + 2 seeds), not 3 x 2 x 3 = 18
    summary = summarise(results, settings, comparison_arms(settings, load_recipe_config(RECIPE))[0])
    assert set(summary["chosen_lr"]) == {0.03} and set(summary["seeds"]) == {3}
    report = (tmp_path / "report.md").read_text()
    assert "tuning seeds [0]" in report
    # 0.03 is the grid's largest rate: the report says these methods may be under-tuned.
    edge = next(line for line in report.splitlines() if line.startswith("**Chosen at the edge of the grid:**"))
    assert all(f"`{arm}`" in edge for arm in arms)


def test_a_process_on_other_seeds_waits_for_the_tuning_runs_then_reads_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes: one on the tuning seed, one on another seed; the second runs only the chosen rate, from the first's runs."""
    settings = _settings(tmp_path, wandb_mode="disabled")
    settings.methods, settings.compute_matched, settings.references = settings.methods[:1], False, []
    settings.tuning_seeds = [0]
    executed = []
    real_run = compare_module.execute_run

    def recording_run(settings, spec, lr, seed, config):
        executed.append((lr, seed))
        return real_run(settings, spec, lr, seed, config)

    monkeypatch.setattr(compare_module, "execute_run", recording_run)
    other = dataclasses.replace(settings, seeds=[1])
    assert compare(other) == [] and executed == []  # the tuning runs have not finished: nothing runs yet
    compare(dataclasses.replace(settings, seeds=[0]))
    assert sorted(executed) == [(0.001, 0), (0.03, 0)]
    results = compare(other)
    chosen = summarise(results, other).loc["lora", "chosen_lr"]
    tuning = {r["learning_rate"]: r["val"]["val/loss"] for r in results if r["seed"] == 0}
    assert chosen == min(tuning, key=tuning.get)
    assert executed[2:] == [(chosen, 1)] and len(results) == 3


@pytest.mark.parametrize("tuning_seeds", [[], [0, 0], [-1], [True]])
def test_bad_tuning_seeds_are_refused_naming_the_option(tmp_path: Path, tuning_seeds: list) -> None:
    settings = _settings(tmp_path, wandb_mode="disabled")
    settings.tuning_seeds = tuning_seeds
    with pytest.raises(ValueError, match="tuning_seeds"):
        compare(settings)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
