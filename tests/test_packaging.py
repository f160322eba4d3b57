"""Packaging: the recipes install as ``lightning_hrp.recipes`` (no generic top-level ``recipes``), with
their configs and the console script, and the core dependencies are only what the callback needs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What `pip install lightning-hrp` (no extras) brings: the callback and the inits import nothing else.
CORE = {"torch", "lightning", "peft", "numpy"}


def test_recipes_is_not_importable_under_its_folder_name():
    """From the repository root the folder is found as ``recipes``; the guard refuses that second copy."""
    done = subprocess.run([sys.executable, "-c", "import recipes"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "ImportError" in done.stderr and "lightning_hrp.recipes" in done.stderr


def test_wheel_installs_one_top_level_package_with_configs_and_the_command(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("lightning_hrp", "recipes"):
        # symlinks=True: the link lightning_hrp/recipes -> ../recipes travels as a link, as in a git checkout.
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path / "dist")], cwd=source, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    wheel = zipfile.ZipFile(tmp_path / "dist" / done.stdout.strip().splitlines()[-1])
    names = set(wheel.namelist())
    info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))

    assert wheel.read(f"{info}/top_level.txt").decode().split() == ["lightning_hrp"]
    assert not [name for name in names if name.startswith("recipes/")]
    assert "lightning_hrp/recipes/cli.py" in names
    configs = {p.name for p in (REPO / "recipes" / "configs").glob("*.yaml")}
    assert configs and {f"lightning_hrp/recipes/configs/{name}" for name in configs} <= names
    assert "lightning-hrp = lightning_hrp.recipes.cli:main" in wheel.read(f"{info}/entry_points.txt").decode()

    requires = [line.split(":", 1)[1].strip() for line in wheel.read(f"{info}/METADATA").decode().splitlines() if line.startswith("Requires-Dist:")]
    core = {re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower() for spec in requires if "extra ==" not in spec}
    assert core == CORE
    extras = {re.search(r'extra == "([^"]+)"', spec).group(1) for spec in requires if "extra ==" in spec}
    assert {"recipes", "wandb", "plots", "quantization", "docs", "all", "dev"} <= extras
