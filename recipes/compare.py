"""``lightning-hrp compare``: LoRA initialisations compared fairly, methods x learning rates x seeds.

One recipe config (a ``lightning-hrp fit`` YAML) is run once per method, learning rate and seed,
with only ``model.init_args.init_method`` / ``init_options``, ``learning_rate`` and
``seed_everything`` changed. Per method the learning rate is chosen on the *validation* split
(mean over seeds of the final ``selection_metric``) and the *test* split is reported at that rate
only, so every method gets the same tuning budget ("Learning Rate Matters", arXiv 2602.04998).

Resumable: each run writes ``result.json`` last, into its own folder
``<output_dir>/runs/<label>/lr=<lr>/seed=<seed>/`` (with ``config.yaml``, the CSV log and any HRP
or init diagnostics); a second invocation skips every run whose ``result.json`` exists for the
same configuration. A run whose ``result.json``, CSV log or diagnostics are unreadable or changed
since it finished (``result.json`` holds their SHA-256) is reported with its path and run again,
never half-used. Method labels name folders, so they must be plain names (no ``/``, no ``..``).
Logging goes to a CSV logger and, unless ``wandb.mode=disabled``, to Weights & Biases: offline by
default (a run folder under ``<output_dir>/wandb`` that ``wandb sync`` uploads later), online with
``--wandb.mode=online``; one W&B group per comparison, run names ``label/lr/seed``, and a
``summary`` run with the result tables and plots.

The report (``report.md``, ``runs.csv``, ``summary.csv`` and PNG plots in ``<output_dir>``) needs
no W&B; ``--report_only=true`` rebuilds it from finished runs.

Run: ``lightning-hrp compare --config recipes/configs/compare_matrix_regression.yaml``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import shutil
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lightning_hrp.inits import InitMethod, LoraInit
from lightning_hrp.recipes.runs import (
    build_run,
    load_config,
    quiet_libraries,
    set_dotted,
    settings_from_command_line,
    with_overrides,
    without_outputs,
)

WandbMode = Literal["offline", "online", "disabled"]
Direction = Literal["min", "max"]


@dataclass
class MethodSpec:
    """One contender: an init method with its options, under a label (e.g. ``hrp_asymmetric``)."""

    label: str
    method: InitMethod
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class WandbSettings:
    """Weights & Biases logging.

    Attributes:
        mode: ``offline`` (default: local run folders, upload later with ``wandb sync``), ``online``,
            or ``disabled``.
        project: W&B project.
        entity: W&B entity (team or user); None is the account's default.
        group: W&B group of this comparison; None is the output folder's name.
    """

    mode: WandbMode = "offline"
    project: str = "lightning-hrp"
    entity: str | None = None
    group: str | None = None


@dataclass
class CompareSettings:
    """A comparison: what to run and how to judge it.

    Attributes:
        recipe_config: The ``lightning-hrp fit`` YAML every run starts from; it must not add an
            init callback (HRPPreheatCallback) of its own: the methods set the init.
        output_dir: Where runs, report and W&B files go.
        methods: The contenders.
        learning_rates: Grid of ``model.init_args.learning_rate`` values, the same for every method.
        seeds: ``seed_everything`` values; each (method, learning rate) runs once per seed.
        selection_metric: Validation metric that chooses each method's learning rate (its final value).
        selection_mode: ``min`` or ``max`` for the selection metric (and the test metric).
        test_metric: Reported test metric; None: ``selection_metric`` with ``val/`` replaced by ``test/``.
        overrides: Dotted keys set in the recipe config for every run, e.g. ``{"trainer.max_steps": 60}``.
        references: Labels every method is judged against in the report (a ``vs <label>`` column each).
        seed_keys: Dotted keys that take the run's seed too, besides ``seed_everything``; e.g. the
            matrix-regression task seed, so that each seed is a new task, not only a new adapter start.
        wandb: W&B settings.
        report_only: Do not run anything; rebuild the report from finished runs.
    """

    recipe_config: str
    output_dir: str
    methods: list[MethodSpec]
    learning_rates: list[float]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    selection_metric: str = "val/loss"
    selection_mode: Direction = "min"
    test_metric: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    seed_keys: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=lambda: ["lora"])
    wandb: WandbSettings = field(default_factory=WandbSettings)
    report_only: bool = False

    @property
    def reported_test_metric(self) -> str:
        if self.test_metric is not None:
            return self.test_metric
        if not self.selection_metric.startswith("val/"):
            raise ValueError(f"selection_metric {self.selection_metric!r} has no val/ prefix; set test_metric explicitly.")
        return "test/" + self.selection_metric.removeprefix("val/")

    @property
    def group(self) -> str:
        return self.wandb.group or Path(self.output_dir).resolve().name


# --------------------------------------------------------------------------------------------
# Run configs
# --------------------------------------------------------------------------------------------

def load_recipe_config(path: str | Path) -> dict[str, Any]:
    """The recipe YAML as a dict, checked to be a ``lightning-hrp fit`` config without its own init callback."""
    config = load_config(path, argument="recipe_config")
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        class_path = callback.get("class_path", "") if isinstance(callback, dict) else str(callback)
        if class_path.endswith("HRPPreheatCallback"):
            raise ValueError(
                f"recipe_config: {path} adds an HRPPreheatCallback; a comparison sets each method's init itself. "
                "Start from the plain-LoRA config (e.g. *_lora.yaml) and give HRP's options in its method entry."
            )
    return config


def run_config(base: dict[str, Any], settings: CompareSettings, spec: MethodSpec, lr: float, seed: int) -> dict[str, Any]:
    """The complete config of one run: the recipe's, with the overrides, the method, ``lr`` and ``seed``."""
    # Loggers are attached per run (CSV + W&B); no checkpoints: a run is short and its result is kept.
    config = with_overrides(without_outputs(base), settings.overrides)
    config["seed_everything"] = seed
    for dotted in settings.seed_keys:
        set_dotted(config, dotted, seed)
    init_args = config["model"].setdefault("init_args", {})
    init_args["learning_rate"] = lr
    init_args["init_method"] = spec.method.value
    init_args["init_options"] = dict(spec.options) or None
    return config


