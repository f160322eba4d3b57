"""The documentation: the site builds with ``mkdocs build --strict``, README.md stays a short front page,
no page holds a machine path or a placeholder, and the options table matches the code.

The pages' examples and commands are run by ``tests/test_readme.py``.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

from lightning_hrp.options import HRPArguments
from test_readme import README, REPO, doc_pages, sections

OPTIONS_PAGE = REPO / "docs" / "options.md"
README_MAX_LINES = 200
# Paths that exist only on a developer's or a CI machine.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|tmp|root|home|Users|scratch)/")
# Left-over markers, anywhere; and an ALL_CAPS_TOKEN with an underscore in prose (outside code), such as a
# section's placeholder line. Environment variables and constants belong in `code`.
MARKER = re.compile(r"\b(?:TODO|TBD|FIXME|XXX)\b")
CAPS_TOKEN = re.compile(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]*[A-Z0-9]\b")


def prose(text: str) -> str:
    """A markdown text without its fenced blocks, inline code and HTML comments."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def test_the_site_builds_strict(tmp_path):
    """Broken links, anchors, snippets, nav entries and API names fail the build (mkdocs.yml: strict, validation)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed (pip install -e '.[docs]'):\n{done.stderr[-4000:]}"
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("lightning_hrp.HRPPreheatCallback", "lightning_hrp.hrp_init", "lightning_hrp.inits.HRPInit",
                 "lightning_hrp.integrations.transformers.HRPTrainerCallback"):
        assert f'id="{name}"' in api, name  # generated from the docstrings


def test_the_readme_is_a_short_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to a docs/ page"
    headings = [heading for heading, _ in sections(README.read_text())][1:]
    assert headings[:3] == ["lightning-hrp", "Quickstart", "Add it to your Lightning Trainer"], headings


def test_no_page_holds_a_machine_path_or_a_placeholder():
    found = []
    for page in doc_pages():
        text = page.read_text()
        name = page.relative_to(REPO)
        found += [f"{name}: machine path {m.group(0)!r}" for m in MACHINE_PATH.finditer(text)]
        found += [f"{name}: marker {m.group(0)!r}" for m in MARKER.finditer(text)]
        found += [f"{name}: placeholder {m.group(0)!r}" for m in CAPS_TOKEN.finditer(prose(text))]
    assert not found, "\n".join(found)


def test_the_checks_catch_what_they_are_for():
    assert MACHINE_PATH.search("see /work/shared/spec/x.txt") and MACHINE_PATH.search("--out /tmp/rehearsal")
    assert not MACHINE_PATH.search("runs/compare/tmp/x and docs/results/")
    assert CAPS_TOKEN.search(prose("Rank budgets.\n\nRANK_BUDGET_EVIDENCE\n"))
    assert not CAPS_TOKEN.search(prose("set `OMP_NUM_THREADS=1`\n```bash\nTORCH_SPEC=x make demo\n```\n"))


def options_table() -> dict[str, str]:
    """The option table of docs/options.md: option name -> its default cell."""
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", OPTIONS_PAGE.read_text(), flags=re.MULTILINE)
    assert rows, "docs/options.md has no option table"
    return {name: default.strip() for name, default in rows}


def test_the_options_table_matches_the_code():
    """Every option of every entry point (HRPArguments' signature) is a row, with its default: a literal in
    backticks, ``required``, or words where the default is ``None`` (e.g. "main optimizer's")."""
    signature = inspect.signature(HRPArguments.__init__).parameters
    expected = {name: p.default for name, p in signature.items() if name != "self"}
    table = options_table()
    assert list(table) == list(expected)  # the same options, in the signature's order
    for name, cell in table.items():
        default = expected[name]
        if default is inspect.Parameter.empty:
            assert cell == "required", name
        elif cell.startswith("`"):
            assert ast.literal_eval(cell.strip("`")) == default, (name, cell, default)
        else:
            assert default is None, (name, cell, default)
