"""The package's layout rules, read from the source (nothing is imported): imports go one way, the
core stays lean, and files stay short enough to read top to bottom."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# recipes/ is installed as lightning_hrp.recipes (setuptools' package-dir, pyproject.toml).
ROOTS = {"lightning_hrp": REPO / "lightning_hrp", "lightning_hrp.recipes": REPO / "recipes"}
MAX_LINES = 450
# A longer file says why in its module docstring, in a sentence starting with this.
LONG_FILE_REASON = "Over 450 lines:"
# What the recipes and their tools need (the extras); the callback and the inits must not import it.
EXTRAS_ONLY = {"transformers", "torchmetrics", "jsonargparse", "yaml", "pandas", "scipy", "gguf", "wandb", "matplotlib", "bitsandbytes"}


def source_files() -> dict[str, Path]:
    """Every module of the package by its dotted name."""
    modules = {}
    for package, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(root)
            parts = [package, *relative.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = source_files()


def imported_modules(name: str, path: Path) -> set[str]:
    """The modules ``name`` imports anywhere in its file (in functions too): a lazy import still ties two modules."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return found


IMPORTS = {name: imported_modules(name, path) for name, path in MODULES.items()}


def test_the_package_is_read_whole():
    assert {"lightning_hrp.callback", "lightning_hrp.inits.registry", "lightning_hrp.recipes.cli", "lightning_hrp.recipes.runs"} <= set(MODULES)


def test_no_import_cycle():
    graph = {name: sorted(target for target in IMPORTS[name] if target in MODULES and target != name) for name in MODULES}
    cycles = []
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for target in graph[name]:
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_only_the_recipes_import_the_recipes():
    outside = {name: sorted(t for t in IMPORTS[name] if t.startswith("lightning_hrp.recipes")) for name in MODULES if not name.startswith("lightning_hrp.recipes")}
    assert not {name: targets for name, targets in outside.items() if targets}


def test_the_core_needs_no_extra():
    """``pip install lightning-hrp`` without extras must be enough for the callback and the inits.

    The recipes need their extra, and an integration needs the framework it integrates with.
    """
    optional = ("lightning_hrp.recipes", "lightning_hrp.integrations")
    core = {name: sorted(t for t in IMPORTS[name] if t.split(".")[0] in EXTRAS_ONLY) for name in MODULES if not name.startswith(optional)}
    assert not {name: targets for name, targets in core.items() if targets}


@pytest.mark.parametrize("relative", [str(path.relative_to(REPO)) for path in MODULES.values()])
def test_a_file_reads_top_to_bottom(relative):
    path = REPO / relative
    lines = len(path.read_text().splitlines())
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert lines <= MAX_LINES or LONG_FILE_REASON in docstring, (
        f"{relative} has {lines} lines; split it by job, or say why not in its docstring ({LONG_FILE_REASON} ...)"
    )


ARCHITECTURE = REPO / "docs" / "architecture.md"


def readme_layout() -> str:
    """The documentation's layout tree (the code block under ``## Layout`` of docs/architecture.md)."""
    section = ARCHITECTURE.read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def test_the_readme_layout_names_every_module():
    # The tree is where a newcomer learns what each file is for; a module missing there is undocumented.
    tree = readme_layout()
    files = [p for p in MODULES.values() if p.name != "__init__.py"] + sorted((REPO / "benchmarks").glob("*.py"))
    missing = sorted(str(p.relative_to(REPO)) for p in files if not re.search(rf"(?<![\w.]){re.escape(p.name)}\b", tree))
    assert not missing, f"docs/architecture.md's Layout tree does not name: {missing}"


def test_a_committed_comparisons_run_folders_are_not_ignored():
    """The whole-split evidence resumes from its committed run folders: git must not ignore them,
    while a comparison's runs elsewhere (runs/compare/...) stay ignored."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO).returncode == 0

    assert not ignored("docs/results/classification_rotten_tomatoes_full/runs/hrp/lr=0.002/seed=0/result.json")
    assert ignored("runs/compare/classification_rotten_tomatoes_r4/runs/lora/lr=0.004/seed=0/result.json")
