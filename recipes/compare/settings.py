"""What a comparison runs and where it puts each run: the settings of ``lightning-hrp compare``, checked up front."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning_hrp._validation import is_positive_number
from lightning_hrp.inits import InitMethod, LoraInit

WandbMode = Literal["offline", "online", "disabled"]
Direction = Literal["min", "max"]
# The labels of the plain-LoRA arms that compute matching adds: lora_matched_<total optimizer steps>.
MATCHED_PREFIX = "lora_matched_"


@dataclass
class MethodSpec:
    """One contender: an init method with its options, under a label (e.g. ``hrp_asymmetric``).

    Attributes:
        label: Names the method in the report and its runs' folder.
        method: The init method.
        options: Its ``init_options``.
        overrides: Dotted keys set in this method's run configs only, after the comparison's
            ``overrides`` (e.g. ``{"trainer.max_steps": 48}`` for a longer plain-LoRA arm).
        learning_rates: This method's own grid instead of the comparison's (e.g. a variant run at
            the rate chosen for the method it varies); None: the comparison's.
    """

    label: str
    method: InitMethod
    options: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    learning_rates: list[float] | None = None

    def rates(self, default: list[float]) -> list[float]:
        """The learning rates this method runs at: its own grid, or ``default`` (the comparison's)."""
        return list(self.learning_rates) if self.learning_rates is not None else list(default)


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
        tuning_seeds: The seeds that choose each method's learning rate: they run at every rate of
            the method's grid, every other seed only at the rate they chose (``k`` rates, ``n`` seeds
            and ``t`` tuning seeds cost ``k*t + n - t`` runs per method instead of ``k*n``). None:
            every seed runs at every rate and the rate is chosen on all of them. They need not be
            among ``seeds``: a process given other ``--seeds`` reads their finished runs.
        selection_metric: Validation metric that chooses each method's learning rate (its final value).
        selection_mode: ``min`` or ``max`` for the selection metric (and the test metric).
        test_metric: Reported test metric; None: ``selection_metric`` with ``val/`` replaced by ``test/``.
        overrides: Dotted keys set in the recipe config for every run, e.g. ``{"trainer.max_steps": 60}``.
        references: Labels every method is judged against in the report, besides its compute-matched
            arm: paired differences per seed at each method's chosen rate.
        secondary_metrics: Further test metrics compared pairwise, each with its direction (e.g.
            ``{"test/acc": "max"}`` beside a cross-entropy endpoint); the test metric is the primary one.
        compute_matched: Give every method that computes on training batches before the main run
            (HRP's preheat, LoRA-GA's and LoRA-One's gradients) a plain-LoRA arm of the same total
            optimizer steps, added automatically (:mod:`~lightning_hrp.recipes.compare.matching`), and
            judge each method against its own. The step budget is then ``trainer.max_steps`` for every
            arm (``trainer.max_epochs`` is lifted to -1).
        seed_keys: Dotted keys that take the run's seed too, besides ``seed_everything``; e.g. the
            matrix-regression task seed, so that each seed is a new task, not only a new adapter start.
        wandb: W&B settings.
        report_only: Do not run anything; rebuild the report from finished runs.
        adopt_output_dir: Take over ``output_dir``, a comparison that lightning-hrp started before it
            marked its folders (it holds ``runs/`` but no ``.lightning-hrp-compare.json``); its run
            folders become the tool's too (an unfinished one is run again). Without it such a folder,
            like any non-empty folder the tool did not create, is refused.
    """

    recipe_config: str
    output_dir: str
    methods: list[MethodSpec]
    learning_rates: list[float]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    tuning_seeds: list[int] | None = None
    selection_metric: str = "val/loss"
    selection_mode: Direction = "min"
    test_metric: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    seed_keys: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=lambda: ["lora"])
    secondary_metrics: dict[str, Direction] = field(default_factory=dict)
    compute_matched: bool = True
    wandb: WandbSettings = field(default_factory=WandbSettings)
    report_only: bool = False
    adopt_output_dir: bool = False

    @property
    def reported_test_metric(self) -> str:
        if self.test_metric is not None:
            return self.test_metric
        if not self.selection_metric.startswith("val/"):
            raise ValueError(f"selection_metric {self.selection_metric!r} has no val/ prefix; set test_metric explicitly.")
        return "test/" + self.selection_metric.removeprefix("val/")

    @property
    def rate_choosing_seeds(self) -> list[int]:
        """The seeds each method's learning rate is chosen on: ``tuning_seeds``, or every seed."""
        return list(self.tuning_seeds) if self.tuning_seeds is not None else list(self.seeds)

    @property
    def group(self) -> str:
        return self.wandb.group or Path(self.output_dir).resolve().name


def run_dir(settings: CompareSettings, label: str, lr: float, seed: int) -> Path:
    """``<output_dir>/runs/<label>/lr=<lr>/seed=<seed>``: the folder of one run."""
    return Path(settings.output_dir) / "runs" / check_label(label) / _lr_folder(lr) / f"seed={seed}"


def _lr_folder(lr: float) -> str:
    return f"lr={lr:g}"


# A label names a folder under <output_dir>/runs/: no separators, no '..', nothing hidden.
_SAFE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# seed_everything's range: outside it Lightning warns and seeds 0 instead, so two such seeds would be one run.
_MAX_SEED = 2**32 - 1


def _check_rates(rates: list[float]) -> None:
    if not rates:
        raise ValueError("learning_rates: a method's own grid must hold at least one value.")
    for lr in rates:
        if not is_positive_number(lr):
            raise ValueError(f"learning_rates: each must be a positive, finite number, got {lr!r}.")
    folders = [_lr_folder(lr) for lr in rates]
    if len(set(folders)) != len(folders):
        raise ValueError(f"learning_rates: must differ within 6 significant digits (each names a folder lr=<value>), got {rates}.")


def check_label(label: Any, argument: str = "methods: label", folder: str = "each method's runs go to <output_dir>/runs/<label>/") -> str:
    """``label`` if it is a safe folder name; raises ``ValueError`` otherwise.

    Args:
        label: The name.
        argument: Where it was given, for the message (``axes: value name``, ...).
        folder: Which folder it names, for the message.
    """
    if not (isinstance(label, str) and _SAFE_LABEL.fullmatch(label)):
        raise ValueError(
            f"{argument} {label!r} is not a safe folder name ({folder}). "
            "Use up to 100 letters, digits, '_', '-' and '.', starting with a letter or digit, e.g. 'hrp_r32'."
        )
    return label


def _check_seeds(seeds: list[Any], argument: str) -> None:
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
            raise ValueError(f"{argument}: each must be an integer in [0, {_MAX_SEED}] (seed_everything's range), got {seed!r}.")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{argument}: must be distinct (a repeated seed is the same run counted twice), got {seeds}.")


def check_settings(settings: CompareSettings) -> None:
    """Refuse a comparison that cannot run as asked, before anything is written or run."""
    if not settings.methods:
        raise ValueError("methods: give at least one method.")
    for spec in settings.methods:
        check_label(spec.label)
        if settings.compute_matched and spec.label.casefold().startswith(MATCHED_PREFIX):
            raise ValueError(
                f"methods: label {spec.label!r} starts with {MATCHED_PREFIX!r}, which names the compute-matched arms "
                "that compare adds itself; choose another label."
            )
        LoraInit(spec.method, spec.options)  # refuse bad options before the first run, not hours in
    for name, direction in settings.secondary_metrics.items():
        if direction not in ("min", "max"):
            raise ValueError(f"secondary_metrics: {name!r} needs the direction 'min' or 'max', got {direction!r}.")
    labels = [spec.label for spec in settings.methods]
    # Case-insensitive: 'LoRA' and 'lora' would share one folder on macOS and Windows.
    if len({label.casefold() for label in labels}) != len(labels):
        raise ValueError(f"methods: labels must be unique, ignoring case (they name folders), got {labels}.")
    if not settings.learning_rates or not settings.seeds:
        raise ValueError("learning_rates and seeds must each hold at least one value.")
    for grid in [settings.learning_rates] + [spec.learning_rates for spec in settings.methods if spec.learning_rates is not None]:
        _check_rates(grid)
    _check_seeds(settings.seeds, "seeds")
    if settings.tuning_seeds is not None:
        if not settings.tuning_seeds:
            raise ValueError("tuning_seeds: give at least one seed to choose the learning rates on, or leave it unset (null) to tune on every seed.")
        _check_seeds(settings.tuning_seeds, "tuning_seeds")
    if settings.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ValueError(
            f"wandb: mode={settings.wandb.mode!r} needs the wandb package: pip install 'lightning-hrp[wandb]', "
            "or log to CSV only with --wandb.mode=disabled."
        )
