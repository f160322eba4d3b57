"""The ``lightning-hrp`` command: every shipped config parses (with the exact command its header
gives), HRP is configurable from the command line, bad input is refused, real runs go through it,
and ``demo`` dispatches to the demo (run in full only with ``-m slow``)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_hrp.recipes.cli import main
from lightning_hrp.recipes.runs import RECIPE_LINKS, build_run, load_config, parse, with_overrides, without_outputs

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "recipes" / "configs").rglob("*.yaml"))
LORA_CONFIG = "recipes/configs/classification_rotten_tomatoes_lora.yaml"


def header_commands(config: Path) -> list[list[str]]:
    """The ``lightning-hrp ...`` commands in the config's leading comment block, as argv lists."""
    commands = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        match = re.search(r"\blightning-hrp\s+(.*)$", line)
        if match:
            commands.append(shlex.split(match.group(1)))
    return commands


def test_there_are_configs():
    assert any(path.name.startswith("classification_") for path in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: str(path.relative_to(REPO / "recipes" / "configs")))
def test_config_header_command_parses(config, monkeypatch):
    """Each config names its own run command; every lightning-hrp command in its header parses."""
    monkeypatch.chdir(REPO)  # the header commands use paths relative to the repository root
    commands = header_commands(config)
    relative = str(config.relative_to(REPO))
    runs_itself = [argv for argv in commands if argv[1:3] == ["--config", relative]]
    assert runs_itself, f"{relative} needs a header comment with its run command, e.g. lightning-hrp fit --config {relative}"
    for argv in commands:
        if argv[0] == "compare":  # a sweep over a recipe config, with its own parser
            from lightning_hrp.recipes.compare import build_parser

            build_parser().parse_args(argv[1:])
            continue
        if argv[0] == "compare-grid":  # one sweep per cell of a grid, with its own parser
            from lightning_hrp.recipes.compare.grid import build_parser as build_grid_parser

            build_grid_parser().parse_args(argv[1:])
            continue
        assert argv[0] in ("fit", "validate", "test"), f"unknown subcommand in {relative}: {argv}"
        section = parse(argv)[argv[0]]
        assert section.model.class_path and section.data.class_path


def test_hrp_callback_from_the_command_line():
    parsed = parse(
        [
            "fit",
            "--config",
            str(REPO / LORA_CONFIG),
            "--trainer.callbacks+=lightning_hrp.HRPPreheatCallback",
            "--trainer.callbacks.preheat_rank=32",
            "--trainer.callbacks.preheat_steps=7",
            "--trainer.callbacks.mode=asymmetric",
        ]
    )
    callbacks = parsed.fit.trainer.callbacks
    hrp = [c for c in callbacks if c.class_path == "lightning_hrp.HRPPreheatCallback"]
    assert len(hrp) == 1 and len(callbacks) == 3  # added to the config's two
    assert (hrp[0].init_args.preheat_rank, hrp[0].init_args.preheat_steps, hrp[0].init_args.mode) == (32, 7, "asymmetric")


HRP_TWINS = [path for path in CONFIGS if path.name.endswith("_hrp.yaml") and path.with_name(path.name.replace("_hrp", "_lora")).is_file()]


@pytest.mark.parametrize("hrp_config", HRP_TWINS, ids=lambda path: path.name)
def test_an_hrp_config_is_its_lora_twin_with_init_method_hrp(hrp_config):
    """``init_method`` is the one switch between LoRA and HRP: nothing else differs but the run's own folders."""
    lora_config = hrp_config.with_name(hrp_config.name.replace("_hrp", "_lora"))
    hrp, lora = (parse(["fit", "--config", str(path)]).fit.as_dict() for path in (hrp_config, lora_config))
    hrp.pop("config"), lora.pop("config")  # the files' own paths
    assert hrp["model"]["init_args"].pop("init_method") == "hrp" and lora["model"]["init_args"].pop("init_method") == "lora"
    assert hrp["model"]["init_args"].pop("init_options")["preheat_steps"] >= 1 and lora["model"]["init_args"].pop("init_options") is None
    lora_name, hrp_name = lora_config.stem, hrp_config.stem
    assert json.loads(json.dumps(lora, default=str).replace(f"runs/{lora_name}", f"runs/{hrp_name}")) == json.loads(json.dumps(hrp, default=str))


