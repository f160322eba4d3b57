"""The ``lightning-hrp`` command.

``lightning-hrp demo [options]`` runs the LoRA-versus-HRP demo (:mod:`lightning_hrp.recipes.demo`);
``lightning-hrp compare --config recipes/configs/compare_*.yaml`` compares LoRA initialisations
over learning rates and seeds (:mod:`lightning_hrp.recipes.compare`), ``lightning-hrp compare-grid``
one such comparison per cell of a grid (:mod:`lightning_hrp.recipes.compare.grid`). Everything
else goes to a ``LightningCLI`` in subclass mode, so a config picks its recipe by ``class_path``::

    lightning-hrp fit --config recipes/configs/matrix_regression_hrp.yaml
    lightning-hrp fit --config recipes/configs/matrix_regression_lora.yaml \\
        --trainer.logger.init_args.save_dir=runs/matrix_regression_lora_with_hrp \\
        --trainer.callbacks.dirpath=runs/matrix_regression_lora_with_hrp/checkpoints \\
        --trainer.callbacks+=HRPPreheatCallback \\
        --trainer.callbacks.preheat_rank=32 --trainer.callbacks.preheat_steps=8
    lightning-hrp validate --config ... --ckpt_path path/to.ckpt
    lightning-hrp test --config ... --ckpt_path path/to.ckpt

A recipe starts from HRP with ``model.init_args.init_method: hrp`` and HRP's options in
``init_options`` (the ``*_hrp.yaml`` configs; ``--model.init_args.init_options.preheat_steps=100``
changes one). HRP is also a plain Trainer callback (``lightning_hrp.HRPPreheatCallback``, or just
``HRPPreheatCallback``, under ``trainer.callbacks``) that any config can add, as above; such a run
gives itself its own folders (README, "Recipes and the command line"). Every subcommand takes
``--snake_case`` options. How a config becomes a run: :mod:`lightning_hrp.recipes.runs`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning_hrp.recipes import DESCRIPTION

# Every subcommand with its one-line help; main() dispatches demo and compare, LightningHRPCLI the rest.
SUBCOMMAND_HELP = {
    "fit": "train a recipe from a config (recipes/configs/*.yaml); HRP is a callback in it",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split",
    "demo": "plain LoRA vs HRP on MiniLM-L6 / Rotten Tomatoes, offline, minutes on a CPU",
    "compare": "compare LoRA initialisations (lora, pissa, eva, lora_one, hrp, ...) over learning rates and seeds",
    "compare-grid": "one compare per cell of a two-axis grid (e.g. rank x steps), paired gains across it",
    "configs": "list the packaged configs (any --config takes one by name); configs cp NAME DEST copies one",
}
# The extra that brings each module the command imports beyond the core install.
_EXTRAS = {
    "transformers": "recipes", "torchmetrics": "recipes", "jsonargparse": "recipes", "yaml": "recipes",
    "pandas": "recipes", "scipy": "recipes", "gguf": "recipes", "matplotlib": "plots", "wandb": "wandb",
}  # fmt: skip


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
    try:
        return _dispatch(args, from_sys_argv=argv is None)
    except ModuleNotFoundError as error:
        extra = _EXTRAS.get((error.name or "").split(".")[0])
        if extra is None:
            raise
        # The console script comes with every install; the recipes and their tools need the extras.
        sys.stderr.write(f"lightning-hrp {args[0]} needs {error.name}: pip install 'lightning-hrp[{extra}]' (or [all]).\n")
        return 2


def _dispatch(args: list[str], from_sys_argv: bool) -> int:
    from lightning_hrp.recipes import packaged_configs

    if args[0] == "configs":
        return packaged_configs.main(args[1:])
    args = [args[0], *packaged_configs.command_line_with_configs(args[1:])]  # --config NAME: a packaged config
    if args[0] == "demo":
        from lightning_hrp.recipes.demo import main as demo_main

        return demo_main(args[1:])
    if args[0] == "compare":
        from lightning_hrp.recipes.compare import main as compare_main

        return compare_main(args[1:])
    if args[0] == "compare-grid":
        from lightning_hrp.recipes.compare.grid import main as grid_main

        return grid_main(args[1:])
    from lightning_hrp.recipes.checkpoints import DamagedCheckpointError
    from lightning_hrp.recipes.runs import CheckpointConflictError, LightningHRPCLI

    # With args=None LightningCLI reads sys.argv itself (passing both makes it warn).
    if from_sys_argv:
        sys.argv[1:] = args
    try:
        LightningHRPCLI(args=None if from_sys_argv else args)
    except (DamagedCheckpointError, CheckpointConflictError) as error:  # usage errors: one line, as jsonargparse's exit 2
        sys.stderr.write(f"lightning-hrp {args[0]}: error: {error}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
