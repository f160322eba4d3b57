"""Training recipes for lightning-hrp: LightningModules, DataModules, YAML configs and the CLI.

This folder is installed as ``lightning_hrp.recipes`` (setuptools' ``package-dir`` in pyproject.toml;
an editable install maps it the same way), so an install claims no generic top-level name such as
``recipes``; configs name their classes as ``lightning_hrp.recipes.<module>.<Class>``. Run any recipe
with ``lightning-hrp fit --config <name>`` (``lightning-hrp configs`` lists them); ``lightning-hrp demo`` compares plain
LoRA with HRP on a small offline task. Modules are imported lazily by the CLI through the configs'
``class_path``, so importing this package stays cheap.
"""

if __name__ != "lightning_hrp.recipes":
    # Imported as plain `recipes` (from the repository root, or by an install made before the move),
    # this would be a second copy of every recipe class next to lightning_hrp.recipes.
    raise ImportError(
        f"The recipes folder is imported as lightning_hrp.recipes, not as {__name__!r} (class paths read "
        "lightning_hrp.recipes.<module>.<Class>). An install or console script made before the move still "
        "says 'recipes': run `pip install -e .` (or `make setup`) again."
    )


def _check_same_tree() -> None:
    # lightning_hrp from one checkout (PYTHONPATH, pytest's pythonpath) and its recipes from the checkout an
    # editable install maps would mix two versions without a word.
    from pathlib import Path

    import lightning_hrp

    checkout = Path(lightning_hrp.__file__).resolve().parents[1]
    sibling = checkout / "recipes" / "__init__.py"
    if (checkout / "pyproject.toml").is_file() and sibling.is_file() and sibling != Path(__file__).resolve():
        raise ImportError(
            f"lightning_hrp comes from {checkout} but lightning_hrp.recipes from {Path(__file__).resolve().parent}: "
            f"install the checkout you run (`pip install -e {checkout}`, or `make setup` there)."
        )


_check_same_tree()

# The command's one-line description, shared by its top-level help and its LightningCLI parser.
DESCRIPTION = "lightning-hrp: High-Rank Preheating (HRP) for LoRA as a Lightning callback."