@pytest.mark.parametrize(
    "extra",
    [
        ["--model.init_args.lora_rank=4"],  # no such argument (it is lora_r)
        ["--model.init_args.scheduler=exponential"],  # not one of the choices
        ["--data.class_path=lightning_hrp.recipes.classification.NoSuchDataModule"],
        ["--trainer.callbacks+=lightning_hrp.HRPPreheatCallback", "--trainer.callbacks.mode=classic"],  # no rank/steps
    ],
)
def test_bad_command_lines_are_refused(extra, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["fit", "--config", str(REPO / LORA_CONFIG), *extra])
    assert exit_info.value.code != 0


def test_predict_is_not_offered(capsys):
    with pytest.raises(SystemExit):
        parse(["predict", "--config", str(REPO / LORA_CONFIG)])
    assert "invalid choice" in capsys.readouterr().err


def test_fit_then_test_through_the_cli_with_hrp(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative runs/ paths land here
    config = str(REPO / "recipes/configs/classification_rotten_tomatoes_hrp.yaml")
    overrides = [
        f"--model.init_args.model_name_or_path={tiny_bert_dir}",
        "--model.init_args.lora_r=4",
        f"--data.init_args.tokenizer={tiny_bert_dir}",
        "--data.init_args.train_size=32",
        "--data.init_args.val_size=16",
        "--data.init_args.test_size=16",
        "--data.init_args.batch_size=8",
        "--trainer.enable_progress_bar=false",
    ]
    hrp = ["--model.init_args.init_options.preheat_rank=16", "--model.init_args.init_options.preheat_steps=2"]
    assert main(["fit", "--config", config, *overrides, *hrp, "--trainer.max_steps=3", "--trainer.val_check_interval=3"]) == 0

    logs = tmp_path / "runs" / "classification_rotten_tomatoes_hrp" / "lightning_logs" / "version_0"
    metrics = (logs / "metrics.csv").read_text()
    assert "hrp/preheat_loss" in metrics and "val/acc" in metrics
    saved = yaml.safe_load((logs / "config.yaml").read_text())
    assert saved["model"]["init_args"]["init_options"]["preheat_steps"] == 2

    # The test command of the config's header, on the checkpoint the fit wrote.
    checkpoint = "runs/classification_rotten_tomatoes_hrp/checkpoints/last.ckpt"
    assert main(["test", "--config", config, *overrides, "--ckpt_path", checkpoint]) == 0
    tested = (tmp_path / "runs" / "classification_rotten_tomatoes_hrp" / "lightning_logs" / "version_1" / "metrics.csv").read_text()
    assert "test/acc" in tested


def _demo_argv(model: str, output: Path, *extra: str) -> list[str]:
    return [
        "demo", "--model", model, "--output_dir", str(output), "--steps", "2", "--val_every", "1",
        "--train_size", "16", "--val_size", "8", "--test_size", "8", "--batch_size", "8", "--lora_r", "4",
        "--preheat_rank", "16", "--preheat_steps", "1", "--accelerator", "cpu", *extra,
    ]  # fmt: skip


def test_demo_dispatch_with_a_tiny_model(tiny_bert_dir, tmp_path, capsys):
    assert main(_demo_argv(tiny_bert_dir, tmp_path)) == 0
    out = capsys.readouterr().out
    assert re.search(r"^LoRA\s+\|\s+2\s+\|", out, re.MULTILINE)
    assert re.search(r"^HRP\s+\|\s+2 \+ 1 preheat\s+\|", out, re.MULTILINE)
    assert "overhead" not in out.lower()
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    for method in ("lora", "hrp"):
        run = results["runs"][method]
        assert run["curve"]["val_steps"] == [1, 2]
        assert len(run["curve"]["train_loss"]) == 2
        assert 0.0 <= run["test"]["test/acc"] <= 1.0
    hrp = results["runs"]["hrp"]
    assert hrp["preheat_seconds"] > 0 and hrp["decompose_seconds"] > 0
    # The printed cost is the HRP run's own timings, as results.json keeps them.
    cost = re.search(r"preheating ([\d.]+) s \+ decomposition ([\d.]+) s = ([\d.]+)% of its main training \(([\d.]+) s\)", out)
    assert cost is not None, out
    main_seconds = hrp["fit_seconds"] - hrp["preheat_seconds"] - hrp["decompose_seconds"]
    assert float(cost.group(1)) == pytest.approx(hrp["preheat_seconds"], abs=0.051)
    assert float(cost.group(4)) == pytest.approx(main_seconds, abs=0.051)


def test_demo_reports_hrps_cost_from_its_own_run_not_from_the_difference_of_wall_times():
    """Issue 21: a LoRA run slowed by a busy machine must not change what the table calls HRP's cost."""
    from lightning_hrp.recipes.demo import DemoSettings, LearningCurve, RunResult, format_table

    test = {"test/acc": 0.8, "test/f1": 0.8, "test/mcc": 0.6, "test/loss": 0.4}
    hrp = RunResult("hrp", fit_seconds=110.0, test=test, curve=LearningCurve(), preheat_seconds=8.0, decompose_seconds=2.0, energy_kept_mean=0.5)
    tables = [format_table(RunResult("lora", lora_seconds, test, LearningCurve()), hrp, DemoSettings()) for lora_seconds in (60.0, 200.0)]
    for table in tables:
        # 8 s + 2 s against the 100 s the HRP run trained without them.
        assert "preheating 8.0 s + decomposition 2.0 s = 10.0% of its main training (100.0 s)" in table
        assert "overhead" not in table.lower()
    assert tables[0].split("\n")[-3:] == tables[1].split("\n")[-3:]


def _help(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 0
    return capsys.readouterr().out


def test_demo_help(capsys):
    assert "lightning-hrp demo" in _help(["demo", "--help"], capsys)


def test_top_level_help_lists_every_subcommand(capsys):
    text = _help(["--help"], capsys)
    for subcommand in ("fit", "validate", "test", "demo", "compare", "compare-grid"):
        assert re.search(rf"^\s+{subcommand}\s", text, re.MULTILINE), f"--help does not list {subcommand}"


@pytest.mark.parametrize("subcommand", ["fit", "demo", "compare", "compare-grid"])
def test_every_subcommand_takes_snake_case_options(subcommand, capsys):
    options = set(re.findall(r"(?<![\w-])--[\w.+-]+", _help([subcommand, "--help"], capsys)))
    assert "--config" in options
    assert not [option for option in options if "-" in option[2:]]


class _TrainingStarted(Exception):
    pass


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--preheat_rank", "4"], "preheat_rank"),  # not above lora_r: the callback found this only at its own fit
        (["--preheat_mode", "sideways"], "preheat_mode"),
        (["--preheat_steps", "0"], "preheat_steps"),
        (["--steps", "0"], "steps"),
        (["--val_every", "3"], "val_every"),  # more than steps: no validation would run
        (["--learning_rate", "nan"], "learning_rate"),
        (["--seed", "-1"], "seed"),
        (["--data_path", "no/such/file.csv.bz2"], "data_path"),
        (["--accelerator", "abacus"], "accelerator"),
    ],
)
def test_demo_checks_every_option_before_the_lora_run(extra, option, tiny_bert_dir, tmp_path, monkeypatch, capsys):
    from lightning_hrp.recipes import demo

    started = []

    def first_run(*args, **kwargs):
        started.append(args)
        raise _TrainingStarted

    monkeypatch.setattr(demo, "run_method", first_run)
    # Without the bad option the same command gets as far as the first run.
    with pytest.raises(_TrainingStarted):
        main(_demo_argv(tiny_bert_dir, tmp_path / "valid"))
    started.clear()
    with pytest.raises(SystemExit) as exit_info:
        main(_demo_argv(tiny_bert_dir, tmp_path / "refused", *extra))
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err
    assert started == [] and not (tmp_path / "refused").exists()