def fingerprint(config: dict[str, Any]) -> str:
    """A short hash of a run config: a finished run is reused only for the same config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_dir(settings: CompareSettings, label: str, lr: float, seed: int) -> Path:
    return Path(settings.output_dir) / "runs" / check_label(label) / _lr_folder(lr) / f"seed={seed}"


def _lr_folder(lr: float) -> str:
    return f"lr={lr:g}"


# A label names a folder under <output_dir>/runs/: no separators, no '..', nothing hidden.
_SAFE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# seed_everything's range: outside it Lightning warns and seeds 0 instead, so two such seeds would be one run.
_MAX_SEED = 2**32 - 1


def check_label(label: Any) -> str:
    """``label`` if it is a safe folder name; raises ``ValueError`` otherwise."""
    if not (isinstance(label, str) and _SAFE_LABEL.fullmatch(label)):
        raise ValueError(
            f"methods: label {label!r} is not a safe folder name (each method's runs go to <output_dir>/runs/<label>/). "
            "Use up to 100 letters, digits, '_', '-' and '.', starting with a letter or digit, e.g. 'hrp_r32'."
        )
    return label


def check_settings(settings: CompareSettings) -> None:
    """Refuse a comparison that cannot run as asked, before anything is written or run."""
    if not settings.methods:
        raise ValueError("methods: give at least one method.")
    for spec in settings.methods:
        check_label(spec.label)
        LoraInit(spec.method, spec.options)  # refuse bad options before the first run, not hours in
    labels = [spec.label for spec in settings.methods]
    # Case-insensitive: 'LoRA' and 'lora' would share one folder on macOS and Windows.
    if len({label.casefold() for label in labels}) != len(labels):
        raise ValueError(f"methods: labels must be unique, ignoring case (they name folders), got {labels}.")
    if not settings.learning_rates or not settings.seeds:
        raise ValueError("learning_rates and seeds must each hold at least one value.")
    for lr in settings.learning_rates:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"learning_rates: each must be a positive, finite number, got {lr!r}.")
    folders = [_lr_folder(lr) for lr in settings.learning_rates]
    if len(set(folders)) != len(folders):
        raise ValueError(
            f"learning_rates: must differ within 6 significant digits (each names a folder lr=<value>), got {settings.learning_rates}."
        )
    for seed in settings.seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
            raise ValueError(f"seeds: each must be an integer in [0, {_MAX_SEED}] (seed_everything's range), got {seed!r}.")
    if len(set(settings.seeds)) != len(settings.seeds):
        raise ValueError(f"seeds: must be distinct (a repeated seed is the same run counted twice), got {settings.seeds}.")


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


def _wandb_logger(settings: CompareSettings, name: str, config: dict[str, Any]) -> Any:
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(
        name=name,
        project=settings.wandb.project,
        entity=settings.wandb.entity,
        group=settings.group,
        job_type="train",
        save_dir=str(Path(settings.output_dir)),
        offline=settings.wandb.mode == "offline",
        config=config,
        tags=[config["model"]["init_args"]["init_method"]],
    )


def _log_diagnostics_to_wandb(experiment: Any, diagnostics: dict[str, Any]) -> None:
    import wandb

    hrp = diagnostics.get("hrp")
    if hrp:
        losses = hrp["preheat_losses"]
        experiment.log(
            {
                "hrp/preheat_loss_curve": wandb.plot.line_series(
                    xs=list(range(len(losses))), ys=[losses], keys=["preheat loss"], title="HRP preheat loss", xname="preheat step"
                ),
                "hrp/singular_values": wandb.plot.line_series(
                    xs=list(range(1, 1 + max(len(layer["singular_values"]) for layer in hrp["layers"]))),
                    ys=[layer["singular_values"] for layer in hrp["layers"]],
                    keys=[layer["name"] for layer in hrp["layers"]],
                    title="Singular values of the preheated updates",
                    xname="index",
                ),
            }
        )
    init = diagnostics.get("init")
    if init and init.get("singular_values"):
        spectra = init["singular_values"]
        experiment.log(
            {
                f"{init['method']}/singular_values": wandb.plot.line_series(
                    xs=list(range(1, 1 + max(len(s) for s in spectra.values()))),
                    ys=list(spectra.values()),
                    keys=list(spectra),
                    title=f"{init['method']}: singular values it started from",
                    xname="index",
                )
            }
        )


def _diagnostics(trainer: Any) -> dict[str, Any]:
    from lightning_hrp import HRPPreheatCallback
    from lightning_hrp.inits import SetupTimeInit

    found: dict[str, Any] = {}
    for callback in trainer.callbacks:
        if isinstance(callback, HRPPreheatCallback) and callback.report is not None:
            found["hrp"] = asdict(callback.report)
        elif isinstance(callback, SetupTimeInit) and callback.report is not None:
            found["init"] = asdict(callback.report)
    return found


def execute_run(settings: CompareSettings, spec: MethodSpec, lr: float, seed: int, config: dict[str, Any]) -> dict[str, Any]:
    """Fit, validate and test one run; write its folder; return its result."""
    from lightning.pytorch.loggers import CSVLogger

    directory = run_dir(settings, spec.label, lr, seed)
    if directory.exists():
        shutil.rmtree(directory)  # an unfinished run from before: start it again
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    name = f"{spec.label}/{lr:g}/{seed}"

    loggers: list[Any] = [CSVLogger(save_dir=str(directory), name="logs", version="")]
    if settings.wandb.mode != "disabled":
        loggers.append(_wandb_logger(settings, name, config))
    # The run is built from the very file saved beside its results.
    run = build_run(load_config(directory / "config.yaml"), loggers=loggers)
    fit_seconds = run.fit()
    validation = run.validate()
    test = run.test()
    diagnostics = _diagnostics(run.trainer)
    if diagnostics:
        (directory / "diagnostics.json").write_text(json.dumps(diagnostics))
    for logger in loggers:
        logger.finalize("success")
    if settings.wandb.mode != "disabled":
        experiment = loggers[1].experiment
        _log_diagnostics_to_wandb(experiment, diagnostics)
        experiment.summary.update({"fit_seconds": fit_seconds, **{f"final/{k}": v for k, v in {**validation, **test}.items()}})
        experiment.finish()
    result = {
        "label": spec.label,
        "method": spec.method.value,
        "options": spec.options,
        "learning_rate": lr,
        "seed": seed,
        "fingerprint": fingerprint(config),
        "fit_seconds": fit_seconds,
        "val": validation,
        "test": test,
        "files": _digests(directory),
    }
    # Written last: its presence marks the run as finished.
    partial = directory / "result.json.partial"
    partial.write_text(json.dumps(result, indent=2))
    partial.replace(directory / "result.json")
    return result


class DamagedRunError(Exception):
    """A file of a finished run is unreadable or not as the run left it: the run must not be used."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


