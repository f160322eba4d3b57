"""Study: where does the Gram route lose accuracy to the QR route? (The evidence behind the engine's steepness rule.)

The Gram route squares the factors' condition numbers: its top-r subspace error is about
``eps s_1^2 / (s_r^2 - s_{r+1}^2)``, the QR route's about ``eps s_1 / (s_r - s_{r+1})``. Their ratio grows
with the *steepness* ``s_1 / (s_r + s_{r+1})``. This script measures both routes in float32, the Gram
route alone (:func:`lightning_hrp.engine.decompose.gram_route_only`, no step up), on products whose
``B`` has singular values spread over 1 to 10 decades, against the QR route in float64, and bins the
ratio of their errors by steepness. ``svd_of_products`` steps a layer up to float64 Grams when the
steepness exceeds ``_STEEPNESS``; the table shows where that bound sits against the crossover.

Run ``python -m benchmarks.gram_route_study`` from the repository root (about a minute on one core).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence

if not __package__:
    sys.exit("Run this study from the repository root as a module: python -m benchmarks.gram_route_study --help")

import torch

from benchmarks.harness import RunClock, header_lines, machine_line, torch_threads
from lightning_hrp.engine import decompose

BINS = (1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 20.0, 100.0, math.inf)


def sin_largest_angle(Vh: torch.Tensor, Vh_reference: torch.Tensor) -> float:
    V, V_reference = Vh.double().mT, Vh_reference.double().mT
    return torch.linalg.matrix_norm(V - V_reference @ (V_reference.mT @ V), ord=2).item()


def spread_product(
    out: int, inp: int, rank: int, decades: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` Gaussian; ``B`` with singular values log-spaced over ``decades`` (jittered), in float32."""
    spread = torch.logspace(0, -decades, rank, dtype=torch.float64)
    jitter = 1 + 0.3 * torch.rand(rank, generator=generator, dtype=torch.float64)
    spread = (spread * jitter).sort(descending=True).values
    left = torch.randn(out, rank, generator=generator, dtype=torch.float64) / math.sqrt(out)
    rotation = torch.linalg.qr(torch.randn(rank, rank, generator=generator, dtype=torch.float64)).Q
    A = torch.randn(rank, inp, generator=generator, dtype=torch.float64) / math.sqrt(inp)
    return ((left * spread) @ rotation).float(), A.float()


def main(argv: Sequence[str] | None = None) -> list[tuple[float, float, float]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gram_route_study", description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=64, help="preheat rank R")
    parser.add_argument("--tops", nargs="+", type=int, default=[4, 8, 16, 32], help="target ranks r")
    parser.add_argument("--decades", nargs="+", type=float, default=[1, 2, 3, 4, 5, 6, 8, 10])
    parser.add_argument("--repeats", type=int, default=2, help="products per (shape, decades, r)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if max(args.tops) >= args.rank:
        parser.error(f"every --tops value must be below --rank, got {args.tops} and {args.rank}.")
    with torch_threads(args.threads):
        return run(args, list(sys.argv[1:] if argv is None else argv))


def run(args: argparse.Namespace, argv: list[str]) -> list[tuple[float, float, float]]:
    generator = torch.Generator().manual_seed(args.seed)
    clock = RunClock.start()
    samples = []  # (steepness, Gram route error, QR route error)
    for decades in args.decades:
        for out, inp in ((2048, 2048), (4096, 1024), (1024, 4096)):
            for top in args.tops:
                for _ in range(args.repeats):
                    B, A = spread_product(out, inp, args.rank, decades, generator)
                    (gram,) = decompose.gram_route_only([(B, A)], [top])
                    (qr,) = decompose.qr_svd_of_products([(B, A)], [top])
                    reference = decompose.qr_svd_of_product(B, A, dtype=torch.float64)
                    S = reference.S
                    steepness = (S[0] / (S[top - 1] + S[top])).item()
                    errors = (sin_largest_angle(svd.Vh, reference.Vh[:top]) for svd in (gram, qr))
                    samples.append((steepness, *errors))
    clock.stop()

    machine = machine_line(torch.device("cpu"))
    for line in header_lines("gram_route_study", argv, machine, clock.load_before, clock.load_after, clock.seconds):
        print(line)
    print(
        f"Products: R = {args.rank}, r in {args.tops}, shapes 2048x2048, 4096x1024, 1024x4096, B's singular values over "
        f"{args.decades} decades, {args.repeats} per setting; errors: sin θ of the top-r right subspace against the "
        f"float64 QR route; both routes in float32. The engine steps up where steepness > {decompose._STEEPNESS:g}.\n"
    )
    print("| steepness s_1 / (s_r + s_r+1) | products | Gram route worse in | median Gram / QR error | largest Gram / QR error |")
    print("|---|---|---|---|---|")
    for low, high in zip(BINS, BINS[1:]):
        chosen = [sample for sample in samples if low <= sample[0] < high]
        if not chosen:
            continue
        ratios = [gram / qr for _, gram, qr in chosen]
        print(
            f"| [{low:g}, {high:g}) | {len(chosen)} | {sum(ratio > 1 for ratio in ratios)} "
            f"| {statistics.median(ratios):.2g} | {max(ratios):.2g} |"
        )
    return samples


if __name__ == "__main__":
    main()
