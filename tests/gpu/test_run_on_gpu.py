"""The GPU entry point (tests/gpu/run_on_gpu.sh) dry-run on the CPU, in the default test run, so that it cannot rot.

What a CPU can check of it: the arguments, the project importing without an install, each step's
results written to ``$OUT`` the moment the step ends (a later timeout loses nothing), the whole
entry point skipping every GPU step cleanly with CUDA absent while still writing its table, the
caps fitting the device tool's limits, the payload's float16 round trip, and the settings the GPU
steps hand to the benchmarks and to ``compare``. ``--rehearse`` (every step on the CPU at toy
size, minutes) is in BENCHMARKS.md, "GPU run".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import gpu_payload  # noqa: E402
import machine_checks  # noqa: E402
import run_on_gpu  # noqa: E402
from step_runner import FAIL, OUT_FILES, PASS, SKIP, STOPPED, TIMEOUT, Results, Step, run_group  # noqa: E402
from test_hrp_gpu_strategies import WORKER_TIMEOUT_S  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# Device tool limits (.library/device/README.md): 10 minutes a command, at most 8 files back.
NINE_MINUTES_S = 540


def python_step(name: str, code: str, cap_s: float | None = 10, **kwargs) -> Step:
    return Step(name, f"test step {name}", [sys.executable, "-c", code], cap_s, **kwargs)


def test_without_cuda_and_without_an_install_the_entry_point_skips_every_gpu_step_and_still_writes_its_table(tmp_path: Path) -> None:
    # python -S skips the site module, so the .pth files of an editable install never run: lightning_hrp
    # can come only from the checkout, next to this environment's packages (on PYTHONPATH). The steps
    # inherit the driver's -S.
    site_packages = sysconfig.get_paths()["purelib"]
    env = {**os.environ, "PYTHONPATH": site_packages}
    hidden = subprocess.run([sys.executable, "-S", "-c", "import lightning_hrp"], cwd=tmp_path, env=env, capture_output=True)
    assert hidden.returncode != 0, "the installed lightning_hrp is still visible: this test would prove nothing"
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    # CUDA hidden, so that the test is the same on a machine with a GPU; no payload.
    env.update(PYTHON=str(wrapper), CUDA_VISIBLE_DEVICES="", OUT=str(out))
    completed = subprocess.run(
        # A CI machine is slower than the GPU machine's host: the caps four times as long.
        ["bash", str(REPO / "tests/gpu/run_on_gpu.sh"), "--payload", str(tmp_path / "no_payload"), "--work", str(tmp_path / "work"), "--slowdown", "4"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    statuses = {step["name"]: step["status"] for step in results["steps"]}
    assert statuses.pop("versions") == statuses.pop("wheels") == statuses.pop("imports") == PASS
    assert {"gpu_tests", "svd", "svd_dense", "overhead_minilm", "compare_report"} <= set(statuses)
    assert set(statuses.values()) == {SKIP}
    assert all("CUDA absent" in step["note"] for step in results["steps"] if step["status"] == SKIP)
    assert results["environment"]["cuda_available"] is False
    assert results["environment"]["versions"]["torch"] == torch.__version__
    assert results["imports"]["outside_checkout"] == [] and set(results["imports"]["origins"]) == set(machine_checks.PROJECT_MODULES)
    assert {p.name for p in out.iterdir()} <= set(OUT_FILES)
    report = (out / "results.md").read_text()
    # Versions come first; the table comes last, in results.md and at the end of the output.
    assert report.index("## versions: PASS") < report.index("## imports: PASS") < report.index("## Summary")
    assert "| gpu_tests | SKIP |" in report.split("## Summary")[1]
    assert "| gpu_tests | SKIP |" in completed.stdout.split("## Summary")[-1]


def test_the_entry_point_runs_the_machines_python3_never_a_virtual_environment_of_the_checkout(tmp_path: Path) -> None:
    # On the GPU machine nothing can be installed, so a .venv the README's setup left there is empty:
    # the entry point must take python3 from PATH (or PYTHON), as the machine's packages live there.
    checkout = tmp_path / "checkout"
    (checkout / "tests/gpu").mkdir(parents=True)
    (checkout / "tests/gpu/run_on_gpu.sh").write_text((REPO / "tests/gpu/run_on_gpu.sh").read_text())
    for folder, name in ((checkout / ".venv/bin", "python"), (tmp_path / "bin", "python3")):
        folder.mkdir(parents=True)
        (folder / name).write_text(f"#!/bin/sh\necho ran {folder / name}\n")
        (folder / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    completed = subprocess.run(["bash", str(checkout / "tests/gpu/run_on_gpu.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert completed.stdout.strip() == f"ran {tmp_path / 'bin/python3'}"


def test_each_step_is_in_out_when_it_ends_and_a_timeout_or_failure_stops_nothing(tmp_path: Path) -> None:
    results = Results(tmp_path / "out", "# test run")
    env = dict(os.environ)
    logs = tmp_path / "logs"
    deadline = time.monotonic() + 60

    def run(steps: list[Step], **kwargs) -> None:
        run_group(steps, results, cwd=tmp_path, env=env, logs=logs, deadline=kwargs.pop("deadline", deadline), echo=lambda _: None, **kwargs)

    run([python_step("first", "print('first output')")])
    # The second step reads what the first left in $OUT before the second started.
    read_back = f"print('## first: PASS' in open({str(tmp_path / 'out/results.md')!r}).read())"
    run([python_step("second", read_back), python_step("slow", "import time; time.sleep(60)", cap_s=1),
         python_step("broken", "raise SystemExit(3)"), Step("skipped", "not run", None, 5, skip="no GPU")])  # fmt: skip
    # An uncapped step ends at the deadline less the reserve, as planned: stopped, not failed.
    run([python_step("uncapped", "import time; time.sleep(60)", cap_s=None)], deadline=time.monotonic() + 3, reserve_s=1.5)
    run([python_step("after", "print('still runs')")])

    by_name = {r.name: r for r in results.steps}
    assert [by_name[n].status for n in ("first", "second", "slow", "broken", "skipped", "uncapped", "after")] == [
        PASS, PASS, TIMEOUT, FAIL, SKIP, STOPPED, PASS
    ]  # fmt: skip
    assert by_name["second"].output().strip() == "True"
    assert by_name["slow"].seconds < 10 and by_name["uncapped"].seconds < 10
    assert by_name["broken"].returncode == 3 and sorted(results.failed()) == ["broken", "slow"]
    saved = json.loads((tmp_path / "out/results.json").read_text())
    assert [step["status"] for step in saved["steps"]] == [r.status for r in results.steps]
    report = (tmp_path / "out/results.md").read_text()
    assert "first output" in report and "## slow: TIMEOUT" in report and "## after: PASS" in report
    assert "still runs" in (tmp_path / "out/log.txt").read_text()


def test_a_step_leaves_no_process_behind(tmp_path: Path) -> None:
    # Like a multi-process worker whose ranks outlive it: the step's whole process group is ended.
    code = "import subprocess; print(subprocess.Popen(['sleep', '60']).pid)"
    results = Results(tmp_path / "out", "# test run")
    run_group([python_step("orphan", code)], results, cwd=tmp_path, env=dict(os.environ), logs=tmp_path / "logs",
              deadline=time.monotonic() + 30, echo=lambda _: None)  # fmt: skip
    child = int(results.steps[0].output())
    for _ in range(200):
        if not _runs(child):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the step's child {child} still runs")


def _runs(pid: int) -> bool:
    """Whether ``pid`` is alive; a killed orphan stays a zombie until PID 1 reaps it, and some containers' PID 1 never does."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # the state field follows the parenthesised command name