# The files of a run that the report reads back, checked against their digests in result.json.
_READ_BACK = ("logs/metrics.csv", "diagnostics.json")
_RESULT_FIELDS = {"label", "method", "options", "learning_rate", "seed", "fingerprint", "fit_seconds", "val", "test", "files"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digests(directory: Path) -> dict[str, str]:
    return {name: _sha256(directory / name) for name in _READ_BACK if (directory / name).is_file()}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedRunError(path, f"unreadable ({error})") from error


def _check_result(result: Any, path: Path, expected: dict[str, Any]) -> None:
    """Raise ``DamagedRunError`` unless ``result`` is a complete result of the run ``expected`` describes."""
    if not isinstance(result, dict) or not _RESULT_FIELDS <= set(result):
        raise DamagedRunError(path, f"not a complete result (needs the fields {sorted(_RESULT_FIELDS)})")
    for key, value in expected.items():
        if result[key] != value:
            raise DamagedRunError(path, f"{key} is {result[key]!r}, but this run's folder is for {value!r}")
    number = (int, float)
    metrics_ok = all(
        isinstance(result[split], dict) and all(isinstance(v, number) and not isinstance(v, bool) for v in result[split].values())
        for split in ("val", "test")
    )
    files_ok = isinstance(result["files"], dict) and set(result["files"]) <= set(_READ_BACK)
    if not (metrics_ok and files_ok and isinstance(result["fingerprint"], str) and isinstance(result["fit_seconds"], number)):
        raise DamagedRunError(path, "malformed result (metrics, file digests, fingerprint or fit_seconds)")


def finished_result(settings: CompareSettings, spec: MethodSpec, lr: float, seed: int, config: dict[str, Any]) -> dict[str, Any] | None:
    """The saved result of this run if it finished with the same config, None if it never finished.

    Raises:
        DamagedRunError: ``result.json``, or a file the report reads back, is unreadable or changed
            since the run finished (e.g. truncated by a full disk or an interrupted copy).
        ValueError: The run finished with a different configuration.
    """
    directory = run_dir(settings, spec.label, lr, seed)
    path = directory / "result.json"
    if not path.is_file():
        return None
    result = _read_json(path)
    _check_result(result, path, {"label": spec.label, "learning_rate": lr, "seed": seed})
    if result["fingerprint"] != fingerprint(config):
        raise ValueError(
            f"{path} holds a finished run of a different configuration (changed recipe, overrides or options). "
            "Use a new output_dir for the new comparison, or delete that run's folder to redo it."
        )
    for name, digest in result["files"].items():
        file = directory / name
        if not file.is_file() or _sha256(file) != digest:
            raise DamagedRunError(file, "missing or changed since the run finished (truncated or edited)")
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclass
class MethodSummary:
    """One method at its validation-chosen learning rate."""

    label: str
    method: str
    chosen_lr: float
    val_mean: float
    val_std: float
    test_mean: float
    test_std: float
    seeds: int
    val_by_lr: dict[float, float]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarise(results: Sequence[dict[str, Any]], settings: CompareSettings) -> list[MethodSummary]:
    """Per method: mean validation metric per learning rate, the best rate, test mean and std there."""
    metric, test_metric = settings.selection_metric, settings.reported_test_metric
    better = min if settings.selection_mode == "min" else max
    summaries = []
    for spec in settings.methods:
        runs = [r for r in results if r["label"] == spec.label]
        if not runs:
            continue
        by_lr: dict[float, list[dict[str, Any]]] = defaultdict(list)
        for r in runs:
            if metric not in r["val"]:
                raise KeyError(f"selection_metric {metric!r} is not among the logged validation metrics {sorted(r['val'])}.")
            by_lr[r["learning_rate"]].append(r)
        val_by_lr = {lr: _mean_std([r["val"][metric] for r in rs])[0] for lr, rs in sorted(by_lr.items())}
        # NaN (a diverged rate) never wins.
        finite = {lr: v for lr, v in val_by_lr.items() if math.isfinite(v)} or val_by_lr
        chosen = better(finite, key=finite.__getitem__)
        chosen_runs = by_lr[chosen]
        val_mean, val_std = _mean_std([r["val"][metric] for r in chosen_runs])
        test_mean, test_std = _mean_std([r["test"][test_metric] for r in chosen_runs])
        summaries.append(
            MethodSummary(spec.label, spec.method.value, chosen, val_mean, val_std, test_mean, test_std, len(chosen_runs), val_by_lr)
        )
    return summaries


def verdict(candidate: MethodSummary, baseline: MethodSummary, mode: Direction) -> str:
    """``win``, ``tie`` or ``loss`` of ``candidate`` against ``baseline`` on the test metric.

    A difference counts only beyond two standard errors of the difference of the two seed means;
    with fewer than two seeds on either side there is no verdict (``n/a``).
    """
    if candidate.seeds < 2 or baseline.seeds < 2:
        return "n/a"
    difference = candidate.test_mean - baseline.test_mean
    stderr = math.sqrt(candidate.test_std**2 / max(candidate.seeds, 1) + baseline.test_std**2 / max(baseline.seeds, 1))
    if abs(difference) <= 2 * stderr:
        return "tie"
    improved = difference < 0 if mode == "min" else difference > 0
    return "win" if improved else "loss"


def _read_curves(directory: Path, metric: str) -> tuple[list[int], list[float]]:
    path = directory / "logs" / "metrics.csv"
    if not path.is_file():
        return [], []
    steps, values = [], []
    try:
        with path.open() as handle:
            for row in csv.DictReader(handle):
                if row.get(metric) not in (None, ""):
                    steps.append(int(row["step"]))
                    values.append(float(row[metric]))
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as error:
        raise DamagedRunError(path, f"unreadable ({error!r})") from error
    # The last rows come from the explicit validate() after fit, at the final step: keep the curve's own.
    seen: dict[int, float] = {}
    for step, value in zip(steps, values):
        seen.setdefault(step, value)
    return list(seen), list(seen.values())


def write_report(results: Sequence[dict[str, Any]], settings: CompareSettings, command: str) -> Path:
    """Write ``runs.csv``, ``summary.csv``, ``report.md`` and the PNG plots; return the report's path."""
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    metric, test_metric = settings.selection_metric, settings.reported_test_metric
    summaries = summarise(results, settings)

    val_keys = sorted({k for r in results for k in r["val"]})
    test_keys = sorted({k for r in results for k in r["test"]})
    with (output / "runs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "method", "options", "learning_rate", "seed", "fit_seconds", *val_keys, *test_keys])
        for r in sorted(results, key=lambda r: (r["label"], r["learning_rate"], r["seed"])):
            writer.writerow(
                [r["label"], r["method"], json.dumps(r["options"]), r["learning_rate"], r["seed"], f"{r['fit_seconds']:.2f}"]
                + [r["val"].get(k, "") for k in val_keys]
                + [r["test"].get(k, "") for k in test_keys]
            )
    with (output / "summary.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "method", "chosen_lr", f"{metric}_mean", f"{metric}_std", f"{test_metric}_mean", f"{test_metric}_std", "seeds"])
        for s in summaries:
            writer.writerow([s.label, s.method, s.chosen_lr, s.val_mean, s.val_std, s.test_mean, s.test_std, s.seeds])

    plots = write_plots(results, summaries, settings)
    references = [next(s for s in summaries if s.label == label) for label in settings.references if any(s.label == label for s in summaries)]
    learning_rates = sorted({r["learning_rate"] for r in results})
    lines = [
        "# LoRA initialisations compared",
        "",
        f"Recipe: `{settings.recipe_config}`; overrides: `{json.dumps(settings.overrides)}`.",
        f"Learning rate chosen per method on the validation split (mean of the final `{metric}` over seeds, "
        f"{settings.selection_mode}imised); the test split (`{test_metric}`) is reported at that rate only. "
        f"Seeds: {settings.seeds}" + (f" (each also sets {', '.join(f'`{k}`' for k in settings.seed_keys)})" if settings.seed_keys else "")
        + ". Mean ± sample std over seeds.",
        "",
        "Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"| method | init | chosen lr | {metric} | {test_metric} |" + "".join(f" vs {r.label} |" for r in references)
        + "".join(f" val @ {lr:g} |" for lr in learning_rates),
        "|---|---|---|---|---|" + "---|" * (len(references) + len(learning_rates)),
    ]
    for s in summaries:
        versus = "".join(
            " — |" if s is r else f" {verdict(s, r, settings.selection_mode)} ({s.test_mean - r.test_mean:+.3g}) |" for r in references
        )
        per_lr = "".join(f" {s.val_by_lr[lr]:.4g} |" if lr in s.val_by_lr else " |" for lr in learning_rates)
        lines.append(
            f"| {s.label} | {s.method} | {s.chosen_lr:g} | {s.val_mean:.4g} ± {s.val_std:.2g} | "
            f"{s.test_mean:.4g} ± {s.test_std:.2g} |{versus}{per_lr}"
        )
    if references:
        lines += [
            "",
            "`vs <method>`: verdict and test difference to that method (each at its own chosen rate); `win`/`loss` "
            "only where the difference exceeds two standard errors of the difference of the seed means, otherwise `tie`.",
        ]
    lines += ["", "Plots:", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", f"Every run: `runs.csv`; per method: `summary.csv`; run folders: `runs/<method>/lr=<lr>/seed=<seed>/`."]
    report = output / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def write_plots(results: Sequence[dict[str, Any]], summaries: Sequence[MethodSummary], settings: CompareSettings) -> list[Path]:
    """Learning curves, final metric with error bars, the learning-rate sweep and HRP spectra, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(settings.output_dir)
    metric, test_metric = settings.selection_metric, settings.reported_test_metric
    paths = []
    colors = {s.label: plt.cm.tab10(i % 10) for i, s in enumerate(summaries)}
    # Past ten methods the colours repeat; the line style tells those apart.
    styles = {s.label: "-" if i < 10 else "--" for i, s in enumerate(summaries)}

    # Learning curves of the validation metric at each method's chosen rate (mean over seeds, min-max band).
    figure, axis = plt.subplots(figsize=(9, 5))
    for s in summaries:
        seeds = sorted(r["seed"] for r in results if r["label"] == s.label and r["learning_rate"] == s.chosen_lr)
        curves = [_read_curves(run_dir(settings, s.label, s.chosen_lr, seed), metric) for seed in seeds]
        curves = [c for c in curves if c[0]]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c[0]) for c in curves)))
        stacked = [[dict(zip(*c))[step] for step in steps] for c in curves]
        mean = [sum(col) / len(col) for col in zip(*stacked)]
        axis.plot(steps, mean, label=f"{s.label} (lr {s.chosen_lr:g})", color=colors[s.label], linestyle=styles[s.label])
        axis.fill_between(steps, [min(col) for col in zip(*stacked)], [max(col) for col in zip(*stacked)], color=colors[s.label], alpha=0.15)
    axis.set_xlabel("training step")
    axis.set_ylabel(metric)
    if settings.selection_mode == "min":
        axis.set_yscale("log")
    axis.set_title("Validation curves at each method's chosen lr\n(mean over seeds; band: min to max)")
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    paths.append(output / "learning_curves.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    # Final test metric with error bars.
    figure, axis = plt.subplots(figsize=(8, 4.5))
    labels = [s.label for s in summaries]
    axis.bar(labels, [s.test_mean for s in summaries], yerr=[s.test_std for s in summaries], capsize=4, color=[colors[l] for l in labels])
    for s in summaries:
        seeds = [r["test"][test_metric] for r in results if r["label"] == s.label and r["learning_rate"] == s.chosen_lr]
        axis.scatter([s.label] * len(seeds), seeds, color="black", s=8, zorder=3)
    axis.set_ylabel(f"{test_metric} at the chosen lr")
    if settings.selection_mode == "min":
        axis.set_yscale("log")
    else:
        low = min(min(r["test"][test_metric] for r in results if r["label"] == s.label) for s in summaries)
        axis.set_ylim(bottom=max(0.0, low - 0.05))
    axis.set_title("Test metric at each method's validation-chosen lr\n(bar: mean, whisker: std, dots: seeds)")
    axis.tick_params(axis="x", rotation=45)
    figure.tight_layout()
    paths.append(output / "final_metric.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    # The learning-rate sweep on the validation split.
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for s in summaries:
        rates = sorted(s.val_by_lr)
        axis.plot(rates, [s.val_by_lr[lr] for lr in rates], marker="o", label=s.label, color=colors[s.label], linestyle=styles[s.label])
    axis.set_xscale("log")
    if settings.selection_mode == "min":
        axis.set_yscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel(f"final {metric} (mean over seeds)")
    axis.set_title("Learning-rate sweep (validation)")
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    paths.append(output / "lr_sweep.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    # HRP diagnostics of the first finished seed at the chosen rate: preheat loss and normalised spectra.
    hrp_runs = []
    for s in summaries:
        seed = min(r["seed"] for r in results if r["label"] == s.label and r["learning_rate"] == s.chosen_lr)
        path = run_dir(settings, s.label, s.chosen_lr, seed) / "diagnostics.json"
        if path.is_file() and "hrp" in (diagnostics := _read_json(path)):
            hrp_runs.append((s.label, diagnostics["hrp"]))
    if hrp_runs:
        figure, (loss_axis, spectrum_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
        for label, hrp in hrp_runs:
            loss_axis.plot(hrp["preheat_losses"], label=label, color=colors[label])
            for i, layer in enumerate(hrp["layers"]):
                values = layer["singular_values"]
                spectrum_axis.plot(
                    range(1, len(values) + 1), [v / values[0] for v in values], color=colors[label], alpha=0.6,
                    label=label if i == 0 else None,
                )
                spectrum_axis.axvline(layer["rank"], color="gray", linestyle=":", linewidth=0.8)
        loss_axis.set_xlabel("preheat step")
        loss_axis.set_ylabel("training loss")
        loss_axis.set_title("HRP preheat loss")
        loss_axis.legend(fontsize=8)
        spectrum_axis.set_yscale("log")
        spectrum_axis.set_xlabel("singular value index (dotted: LoRA rank r)")
        spectrum_axis.set_ylabel("sigma_i / sigma_1")
        spectrum_axis.set_title("Spectra of the preheated updates (one line per layer)")
        spectrum_axis.legend(fontsize=8)
        figure.tight_layout()
        paths.append(output / "hrp_spectra.png")
        figure.savefig(paths[-1], dpi=120)
        plt.close(figure)
    return paths


def log_summary_to_wandb(results: Sequence[dict[str, Any]], settings: CompareSettings, plots: Sequence[Path]) -> None:
    """One ``summary`` run in the comparison's W&B group: every run and the per-method table, and the plots."""
    import wandb

    summaries = summarise(results, settings)
    run = wandb.init(
        project=settings.wandb.project,
        entity=settings.wandb.entity,
        group=settings.group,
        name="summary",
        job_type="summary",
        dir=str(Path(settings.output_dir)),
        mode=settings.wandb.mode,
        config={"settings": json.loads(json.dumps(asdict(settings), default=str))},
    )
    metric, test_metric = settings.selection_metric, settings.reported_test_metric
    runs_table = wandb.Table(columns=["label", "method", "learning_rate", "seed", metric, test_metric, "fit_seconds"])
    for r in results:
        runs_table.add_data(r["label"], r["method"], r["learning_rate"], r["seed"], r["val"].get(metric), r["test"].get(test_metric), r["fit_seconds"])
    summary_table = wandb.Table(columns=["label", "method", "chosen_lr", f"{metric}_mean", f"{test_metric}_mean", f"{test_metric}_std", "seeds"])
    for s in summaries:
        summary_table.add_data(s.label, s.method, s.chosen_lr, s.val_mean, s.test_mean, s.test_std, s.seeds)
    run.log({"runs": runs_table, "summary": summary_table, **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
    run.finish()


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def compare(settings: CompareSettings, command: str = "") -> list[dict[str, Any]]:
    """Run (or reuse) every run of the comparison, write the report; return all results."""
    check_settings(settings)
    base = load_recipe_config(settings.recipe_config)
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if settings.wandb.mode != "disabled":
        os.environ["WANDB_MODE"] = settings.wandb.mode
        os.environ["WANDB_DIR"] = str(output)
        os.environ.setdefault("WANDB_SILENT", "true")
    results = []
    plan = [(spec, lr, seed) for spec in settings.methods for lr in settings.learning_rates for seed in settings.seeds]
    for index, (spec, lr, seed) in enumerate(plan, start=1):
        config = run_config(base, settings, spec, lr, seed)
        tag = f"[{index}/{len(plan)}] {spec.label} lr={lr:g} seed={seed}"
        try:
            result = finished_result(settings, spec, lr, seed, config)
        except DamagedRunError as damaged:
            result = None
            action = "left out of the report (report_only)" if settings.report_only else "running it again"
            print(f"{tag}: damaged run, {damaged}; {action}", flush=True)
        else:
            if result is not None:
                print(f"{tag}: finished before, skipped", flush=True)
            elif settings.report_only:
                print(f"{tag}: not run yet (report_only)", flush=True)
        if result is None:
            if settings.report_only:
                continue
            result = execute_run(settings, spec, lr, seed, config)
            print(
                f"{tag}: {settings.selection_metric}={result['val'].get(settings.selection_metric, float('nan')):.4g} "
                f"{settings.reported_test_metric}={result['test'].get(settings.reported_test_metric, float('nan')):.4g} "
                f"({result['fit_seconds']:.0f} s)",
                flush=True,
            )
        results.append(result)
    if not results:
        raise ValueError(f"No finished run under {output}; nothing to report.")
    report = write_report(results, settings, command)
    if settings.wandb.mode != "disabled" and not settings.report_only:
        plots = sorted(output.glob("*.png"))
        log_summary_to_wandb(results, settings, plots)
    print(f"Report: {report}", flush=True)
    return results


def build_parser() -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog="lightning-hrp compare",
        description=(
            "Compare LoRA initialisations on one recipe: methods x learning rates x seeds, learning rate chosen per "
            "method on validation, test reported; resumable; CSV + W&B (offline by default) logging; markdown + PNG report."
        ),
    )
    parser.add_argument("--config", action=ActionConfigFile, help="A compare YAML (see recipes/configs/compare_*.yaml).")
    parser.add_class_arguments(CompareSettings, as_positional=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-hrp compare``."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    settings = settings_from_command_line(parser, CompareSettings, args)
    try:
        check_settings(settings)
    except ValueError as error:  # a bad grid or method is a usage error, as a malformed option is
        parser.error(str(error))
    # The report shows the command that runs the comparison, also when only the report was rebuilt.
    command = " ".join(["lightning-hrp compare", *(a for a in args if not a.startswith("--report_only"))])
    with quiet_libraries():
        compare(settings, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
