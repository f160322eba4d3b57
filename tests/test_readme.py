"""The README's and the documentation pages' examples run as printed: every Python example, and every
``lightning-hrp`` command.

The convention, for README.md and every page of the site (``docs/``, the results' per-run folders aside):
**every ```python block runs as printed**, as a script in a fresh folder, and prints the line
:data:`EXAMPLES` expects for it (a page section holds at most one). A fragment that is not meant to
run is fenced as ```py (highlighted the same, not run). Every ``lightning-hrp ...`` line of a ```bash block is parsed (and the fast
recipe's commands are run, in order).
"""

import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lightning_hrp.recipes.cli import main
from lightning_hrp.recipes.runs import parse
from test_cli import CONFIGS, header_commands

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"


def doc_pages() -> list[Path]:
    """README.md and the site's pages, without the results' generated per-run reports (docs/results/*/)."""
    pages = [p for p in sorted(DOCS.rglob("*.md")) if not p.relative_to(DOCS).parts[:1] == ("results",) or p.parent == DOCS / "results"]
    return [README, *pages]


# Each page section (``page: heading``) with a Python example, and what its run prints.
EXAMPLES = {
    "README.md: Add it to your Lightning Trainer": "preheat loss",
    "docs/entry-points/lightning-trainer.md: Example": "top-r energy of layer 0",
    "docs/entry-points/hrp-init.md: Example": "main loss",
    "docs/entry-points/fabric.md: Example": "on 2 processes",
    "docs/entry-points/transformers.md: Example": "transformers: preheat loss",
    "docs/entry-points/qlora.md: Example": "4-bit base: preheated 4 layers",
    "docs/entry-points/rank-budgets.md: Example": "allocated ranks sum to 64; reloaded with peft alone, max difference 0.0e+00",
}


