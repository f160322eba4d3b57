"""How a run is built from a config: one way for the command line, the demo, ``compare`` and the benchmarks.

A config is a ``lightning-hrp fit`` YAML (``recipes/configs/*.yaml``), or the same as a dict.
:class:`LightningHRPCLI` parses it (any LightningModule / LightningDataModule by ``class_path``,
with the module's arguments that must agree with the data linked to the data's); :func:`build_run`
turns it into a Trainer, model and DataModule without running anything; the config helpers
change a config as a dict (:func:`with_overrides`, :func:`without_outputs`) before it is built.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import Logger

# Imported, not only named: jsonargparse resolves a short class name such as
# `--trainer.callbacks+=HRPPreheatCallback` among the Callback subclasses imported so far.
from lightning_hrp import HRPPreheatCallback  # noqa: F401
from lightning_hrp.recipes import DESCRIPTION
from lightning_hrp.recipes.packaged_configs import configs_folder, resolve_config, resolve_config_arguments

SUBCOMMANDS = ("fit", "validate", "test")
# What a recipe's module must agree on with its data, set once (on the source side) and copied to
# the other: (source, target, when). jsonargparse skips a link whose keys the chosen classes lack.
# A value given for a target is replaced by the source's, so the bundled configs set sources only.
RECIPE_LINKS: tuple[tuple[str, str, str], ...] = (
    # Matrix regression: module and data each build W0 from these.
    ("data.init_args.in_features", "model.init_args.in_features", "parse"),
    ("data.init_args.out_features", "model.init_args.out_features", "parse"),
    ("data.init_args.task_seed", "model.init_args.task_seed", "parse"),
    # Classification: the data tokenises with the model's tokenizer, and the head has the data's classes.
    ("model.init_args.model_name_or_path", "data.init_args.tokenizer", "parse"),
    ("data.num_labels", "model.init_args.num_labels", "instantiate"),
    # Math SFT: the data loads the model's tokenizer (from the same GGUF and cache).
    ("model.init_args.model_name_or_path", "data.init_args.model_name_or_path", "parse"),
    ("model.init_args.gguf_file", "data.init_args.gguf_file", "parse"),
    ("model.init_args.cache_dir", "data.init_args.cache_dir", "parse"),
)
Settings = TypeVar("Settings")


class LightningHRPCLI(LightningCLI):
    """``LightningCLI`` with any LightningModule / LightningDataModule chosen by ``class_path``.

    Args:
        args: A command line (list), or a config as a dict or Namespace, as ``LightningCLI`` takes it.
        **kwargs: Further ``LightningCLI`` arguments (``run=False``, ``trainer_defaults``, ...).
    """

    def __init__(self, args: ArgsType = None, **kwargs: Any) -> None:
        super().__init__(
            model_class=pl.LightningModule,
            datamodule_class=pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": DESCRIPTION},
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for source, target, apply_on in RECIPE_LINKS:
            parser.link_arguments(source, target, apply_on=apply_on)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, then check a ``--ckpt_path`` before ``LightningCLI`` merges its hyper-parameters into the config.

        Raises:
            DamagedCheckpointError: The checkpoint does not load.
            CheckpointConflictError: A model option given on the command line differs from the
                checkpoint's, which would silently replace it.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():  # "last", "best" and sharded folders: Lightning's own
            return
        from lightning_hrp.recipes.checkpoints import read_checkpoint

        checkpoint = read_checkpoint(ckpt_path)
        command_line = sys.argv[1:] if args is None else args
        if isinstance(command_line, (list, tuple)):
            check_against_checkpoint(command_line, self.config[subcommand].model, checkpoint.get("hyper_parameters") or {}, ckpt_path)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # predict needs a predict_step, which no recipe has; keep the menu to what works.
        return {name: commands for name, commands in LightningCLI.subcommands().items() if name in SUBCOMMANDS}


class CheckpointConflictError(ValueError):
    """A command-line option that a ``--ckpt_path``'s hyper-parameters would silently replace."""


# Model arguments that follow the data's (RECIPE_LINKS): the data's value wins over the checkpoint's anyway.
_FOLLOW_THE_DATA = {target.removeprefix("model.init_args.") for _, target, _ in RECIPE_LINKS if target.startswith("model.init_args.")}


def _model_options(command_line: Sequence[str]) -> dict[str, str]:
    """The model's init arguments (and ``class_path``) set on ``command_line``, each with the option that set it."""
    options: dict[str, str] = {}
    for token in command_line:
        if not isinstance(token, str) or not token.startswith("--model"):
            continue
        option = token[2:].split("=", 1)[0].rstrip("+")
        keys = option.split(".")[1:]
        if keys[:1] in (["init_args"], ["dict_kwargs"]):
            keys = keys[1:]
        if option == "model" or keys == ["class_path"]:
            options["class_path"] = option
        elif keys and option.split(".")[0] == "model":
            options.setdefault(keys[0], option)
    return options


