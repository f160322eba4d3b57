"""The ``lightning-hrp`` command.

``lightning-hrp demo [options]`` runs the LoRA-versus-HRP demo (:mod:`lightning_hrp.recipes.demo`);
``lightning-hrp compare --config recipes/configs/compare_*.yaml`` compares LoRA initialisations
over learning rates and seeds (:mod:`lightning_hrp.recipes.compare`). Everything
else goes to a ``LightningCLI`` in subclass mode, so a config picks its recipe by ``class_path``::

    lightning-hrp fit --config recipes/configs/matrix_regression_hrp.yaml
    lightning-hrp fit --config recipes/configs/matrix_regression_lora.yaml \\
        --trainer.logger.init_args.save_dir=runs/matrix_regression_lora_with_hrp \\
        --trainer.callbacks.dirpath=runs/matrix_regression_lora_with_hrp/checkpoints \\
        --trainer.callbacks+=HRPPreheatCallback \\
        --trainer.callbacks.preheat_rank=32 --trainer.callbacks.preheat_steps=8
    lightning-hrp validate --config ... --ckpt_path path/to.ckpt
    lightning-hrp test --config ... --ckpt_path path/to.ckpt

HRP is a Trainer callback (``class_path: lightning_hrp.HRPPreheatCallback``, or just
``HRPPreheatCallback``, under ``trainer.callbacks``), configurable from YAML and the command line
like any other; a run that adds it to a config gives itself its own folders, as above (README,
"Recipes and the command line"). Every subcommand takes ``--snake_case`` options.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any, TypeVar

import lightning.pytorch as pl
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.cli import ArgsType, LightningCLI

# Imported, not only named: jsonargparse resolves a short class name such as
# `--trainer.callbacks+=HRPPreheatCallback` among the Callback subclasses imported so far.
from lightning_hrp import HRPPreheatCallback  # noqa: F401

SUBCOMMANDS = ("fit", "validate", "test")
# Every subcommand with its one-line help; main() dispatches demo and compare, LightningHRPCLI the rest.
SUBCOMMAND_HELP = {
    "fit": "train a recipe from a config (recipes/configs/*.yaml); HRP is a callback in it",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split",
    "demo": "plain LoRA vs HRP on MiniLM-L6 / Rotten Tomatoes, offline, minutes on a CPU",
    "compare": "compare LoRA initialisations (lora, pissa, eva, lora_one, hrp, ...) over learning rates and seeds",
}
DESCRIPTION = "lightning-hrp: High-Rank Preheating (HRP) for LoRA as a Lightning callback."
Settings = TypeVar("Settings")


class LightningHRPCLI(LightningCLI):
    """``LightningCLI`` with any LightningModule / LightningDataModule chosen by ``class_path``."""

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

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # predict needs a predict_step, which no recipe has; keep the menu to what works.
        return {name: commands for name, commands in LightningCLI.subcommands().items() if name in SUBCOMMANDS}


class _ParsedOnly(Exception):
    def __init__(self, config: Namespace) -> None:
        super().__init__("parsed")
        self.config = config


class _ParseOnlyCLI(LightningHRPCLI):
    def before_instantiate_classes(self) -> None:
        # Parsing has checked every class_path and init argument against its signature; stop
        # before anything is built (no model download, no training).
        raise _ParsedOnly(self.config)


def parse(args: ArgsType) -> Namespace:
    """Parse and validate a ``lightning-hrp`` command line (subcommand first) without running it.

    Args:
        args: E.g. ``["fit", "--config", "recipes/configs/x.yaml"]``, or as a dict
            (``{"fit": {"model": ..., "data": ...}}``) like ``LightningCLI``'s ``args``.

    Returns:
        The parsed configuration. Invalid input exits with jsonargparse's error message, as the
        real command would. Like the real command, a ``seed_everything`` value seeds the RNGs.
    """
    with warnings.catch_warnings():
        # Called from Python, args and sys.argv differ by design; LightningCLI warns about that.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            _ParseOnlyCLI(args=args)
        except _ParsedOnly as parsed:
            return parsed.config
    raise RuntimeError("_ParseOnlyCLI returned without stopping after parsing")


def settings_from_command_line(parser: ArgumentParser, settings_class: type[Settings], args: Sequence[str]) -> Settings:
    """Parse ``args`` with ``parser`` (built with ``add_class_arguments(settings_class)``) into a ``settings_class``."""
    fields = vars(parser.instantiate(parser.parse_args(args)))
    return settings_class(**{k: v for k, v in fields.items() if k in settings_class.__dataclass_fields__})


def format_help() -> str:
    """The top-level ``--help``: every subcommand, whichever parser serves it."""
    width = max(map(len, SUBCOMMAND_HELP))
    lines = [
        f"usage: lightning-hrp {{{','.join(SUBCOMMAND_HELP)}}} ...",
        "",
        DESCRIPTION,
        "",
        "subcommands (lightning-hrp <subcommand> --help lists its options, all --snake_case):",
        *(f"  {name.ljust(width)}  {text}" for name, text in SUBCOMMAND_HELP.items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-hrp`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        if args:
            sys.stdout.write(format_help())
            return 0
        sys.stderr.write(format_help() + "lightning-hrp: error: give a subcommand.\n")
        return 2
    if args[0] == "demo":
        from lightning_hrp.recipes.demo import main as demo_main

        return demo_main(args[1:])
    if args[0] == "compare":
        from lightning_hrp.recipes.compare import main as compare_main

        return compare_main(args[1:])
    # With argv=None LightningCLI reads sys.argv itself (passing both makes it warn).
    LightningHRPCLI(args=None if argv is None else args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