def test_lightning_hrp_lists_the_callback():
    import lightning_hrp

    assert set(lightning_hrp.__all__) <= set(dir(lightning_hrp))


def test_callback_by_its_short_class_name():
    """`--trainer.callbacks+=HRPPreheatCallback` with a user's own module (here Lightning's BoringModel, which
    imports nothing of lightning_hrp), in a fresh process where nothing imported the callback before."""
    code = (
        "from lightning_hrp.recipes.runs import parse\n"
        "config = parse(['fit', '--model=lightning.pytorch.demos.boring_classes.BoringModel',\n"
        "                '--data=lightning.pytorch.demos.boring_classes.BoringDataModule',\n"
        "                '--trainer.callbacks+=HRPPreheatCallback',\n"
        "                '--trainer.callbacks.preheat_rank=32', '--trainer.callbacks.preheat_steps=7'])\n"
        "hrp = config.fit.trainer.callbacks[-1]\n"
        "print(hrp.class_path, hrp.init_args.preheat_rank, hrp.init_args.preheat_steps)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    class_path, rank, steps = result.stdout.split()[-3:]
    assert class_path.endswith(".HRPPreheatCallback") and (rank, steps) == ("32", "7")


def test_a_missing_extra_is_named_with_its_install_command():
    """The console script comes with every install; without the recipes extra it says what to install."""
    # jsonargparse hidden as in an install without the recipes extra.
    code = "import sys; sys.modules['jsonargparse'] = None; from lightning_hrp.recipes.cli import main; sys.exit(main(['fit', '--help']))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "pip install 'lightning-hrp[recipes]'" in result.stderr


def test_a_config_given_as_a_dict_parses():
    """``LightningCLI`` takes ``args`` as a dict too; so must its subclass."""
    config = yaml.safe_load((REPO / "recipes/configs/matrix_regression_hrp.yaml").read_text())
    parsed = parse({"fit": config})
    assert parsed.subcommand == "fit"
    assert parsed.fit.model.init_args.init_options["preheat_rank"] == 32


def test_the_module_follows_its_data_where_they_must_agree():
    """What a module must share with its data is set once, on one side (RECIPE_LINKS)."""
    matrix = parse(["fit", "--config", str(REPO / "recipes/configs/matrix_regression_lora.yaml"), "--data.init_args.task_seed=3", "--data.init_args.in_features=16"])
    assert (matrix.fit.model.init_args.task_seed, matrix.fit.model.init_args.in_features) == (3, 16)
    classification = parse(["fit", "--config", str(REPO / LORA_CONFIG), "--model.init_args.model_name_or_path=/models/bert"])
    assert classification.fit.data.init_args.tokenizer == "/models/bert"
    math_sft = parse(
        ["fit", "--config", str(REPO / "recipes/configs/math_sft_smollm2_lora.yaml"), "--model.init_args.model_name_or_path=/models/llama",
         "--model.init_args.gguf_file=llama.gguf", "--model.init_args.cache_dir=/cache"]
    )  # fmt: skip
    data = math_sft.fit.data.init_args
    assert (data.model_name_or_path, data.gguf_file, data.cache_dir) == ("/models/llama", "llama.gguf", "/cache")


def test_the_classifier_head_gets_the_data_classes(tiny_bert_dir):
    config = load_config(REPO / "recipes/configs/classification_glue_sst2_lora.yaml")
    overrides = {"model.init_args.model_name_or_path": tiny_bert_dir, "data.init_args.task": "mnli", "trainer.accelerator": "cpu"}
    run = build_run(with_overrides(without_outputs(config), overrides))
    assert run.datamodule.num_labels == 3 and run.model.hparams.num_labels == 3
    assert run.model.model.config.num_labels == 3


def test_no_bundled_config_sets_what_follows_the_data():
    """A value given for a linked argument would be replaced by the data's without a word: configs leave them out."""
    for path in CONFIGS:
        config = yaml.safe_load(path.read_text())
        for _, target, _ in RECIPE_LINKS:
            node = config
            for key in target.split("."):
                node = node.get(key) if isinstance(node, dict) else None
            assert node is None, f"{path.name} sets {target}, which follows the data"


@pytest.mark.slow
def test_full_demo(tmp_path, capsys):
    """The README's first command, with its defaults: both runs must beat the majority class."""
    assert main(["demo", "--output_dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    test_size = results["settings"]["test_size"]
    from lightning_hrp.recipes.classification_data import default_rotten_tomatoes_path, load_rotten_tomatoes, split_rotten_tomatoes

    test_labels = [label for _, label in split_rotten_tomatoes(load_rotten_tomatoes(default_rotten_tomatoes_path()))["test"][:test_size]]
    majority = max(sum(test_labels), len(test_labels) - sum(test_labels)) / len(test_labels)
    for method in ("lora", "hrp"):
        assert results["runs"][method]["test"]["test/acc"] > majority
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    assert "HRP's own cost in this run:" in capsys.readouterr().out


@pytest.fixture(scope="module")
def rank_4_checkpoint(tmp_path_factory) -> Path:
    """A real ``lightning-hrp fit`` checkpoint of the matrix regression recipe (LoRA rank 4), in its own folder."""
    folder = tmp_path_factory.mktemp("rank_4_run")
    config = str(REPO / "recipes" / "configs" / "matrix_regression_lora.yaml")
    outputs = [f"--trainer.logger.init_args.save_dir={folder}", f"--trainer.callbacks.dirpath={folder}/checkpoints"]
    assert main(["fit", "--config", config, *outputs, "--trainer.max_steps=2", "--trainer.enable_progress_bar=false"]) == 0
    return folder / "checkpoints" / "last.ckpt"


def _refusal_line(capsys, code: int) -> str:
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in errors[0]
    return errors[0]


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(rank_4_checkpoint, tmp_path, capsys, damage, subcommand):
    damaged = tmp_path / f"{damage}.ckpt"
    whole = rank_4_checkpoint.read_bytes()
    damaged.write_bytes({"truncated": whole[: len(whole) // 2], "empty": b"", "garbage": bytes(range(256)) * 20}[damage])
    config = str(REPO / "recipes" / "configs" / "matrix_regression_lora.yaml")
    line = _refusal_line(capsys, main([subcommand, "--config", config, "--ckpt_path", str(damaged)]))
    assert str(damaged) in line and "damaged or not a checkpoint" in line


def test_a_command_line_option_the_checkpoint_would_replace_is_refused_naming_both_values(rank_4_checkpoint, tmp_path, capsys):
    config = str(REPO / "recipes" / "configs" / "matrix_regression_lora.yaml")
    outputs = [f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.callbacks.dirpath={tmp_path}/checkpoints"]
    resume = ["fit", "--config", config, *outputs, "--ckpt_path", str(rank_4_checkpoint), "--trainer.max_steps=3"]
    line = _refusal_line(capsys, main([*resume, "--model.init_args.lora_rank=8"]))
    assert "lora_rank=8" in line and "lora_rank=4" in line
    assert not (tmp_path / "checkpoints").exists()  # refused before training
    # The checkpoint's own value is no conflict: the run resumes.
    assert main([*resume, "--model.init_args.lora_rank=4", "--trainer.enable_progress_bar=false"]) == 0
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
