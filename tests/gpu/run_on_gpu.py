"""Every GPU check of lightning-hrp in one go, in under 9 minutes, on a machine where nothing can be installed.

Run it through ``tests/gpu/run_on_gpu.sh`` (which picks the Python). With the machine's own Python
and this checkout, no install: the checkout goes first on ``PYTHONPATH`` (its package laid out by links in the
scratch folder, recipes/ as lightning_hrp/recipes, as an install lays it out); the few pure-Python
packages that machine lacks come as wheels from the payload folder (``tools/gpu_payload.py pack``
fills it here), installed into a scratch folder only where missing. Steps, in order (caps in
:data:`CAPS_S`, all within ``--budget-s``):

1. ``versions``: Python, torch, CUDA, the GPU and every package's version, before anything else.
2. ``wheels``, ``imports`` (every project module from this checkout), ``payload`` (MiniLM back to float32).
3. ``svd``, ``svd_steep``, ``svd_dense``: the decomposition of the 224 LLaMA-7B layers against its Gram
   floor (``benchmarks/svd.py``), in three parts so that a slow part costs only its own tables.
4. ``overhead_matrix``, ``overhead_minilm``: HRP's time and memory against the main training
   (``benchmarks/overhead.py``), on matrix regression and on MiniLM-L6 (a small transformers model).
5. At the same time: ``gpu_tests`` (``tests/gpu``: every support-table cell one GPU can test) and
   the evidence run, ``compare_seed<k>`` (``lightning-hrp compare`` on MiniLM / Rotten Tomatoes,
   ``recipes/configs/compare_classification_rotten_tomatoes_gpu.yaml``, one process per seed),
   which takes whatever time the steps before it left.
6. ``compare_report``: the comparison's report from every run that finished.

Each step's results are in ``$OUT`` as soon as it ends: ``results.md`` (a section per step),
``results.json`` (versions, the step table, every benchmark's JSON, the test outcomes),
``log.txt`` (every step's whole output), ``gpu_tests.xml``, ``compare_report.md``,
``compare_runs.csv`` and ``compare.tar.gz`` (the comparison's folder: every run's config, log and
result, from which ``--report_only=true`` rebuilds the report). The run ends with a pass/fail table;
its exit status is 1 if any step failed or timed out (a comparison process still running at the
deadline is ``STOPPED``, as planned: its finished runs are in the report). Without CUDA every GPU step
is skipped, the table is still written, and the exit status is 0.

``--rehearse`` runs every step on the CPU at toy size instead (minutes), to check the plumbing here
before the one GPU run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from step_runner import PASS, Collect, Results, Step, StepResult, fenced, run_group

REPO = Path(__file__).resolve().parents[2]
PAYLOAD = REPO / ".gpu_payload"
COMPARE_CONFIG = REPO / "recipes/configs/compare_classification_rotten_tomatoes_gpu.yaml"
MACHINE_CHECKS = str(Path(__file__).with_name("machine_checks.py"))
# Seconds each step may run on the GPU, about twice its expected time (BENCHMARKS.md, "GPU run", gives the
# estimates and the CPU figures behind them). The comparison has no cap of its own: it runs to the deadline
# less compare_report's cap, at least ``budget - capped_s()`` even when every step before it uses its whole cap.
CAPS_S = {
    "versions": 20, "wheels": 15, "imports": 30, "payload": 20,
    "svd": 50, "svd_steep": 30, "svd_dense": 60,
    "overhead_matrix": 50, "overhead_minilm": 75,
    "compare_config": 20, "gpu_tests": 140, "compare_report": 25,
}  # fmt: skip
DEFAULT_BUDGET_S = 535
# A rehearsal runs on a CPU: every cap and the default budget this many times longer (--slowdown).
REHEARSAL_SLOWDOWN = 4
PARTS = ("tests", "svd", "overhead", "compare")


def capped_s(slowdown: float = 1) -> float:
    """The time of every step but the comparison and the GPU tests (which run beside it), each at its cap."""
    return slowdown * sum(cap for name, cap in CAPS_S.items() if name != "gpu_tests")


@dataclass
class Context:
    """What the run knows so far: its options, folders, and what the first steps found."""

    args: argparse.Namespace
    work: Path
    device: str = "cuda"
    environment: dict[str, Any] = field(default_factory=dict)
    model_dir: Path | None = None
    compare: dict[str, Any] = field(default_factory=dict)

    @property
    def rehearse(self) -> bool:
        return self.args.rehearse

    def cap(self, step: str) -> float:
        return CAPS_S[step] * self.args.slowdown

    @property
    def cuda(self) -> bool:
        return bool(self.environment.get("cuda_available"))

    def gpu_skip(self, part: str) -> str | None:
        """Why a step of ``part`` does not run: not asked for, or no CUDA (unless rehearsing on the CPU)."""
        if part not in self.args.only:
            return f"not asked for (--only {' '.join(self.args.only)})"
        if not self.environment:
            return "the versions step failed, so whether CUDA is there is unknown"
        if not self.cuda and not self.rehearse:
            return "CUDA absent: this step needs a GPU"
        return None


def last_result(step_result: StepResult) -> dict[str, Any]:
    """The ``RESULT {json}`` line a machine_checks step printed last."""
    lines = [line for line in step_result.output().splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1].removeprefix("RESULT ")) if lines else {}


def python(*arguments: str) -> list[str]:
    """A command in this Python, with its ``-S`` if it has one (the dry-run test hides the site packages' .pth files)."""
    return [sys.executable, *(["-S"] if sys.flags.no_site else []), *arguments]


# --------------------------------------------------------------------------------------------
# Setup: versions, wheels, imports, payload
# --------------------------------------------------------------------------------------------


def checks_collect(key: str, then: Callable[[dict[str, Any]], None] = lambda found: None) -> Collect:
    """For a machine_checks step: keep its RESULT under ``key`` in results.json, show the rest of its output."""

    def collect(step_result: StepResult, results: Results) -> str:
        found = last_result(step_result)
        results.set(key, found)
        then(found)
        lines = [line for line in step_result.output().splitlines() if not line.startswith("RESULT ")]
        return fenced("\n".join(lines) + ("\n" + step_result.errors()[-4000:] if step_result.status != PASS else ""))

    return collect


def setup_steps(ctx: Context) -> list[list[Step]]:
    def found_environment(environment: dict[str, Any]) -> None:
        ctx.environment = environment
        ctx.device = "cuda" if ctx.cuda and not ctx.rehearse else "cpu"

    wheels = ctx.args.payload / "wheels"
    return [
        [Step("versions", "Python, torch, CUDA, GPU and package versions", python(MACHINE_CHECKS, "versions"), ctx.cap("versions"),
              checks_collect("environment", found_environment))],
        [Step("wheels", f"install the wheels of {wheels} whose distribution this Python lacks",
              python(MACHINE_CHECKS, "wheels", "--wheels", str(wheels), "--target", str(ctx.work / "site")), ctx.cap("wheels"),
              checks_collect("wheels"))],
        [Step("imports", "import every project module the run uses, from this checkout", python(MACHINE_CHECKS, "imports"),
              ctx.cap("imports"), checks_collect("imports"))],
    ]  # fmt: skip


def payload_steps(ctx: Context) -> list[list[Step]]:
    needs_model = {"overhead", "compare"} & set(ctx.args.only)
    skip = None if needs_model else "nothing asked for uses the model"
    # A missing payload fails this step (gpu_payload.py says how to fill it) and skips the MiniLM steps.
    skip = skip or ctx.gpu_skip(sorted(needs_model)[0])
    target = ctx.work / "minilm-l6-float32"

    def unpacked(step_result: StepResult, results: Results) -> str:
        if step_result.status == PASS:
            ctx.model_dir = target
        return fenced(step_result.output() + step_result.errors())

    command = python(str(REPO / "tools/gpu_payload.py"), "unpack", "--payload", str(ctx.args.payload), "--into", str(target))
    return [[Step("payload", "check the payload and write MiniLM-L6 back in float32", command, ctx.cap("payload"), unpacked, skip)]]


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------


def benchmark_step(ctx: Context, name: str, module: str, arguments: list[str], skip: str | None) -> Step:
    json_path = ctx.work / f"{name}.json"

    def collect(step_result: StepResult, results: Results) -> str:
        if json_path.is_file():
            results.data["benchmarks"][name] = json.loads(json_path.read_text())
            results.set("benchmarks", results.data["benchmarks"])
        return fenced(step_result.output() or step_result.errors()[-4000:])

    command = python("-m", f"benchmarks.{module}", "--device", ctx.device, *arguments, "--json", str(json_path))
    return Step(name, f"python -m benchmarks.{module} on {ctx.device}", command, ctx.cap(name), collect, skip)


def svd_steps(ctx: Context) -> list[list[Step]]:
    skip = ctx.gpu_skip("svd")
    if ctx.rehearse:
        size = ["--sets", "tiny", "--ranks", "16", "--tops", "8", "--repeats", "1", "--threads", "1"]
    else:
        size = ["--sets", "llama-7b", "--ranks", "64", "--tops", "8", "--repeats", "5", "--budget-s", "2"]
    return [
        [benchmark_step(ctx, "svd", "svd", [*size, "--factors", "gaussian", "preheat", "--compare", "loop", "qr", "lowrank"], skip)],
        [benchmark_step(ctx, "svd_steep", "svd", [*size, "--factors", "steep", "--compare", "qr"], skip)],
        # cuSOLVER's dense SVD of a 4096 x 11008 matrix takes seconds: on its own, last.
        [benchmark_step(ctx, "svd_dense", "svd", [*size, "--factors", "gaussian", "--compare", "dense"], skip)],
    ]


def overhead_steps(ctx: Context) -> list[list[Step]]:
    skip = ctx.gpu_skip("overhead")
    matrix = ["--recipes", "matrix_regression", "--repeats", "3"]
    # 200 main and 10 preheat steps, 2 repeats: about 50 s on the GPU (BENCHMARKS.md, "GPU run").
    minilm = ["--recipes", "classification", "--repeats", "2", "--main-steps", "200"]
    if ctx.rehearse:
        matrix = ["--recipes", "matrix_regression", "--repeats", "1", "--main-steps", "20", "--threads", "1"]
        minilm = ["--recipes", "classification", "--repeats", "1", "--main-steps", "4", "--multipliers", "4", "--threads", "1"]
    minilm_skip = skip
    if skip is None and ctx.model_dir is None:
        minilm_skip = "no float32 MiniLM (see the payload step)"
    data = ctx.args.payload / "data/rotten_tomatoes_corpus_full.csv.bz2"
    minilm += [f"--override=model.init_args.model_name_or_path={ctx.model_dir}", f"--override=data.init_args.data_path={data}"]
    return [
        [benchmark_step(ctx, "overhead_matrix", "overhead", matrix, skip)],
        [benchmark_step(ctx, "overhead_minilm", "overhead", minilm, minilm_skip)],
    ]


# --------------------------------------------------------------------------------------------
# GPU tests and the evidence run, at the same time
# --------------------------------------------------------------------------------------------


def junit_table(report: Path) -> tuple[list[dict[str, Any]], str]:
    """Every test case of a JUnit report with its outcome (PASS, FAIL, SKIP, XFAIL), and as a markdown table."""
    cases = []
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome = "PASS"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "FAIL"
            elif child.tag == "skipped":
                outcome = "XFAIL" if child.get("type") == "pytest.xfail" else "SKIP"
        message = next((child.get("message", "") for child in case if child.tag != "system-out"), "")
        cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)), "message": message})
    lines = ["| test (strategy@precision) | result | seconds | message |", "|---|---|---|---|"]
    lines += [f"| {c['test']} | {c['outcome']} | {c['seconds']:.1f} | {c['message'][:200]} |" for c in cases]
    return cases, "\n".join(lines)


