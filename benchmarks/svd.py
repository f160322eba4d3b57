"""Benchmark: the engine's SVD of ``B @ A`` against its floor, the QR route, and dense and randomised SVDs.

Every time is reported as a ratio to the **Gram floor**: forming the two ``R x R`` Gram matrices
``B^T B`` and ``A A^T`` of every layer, the one pass over the factors that any Gram-based route must
make. Methods, each giving the top-``r`` singular triplets of every layer's ``P = B @ A``:

* ``ours``: :func:`lightning_hrp.engine.decompose.svd_of_products`, the engine's entry point (Gram
  route, per-layer Grams, the ``R x R`` work batched), timed on every layer;
* ``loop``: :func:`~lightning_hrp.engine.decompose.svd_of_product` layer by layer (the ``R x R`` work
  not batched), timed on every layer;
* ``qr``: :func:`~lightning_hrp.engine.decompose.qr_svd_of_products`, the QR route (what the engine
  did before the Gram route), stacked by shape, timed on every layer;
* ``dense``: ``torch.linalg.svd`` of the formed ``P``; ``lowrank``: ``torch.svd_lowrank(P, q=r + 10)``.
  Both are timed on a sample (by default the first layer of each shape) and extrapolated to the set
  as ``sum over shapes of (layers of that shape) x (median time per layer)``.

The floor and ``ours`` are timed in alternating rounds, so the goal's ratio holds within one
round; the report gives the median of the per-round ratios next to the ratio of the medians.

Factors (``--factors``): ``gaussian`` (``B ~ N(0, 1/R)``, ``A ~ N(0, 1/in)``); ``preheat``, like a
preheated adapter: ``A`` Gaussian, ``B`` of rank ``3R/4`` with singular values spread over three
decades and the last ``R/4`` columns exactly zero; ``steep``: ``B``'s singular values spread over
eight decades, where the Gram route loses to the QR route and the engine steps up to float64 Grams.

Accuracy: ``sin`` of the largest principal angle between the top-``r`` right singular subspaces (the
rows of ``Vh`` that initialise LoRA ``A``) of a method and of a float64 reference (the QR route in
float64, exact to ~1e-15 here; with ``--dtype float64`` the dense float64 SVD, so that the ``qr``
method is not graded against itself), ``||V V^T - V_ref V_ref^T||_2``, maximised over the sampled
layers, and the relative spectral gap ``(s_r - s_{r+1}) / s_1`` that such errors scale with.

The layer sets and factors: :mod:`benchmarks.svd_layers`; the baselines and the grading:
:mod:`benchmarks.svd_methods`; the result rows and tables: :mod:`benchmarks.svd_report`.
Run ``python -m benchmarks.svd --help`` from the repository root; results and commands are in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

if not __package__:
    sys.exit("Run this benchmark from the repository root as a module: python -m benchmarks.svd --help")

import torch

from benchmarks.harness import (
    CLOCKS,
    RunClock,
    Timing,
    header_lines,
    machine_line,
    measure,
    measure_interleaved,
    paired_ratio,
    print_goal_lines,
    torch_threads,
)
from benchmarks.svd_layers import FACTORS, LAYER_SETS, LayerSet, LayerShape, make_products, sample_layers
from benchmarks.svd_methods import dense_svd, gram_floor, lowrank_svd, reference_svd, relative_sv_error, sin_largest_angle
from benchmarks.svd_report import LayerRow, MethodResult, SetRow, goal_lines, layer_table, max_or_none, set_table
from lightning_hrp.engine.decompose import ProductSVD, qr_svd_of_products, svd_of_product, svd_of_products

COMPARISONS = ("loop", "qr", "dense", "lowrank")
FULL_DEFAULTS = {
    "sets": ["bert-base", "llama-7b"],
    "ranks": [16, 64, 256],
    "tops": [8, 16],
    "factors": ["gaussian", "preheat"],
    "repeats": 5,
}
QUICK_DEFAULTS = {"sets": ["tiny"], "ranks": [16, 64], "tops": [8, 16], "factors": list(FACTORS), "repeats": 3}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.svd",
        description="Time the engine's SVD of B@A against its Gram floor, the QR route, torch.linalg.svd and "
        "torch.svd_lowrank.",
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
    parser.add_argument("--factors", nargs="+", choices=FACTORS, help="kinds of factors (see the module docstring)")
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
        "--reference-layers-per-shape",
        type=int,
        default=3,
        help="layers of each shape whose results are checked against the float64 reference",
    )
    parser.add_argument(
        "--compare",
        nargs="*",
        choices=COMPARISONS,
        default=list(COMPARISONS),
        help="methods to compare with ours and the Gram floor (give none to time only those)",
    )
    parser.add_argument(
        "--dense-all-ranks", action="store_true", help="run the dense baseline at every R (default: per-set ranks)"
    )
    parser.add_argument(
        "--dense-all-factors",
        action="store_true",
        help="run the dense baseline for every kind of factors (default: only the first of --factors)",
    )
    parser.add_argument("--oversample", type=int, default=10, help="svd_lowrank q = r + oversample")
    parser.add_argument("--niter", type=int, default=2, help="svd_lowrank power iterations")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
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
    for name in ("repeats", "baseline_layers_per_shape", "reference_layers_per_shape", "oversample"):
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


def run_set(layer_set: LayerSet, rank: int, factors: str, args: argparse.Namespace, dtype: torch.dtype) -> list[SetRow]:
    """All timings and errors for one layer set, kind of factors and preheat rank (one row per target rank)."""
    products = make_products(layer_set, rank, factors, dtype=dtype, device=torch.device(args.device), seed=args.seed)
    shapes = layer_set.layer_shapes()
    baseline_layers = sample_layers(layer_set, args.baseline_layers_per_shape)
    reference_layers = sorted(set(sample_layers(layer_set, args.reference_layers_per_shape)) | set(baseline_layers))
    references = {i: reference_svd(*products[i], dtype=dtype) for i in reference_layers}

    def timed(operation: Callable[[], Any]) -> tuple[Any, Timing]:
        return measure(operation, repeats=args.repeats, budget_s=args.budget_s, clock=args.clock)

    run_dense = (
        "dense" in args.compare
        and (args.dense_all_ranks or layer_set.dense_ranks is None or rank in layer_set.dense_ranks)
        and (args.dense_all_factors or factors == args.factors[0])
    )
    dense_results: dict[int, tuple[ProductSVD, Timing]] = {}
    if run_dense:
        keep = max(args.tops)
        for index in baseline_layers:
            B, A = products[index]
            dense_results[index] = timed(lambda: dense_svd(B, A, keep))

    def max_error(results: Sequence[ProductSVD], top: int) -> float:
        return max(sin_largest_angle(results[i].Vh, references[i].Vh[:top]) for i in reference_layers)

    # Warm up every code path (LAPACK's first calls, allocator) before anything is timed.
    svd_of_products(products[:1], [min(args.tops)], dtype=dtype)
    rows = []
    for top in args.tops:
        row = SetRow(set_name=layer_set.name, factors=factors, layers=len(products), preheat_rank=rank, top=top)
        tops = [top] * len(products)
        ours = svd_of_products(products, tops, dtype=dtype)  # the results whose errors are reported
        interleaved = measure_interleaved(
            {"grams": lambda: gram_floor(products), "ours": lambda: svd_of_products(products, tops, dtype=dtype)},
            repeats=args.repeats,
            budget_s=args.budget_s,
            clock=args.clock,
        )
        row.methods["grams"] = whole_set_result(interleaved["grams"], None)
        row.methods["ours"] = whole_set_result(interleaved["ours"], max_error(ours, top))
        row.paired_ratio = paired_ratio(interleaved["ours"], interleaved["grams"])
        if "loop" in args.compare:
            looped, timing = timed(lambda: [svd_of_product(B, A, top=top, dtype=dtype) for B, A in products])
            row.methods["loop"] = whole_set_result(timing, max_error(looped, top))
            del looped
        qr = None
        if "qr" in args.compare:
            qr, timing = timed(lambda: qr_svd_of_products(products, tops, dtype=dtype))
            row.methods["qr"] = whole_set_result(timing, max_error(qr, top))

        lowrank_timings: dict[int, Timing] = {}
        for index in reference_layers:
            B, A = products[index]
            reference = references[index]
            layer_row = LayerRow(shape=shapes[index].label, layer_index=index)
            layer_row.sin_theta["ours"] = sin_largest_angle(ours[index].Vh, reference.Vh[:top])
            if qr is not None:
                layer_row.sin_theta["qr"] = sin_largest_angle(qr[index].Vh, reference.Vh[:top])
            layer_row.ours_rel_sv_error = relative_sv_error(ours[index].S, reference.S, top)
            s_1, s_r, s_next = (reference.S[i].item() if i < reference.S.shape[-1] else 0.0 for i in (0, top - 1, top))
            layer_row.relative_gap = (s_r - s_next) / s_1 if s_1 > 0 else None
            layer_row.steepness = s_1 / (s_r + s_next) if s_r + s_next > 0 else math.inf
            if index in dense_results:
                dense, dense_timing = dense_results[index]
                layer_row.dense_s, layer_row.dense_runs = dense_timing.median, dense_timing.runs
                layer_row.sin_theta["dense"] = sin_largest_angle(dense.Vh[:top], reference.Vh[:top])
            if "lowrank" in args.compare and index in baseline_layers:
                lowrank, lowrank_timings[index] = timed(lambda: lowrank_svd(B, A, top, args.oversample, args.niter))
                layer_row.lowrank_s, layer_row.lowrank_runs = lowrank_timings[index].median, lowrank_timings[index].runs
                layer_row.sin_theta["lowrank"] = sin_largest_angle(lowrank.Vh, reference.Vh[:top])
            row.layer_rows.append(layer_row)
        del ours, qr

        for name, timings in (("dense", {i: t for i, (_, t) in dense_results.items()}), ("lowrank", lowrank_timings)):
            if timings:
                row.methods[name] = extrapolate(
                    shapes,
                    timings,
                    max_sin_theta=max_or_none(layer.sin_theta.get(name) for layer in row.layer_rows),
                )
        rows.append(row)
    return rows


def whole_set_result(timing: Timing, max_sin_theta: float | None) -> MethodResult:
    return MethodResult(
        seconds=timing.median,
        wall_seconds=timing.wall_median,
        runs=timing.runs,
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
        runs=min(t.runs for t in timings.values()),
        extrapolated=len(timings) < len(shapes),
        max_sin_theta=max_sin_theta,
    )


def main(argv: Sequence[str] | None = None) -> list[SetRow]:
    """Run the benchmark, print markdown tables to stdout and return the rows.

    ``--threads`` applies for the run only; the previous torch thread count is restored after.
    """
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run_and_report(args, list(sys.argv[1:] if argv is None else argv))


def run_and_report(args: argparse.Namespace, argv: list[str]) -> list[SetRow]:
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    device = torch.device(args.device)
    machine = machine_line(device, [f"dtype {args.dtype}"])
    clock = RunClock.start()
    rows: list[SetRow] = []
    for set_name in args.sets:
        for factors in args.factors:
            for rank in args.ranks:
                # Progress on stderr, so that stdout stays a clean report.
                elapsed = time.perf_counter() - clock.started
                print(f"[{elapsed:6.0f} s] {set_name}, {factors}, R={rank}", file=sys.stderr, flush=True)
                rows.extend(run_set(LAYER_SETS[set_name], rank, factors, args, dtype))
    clock.stop()

    for line in header_lines("svd", argv, machine, clock.load_before, clock.load_after, clock.seconds):
        print(line)
    for set_name in args.sets:
        print(f"Layer set {set_name}: {LAYER_SETS[set_name].description}")
    print(
        f"Times: {'wall-clock' if args.clock == 'wall' else 'CPU (process_time)'} seconds, "
        f"median of up to {args.repeats} runs, fewer once {args.budget_s:g} s are spent ([n=...] = runs); the Gram floor "
        f"and ours in alternating rounds; dense and lowrank timed on {args.baseline_layers_per_shape} layer(s) per shape; "
        f"errors against the float64 {'dense SVD' if dtype == torch.float64 else 'QR route'} on "
        f"{args.reference_layers_per_shape} layer(s) per shape; "
        f"lowrank q = r + {args.oversample}, niter = {args.niter}."
    )
    sampled = {
        name: (
            len(sample_layers(LAYER_SETS[name], args.baseline_layers_per_shape)),
            len(sample_layers(LAYER_SETS[name], args.reference_layers_per_shape)),
        )
        for name in args.sets
    }
    print("\nWhole layer sets, as multiples of the Gram floor (forming B^T B and A A^T of every layer):\n")
    print(set_table(rows, sampled))
    print("\nPer layer shape (errors: sin θ of the top-r right subspace against the float64 reference, largest over "
          "the sampled layers):\n")
    print(layer_table(rows))
    print_goal_lines(goal_lines(rows, device, args.clock))

    if args.json_path:
        payload: dict[str, Any] = {
            "argv": argv,
            "machine": machine,
            "load_average_before_after": [clock.load_before, clock.load_after],
            "clock": args.clock,
            "seconds": clock.seconds,
            "layer_sets": {name: LAYER_SETS[name].description for name in args.sets},
            "rows": [asdict(row) for row in rows],
        }
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
