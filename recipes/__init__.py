"""Training recipes for lightning-hrp: LightningModules, DataModules, YAML configs and the CLI.

This folder is imported as ``lightning_hrp.recipes`` (``lightning_hrp/recipes`` is a link to it), so
an install claims no generic top-level name such as ``recipes``; configs name their classes as
``lightning_hrp.recipes.<module>.<Class>``. Run any recipe with
``lightning-hrp fit --config recipes/configs/<name>.yaml``; ``lightning-hrp demo`` compares plain
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

# The command's one-line description, shared by its top-level help and its LightningCLI parser.
DESCRIPTION = "lightning-hrp: High-Rank Preheating (HRP) for LoRA as a Lightning callback."
