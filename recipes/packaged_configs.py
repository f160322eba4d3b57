"""The configs shipped in the package (``recipes/configs/*.yaml``), found by name from any directory.

``lightning-hrp configs`` lists them with the first sentence of their header; ``lightning-hrp configs
cp NAME DEST`` copies one to edit (as ``tune ls`` / ``tune cp`` do). Wherever a command takes
``--config``, a bare name such as ``matrix_regression_hrp`` (no folder, no ``.yaml``, and no file of that
name in the working directory) means the packaged config; so does the repository-relative
``recipes/configs/<name>.yaml`` that the configs, their headers and the README use, when no such file
exists (outside a checkout). An existing file always wins.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

# How the configs name each other and how the README names them: relative to the repository root.
REPOSITORY_FOLDER = "recipes/configs/"
_BARE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_USAGE = "usage: lightning-hrp configs [cp NAME DEST]\n"


def configs_folder() -> Path:
    """The folder of the packaged configs (the checkout's ``recipes/configs`` in an editable install)."""
    return Path(str(resources.files("lightning_hrp.recipes") / "configs"))


def packaged_configs() -> dict[str, Path]:
    """Every packaged config by name (its file name without ``.yaml``), sorted."""
    return {path.stem: path for path in sorted(configs_folder().glob("*.yaml"))}


def description(path: Path, width: int = 100) -> str:
    """The first sentence of a config's header comment, cut at a word to at most ``width`` characters."""
    words: list[str] = []
    for line in path.read_text().splitlines():
        text = line.removeprefix("#").strip()
        if not line.startswith("#") or not text:
            break
        words.extend(text.split())
        if re.search(r"\.(\s|$)", text):
            break
    sentence = re.split(r"(?<=\.)\s", " ".join(words), maxsplit=1)[0].rstrip(".")
    if len(sentence) <= width:
        return sentence
    return sentence[: width - 3].rsplit(" ", 1)[0] + "..."


def resolve_config(value: str, argument: str = "--config") -> str:
    """The file ``--config value`` means: ``value`` itself if it exists, else a packaged config it names.

    ``argument`` names the option in the error.

    Raises:
        FileNotFoundError: ``value`` is a bare name (or ``recipes/configs/<name>.yaml``) that is neither
            a file nor a packaged config.
    """
    if Path(value).exists():
        return value
    name = None
    if _BARE_NAME.fullmatch(value) and not value.endswith((".yaml", ".yml")):
        name = value
    elif value.startswith(REPOSITORY_FOLDER) and value.endswith(".yaml") and "/" not in value[len(REPOSITORY_FOLDER) :]:
        name = value[len(REPOSITORY_FOLDER) : -len(".yaml")]
    if name is None:
        return value  # a path or a YAML string: the parser that reads it reports what is wrong with it
    configs = packaged_configs()
    if name not in configs:
        raise FileNotFoundError(
            f"{argument} {value}: no such file, and no packaged config named {name!r} (`lightning-hrp configs` lists them)."
        )
    return str(configs[name])


def resolve_config_arguments(args: Sequence[str]) -> list[str]:
    """``args`` with the value of every ``--config`` / ``-c`` (``--config=...`` too) resolved by :func:`resolve_config`."""
    resolved = list(args)
    for i, arg in enumerate(resolved):
        if arg in ("--config", "-c") and i + 1 < len(resolved):
            resolved[i + 1] = resolve_config(resolved[i + 1])
        elif arg.startswith("--config="):
            resolved[i] = "--config=" + resolve_config(arg.removeprefix("--config="))
    return resolved


def command_line_with_configs(args: Sequence[str]) -> list[str]:
    """:func:`resolve_config_arguments` for a command line: an unknown name exits with a usage error."""
    try:
        return resolve_config_arguments(args)
    except FileNotFoundError as error:
        sys.stderr.write(f"lightning-hrp: error: {error}\n")
        raise SystemExit(2) from None


def main(args: Sequence[str]) -> int:
    """``lightning-hrp configs``: list the packaged configs, or ``cp NAME DEST`` one (never over a file)."""
    args = list(args)
    configs = packaged_configs()
    if not args:
        width = max(map(len, configs))
        for name, path in configs.items():
            sys.stdout.write(f"{name.ljust(width)}  {description(path)}\n")
        sys.stdout.write(f"\nRun one with `lightning-hrp fit --config NAME`; copy one to edit with `lightning-hrp configs cp NAME DEST`.\n")
        return 0
    if args[0] in ("-h", "--help"):
        sys.stdout.write(_USAGE + "Without arguments: list the packaged configs. cp: copy one to DEST (a file or a folder).\n")
        return 0
    if args[0] != "cp" or len(args) != 3:
        sys.stderr.write(_USAGE + "lightning-hrp configs: error: give no arguments, or cp NAME DEST.\n")
        return 2
    name, destination = args[1].removesuffix(".yaml"), Path(args[2])
    if name not in configs:
        sys.stderr.write(f"lightning-hrp configs cp: no packaged config named {name!r}; `lightning-hrp configs` lists them.\n")
        return 2
    if destination.is_dir():
        destination = destination / configs[name].name
    if destination.exists():
        sys.stderr.write(f"lightning-hrp configs cp: {destination} exists; not overwritten (remove it or give another DEST).\n")
        return 2
    if not destination.parent.is_dir():
        sys.stderr.write(f"lightning-hrp configs cp: no folder {destination.parent} to copy into.\n")
        return 2
    shutil.copyfile(configs[name], destination)
    sys.stdout.write(f"Copied {name} to {destination}.\n")
    return 0