def _plain(value: Any) -> Any:
    return value.as_dict() if isinstance(value, Namespace) else value


def check_against_checkpoint(command_line: Sequence[str], model: Namespace, hyper_parameters: Mapping[str, Any], ckpt_path: str) -> None:
    """Refuse a model option given on ``command_line`` that differs from the checkpoint's ``hyper_parameters``.

    ``LightningCLI`` builds the model from the checkpoint's hyper-parameters, over the config: a
    ``--model.init_args.lora_rank=8`` on a rank-4 checkpoint would train and save rank 4. Values in a
    ``--config`` file are replaced as ``LightningCLI`` does (the config usually is the one the
    checkpoint was trained with); equal values and arguments the checkpoint lacks pass.

    Raises:
        CheckpointConflictError: Naming each option, its value here and the checkpoint's.
    """
    conflicts = []
    for name, option in _model_options(command_line).items():
        if name == "class_path":
            given, saved = model.get("class_path"), hyper_parameters.get("_class_path")
        elif name in _FOLLOW_THE_DATA or name not in hyper_parameters:
            continue
        else:
            given, saved = _plain((model.get("init_args") or Namespace()).get(name)), hyper_parameters[name]
        if saved is not None and given != saved:
            conflicts.append(f"--{option} gives {name}={given!r}, the checkpoint has {name}={saved!r}")
    if conflicts:
        raise CheckpointConflictError(
            f"ckpt_path: {ckpt_path} was trained with other model options, which would silently replace those given here: "
            f"{'; '.join(conflicts)}. Leave those options out to go on with the checkpoint as it was trained, "
            "or start a new run without --ckpt_path."
        )


class _ParsedOnly(Exception):
    def __init__(self, config: Namespace) -> None:
        super().__init__("parsed")
        self.config = config


class _ParseOnlyCLI(LightningHRPCLI):
    def before_instantiate_classes(self) -> None:
        # Parsing has checked every class_path and init argument against its signature; stop
        # before anything is built (no model download, no training).
        raise _ParsedOnly(self.config)


@contextmanager
def _args_from_python() -> Iterator[None]:
    with warnings.catch_warnings():
        # Called from Python, args and sys.argv differ by design; LightningCLI warns about that.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        yield


def parse(args: ArgsType) -> Namespace:
    """Parse and validate a ``lightning-hrp`` command line (subcommand first) without running it.

    Args:
        args: E.g. ``["fit", "--config", "recipes/configs/x.yaml"]``, or as a dict
            (``{"fit": {"model": ..., "data": ...}}``) like ``LightningCLI``'s ``args``.

    Returns:
        The parsed configuration. Invalid input exits with jsonargparse's error message, as the
        real command would. Like the real command, a ``seed_everything`` value seeds the RNGs.
    """
    with _args_from_python():
        try:
            _ParseOnlyCLI(args=args)
        except _ParsedOnly as parsed:
            return parsed.config
    raise RuntimeError("_ParseOnlyCLI returned without stopping after parsing")


@dataclass
class Run:
    """One run, built and not started: its Trainer, LightningModule and LightningDataModule."""

    trainer: pl.Trainer
    model: pl.LightningModule
    datamodule: pl.LightningDataModule

    def fit(self, datamodule: pl.LightningDataModule | None = None) -> float:
        """Train; returns the wall-clock seconds of ``Trainer.fit``.

        Args:
            datamodule: Instead of the run's own, an equal one already set up (reused across runs).
        """
        started = time.perf_counter()
        self.trainer.fit(self.model, datamodule=datamodule or self.datamodule)
        return time.perf_counter() - started

    def validate(self) -> dict[str, float]:
        """The validation metrics of the model as it is."""
        return _first(self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False))

    def test(self) -> dict[str, float]:
        """The test metrics of the model as it is."""
        return _first(self.trainer.test(self.model, datamodule=self.datamodule, verbose=False))


