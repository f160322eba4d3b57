"""The ``lightning-hrp`` command.

``lightning-hrp demo [options]`` runs the LoRA-versus-HRP demo (:mod:`recipes.demo`);
``lightning-hrp compare --config recipes/configs/compare_*.yaml`` compares LoRA initialisations
over learning rates and seeds (:mod:`recipes.compare`). Everything
else goes to a ``LightningCLI`` in subclass mode, so a config picks its recipe by ``class_path``::

    lightning-hrp fit --config recipes/configs/classification_rotten_tomatoes_hrp.yaml
    lightning-hrp fit --config recipes/configs/classification_rotten_tomatoes_lora.yaml \\
        --trainer.callbacks+=lightning_hrp.HRPPreheatCallback \\
        --trainer.callbacks.preheat_rank=64 --trainer.callbacks.preheat_steps=20
    lightning-hrp validate --config ... --ckpt_path path/to.ckpt
    lightning-hrp test --config ... --ckpt_path path/to.ckpt

HRP is a Trainer callback (``class_path: lightning_hrp.HRPPreheatCallback`` under
``trainer.callbacks``), configurable from YAML and the command line like any other.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

SUBCOMMANDS = ("fit", "validate", "test")
DESCRIPTION = (
    "lightning-hrp: High-Rank Preheating (HRP) for LoRA as a Lightning callback. 'fit', 'validate' and 'test' "
    "run a recipe from a config (see recipes/configs/); 'lightning-hrp demo' compares plain LoRA with HRP "
    "offline in minutes (lightning-hrp demo --help); 'lightning-hrp compare' compares LoRA initialisations "
    "(lora, pissa, eva, lora_one, hrp, ...) over learning rates and seeds (lightning-hrp compare --help)."
)


class LightningHRPCLI(LightningCLI):
    """``LightningCLI`` with any LightningModule / LightningDataModule chosen by ``class_path``."""

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(
            model_class=pl.LightningModule,
            datamodule_class=pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": DESCRIPTION},
            args=list(args) if args is not None else None,
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


def parse(args: Sequence[str]) -> Namespace:
    """Parse and validate a ``lightning-hrp`` command line (subcommand first) without running it.

    Args:
        args: E.g. ``["fit", "--config", "recipes/configs/x.yaml"]``.

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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-hrp`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "demo":
        from recipes.demo import main as demo_main

        return demo_main(args[1:])
    if args and args[0] == "compare":
        from recipes.compare import main as compare_main

        return compare_main(args[1:])
    # With argv=None LightningCLI reads sys.argv itself (passing both makes it warn).
    LightningHRPCLI(args=None if argv is None else args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
