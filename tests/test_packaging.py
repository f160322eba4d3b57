"""Packaging: the top-level recipes/ folder installs as ``lightning_hrp.recipes`` (setuptools' package-dir,
no symlink, no generic top-level ``recipes``), with its configs, ``py.typed`` and the console script; the
wheel builds without warnings and passes ``twine check``; and an installed wheel runs a packaged config by
name from a directory outside the checkout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What `pip install lightning-hrp` (no extras) brings: the callback and the inits import nothing else.
CORE = {"torch", "lightning", "peft", "numpy"}
# What the wheel is built from (as a git checkout holds it; build outputs left out).
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "lightning_hrp", "recipes")


def _clean_env() -> dict[str, str]:
    # No PYTHONPATH: the subprocess must not import the checkout. Byte-compiling on: with it off,
    # distutils warns "byte-compiling is disabled", which says nothing about the package.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> tuple[Path, str]:
    """The wheel built from a copy of the checkout, and everything the build printed."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", build, str(root / "dist")], cwd=source, capture_output=True, text=True, timeout=300, env=_clean_env()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "dist" / done.stdout.strip().splitlines()[-1], done.stdout + done.stderr


def test_recipes_is_not_importable_under_its_folder_name():
    """From the repository root the folder is found as ``recipes``; the guard refuses that second copy."""
    done = subprocess.run([sys.executable, "-c", "import recipes"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "ImportError" in done.stderr and "lightning_hrp.recipes" in done.stderr


def test_no_symlink_is_tracked():
    listed = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    assert listed.strip()
    assert [line for line in listed.splitlines() if line.startswith("120000")] == []


def test_wheel_builds_without_warnings(built_wheel):
    _, output = built_wheel
    assert [line for line in output.splitlines() if re.search(r"warn", line, re.IGNORECASE)] == []


def test_wheel_holds_every_module_the_configs_and_py_typed(built_wheel):
    wheel_path, _ = built_wheel
    wheel = zipfile.ZipFile(wheel_path)
    names = set(wheel.namelist())
    info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))

    assert wheel.read(f"{info}/top_level.txt").decode().split() == ["lightning_hrp"]
    assert not [name for name in names if not name.startswith(("lightning_hrp/", f"{info}/"))]
    # Every module of both folders: the package list in pyproject.toml cannot leave a subpackage out.
    modules = {f"lightning_hrp/{p.relative_to(REPO / 'lightning_hrp').as_posix()}" for p in (REPO / "lightning_hrp").rglob("*.py")}
    modules |= {f"lightning_hrp/recipes/{p.relative_to(REPO / 'recipes').as_posix()}" for p in (REPO / "recipes").rglob("*.py")}
    assert "lightning_hrp/recipes/cli.py" in modules and modules <= names
    configs = {f"lightning_hrp/recipes/configs/{p.name}" for p in (REPO / "recipes" / "configs").glob("*.yaml")}
    assert configs and configs <= names
    assert {"lightning_hrp/py.typed", f"{info}/licenses/LICENSE"} <= names
    assert names - modules - configs == {"lightning_hrp/py.typed", *(name for name in names if name.startswith(f"{info}/"))}
    assert "lightning-hrp = lightning_hrp.recipes.cli:main" in wheel.read(f"{info}/entry_points.txt").decode()

    metadata = wheel.read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = {re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower() for spec in requires if "extra ==" not in spec}
    assert core == CORE
    extras = {re.search(r'extra == "([^"]+)"', spec).group(1) for spec in requires if "extra ==" in spec}
    assert {"recipes", "wandb", "plots", "quantization", "docs", "all", "dev"} <= extras


def test_wheel_passes_twine_check(built_wheel):
    pytest.importorskip("twine", reason="twine comes with the dev extra (make setup)")
    wheel_path, _ = built_wheel
    done = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASSED" in done.stdout


def test_installed_wheel_runs_a_packaged_config_by_name_outside_the_checkout(built_wheel, tmp_path):
    """A fresh environment with only the wheel (the heavy dependencies come from this one's site-packages)."""
    wheel_path, _ = built_wheel
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    # This environment's site folders (pip and torch may live in a parent one that a .pth names).
    (site / "dependencies.pth").write_text("".join(f"{p}\n" for p in sys.path if p.endswith("site-packages")))
    env = _clean_env()
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel_path)], capture_output=True, text=True, timeout=300, env=env)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], cwd=work, capture_output=True, text=True, timeout=600, env=env)

    where = run(python, "-c", "import lightning_hrp.recipes as r, lightning_hrp as l; print(l.__file__); print(r.__file__)")
    assert where.returncode == 0, where.stderr[-3000:]
    assert all(Path(line).is_relative_to(site) for line in where.stdout.split())

    command = venv / "bin" / "lightning-hrp"
    listed = run(command, "configs")
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert re.search(r"^matrix_regression_hrp\s+Low-rank matrix regression", listed.stdout, re.MULTILINE)
    copied = run(command, "configs", "cp", "matrix_regression_lora", "mine.yaml")
    assert copied.returncode == 0 and (work / "mine.yaml").read_text() == (REPO / "recipes/configs/matrix_regression_lora.yaml").read_text()
    again = run(command, "configs", "cp", "matrix_regression_hrp", "mine.yaml")
    assert again.returncode == 2 and "matrix_regression_lora" in (work / "mine.yaml").read_text()
    # A compare config names its recipe as recipes/configs/<name>.yaml: the packaged one here.
    recipe = run(python, "-c", "from lightning_hrp.recipes.runs import load_config; print(load_config('recipes/configs/matrix_regression_lora.yaml')['model']['class_path'])")
    assert recipe.returncode == 0 and recipe.stdout.strip() == "lightning_hrp.recipes.matrix_regression.MatrixRegressionModule", recipe.stderr[-3000:]

    fit = run(command, "fit", "--config", "matrix_regression_hrp", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false")
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert (work / "runs" / "matrix_regression_hrp" / "checkpoints" / "last.ckpt").is_file()
    unknown = run(command, "fit", "--config", "no_such_config")
    assert unknown.returncode == 2 and "no_such_config" in unknown.stderr
