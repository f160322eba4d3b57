"""The GPU run's look at the machine it runs on, run by tests/gpu/run_on_gpu.py as steps in that machine's Python.

Subcommands (each prints a human-readable part, then one line ``RESULT {json}`` for the driver):

* ``versions``: Python, torch, CUDA and the GPU, and the versions of every package the run uses.
* ``wheels --wheels DIR --target DIR``: install, from the wheels in ``--wheels``, only the
  distributions this Python lacks, into ``--target`` (put on ``PYTHONPATH`` by the driver).
* ``imports``: import the project's modules and say where each came from; fails unless every one
  comes from this checkout (no install needed, none used).
* ``compare-config``: write the evidence run's compare config (see :func:`write_compare_config`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# The distributions whose versions explain a result (printed first), as pip names them.
DISTRIBUTIONS = (
    "torch", "lightning", "pytorch-lightning", "peft", "transformers", "torchmetrics", "tokenizers", "safetensors",
    "numpy", "pandas", "scipy", "matplotlib", "pyyaml", "jsonargparse", "docstring-parser", "typeshed-client", "pytest",
)  # fmt: skip
# What the GPU run imports from the checkout; each must come from REPO.
PROJECT_MODULES = (
    "lightning_hrp",
    "lightning_hrp.engine.decompose",
    "lightning_hrp.recipes.runs",
    "lightning_hrp.recipes.classification",
    "lightning_hrp.recipes.compare",
    "benchmarks.svd",
    "benchmarks.overhead",
)
RESULT_PREFIX = "RESULT "


def result(payload: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(payload), flush=True)


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> int:
    import torch

    found = {name: installed_version(name) for name in DISTRIBUTIONS}
    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    memory = [round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1) for i in range(len(gpus))]
    environment = {
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "cpus": __import__("os").cpu_count(),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cuda_available": cuda,
        "gpus": [f"{name} ({gib} GiB)" for name, gib in zip(gpus, memory)],
        "versions": found,
    }
    print(f"Python {environment['python']} on {environment['platform']}, {environment['cpus']} CPUs")
    print(f"torch {found['torch']} (CUDA {torch.version.cuda}); GPUs: {', '.join(environment['gpus']) or 'none (CUDA absent)'}")
    print("; ".join(f"{name} {version or 'MISSING'}" for name, version in found.items() if name != "torch"))
    result(environment)
    return 0


def _distribution_of(wheel: Path) -> str:
    """The distribution name a wheel installs, as ``importlib.metadata`` knows it."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        for line in archive.read(metadata).decode().splitlines():
            if line.startswith("Name:"):
                return line.split(":", 1)[1].strip()
    raise ValueError(f"{wheel} has no Name in its METADATA")


def wheels(folder: Path, target: Path) -> int:
    available = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    missing = [wheel for wheel in available if installed_version(_distribution_of(wheel)) is None]
    if missing:
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, missing)]  # fmt: skip
        subprocess.run(command, check=True)
    names = [wheel.name for wheel in missing]
    print(f"installed into {target}: {', '.join(names)}" if names else f"nothing to install ({len(available)} wheels in {folder}, none missing here)")
    result({"installed": names, "available": [wheel.name for wheel in available]})
    return 0


def imports() -> int:
    # The driver puts the checkout on PYTHONPATH; nothing here adds it, so that this checks what the steps see.
    origins, outside = {}, []
    for name in PROJECT_MODULES:
        module = importlib.import_module(name)
        origins[name] = str(Path(module.__file__).resolve())
        if not Path(origins[name]).is_relative_to(REPO):
            outside.append(name)
        print(f"{name}: {module.__file__}")
    result({"origins": origins, "outside_checkout": outside})
    if outside:
        print(f"imported from outside the checkout {REPO}: {outside}", file=sys.stderr)
        return 1
    return 0


def write_compare_config(config: Path, out: Path, overrides: dict[str, Any], settings: dict[str, Any]) -> int:
    """The committed compare YAML with ``settings`` (e.g. ``output_dir``) and ``overrides`` (added to its own) set.

    A method whose building block this machine's packages lack (e.g. a peft without LoRA-GA) is left
    out and named, rather than failing the whole comparison before its first run; any other
    configuration error fails this step.
    """
    import yaml

    from lightning_hrp.errors import HRPConfigurationError
    from lightning_hrp.inits import LoraInit

    loaded = yaml.safe_load(config.read_text())
    kept, left_out = [], {}
    for method in loaded["methods"]:
        try:
            LoraInit(method["method"], method.get("options"))
        except HRPConfigurationError as error:
            if not isinstance(error.__cause__, (ImportError, AttributeError)):
                raise
            left_out[method["label"]] = str(error)
        else:
            kept.append(method)
    loaded.update(settings, methods=kept, overrides={**loaded.get("overrides", {}), **overrides})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(loaded, sort_keys=False))
    for label, reason in left_out.items():
        print(f"left out {label}: {reason}")
    print(f"{out}: {len(kept)} methods x {len(loaded['learning_rates'])} learning rates x {len(loaded['seeds'])} seeds")
    result({"config": str(out), "methods": [m["label"] for m in kept], "left_out": left_out, "seeds": loaded["seeds"]})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("versions")
    commands.add_parser("imports")
    wheel_parser = commands.add_parser("wheels")
    wheel_parser.add_argument("--wheels", type=Path, required=True)
    wheel_parser.add_argument("--target", type=Path, required=True)
    compare_parser = commands.add_parser("compare-config")
    compare_parser.add_argument("--config", type=Path, required=True)
    compare_parser.add_argument("--out", type=Path, required=True)
    compare_parser.add_argument("--overrides", type=json.loads, default={}, help="JSON object of dotted keys")
    compare_parser.add_argument("--settings", type=json.loads, default={}, help="JSON object of compare settings")
    args = parser.parse_args(argv)
    if args.command == "versions":
        return versions()
    if args.command == "imports":
        return imports()
    if args.command == "wheels":
        return wheels(args.wheels, args.target)
    return write_compare_config(args.config, args.out, args.overrides, args.settings)


if __name__ == "__main__":
    sys.exit(main())
