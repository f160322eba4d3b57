"""Training recipes for lightning-hrp: LightningModules, DataModules, YAML configs and the CLI.

Run any recipe with ``lightning-hrp fit --config recipes/configs/<name>.yaml``; ``lightning-hrp demo``
compares plain LoRA with HRP on a small offline task. Modules are imported lazily by the CLI through
the configs' ``class_path``, so importing this package stays cheap.
"""
