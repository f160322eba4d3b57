"""One run of a comparison: its config, running it into its folder, and reading a finished run back.

Each run writes ``config.yaml`` (the run is built from that very file), a CSV log, HRP or init
diagnostics and, last, ``result.json``, which holds the SHA-256 of every file the report reads
back: a finished run is reused only for the same configuration, and a damaged one is named and run
again, never half-used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from lightning_hrp.recipes.compare.folders import MARKER, marker_kind, write_marker
from lightning_hrp.recipes.compare.settings import CompareSettings, MethodSpec, run_dir
from lightning_hrp.recipes.runs import build_run, load_config, set_dotted, with_overrides, without_outputs

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
    config = with_overrides(with_overrides(without_outputs(base), settings.overrides), spec.overrides)
    if settings.compute_matched:
        # Every arm's budget is its trainer.max_steps (compare_matching): an epoch limit must not end one earlier.
        set_dotted(config, "trainer.max_epochs", -1)
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
    from lightning_hrp.inits import HRPInit, SetupTimeInit

    found: dict[str, Any] = {}
    for callback in trainer.callbacks:
        if isinstance(callback, HRPPreheatCallback) and callback.report is not None:
            found["hrp"] = asdict(callback.report)
        elif isinstance(callback, SetupTimeInit) and callback.report is not None:
            found["init"] = asdict(callback.report)
        if isinstance(callback, HRPInit) and callback.hrp_report is not None:
            found["hrp"] = asdict(callback.hrp_report)  # with the ranks it allocated
    return found


def execute_run(settings: CompareSettings, spec: MethodSpec, lr: float, seed: int, config: dict[str, Any]) -> dict[str, Any]:
    """Fit, validate and test one run; write its folder; return its result."""
    from lightning.pytorch.loggers import CSVLogger

    directory = run_dir(settings, spec.label, lr, seed)
    if directory.exists():
        if marker_kind(directory) != "run":
            raise ValueError(
                f"{directory} is in the place of an unfinished or damaged run, but lightning-hrp did not create it (no {MARKER}); "
                "it is not deleted. Move it away to run this run again, or use a new output_dir."
            )
        shutil.rmtree(directory)  # an unfinished or damaged run of this comparison: start it again
    write_marker(directory, "run")
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


def work_before_training(directory: Path) -> dict[str, int]:
    """What a run's diagnostics say it computed before training: ``{"preheat steps": n}`` for HRP (fewer
    than ``preheat_steps`` when ``drift_tolerance`` stopped it), ``{"<init> batches": n}`` for a data-driven
    init (EVA's forward-only batches, the gradient batches of LoRA-GA and LoRA-One); empty without diagnostics."""
    path = directory / "diagnostics.json"
    if not path.is_file():
        return {}
    diagnostics = read_json(path)
    found = {}
    if "hrp" in diagnostics:
        found["preheat steps"] = len(diagnostics["hrp"]["preheat_losses"])
    if "init" in diagnostics:
        found[f"{diagnostics['init']['method']} batches"] = int(diagnostics["init"]["batches"])
    return found


def read_json(path: Path) -> Any:
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
    result = read_json(path)
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


def read_learning_curve(directory: Path, metric: str) -> pd.Series:
    """``metric`` by optimizer steps taken, from a run's CSV log (empty if the run never logged it).

    Lightning logs a validation inside ``fit`` at the step count *before* the step that triggered it
    (the row of step ``k`` follows ``k + 1`` optimizer steps); the last row, from the explicit
    ``validate()`` after ``fit``, is logged at the steps taken. Both are put on the steps-taken axis.
    """
    path = directory / "logs" / "metrics.csv"
    if not path.is_file():
        return pd.Series(dtype=float)
    try:
        log = pd.read_csv(path)
        if metric not in log:
            return pd.Series(dtype=float)
        rows = log[["step", metric]].dropna(subset=[metric]).astype({"step": int, metric: float})
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, KeyError, TypeError, ValueError) as error:
        raise DamagedRunError(path, f"unreadable ({error!r})") from error
    steps = rows["step"].to_numpy().copy()
    steps[:-1] += 1  # every row but the last (validate() after fit) comes from inside fit
    curve = pd.Series(rows[metric].to_numpy(), index=steps, name=metric)
    # A validation at the last step of fit and validate() after it give the same step: keep the latter.
    return curve[~curve.index.duplicated(keep="last")]