def tests_step(ctx: Context) -> Step:
    report = ctx.work / "gpu_tests.xml"

    def collect(step_result: StepResult, results: Results) -> str:
        if not report.is_file():
            return "no test report (pytest did not finish)\n\n" + fenced(step_result.output()[-6000:])
        results.copy(report, "gpu_tests.xml")
        cases, table = junit_table(report)
        results.set("gpu_tests", cases)
        return table + "\n\n" + fenced("\n".join(step_result.output().splitlines()[-15:]))

    command = python("-m", "pytest", "tests/gpu", "-m", "gpu", "-q", "-rfEsx", "-p", "no:cacheprovider",
                     f"--junitxml={report}", "-o", "junit_family=xunit1")  # fmt: skip
    what = "tests/gpu: one device, DDP, FSDP1, FSDP2 and CPU offload at every precision (pytest -m gpu)"
    return Step("gpu_tests", what, command, ctx.cap("gpu_tests"), collect, ctx.gpu_skip("tests"))


def compare_settings(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings and overrides the run adds to the committed compare config."""
    settings: dict[str, Any] = {"output_dir": str(ctx.work / "compare"), "wandb": {"mode": "disabled"}}
    overrides: dict[str, Any] = {
        "model.init_args.model_name_or_path": str(ctx.model_dir),
        "data.init_args.data_path": str(ctx.args.payload / "data/rotten_tomatoes_corpus_full.csv.bz2"),
    }
    if ctx.rehearse:
        settings.update(learning_rates=[0.003], seeds=[0, 1])
        overrides.update({
            "trainer.max_steps": 2, "trainer.val_check_interval": 1, "data.init_args.train_size": 64,
            "data.init_args.val_size": 32, "data.init_args.test_size": 32, "data.init_args.batch_size": 8,
            "data.init_args.eval_batch_size": 16, "data.init_args.max_length": 16,
        })  # fmt: skip
    return settings, overrides


def compare_config_steps(ctx: Context) -> list[list[Step]]:
    skip = ctx.gpu_skip("compare") or (None if ctx.model_dir else "no float32 MiniLM (see the payload step)")
    config = ctx.work / "compare_gpu.yaml"
    settings, overrides = compare_settings(ctx)

    command = python(MACHINE_CHECKS, "compare-config", "--config", str(COMPARE_CONFIG), "--out", str(config),
                     "--settings", json.dumps(settings), "--overrides", json.dumps(overrides))  # fmt: skip
    return [[Step("compare_config", f"{COMPARE_CONFIG.relative_to(REPO)} with the payload's model and data", command, ctx.cap("compare_config"),
                  checks_collect("compare", lambda found: ctx.compare.update(found)), skip)]]


def evidence_steps(ctx: Context) -> list[list[Step]]:
    seeds = ctx.compare.get("seeds", [])
    skip = ctx.gpu_skip("compare") or (None if seeds else "no compare config (see compare_config)")
    # One process per seed, all on the one GPU: each is bound by its own Python and kernel launches.
    threads = str(max(1, (os.cpu_count() or 1) // (len(seeds) + 2)))
    shards = [
        Step(
            f"compare_seed{seed}",
            f"lightning-hrp compare, seed {seed}: every method x learning rate",
            python("-m", "lightning_hrp.recipes.cli", "compare", "--config", ctx.compare["config"], f"--seeds=[{seed}]"),
            None,
            lambda step_result, results: fenced("\n".join(step_result.output().splitlines()[-12:])),
            skip,
            env={"OMP_NUM_THREADS": threads},
        )
        for seed in seeds
    ]
    return [[tests_step(ctx), *shards]] if shards else [[tests_step(ctx), Step("compare", "the evidence run", None, None, skip=skip)]]


def compare_report_steps(ctx: Context) -> list[list[Step]]:
    output = ctx.work / "compare"
    skip = ctx.gpu_skip("compare") or (None if ctx.compare.get("config") else "no comparison ran")

    def collect(step_result: StepResult, results: Results) -> str:
        with tarfile.open(ctx.work / "compare.tar.gz", "w:gz") as archive:
            archive.add(output, arcname="compare")
        results.copy(ctx.work / "compare.tar.gz", "compare.tar.gz")
        report = output / "report.md"
        if not report.is_file():
            return fenced(step_result.output() + step_result.errors()[-4000:])
        results.copy(report, "compare_report.md")
        results.copy(output / "runs.csv", "compare_runs.csv")
        return report.read_text()

    command = python("-m", "lightning_hrp.recipes.cli", "compare", "--config", str(ctx.compare.get("config")), "--report_only=true")
    return [[Step("compare_report", "the comparison's report from every finished run", command, ctx.cap("compare_report"), collect, skip)]]


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

PLAN = (setup_steps, payload_steps, svd_steps, overhead_steps, compare_config_steps, evidence_steps, compare_report_steps)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tests/gpu/run_on_gpu.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="results folder (default: $OUT)")
    parser.add_argument("--payload", type=Path, default=PAYLOAD, help="wheels, MiniLM and data (default: .gpu_payload)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--budget-s", type=float, help=f"the whole run's deadline (default {DEFAULT_BUDGET_S} x --slowdown)")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="run only these parts (setup always runs)")
    parser.add_argument("--rehearse", action="store_true", help="every step on the CPU at toy size, to check the plumbing")
    parser.add_argument(
        "--slowdown",
        type=float,
        help=f"every cap and the default budget this many times longer, for a slow or busy CPU (default 1; --rehearse: {REHEARSAL_SLOWDOWN})",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("give --out DIR (or set OUT): where the results go.")
    if args.slowdown is None:
        args.slowdown = REHEARSAL_SLOWDOWN if args.rehearse else 1
    if not args.slowdown >= 1:
        parser.error(f"--slowdown must be >= 1, got {args.slowdown:g}.")
    if args.budget_s is None:
        args.budget_s = DEFAULT_BUDGET_S * args.slowdown
    # The steps' caps, and at least a minute for the comparison; the device tool ends a command at 600 s.
    lowest, highest = capped_s(args.slowdown) + 60 * args.slowdown, 590 * args.slowdown
    if not lowest <= args.budget_s <= highest:
        parser.error(f"--budget-s must lie in [{lowest:g}, {highest:g}] at --slowdown {args.slowdown:g}, got {args.budget_s:g}.")
    return args


def checkout_package(work: Path) -> Path:
    """A folder holding the checkout's ``lightning_hrp`` as an install lays it out, made of links into the checkout.

    pyproject.toml installs the top-level recipes/ as ``lightning_hrp.recipes`` (package-dir); without an
    install, this is the same layout: every entry of lightning_hrp/ linked, and recipes/ linked beside them.
    """
    root = work / "package"
    shutil.rmtree(root, ignore_errors=True)  # links only: nothing in the checkout is touched
    package = root / "lightning_hrp"
    package.mkdir(parents=True)
    for entry in (REPO / "lightning_hrp").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "recipes").symlink_to(REPO / "recipes")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget_s
    ctx = Context(args, work=args.work or Path(tempfile.mkdtemp(prefix="lightning-hrp-gpu-")))
    ctx.work.mkdir(parents=True, exist_ok=True)
    header = (f"# lightning-hrp GPU run, {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n`tests/gpu/run_on_gpu.sh "
              f"{' '.join(sys.argv[1:] if argv is None else argv)}`: budget {args.budget_s:g} s (the comparison at least "
              f"{args.budget_s - capped_s(args.slowdown):.0f} s), parts {', '.join(args.only)}"
              f"{', rehearsal on the CPU' if args.rehearse else ''}; scratch folder {ctx.work}.")  # fmt: skip
    results = Results(args.out, header)
    env = {
        **os.environ,
        # The checkout first (its package, then its benchmarks), then the wheels installed into the scratch folder.
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(checkout_package(ctx.work)), str(REPO), str(ctx.work / "site"), os.environ.get("PYTHONPATH")])
        ),
        "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    }  # fmt: skip
    print(header, flush=True)
    for make_groups in PLAN:
        for group in make_groups(ctx):
            # The comparison's shards run to the deadline less the report's reserve.
            reserve = ctx.cap("compare_report") if make_groups is evidence_steps else 0.0
            run_group(group, results, cwd=REPO, env=env, logs=ctx.work / "logs", deadline=deadline, reserve_s=reserve,
                      echo=lambda text: print(text, flush=True))  # fmt: skip
    failed = results.failed()
    summary = f"{len(results.steps) - len(failed)}/{len(results.steps)} steps passed or skipped in {time.monotonic() - started:.0f} s"
    table = f"\n## Summary\n\n{results.table()}\n\n{summary}; failed or timed out: {', '.join(failed) or 'none'}.\n"
    results.append("results.md", table)
    results.set("summary", {"failed": failed, "seconds": time.monotonic() - started})
    print(table + f"\nResults in {args.out}: {', '.join(sorted(p.name for p in args.out.iterdir()))}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
