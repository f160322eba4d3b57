"""Which folders ``compare`` and ``compare-grid`` own: only those they created (or were told to adopt).

A folder the tool creates gets a marker file, :data:`MARKER`, with the tool, its version and the
kind of folder (a comparison, a grid, one run). An existing ``output_dir`` is used only if it holds
the marker (a resumed comparison) or is empty; a run folder is deleted to run it again only if it
holds the marker. A folder written before markers existed is taken over only when asked
(``adopt_output_dir=true``), never silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import lightning_hrp

MARKER = ".lightning-hrp-compare.json"
FolderKind = Literal["comparison", "grid", "run"]


def marker_kind(folder: Path) -> str | None:
    """The kind the marker in ``folder`` records; None without a (readable) marker."""
    try:
        content = json.loads((folder / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return content.get("kind") if isinstance(content, dict) and content.get("tool") == "lightning-hrp" else None


def write_marker(folder: Path, kind: FolderKind) -> None:
    """Mark ``folder`` (created if missing) as the tool's own ``kind`` of folder."""
    folder.mkdir(parents=True, exist_ok=True)
    content = {"tool": "lightning-hrp", "version": lightning_hrp.__version__, "kind": kind}
    (folder / MARKER).write_text(json.dumps(content) + "\n")


def _adoptable(folder: Path, kind: FolderKind) -> bool:
    # A comparison from before the markers has its runs/ folder; a grid, its cells' comparisons.
    if kind == "comparison":
        return (folder / "runs").is_dir()
    return any(entry.is_dir() and "=" in entry.name for entry in folder.iterdir())


def check_output_dir(folder: Path, kind: FolderKind, *, adopt: bool = False, report_only: bool = False) -> None:
    """Raise ``ValueError`` unless the tool may write its ``kind`` of output into ``folder``; writes nothing."""
    found = marker_kind(folder)
    if found == kind:
        return
    fix = "Choose a new output_dir"
    if found is not None:
        raise ValueError(f"output_dir: {folder} is a {found} folder of lightning-hrp, not a {kind}. {fix}.")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output_dir: {folder} is a file, not a folder. {fix}.")
    entries = sorted(entry.name for entry in folder.iterdir()) if folder.is_dir() else []
    if not entries:
        if report_only:
            raise ValueError(f"output_dir: {folder} holds no {kind} of lightning-hrp (no {MARKER}); there is no report to rebuild.")
        return  # a new folder, or an empty one: the tool's from now on
    if adopt:
        if not _adoptable(folder, kind):
            raise ValueError(
                f"adopt_output_dir: {folder} does not look like a {kind} that lightning-hrp wrote before its folder markers "
                f"(it holds {entries[:5]}); adopt only such a folder."
            )
        return
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    if report_only:
        raise ValueError(f"output_dir: {folder} holds no {kind} of lightning-hrp (no {MARKER}; found {shown}); there is no report to rebuild.")
    raise ValueError(
        f"output_dir: {folder} already holds files that lightning-hrp did not create ({shown}; no {MARKER}), which it "
        f"could overwrite or delete. {fix} (a missing or empty one). For a {kind} that lightning-hrp started before it "
        "marked its folders, add --adopt_output_dir=true once."
    )


def claim_output_dir(folder: Path, kind: FolderKind, *, adopt: bool = False, report_only: bool = False) -> None:
    """:func:`check_output_dir`, then mark ``folder`` as the tool's (adopting marks the run folders in it too)."""
    check_output_dir(folder, kind, adopt=adopt, report_only=report_only)
    if marker_kind(folder) == kind:
        return
    if adopt and folder.is_dir() and any(folder.iterdir()):
        if kind == "comparison":  # its run folders are the tool's too: an unfinished one may be run again
            for run in folder.glob("runs/*/lr=*/seed=*"):
                if run.is_dir():
                    write_marker(run, "run")
        print(f"Adopted {folder}, a {kind} from before lightning-hrp marked its folders, as lightning-hrp's own.", flush=True)
    write_marker(folder, kind)


def require_marker(folder: Path, kind: FolderKind) -> None:
    """Raise ``ValueError`` unless ``folder`` holds the tool's marker for ``kind``: nothing is written elsewhere."""
    if marker_kind(folder) != kind:
        raise ValueError(f"{folder} is not a {kind} folder of lightning-hrp (no {MARKER}); refusing to write into it.")