def fenced(text: str, language: str) -> list[str]:
    """The bodies of the ```language blocks of a markdown text (a title or other attributes may follow)."""
    return re.findall(rf"^```{language}(?:[ \t][^\n]*)?\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def sections(text: str) -> list[tuple[str, str]]:
    """A markdown text's sections as (heading, body), at every heading level; a ``#`` line inside a fenced
    block (a Python comment) is not a heading."""
    found: list[tuple[str, list[str]]] = [("", [])]
    in_fence = False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            in_fence = not in_fence
        heading = None if in_fence else re.match(r"#+ (.*)", line)
        if heading:
            found.append((heading.group(1).strip(), []))
        else:
            found[-1][1].append(line)
    return [(heading, "".join(lines)) for heading, lines in found]


def page_examples() -> dict[str, str]:
    """Every ```python block of README.md and the site's pages, by ``page: heading`` of its section."""
    examples = {}
    for page in doc_pages():
        for heading, body in sections(page.read_text()):
            blocks = fenced(body, "python")
            key = f"{page.relative_to(REPO)}: {heading}"
            assert len(blocks) <= 1, key
            if blocks:
                examples[key] = blocks[0]
    return examples


def test_every_page_example_is_run():
    assert set(page_examples()) == set(EXAMPLES)


@pytest.mark.parametrize("section", EXAMPLES)
def test_page_example_runs_as_printed(section, tmp_path):
    # As a script: Lightning Fabric starts its second process by running the script again.
    script = tmp_path / "example.py"
    script.write_text(page_examples()[section])
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert EXAMPLES[section] in result.stdout


def test_readme_quickstart_is_the_ci_test_command():
    text = README.read_text()
    quickstart = re.search(r"## Quickstart.*?```bash\n(.*?)```", text, flags=re.DOTALL).group(1)
    commands = [line.split("#")[0].strip() for line in quickstart.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (README.parent / ".ci" / "run").read_text()


def readme_commands() -> list[list[str]]:
    """Every ``lightning-hrp ...`` command of the bash blocks of README.md and the site's pages (continuations
    joined, leading ``NAME=value`` environment settings dropped), as argv lists, page by page."""
    commands = []
    for page in doc_pages():
        for block in fenced(page.read_text(), "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                argv = shlex.split(line, comments=True)
                while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
                    argv = argv[1:]
                if argv[:1] == ["lightning-hrp"]:
                    commands.append(argv[1:])
    return commands


def _folders(argv: list[str]) -> tuple[str, str]:
    """Where a fit/validate/test command writes: its logger's save_dir and its checkpoint folder."""
    trainer = parse(argv)[argv[0]].trainer
    (checkpoints,) = [c.init_args.dirpath for c in trainer.callbacks if c.class_path.endswith(".ModelCheckpoint")]
    return trainer.logger.init_args.save_dir, checkpoints


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_every_run_writes_its_own_folder_and_each_test_command_tests_its_run(monkeypatch):
    """Two different fits never share a folder (one would replace the other's checkpoint), counting the
    configs' own header commands; every README test command reads the checkpoint of exactly one README fit,
    of the same config, and logs beside it."""
    monkeypatch.chdir(REPO)  # the commands use paths relative to the repository root
    readme = readme_commands()
    assert any(argv[0] == "fit" for argv in readme) and any(argv[0] == "test" for argv in readme)
    fits = {tuple(argv) for argv in readme + [c for config in CONFIGS for c in header_commands(config)] if argv[0] == "fit"}
    written: dict[str, tuple[str, ...]] = {}
    for argv in sorted(fits):
        for folder in _folders(list(argv)):
            assert folder not in written, f"{folder} is written by both\n  {shlex.join(written[folder])}\n  {shlex.join(argv)}"
            written[folder] = argv
    for argv in readme:
        if argv[0] not in ("validate", "test"):
            continue
        checkpoint = Path(_option(argv, "--ckpt_path"))
        assert checkpoint.name == "last.ckpt", argv
        writer = written.get(str(checkpoint.parent))
        assert writer is not None and writer in {tuple(a) for a in readme}, f"no README fit writes {checkpoint}"
        assert _option(list(writer), "--config") == _option(argv, "--config")
        assert _folders(argv)[0] == _folders(list(writer))[0]  # its logs go to the run's folder too


def test_every_readme_command_parses(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    for argv in readme_commands():
        if "--help" in argv:
            with pytest.raises(SystemExit) as exit_info:
                main(argv)
            assert exit_info.value.code == 0, argv
        elif argv[0] == "compare":
            from lightning_hrp.recipes.compare import build_parser

            build_parser().parse_args(argv[1:])
        elif argv[0] == "compare-grid":
            from lightning_hrp.recipes.compare.grid import build_parser

            build_parser().parse_args(argv[1:])
        else:
            assert argv[0] in ("fit", "validate", "test"), argv
            parse(argv)


def test_readme_matrix_regression_commands_run_as_printed(tmp_path, monkeypatch, capsys):
    """The fast recipe's README commands, in order; the test command reads the HRP run's checkpoint."""
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    monkeypatch.chdir(tmp_path)
    commands = [argv for argv in readme_commands() if argv[0] in ("fit", "validate", "test") and "matrix_regression" in " ".join(argv)]
    assert [argv[0] for argv in commands] == ["fit", "fit", "test", "fit"]
    for argv in commands:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LightningCLI's args-and-sys.argv warning, Lightning's tips
            assert main(argv) == 0, argv
    assert "test/loss" in capsys.readouterr().out
    folders = {path.name for path in (tmp_path / "runs").iterdir()}
    assert folders == {"matrix_regression_lora", "matrix_regression_hrp", "matrix_regression_lora_with_hrp"}
    for folder, with_hrp in (("matrix_regression_lora", False), ("matrix_regression_hrp", True), ("matrix_regression_lora_with_hrp", True)):
        states = torch.load(tmp_path / "runs" / folder / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
        assert any("HRPPreheatCallback" in key for key in states) == with_hrp, folder