def _first(results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    return {key: float(value) for key, value in (results[0] if results else {}).items()}


def build_run(config: Mapping[str, Any], *, callbacks: Sequence[Callback] = (), loggers: Sequence[Logger] | None = None) -> Run:
    """The Trainer, model and data of a ``lightning-hrp fit`` config, as the command line builds them.

    ``seed_everything`` in the config seeds the RNGs before anything is built, as in ``lightning-hrp fit``.

    Args:
        config: The config as a dict (``trainer``, ``model``, ``data``, ``seed_everything``).
        callbacks: Added after the config's own ``trainer.callbacks``.
        loggers: Replace the config's ``trainer.logger`` (None keeps it).
    """
    with _args_from_python():
        cli = LightningHRPCLI(
            args=dict(config),
            run=False,
            save_config_callback=None,  # callers keep the config themselves (compare writes it beside the run)
            trainer_defaults={"callbacks": list(callbacks)} if callbacks else {},
        )
    if loggers is not None:
        cli.trainer.loggers = list(loggers)
    return Run(cli.trainer, cli.model, cli.datamodule)


def bundled_config(name: str) -> dict[str, Any]:
    """A config shipped in ``recipes/configs/`` by file name, found inside the installed package (a wheel too)."""
    return load_config(configs_folder() / name, argument=name)


def load_config(path: str | Path, argument: str = "config") -> dict[str, Any]:
    """A ``lightning-hrp fit`` YAML as a dict; ``argument`` names the option in error messages."""
    # recipes/configs/<name>.yaml, as configs name each other, is the packaged one outside a checkout.
    path = Path(resolve_config(str(path), argument=argument))
    if not path.is_file():
        raise FileNotFoundError(
            f"{argument}: no file at {path}; expected a lightning-hrp fit YAML such as recipes/configs/matrix_regression_lora.yaml."
        )
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"{argument}: {path} is not a lightning-hrp fit config (no 'model' section).")
    return config


def set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    """``config["a"]["b"] = value`` for ``dotted="a.b"``, creating missing sections."""
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"overrides: {dotted!r} goes through {key!r}, which is {child!r}, not a section.")
        node = child
    node[keys[-1]] = value


def with_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with each dotted key of ``overrides`` set (e.g. ``{"trainer.max_steps": 60}``)."""
    changed = copy.deepcopy(dict(config))
    for dotted, value in overrides.items():
        set_dotted(changed, dotted, value)
    return changed


_CHECKPOINT_CALLBACK = "lightning.pytorch.callbacks.ModelCheckpoint"


def without_outputs(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` that writes nothing by itself: no logger, no checkpoints, no progress bar or model summary.

    The caller attaches the loggers it wants (:func:`build_run`'s ``loggers``); the config's other
    callbacks (e.g. a ``LearningRateMonitor``) stay.
    """
    changed = copy.deepcopy(dict(config))
    trainer = changed.setdefault("trainer", {})
    trainer["logger"] = False
    trainer["enable_checkpointing"] = False
    trainer["enable_progress_bar"] = False
    trainer["enable_model_summary"] = False
    trainer["callbacks"] = [
        c for c in trainer.get("callbacks") or [] if not (isinstance(c, dict) and c.get("class_path") == _CHECKPOINT_CALLBACK)
    ]
    return changed


def settings_parser(prog: str, description: str, settings_class: type, config_help: str) -> ArgumentParser:
    """A command line of ``--config`` (a YAML of the options) and one ``--snake_case`` option per field of ``settings_class``."""
    from jsonargparse import ActionConfigFile

    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", action=ActionConfigFile, help=config_help)
    parser.add_class_arguments(settings_class, as_positional=False)
    return parser


def settings_from_command_line(parser: ArgumentParser, settings_class: type[Settings], args: Sequence[str]) -> Settings:
    """Parse ``args`` with a :func:`settings_parser` of ``settings_class`` into a ``settings_class``.

    ``--config NAME`` reads the packaged config ``NAME`` (:mod:`lightning_hrp.recipes.packaged_configs`).
    """
    try:
        args = resolve_config_arguments(args)
    except FileNotFoundError as error:
        parser.error(str(error))
    fields = vars(parser.instantiate(parser.parse_args(args)))
    return settings_class(**{k: v for k, v in fields.items() if k in settings_class.__dataclass_fields__})


_QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_hrp")


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep a script's output to its own lines and progress bars; everything is restored afterwards.

    Lightning's and HRP's info lines, transformers' load reports and download bars, and the
    dataloader-worker hint (irrelevant on a few cores) and two deprecation warnings between the pinned
    libraries (Lightning's LeafSpec, peft's is_gradient_checkpointing) are off; other warnings and errors show.
    """
    from transformers.utils import logging as transformers_logging

    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    verbosity = transformers_logging.get_verbosity()
    progress_bar = transformers_logging.is_progress_bar_enabled()
    try:
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            # peft reads model.is_gradient_checkpointing, deprecated in transformers 5: once per run, nothing to act on.
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        transformers_logging.set_verbosity(verbosity)
        if progress_bar:
            transformers_logging.enable_progress_bar()