def test_out_holds_only_the_files_the_device_tool_brings_back(tmp_path: Path) -> None:
    assert len(OUT_FILES) <= 8
    with pytest.raises(ValueError, match="may leave"):
        Results(tmp_path, "# test").path("compare_summary.csv")


def test_arguments(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("OUT", raising=False)
    for bad in ([], ["--out", "x", "--budget-s", "700"], ["--out", "x", "--budget-s", "200"], ["--out", "x", "--only", "bogus"],
                ["--out", "x", "--slowdown", "0.5"]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            run_on_gpu.parse_args(bad)
        assert exit_info.value.code == 2, bad
    assert "--out" in capsys.readouterr().err
    monkeypatch.setenv("OUT", "/results")
    args = run_on_gpu.parse_args([])
    assert args.out == Path("/results") and args.budget_s == run_on_gpu.DEFAULT_BUDGET_S and args.only == list(run_on_gpu.PARTS)
    rehearsal = run_on_gpu.parse_args(["--rehearse"])
    assert rehearsal.slowdown == run_on_gpu.REHEARSAL_SLOWDOWN and rehearsal.budget_s == run_on_gpu.DEFAULT_BUDGET_S * rehearsal.slowdown
    assert run_on_gpu.parse_args(["--slowdown", "2", "--budget-s", "1000"]).budget_s == 1000


def test_the_caps_fit_nine_minutes_and_leave_the_comparison_and_the_tests_their_time() -> None:
    budget = run_on_gpu.DEFAULT_BUDGET_S
    assert budget < NINE_MINUTES_S
    # The comparison runs from the end of the benchmarks to the deadline less the report's cap, at least
    # this long; the GPU tests run beside it, and their worker must end before their own cap does.
    window = budget - run_on_gpu.capped_s()
    assert window >= run_on_gpu.CAPS_S["gpu_tests"] >= WORKER_TIMEOUT_S + 20


def test_the_payload_round_trip_and_a_changed_file_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(0)
    weights = {"big": torch.randn(300, 256, generator=generator) * 0.05, "bias": torch.randn(8, generator=generator), "ids": torch.arange(4)}
    save_file(weights, str(tmp_path / "source.safetensors"))
    payload = tmp_path / "payload"
    (payload / gpu_payload.MODEL_FOLDER).mkdir(parents=True)
    rounding = gpu_payload.to_float16(tmp_path / "source.safetensors", payload / gpu_payload.MODEL_FOLDER / gpu_payload.WEIGHTS)
    for name in gpu_payload.MODEL_FILES:
        (payload / gpu_payload.MODEL_FOLDER / name).write_text("{}")
    gpu_payload.write_manifest(payload, float16_rounding=rounding)

    gpu_payload.unpack(payload, tmp_path / "model")
    restored = load_file(str(tmp_path / "model" / gpu_payload.WEIGHTS))
    assert restored["big"].dtype == torch.float32 and torch.equal(restored["big"], weights["big"].half().float())
    assert torch.equal(restored["bias"], weights["bias"]) and torch.equal(restored["ids"], weights["ids"])  # small: exact
    assert 0 < rounding["max_abs_change"] <= 0.05 * 5 * 2**-11 and rounding["max_relative_frobenius_change"] < 1e-3
    assert {p.name for p in (tmp_path / "model").iterdir()} == {gpu_payload.WEIGHTS, *gpu_payload.MODEL_FILES}

    (payload / gpu_payload.MODEL_FOLDER / "vocab.txt").write_text("changed")
    with pytest.raises(gpu_payload.PayloadError, match="vocab.txt"):
        gpu_payload.unpack(payload, tmp_path / "model2")
    assert not (tmp_path / "model2").exists()


def test_the_minilm_overhead_step_reaches_the_recipe_and_the_benchmark_keeps_its_own_settings() -> None:
    from benchmarks import overhead
    from benchmarks.overhead_fits import RECIPES, StepPlan, fit_config

    args = overhead.parse_args(
        ["--recipes", "classification", "--override=model.init_args.model_name_or_path=/models/minilm", "--override=trainer.max_steps=5"]
    )
    config = fit_config(RECIPES["classification"], StepPlan(3, 1), args, seed=0)
    assert config["model"]["init_args"]["model_name_or_path"] == "/models/minilm"
    assert config["trainer"]["max_steps"] == 3
    with pytest.raises(SystemExit):
        overhead.parse_args(["--override", "no_value_given"])


def test_the_evidence_config_parses_with_the_payloads_paths_and_one_seed_per_process(tmp_path: Path) -> None:
    from lightning_hrp.recipes.compare import build_parser
    from lightning_hrp.recipes.compare.settings import check_settings

    ctx = run_on_gpu.Context(run_on_gpu.parse_args(["--out", str(tmp_path)]), work=tmp_path, model_dir=tmp_path / "minilm")
    settings, overrides = run_on_gpu.compare_settings(ctx)
    config = tmp_path / "compare.yaml"
    assert machine_checks.write_compare_config(run_on_gpu.COMPARE_CONFIG, config, overrides, settings) == 0
    parser = build_parser()
    shard = parser.instantiate(parser.parse_args(["--config", str(config), "--seeds=[3]"]))
    check_settings(shard)
    assert shard.seeds == [3] and shard.wandb.mode == "disabled" and shard.output_dir == str(tmp_path / "compare")
    assert shard.overrides["model.init_args.model_name_or_path"] == str(tmp_path / "minilm")
    assert shard.overrides["trainer.max_steps"] == 200  # the committed config's own overrides stay
    full = parser.instantiate(parser.parse_args(["--config", str(run_on_gpu.COMPARE_CONFIG)]))
    assert len(full.seeds) >= 5 and {m.label for m in shard.methods} == {m.label for m in full.methods}


def test_a_method_the_machines_peft_lacks_is_left_out_and_named_but_a_bad_option_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_hrp.inits
    from lightning_hrp.errors import HRPConfigurationError

    real = lightning_hrp.inits.LoraInit

    def without_eva(method: str, options: dict | None = None):
        if method == "eva":
            raise HRPConfigurationError("eva needs peft's EvaConfig") from ImportError("no EvaConfig")
        return real(method, options)

    monkeypatch.setattr(lightning_hrp.inits, "LoraInit", without_eva)
    config = tmp_path / "compare.yaml"
    machine_checks.write_compare_config(run_on_gpu.COMPARE_CONFIG, config, {}, {})
    methods = [m["label"] for m in yaml.safe_load(config.read_text())["methods"]]
    assert "eva" not in methods and "lora" in methods and "hrp" in methods
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(run_on_gpu.COMPARE_CONFIG.read_text()), "methods": [{"label": "hrp", "method": "hrp", "options": {"preheat_steps": 3}}]}))
    with pytest.raises(HRPConfigurationError, match="preheat_rank"):
        machine_checks.write_compare_config(bad, tmp_path / "out.yaml", {}, {})
