"""Benchmark: the batched QR-core SVD of ``B @ A`` against dense and randomised SVDs.

Methods, each giving the top-``r`` singular triplets of every layer's ``P = B @ A``:

* ``ours``: :func:`lightning_hrp.engine.decompose.svd_of_products`, one batched call per shape,
  timed on every layer of the set.
* ``loop``: :func:`lightning_hrp.engine.decompose.svd_of_product` called layer by layer (no
  stacking), timed on every layer of the set.
* ``cholqr``: a candidate engine variant defined here (not in ``lightning_hrp``): the same core
  with the triangular factors taken from Cholesky factors of the ``R x R`` Gram matrices, batched
  like ``ours``, timed on every layer.
* ``dense``: form ``P`` and run ``torch.linalg.svd(P, full_matrices=False)``.
* ``lowrank``: form ``P`` and run ``torch.svd_lowrank(P, q=r + oversample, niter=...)``.

``dense`` and ``lowrank`` are timed per layer on a sample (by default the first layer of each
shape) and extrapolated to the whole set as ``sum over shapes of (layers of that shape) x (median
time per layer)``; the report marks such totals. (The dense SVD of one 4096 x 11008 matrix takes
about a minute on one CPU core.)

Subspace error: ``sin`` of the largest principal angle between the top-``r`` right singular
subspaces (the rows of ``Vh`` that initialise LoRA ``A``) of a method and of the dense SVD,
``||V V^T - V_dense V_dense^T||_2``, computed in float64 and maximised over the sampled layers. It
measures disagreement, so it includes the dense SVD's own rounding error; the per-layer table
therefore also gives both ``ours`` and ``dense`` against ``ours`` in float64 (exact up to 1e-15
here), and the relative spectral gap ``(s_r - s_{r+1}) / s_1`` that such errors scale with
(``~ eps / gap``).

Run ``python benchmarks/svd.py --help``; results and the exact commands are in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

from lightning_hrp.engine.decompose import ProductSVD, svd_of_product, svd_of_products

ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class LayerShape:
    """``per_block`` linear layers of weight shape ``(out_features, in_features)`` in each transformer block."""

    out_features: int
    in_features: int
    per_block: int

    @property
    def label(self) -> str:
        return f"{self.out_features}x{self.in_features}"


@dataclass(frozen=True)
class LayerSet:
    """The LoRA target layers of a model, by shape.

    Attributes:
        name: Command-line name.
        description: One line for the docs.
        shapes: Layer shapes of one block, in block order.
        blocks: Number of transformer blocks.
        dense_ranks: Preheat ranks at which the dense baseline runs by default (``None``: all);
            ``--dense-all-ranks`` overrides it.
    """

    name: str
    description: str
    shapes: tuple[LayerShape, ...]
    blocks: int
    dense_ranks: tuple[int, ...] | None = None

    def layer_shapes(self) -> list[LayerShape]:
        """One entry per layer, block after block."""
        return [shape for _ in range(self.blocks) for shape in self.shapes for _ in range(shape.per_block)]


LAYER_SETS: dict[str, LayerSet] = {
    layer_set.name: layer_set
    for layer_set in (
        LayerSet(
            name="llama-7b",
            description="LLaMA-7B: per block q,k,v,o 4096x4096, gate,up 11008x4096, down 4096x11008; 32 blocks",
            shapes=(LayerShape(4096, 4096, 4), LayerShape(11008, 4096, 2), LayerShape(4096, 11008, 1)),
            blocks=32,
            # The dense SVDs of the three LLaMA shapes take minutes per R on a small CPU.
            dense_ranks=(64,),
        ),
        LayerSet(
            name="bert-base",
            description="BERT-base: per block q,k,v,attn-out 768x768, intermediate 3072x768, output 768x3072; 12 blocks",
            shapes=(LayerShape(768, 768, 4), LayerShape(3072, 768, 1), LayerShape(768, 3072, 1)),
            blocks=12,
        ),
        LayerSet(
            name="tiny",
            description="LLaMA-like toy: per block 4x 256x256, 2x 688x256, 1x 256x688; 2 blocks",
            shapes=(LayerShape(256, 256, 4), LayerShape(688, 256, 2), LayerShape(256, 688, 1)),
            blocks=2,
        ),
    )
}

COMPARISONS = ("loop", "cholqr", "dense", "lowrank")
FULL_DEFAULTS = {"sets": ["bert-base", "llama-7b"], "ranks": [16, 64, 256], "tops": [8, 16], "repeats": 5}
QUICK_DEFAULTS = {"sets": ["tiny"], "ranks": [16, 64], "tops": [8, 16], "repeats": 3}  # plus --threads 1


@dataclass
class Timing:
    """Measurements of one operation, in seconds, on the clock the report uses.

    Attributes:
        seconds: One entry per run, on the chosen clock (wall or this process's CPU time).
        wall_seconds: The same runs by the wall clock (what the repeat budget counts).
    """

    seconds: list[float]
    wall_seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


@dataclass
class MethodResult:
    """One method on a whole layer set at one ``(R, r)``.

    Attributes:
        seconds: Whole-set time on the report's clock (median per call, or extrapolated).
        wall_seconds: The same by the wall clock.
        runs: Measurements behind each median.
        extrapolated: Whether the total was extrapolated from sampled layers.
        max_sin_theta: Largest subspace error against the dense SVD over the sampled layers
            (``None`` without a dense reference).
    """

    seconds: float
    wall_seconds: float
    runs: int
    extrapolated: bool
    max_sin_theta: float | None = None


@dataclass
class LayerRow:
    """One sampled layer at one ``(R, r)``: per-layer times (seconds) and errors."""

    shape: str
    layer_index: int
    ours_s: float
    ours_runs: int
    dense_s: float | None = None
    dense_runs: int = 0
    lowrank_s: float | None = None
    lowrank_runs: int = 0
    ours_sin_theta: float | None = None
    lowrank_sin_theta: float | None = None
    ours_rel_sv_error: float | None = None
    ours_sin_theta_vs_float64: float | None = None
    dense_sin_theta_vs_float64: float | None = None
    relative_gap: float | None = None


@dataclass
class SetRow:
    """A whole layer set at one ``(R, r)``: one :class:`MethodResult` per method, and the sampled layers."""

    set_name: str
    layers: int
    preheat_rank: int
    top: int
    methods: dict[str, MethodResult] = field(default_factory=dict)
    layer_rows: list[LayerRow] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time the batched QR-core SVD of B@A against torch.linalg.svd and torch.svd_lowrank.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny layer set, fewer repeats and (unless --threads says otherwise) one thread: seconds, even on a "
        "busy CPU",
    )
    parser.add_argument("--sets", nargs="+", choices=sorted(LAYER_SETS), help="layer sets to run")
    parser.add_argument("--ranks", nargs="+", type=int, help="preheat ranks R")
    parser.add_argument("--tops", nargs="+", type=int, help="target LoRA ranks r")
    parser.add_argument("--repeats", type=int, help="measurements per timed operation (median reported)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=20.0,
        help="stop repeating an operation once its measurements add up to this many seconds (at least one)",
    )
    parser.add_argument(
        "--baseline-layers-per-shape",
        type=int,
        default=1,
        help="layers of each shape on which the dense and lowrank baselines run (the rest is extrapolated)",
    )
    parser.add_argument(
        "--compare",
        nargs="*",
        choices=COMPARISONS,
        default=list(COMPARISONS),
        help="methods to compare with ours (give none to time only ours)",
    )
    parser.add_argument(
        "--dense-all-ranks", action="store_true", help="run the dense baseline at every R (default: per-set ranks)"
    )
    parser.add_argument("--oversample", type=int, default=10, help="svd_lowrank q = r + oversample")
    parser.add_argument("--niter", type=int, default=2, help="svd_lowrank power iterations")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="what the tables report: wall-clock seconds, or this process's CPU seconds (steadier on a shared CPU "
        "with --threads 1)",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", help="also write all rows as JSON to this path")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick and args.threads is None:
        # Tiny matrices gain nothing from a second thread, and on a CPU shared with other jobs two
        # OpenMP threads made this run 50x slower (BENCHMARKS.md).
        args.threads = 1
    if min(args.ranks) < 1 or min(args.tops) < 1:
        parser.error(f"--ranks and --tops must be positive, got {args.ranks} and {args.tops}.")
    if max(args.tops) > min(args.ranks):
        parser.error(f"every --tops value must be <= every --ranks value, got tops {args.tops} and ranks {args.ranks}.")
    for name in ("repeats", "baseline_layers_per_shape", "oversample"):
        if getattr(args, name) < (0 if name == "oversample" else 1):
            parser.error(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}.")
    if args.niter < 0:
        parser.error(f"--niter must be >= 0, got {args.niter}.")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} was asked for but torch.cuda.is_available() is False; use --device cpu.")
    if device.type != "cpu" and args.clock == "cpu":
        parser.error(f"--clock cpu measures host CPU time and means nothing for --device {args.device}; use --clock wall.")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}.")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    operation: Callable[[], ResultT], *, repeats: int, budget_s: float, device: torch.device, clock: str
) -> tuple[ResultT, Timing]:
    """Run ``operation`` up to ``repeats`` times (fewer once ``budget_s`` wall seconds are spent).

    The device is synchronised before and after each run; ``clock`` is ``"wall"`` or ``"cpu"``
    (CPU time of this process, all its threads together).
    """
    wall: list[float] = []
    cpu: list[float] = []
    result = None
    while len(wall) < repeats and (not wall or sum(wall) < budget_s):
        synchronize(device)
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        result = operation()
        synchronize(device)
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return result, Timing(seconds=wall if clock == "wall" else cpu, wall_seconds=wall)  # type: ignore[return-value]


def make_products(
    layer_set: LayerSet, rank: int, *, dtype: torch.dtype, device: torch.device, seed: int
) -> list[tuple[Tensor, Tensor]]:
    """Gaussian preheat factors ``B (out, R)``, ``A (R, in)``, scaled so ``B @ A`` entries are O(1/sqrt(in))."""
    generator = torch.Generator(device=device).manual_seed(seed)
    products = []
    for shape in layer_set.layer_shapes():
        B = torch.randn(shape.out_features, rank, generator=generator, dtype=dtype, device=device) / math.sqrt(rank)
        A = torch.randn(rank, shape.in_features, generator=generator, dtype=dtype, device=device)
        products.append((B, A / math.sqrt(shape.in_features)))
    return products


def sample_layers(layer_set: LayerSet, per_shape: int) -> list[int]:
    """Indices of the first ``per_shape`` layers of each shape."""
    taken: dict[LayerShape, int] = {}
    indices = []
    for index, shape in enumerate(layer_set.layer_shapes()):
        if taken.get(shape, 0) < per_shape:
            taken[shape] = taken.get(shape, 0) + 1
            indices.append(index)
    return indices


def dense_svd(B: Tensor, A: Tensor, keep: int) -> ProductSVD:
    """``torch.linalg.svd`` of the materialised product, cut to ``keep`` vectors (a copy negligible next to the SVD)."""
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    # Clone so the full-size factors can be freed.
    return ProductSVD(U=U[:, :keep].clone(), S=S, Vh=Vh[:keep].clone())


def lowrank_svd(B: Tensor, A: Tensor, top: int, oversample: int, niter: int) -> ProductSVD:
    """``torch.svd_lowrank`` of the materialised product with ``q = top + oversample``."""
    product = B @ A
    q = min(top + oversample, *product.shape)
    U, S, V = torch.svd_lowrank(product, q=q, niter=niter)
    return ProductSVD(U=U[:, :top], S=S, Vh=V[:, :top].mT)


def cholqr_svd_of_product(B: Tensor, A: Tensor, *, top: int, dtype: torch.dtype) -> ProductSVD:
    """Candidate engine variant (not in lightning_hrp): the same core from Cholesky-QR.

    ``B = Q_b L_b^T`` with ``L_b L_b^T = B^T B`` (and likewise for ``A^T``), so the triangular
    factors come from two ``R x R`` Gram matrices (one BLAS-3 product each) instead of Householder
    QR, and the orthonormal factors are never formed: ``Vh = Vh_c[:top] L_a^{-1} A`` and
    ``U = B L_b^{-T} U_c[:, :top]``. It squares the factors' condition number, so it needs
    full-rank, reasonably conditioned ``B`` and ``A``; here it is only timed and checked on the
    benchmark's Gaussian factors.
    """
    B, A = B.to(dtype), A.to(dtype)
    L_b, info_b = torch.linalg.cholesky_ex(B.mT @ B)
    L_a, info_a = torch.linalg.cholesky_ex(A @ A.mT)
    if bool((info_b != 0).any()) or bool((info_a != 0).any()):
        raise RuntimeError("cholqr candidate: a Gram matrix is not positive definite (rank-deficient factors).")
    u_core, S, vh_core = torch.linalg.svd(L_b.mT @ L_a, full_matrices=False)
    Vh = torch.linalg.solve_triangular(L_a, vh_core[..., :top, :], upper=False, left=False) @ A
    U = B @ torch.linalg.solve_triangular(L_b.mT, u_core[..., :top], upper=True)
    return ProductSVD(U=U, S=S, Vh=Vh)


def cholqr_svd_of_products(
    products: Sequence[tuple[Tensor, Tensor]], top: int, *, dtype: torch.dtype
) -> list[ProductSVD]:
    """The candidate batched like :func:`svd_of_products`: one call per group of equal shapes."""
    groups: dict[tuple, list[int]] = {}
    for index, (B, A) in enumerate(products):
        groups.setdefault((tuple(B.shape), tuple(A.shape)), []).append(index)
    results: list[ProductSVD | None] = [None] * len(products)
    for indices in groups.values():
        stacked = cholqr_svd_of_product(
            torch.stack([products[i][0] for i in indices]),
            torch.stack([products[i][1] for i in indices]),
            top=top,
            dtype=dtype,
        )
        for position, index in enumerate(indices):
            results[index] = ProductSVD(stacked.U[position], stacked.S[position], stacked.Vh[position])
    return results  # type: ignore[return-value]


def sin_largest_angle(Vh: Tensor, Vh_reference: Tensor) -> float:
    """``sin`` of the largest principal angle between the row spaces of ``Vh`` and ``Vh_reference``.

    For orthonormal rows it equals ``||Vh^T Vh - Vh_ref^T Vh_ref||_2``; computing it as the norm of the
    part of ``Vh`` outside the reference space keeps full accuracy for tiny angles (``sqrt(1 - cos^2)``
    would not).
    """
    V = Vh.to(torch.float64).mT
    V_reference = Vh_reference.to(torch.float64).mT
    outside = V - V_reference @ (V_reference.mT @ V)
    return torch.linalg.matrix_norm(outside, ord=2).item()


def relative_sv_error(S: Tensor, S_reference: Tensor, top: int) -> float:
    """Largest error of the top singular values, relative to the largest reference singular value."""
    S, S_reference = S[:top].to(torch.float64), S_reference[:top].to(torch.float64)
    return ((S - S_reference).abs().max() / S_reference[0]).item()


def run_set(layer_set: LayerSet, rank: int, args: argparse.Namespace, dtype: torch.dtype) -> list[SetRow]:
    """All timings and errors for one layer set at one preheat rank (one row per target rank)."""
    device = torch.device(args.device)
    products = make_products(layer_set, rank, dtype=dtype, device=device, seed=args.seed)
    shapes = layer_set.layer_shapes()
    sampled = sample_layers(layer_set, args.baseline_layers_per_shape)

    def timed(operation: Callable[[], ResultT]) -> tuple[ResultT, Timing]:
        return measure(operation, repeats=args.repeats, budget_s=args.budget_s, device=device, clock=args.clock)

    run_dense = "dense" in args.compare and (
        args.dense_all_ranks or layer_set.dense_ranks is None or rank in layer_set.dense_ranks
    )
    dense_results: dict[int, tuple[ProductSVD, Timing]] = {}
    if run_dense:
        keep = max(args.tops) + 1  # one more singular value than needed, for the gap
        for index in sampled:
            B, A = products[index]
            dense_results[index] = timed(lambda: dense_svd(B, A, keep))

    def max_error(results: Sequence[ProductSVD], top: int) -> float | None:
        """Largest subspace error of per-layer ``results`` against the sampled dense SVDs."""
        return max_or_none(sin_largest_angle(results[i].Vh, dense.Vh[:top]) for i, (dense, _) in dense_results.items())

    rows = []
    for top in args.tops:
        row = SetRow(set_name=layer_set.name, layers=len(products), preheat_rank=rank, top=top)
        lowrank_timings: dict[int, Timing] = {}
        for index in sampled:
            B, A = products[index]
            # Per-layer ours first: it also warms up LAPACK for this shape.
            ours_single, ours_single_timing = timed(lambda: svd_of_product(B, A, top=top, dtype=dtype))
            layer_row = LayerRow(
                shape=shapes[index].label,
                layer_index=index,
                ours_s=ours_single_timing.median,
                ours_runs=len(ours_single_timing.seconds),
            )
            lowrank = None
            if "lowrank" in args.compare:
                lowrank, lowrank_timings[index] = timed(lambda: lowrank_svd(B, A, top, args.oversample, args.niter))
                layer_row.lowrank_s = lowrank_timings[index].median
                layer_row.lowrank_runs = len(lowrank_timings[index].seconds)
            if index in dense_results:
                dense, dense_timing = dense_results[index]
                layer_row.dense_s, layer_row.dense_runs = dense_timing.median, len(dense_timing.seconds)
                layer_row.ours_sin_theta = sin_largest_angle(ours_single.Vh, dense.Vh[:top])
                layer_row.ours_rel_sv_error = relative_sv_error(ours_single.S, dense.S, top)
                if lowrank is not None:
                    layer_row.lowrank_sin_theta = sin_largest_angle(lowrank.Vh, dense.Vh[:top])
                # Which side a disagreement comes from: both against ours in float64.
                exact = svd_of_product(B, A, top=top, dtype=torch.float64)
                layer_row.ours_sin_theta_vs_float64 = sin_largest_angle(ours_single.Vh, exact.Vh)
                layer_row.dense_sin_theta_vs_float64 = sin_largest_angle(dense.Vh[:top], exact.Vh)
                # Beyond the first min(out, in, R) singular values the product's are exactly zero.
                next_value = exact.S[top] if top < exact.S.shape[-1] else 0.0
                layer_row.relative_gap = ((exact.S[top - 1] - next_value) / exact.S[0]).item()
            row.layer_rows.append(layer_row)

        batched, timing = timed(lambda: svd_of_products(products, [top] * len(products), dtype=dtype))
        # Errors of the whole-set methods use exactly the results that were timed.
        row.methods["ours"] = whole_set_result(timing, max_error(batched, top))
        del batched
        if "loop" in args.compare:
            looped, timing = timed(lambda: [svd_of_product(B, A, top=top, dtype=dtype) for B, A in products])
            row.methods["loop"] = whole_set_result(timing, max_error(looped, top))
            del looped
        if "cholqr" in args.compare:
            candidate, timing = timed(lambda: cholqr_svd_of_products(products, top, dtype=dtype))
            row.methods["cholqr"] = whole_set_result(timing, max_error(candidate, top))
            del candidate
        if dense_results:
            row.methods["dense"] = extrapolate(
                shapes,
                {i: timing for i, (_, timing) in dense_results.items()},
                max_sin_theta=None,  # it is the reference
            )
        if lowrank_timings:
            row.methods["lowrank"] = extrapolate(
                shapes,
                lowrank_timings,
                max_sin_theta=max_or_none(layer_row.lowrank_sin_theta for layer_row in row.layer_rows),
            )
        rows.append(row)
    return rows


def whole_set_result(timing: Timing, max_sin_theta: float | None) -> MethodResult:
    return MethodResult(
        seconds=timing.median,
        wall_seconds=statistics.median(timing.wall_seconds),
        runs=len(timing.seconds),
        extrapolated=False,
        max_sin_theta=max_sin_theta,
    )


def extrapolate(shapes: list[LayerShape], timings: dict[int, Timing], max_sin_theta: float | None) -> MethodResult:
    """Whole-set result from per-layer samples: per shape, (layers of the shape) x (median sample time)."""
    per_shape: dict[LayerShape, list[Timing]] = {}
    for index, timing in timings.items():
        per_shape.setdefault(shapes[index], []).append(timing)

    def total(seconds_of: Callable[[Timing], list[float]]) -> float:
        return sum(statistics.median([statistics.median(seconds_of(t)) for t in per_shape[shape]]) for shape in shapes)

    return MethodResult(
        seconds=total(lambda t: t.seconds),
        wall_seconds=total(lambda t: t.wall_seconds),
        runs=min(len(t.seconds) for t in timings.values()),
        extrapolated=len(timings) < len(shapes),
        max_sin_theta=max_sin_theta,
    )


def max_or_none(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return max(present) if present else None


def machine_line(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    if device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        where = f"CPU {cpu_model()}, nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}"
    return f"{where}; torch {torch.__version__}; Python {platform.python_version()}; dtype {args.dtype}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


METHOD_ORDER = ("ours", "loop", "cholqr", "dense", "lowrank")


def format_seconds(seconds: float | None, runs: int | None = None) -> str:
    if seconds is None:
        return "not run"
    text = f"{seconds:.3g}" if seconds >= 1e-3 else f"{seconds:.2e}"
    return text if runs is None else f"{text} [n={runs}]"


def format_ratio(numerator: float | None, denominator: float) -> str:
    return "-" if numerator is None else f"{numerator / denominator:.3g}"


def format_error(error: float | None) -> str:
    return "-" if error is None else f"{error:.1e}"


def set_table(rows: list[SetRow], sampled_per_set: dict[str, int]) -> str:
    lines = [
        "| set | layers | R | r | method | time (s) | time / ours | max sin θ vs dense | timed on |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours = row.methods["ours"]
        for name in METHOD_ORDER:
            result = row.methods.get(name)
            if result is None:
                continue
            if result.extrapolated:
                timed_on = f"{sampled_per_set[row.set_name]} layers, extrapolated, n={result.runs}"
            else:
                timed_on = f"all {row.layers} layers, n={result.runs}"
            error = "reference" if name == "dense" else format_error(result.max_sin_theta)
            lines.append(
                f"| {row.set_name} | {row.layers} | {row.preheat_rank} | {row.top} | {name} "
                f"| {format_seconds(result.seconds)} | {format_ratio(result.seconds, ours.seconds)} "
                f"| {error} | {timed_on} |"
            )
    return "\n".join(lines)


def layer_table(rows: list[SetRow]) -> str:
    lines = [
        "| set | shape (out x in) | R | r | ours (s) | dense (s) | dense / ours | lowrank (s) | lowrank / ours "
        "| sin θ ours | sin θ lowrank | rel. σ error ours | sin θ ours vs f64 | sin θ dense vs f64 | gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for set_row in rows:
        for row in set_row.layer_rows:
            lines.append(
                f"| {set_row.set_name} | {row.shape} | {set_row.preheat_rank} | {set_row.top} "
                f"| {format_seconds(row.ours_s, row.ours_runs)} "
                f"| {format_seconds(row.dense_s, row.dense_runs or None)} "
                f"| {format_ratio(row.dense_s, row.ours_s)} "
                f"| {format_seconds(row.lowrank_s, row.lowrank_runs or None)} "
                f"| {format_ratio(row.lowrank_s, row.ours_s)} "
                f"| {format_error(row.ours_sin_theta)} | {format_error(row.lowrank_sin_theta)} "
                f"| {format_error(row.ours_rel_sv_error)} | {format_error(row.ours_sin_theta_vs_float64)} "
                f"| {format_error(row.dense_sin_theta_vs_float64)} | {format_error(row.relative_gap)} |"
            )
    return "\n".join(lines)


def goal_lines(rows: list[SetRow], device: torch.device, clock: str) -> list[str]:
    """Verdicts on the two project goals, from whatever rows this run produced, on the report's clock."""
    lines = []
    for set_row in rows:
        if set_row.set_name != "llama-7b" or set_row.preheat_rank != 64:
            continue
        where = f"{device.type}, {clock} clock"
        for row in set_row.layer_rows:
            if row.shape == "4096x4096" and row.dense_s is not None and row.ours_sin_theta is not None:
                ratio = row.dense_s / row.ours_s
                met = ratio >= 100 and row.ours_sin_theta < 1e-4
                lines.append(
                    f"Goal 1 (one 4096x4096, R=64, r={set_row.top}, {where}): dense / ours = {ratio:.3g} (>= 100?), "
                    f"sin θ vs dense = {row.ours_sin_theta:.1e} (< 1e-4?): {'MET' if met else 'NOT MET'} "
                    f"(sin θ vs float64: ours {row.ours_sin_theta_vs_float64:.1e}, "
                    f"dense {row.dense_sin_theta_vs_float64:.1e})"
                )
                break
        ours = set_row.methods["ours"]
        others = ", ".join(
            f"{name} {set_row.methods[name].seconds:.3g} s" for name in ("loop", "cholqr") if name in set_row.methods
        )
        lines.append(
            f"Goal 2 (all {set_row.layers} LLaMA-7B layers, R=64, r={set_row.top}, {where}): "
            f"ours = {ours.seconds:.3g} s (< 1 s?): {'MET' if ours.seconds < 1.0 else 'NOT MET'} "
            f"(wall clock {ours.wall_seconds:.3g} s{'; ' + others if others else ''})"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> list[SetRow]:
    """Run the benchmark, print markdown tables to stdout and return the rows.

    ``--threads`` applies for the run only; the previous torch thread count is restored after.
    """
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return run_and_report(args, list(sys.argv[1:] if argv is None else argv))
    finally:
        torch.set_num_threads(threads_before)


def run_and_report(args: argparse.Namespace, argv: list[str]) -> list[SetRow]:
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    device = torch.device(args.device)
    machine = machine_line(args)
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows: list[SetRow] = []
    for set_name in args.sets:
        for rank in args.ranks:
            # Progress on stderr, so that stdout stays a clean report.
            print(f"[{time.perf_counter() - started:6.0f} s] {set_name}, R={rank}", file=sys.stderr, flush=True)
            rows.extend(run_set(LAYER_SETS[set_name], rank, args, dtype))
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()

    print(f"Command: benchmarks/svd.py {' '.join(argv)}".rstrip())
    print(f"Machine: {machine}")
    print(f"1-min load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f}; run took {elapsed:.0f} s")
    for set_name in args.sets:
        print(f"Layer set {set_name}: {LAYER_SETS[set_name].description}")
    print(
        f"Times: {'wall-clock' if args.clock == 'wall' else 'CPU (process_time)'} seconds, "
        f"median of up to {args.repeats} runs, fewer once {args.budget_s:g} s are spent ([n=...] = runs); "
        f"dense and lowrank timed on {args.baseline_layers_per_shape} layer(s) per shape; "
        f"lowrank q = r + {args.oversample}, niter = {args.niter}."
    )
    print("\nWhole layer sets (ours and cholqr: one batched call per shape; loop: one call per layer):\n")
    print(set_table(rows, {name: len(sample_layers(LAYER_SETS[name], args.baseline_layers_per_shape)) for name in args.sets}))
    print("\nPer sampled layer (ours: svd_of_product on that layer alone):\n")
    print(layer_table(rows))
    goals = goal_lines(rows, device, args.clock)
    if goals:
        print()
        for line in goals:
            print(f"- {line}")

    if args.json_path:
        payload: dict[str, Any] = {
            "argv": argv,
            "machine": machine,
            "load_average_before_after": [load_before[0], load_after[0]],
            "clock": args.clock,
            "seconds": elapsed,
            "layer_sets": {name: LAYER_SETS[name].description for name in args.sets},
            "rows": [asdict(row) for row in rows],
        }
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
