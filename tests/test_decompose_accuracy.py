"""Accuracy of the engine's decomposition against ``torch.linalg.svd`` in float64, over many shapes and kinds of factors.

What is held here (spec sections 2 and 6, issue 15 goal 1):

* the top-r right subspace (what initialises LoRA ``A``) and the top singular values agree with the
  dense float64 SVD, in float64 to ~1e-9 and in float32 at least as well as the QR route in float32;
* rank-deficient and zero products: exact zero singular values and orthonormal singular vectors;
* the layers the float32 Grams cannot resolve (steep spectra, ill-conditioned ``A``, ``A`` of rank
  below ``R``) still come out right, through float64 Grams or the QR route.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_hrp.engine.decompose import qr_svd_of_products, svd_of_product, svd_of_products

F32_EPS = torch.finfo(torch.float32).eps


def sin_largest_angle(Vh: torch.Tensor, Vh_reference: torch.Tensor) -> float:
    """``sin`` of the largest principal angle between two row spaces (orthonormal rows), in float64."""
    V, V_reference = Vh.double().mT, Vh_reference.double().mT
    return torch.linalg.matrix_norm(V - V_reference @ (V_reference.mT @ V), ord=2).item()


def dense_reference(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(B.double() @ A.double(), full_matrices=False)


def factors(kind: str, out: int, inp: int, R: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` in float64.

    Kinds: ``gaussian``; ``spread`` (B's singular values over three decades); ``deficient`` (B of rank
    ``R // 2``, the other columns exactly zero); ``steep`` (B's singular values over twelve decades);
    ``ill_a`` (A's singular values over five decades).
    """
    A = torch.randn(R, inp, generator=generator, dtype=torch.float64) / math.sqrt(inp)
    B = torch.randn(out, R, generator=generator, dtype=torch.float64) / math.sqrt(R)
    if kind in ("spread", "steep", "deficient"):
        kept = R // 2 if kind == "deficient" else R
        decades = {"spread": 3.0, "steep": 12.0, "deficient": 3.0}[kind]
        left = torch.randn(out, kept, generator=generator, dtype=torch.float64) / math.sqrt(out)
        rotation = torch.linalg.qr(torch.randn(kept, kept, generator=generator, dtype=torch.float64)).Q
        B = torch.zeros(out, R, dtype=torch.float64)
        B[:, :kept] = (left * torch.logspace(0, -decades, kept, dtype=torch.float64)) @ rotation
    elif kind == "ill_a":
        rows = torch.linalg.qr(torch.randn(inp, R, generator=generator, dtype=torch.float64)).Q.mT
        rotation = torch.linalg.qr(torch.randn(R, R, generator=generator, dtype=torch.float64)).Q
        A = rotation @ (torch.logspace(0, -5, R, dtype=torch.float64)[:, None] * rows)
    return B, A


# (out, in, R, top): tall, wide, square, R == min(out, in), R > in, R > out, top == 1, top == R.
SHAPES = [
    (96, 80, 16, 4),
    (80, 96, 16, 16),
    (120, 120, 24, 1),
    (40, 64, 40, 8),
    (64, 24, 32, 6),
    (20, 72, 32, 5),
]


@pytest.mark.parametrize("kind", ["gaussian", "spread", "deficient"])
@pytest.mark.parametrize(("out", "inp", "R", "top"), SHAPES)
def test_float64_matches_dense_svd(kind, out, inp, R, top):
    generator = torch.Generator().manual_seed(out * 7919 + inp * 31 + R)
    B, A = factors(kind, out, inp, R, generator)
    ours = svd_of_product(B, A, top=top, dtype=torch.float64)
    _, S, Vh = dense_reference(B, A)
    k = min(out, inp, R)
    assert ours.S.shape == (k,) and ours.U.shape == (out, top) and ours.Vh.shape == (top, inp)
    torch.testing.assert_close(ours.S, S[:k], atol=1e-10 * S[0].item(), rtol=1e-9)
    rank = int((S[:k] > 1e-9 * S[0]).sum())
    resolved = min(top, rank)
    # The subspace of the resolved directions (all of them, or up to the rank); the rest is arbitrary.
    if resolved < k and S[resolved - 1] - S[resolved] > 1e-3 * S[0]:
        assert sin_largest_angle(ours.Vh[:resolved], Vh[:resolved]) < 1e-9
    torch.testing.assert_close(ours.Vh @ ours.Vh.mT, torch.eye(top, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(ours.U.mT @ ours.U, torch.eye(top, dtype=torch.float64), atol=1e-9, rtol=0)
    # The triplets reproduce the best rank-top approximation of the product.
    torch.testing.assert_close(ours.U @ torch.diag(ours.S[:top]) @ ours.Vh, (B @ A) - _tail(B @ A, top), atol=1e-9, rtol=0)


def _tail(P: torch.Tensor, top: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(P, full_matrices=False)
    return U[:, top:] @ torch.diag(S[top:]) @ Vh[top:]


@pytest.mark.parametrize("kind", ["gaussian", "spread", "steep", "deficient"])
def test_float32_subspace_at_least_as_accurate_as_the_qr_route(kind):
    """Issue 15 goal 1's accuracy half, on small layers: the Gram route's largest error over the layers is at
    or below the QR route's, both in float32, against the dense float64 SVD."""
    generator = torch.Generator().manual_seed(11)
    products = [factors(kind, out, inp, 32, generator) for out, inp in [(512, 256), (256, 512), (384, 384)] * 2]
    products32 = [(B.float(), A.float()) for B, A in products]
    top = 8
    ours = svd_of_products(products32, [top] * len(products))
    qr = qr_svd_of_products(products32, [top] * len(products))
    ours_errors, qr_errors = [], []
    for (B, A), mine, theirs in zip(products, ours, qr):
        _, S, Vh = dense_reference(B, A)
        assert mine.Vh.dtype == torch.float32 and mine.S.dtype == torch.float32
        ours_errors.append(sin_largest_angle(mine.Vh, Vh[:top]))
        qr_errors.append(sin_largest_angle(theirs.Vh, Vh[:top]))
        # Singular values: float32 accuracy relative to the largest.
        assert ((mine.S[:top].double() - S[:top]).abs() / S[0]).max() < 20 * F32_EPS
    assert max(ours_errors) <= max(qr_errors), (ours_errors, qr_errors)


def test_steep_spectrum_steps_up_to_float64_grams():
    # s_8 / s_1 ~ 1e-4: float32 Grams cannot resolve the top 8 (their error would be ~eps (s_1/s_8)^2 ~ 10),
    # float64 Grams can; the answer still comes back in float32.
    generator = torch.Generator().manual_seed(3)
    B, A = factors("steep", 300, 200, 24, generator)
    ours = svd_of_product(B.float(), A.float(), top=8)
    _, S, Vh = dense_reference(B.float(), A.float())
    assert S[7] / S[0] < 1e-3
    assert ours.Vh.dtype == torch.float32
    assert sin_largest_angle(ours.Vh, Vh[:8]) < 1e-6


def test_ill_conditioned_a_is_still_decomposed_accurately():
    # A's singular values span three decades (A A^T: 1e6), but B undoes that, so P = B A is well conditioned
    # and nothing in P's spectrum asks for more precision. With float32 Grams the orthonormal basis of A's
    # row space would be off by ~eps * 1e6; the engine sees the right vectors are not orthonormal and steps up.
    generator = torch.Generator().manual_seed(4)
    R, inp, out = 16, 300, 200
    rows = torch.linalg.qr(torch.randn(inp, R, generator=generator, dtype=torch.float64)).Q.mT
    rotation = torch.linalg.qr(torch.randn(R, R, generator=generator, dtype=torch.float64)).Q
    spread = torch.logspace(0, -3, R, dtype=torch.float64)
    A = rotation @ (spread[:, None] * rows)
    B = torch.randn(out, R, generator=generator, dtype=torch.float64) @ torch.diag(1 / spread) @ rotation.mT
    B32, A32 = B.float(), A.float()
    ours = svd_of_product(B32, A32, top=4)
    _, S, Vh = dense_reference(B32, A32)
    assert S[3] / S[0] > 0.3  # a flat spectrum: the steepness rule does not fire
    qr = qr_svd_of_products([(B32, A32)], [4])[0]
    assert sin_largest_angle(ours.Vh, Vh[:4]) <= sin_largest_angle(qr.Vh, Vh[:4])
    torch.testing.assert_close(ours.Vh @ ours.Vh.mT, torch.eye(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "case",
    ["zero_B", "zero_A", "B_rank_2", "A_zero_rows", "R_above_in", "R_above_out"],
)
def test_degenerate_products_give_exact_zeros_and_orthonormal_vectors(case, dtype):
    generator = torch.Generator().manual_seed(5)
    out, inp, R, top = 30, 20, 8, 5
    if case == "R_above_in":
        inp = 6
    if case == "R_above_out":
        out = 6
    B = torch.randn(out, R, generator=generator, dtype=torch.float64)
    A = torch.randn(R, inp, generator=generator, dtype=torch.float64)
    if case == "zero_B":
        B.zero_()
    elif case == "zero_A":
        A.zero_()
    elif case == "B_rank_2":
        B = torch.randn(out, 2, generator=generator, dtype=torch.float64) @ torch.randn(2, R, generator=generator, dtype=torch.float64)
    elif case == "A_zero_rows":
        A[3:] = 0
    B, A = B.to(dtype), A.to(dtype)
    ours = svd_of_product(B, A, top=top, dtype=dtype)
    _, S, Vh = dense_reference(B, A)
    k = min(out, inp, R)
    rank = int((S[:k] > 1e-6 * S[0]).sum()) if S[0] > 0 else 0
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    eye = torch.eye(top, dtype=dtype)
    torch.testing.assert_close(ours.Vh @ ours.Vh.mT, eye, atol=tolerance, rtol=0)
    torch.testing.assert_close(ours.U.mT @ ours.U, eye, atol=tolerance, rtol=0)
    assert torch.isfinite(ours.U).all() and torch.isfinite(ours.Vh).all()
    scale = max(S[0].item(), 1.0)
    torch.testing.assert_close(ours.S[:rank].double(), S[:rank], atol=tolerance * scale, rtol=tolerance)
    # Beyond the rank: zero, to the rounding of the dtype the answer is given in; exactly zero where B
    # carries the deficiency (the Gram route handles those; A's go to the QR route).
    assert (ours.S[rank:].double().abs() <= tolerance * scale).all()
    if case in ("zero_B", "B_rank_2", "R_above_out"):
        assert (ours.S[rank:] == 0).all()
    if 0 < rank < top:
        assert sin_largest_angle(ours.Vh[:rank], Vh[:rank]) < 100 * tolerance
    # The sign convention holds for the completed directions too.
    pivots = ours.U.abs().argmax(dim=0, keepdim=True)
    assert (torch.gather(ours.U, 0, pivots) > 0).all()


def test_singular_values_of_a_rank_deficient_float32_product_are_tiny():
    # B of rank 3 in float32: the Grams' rounding would leave ~sqrt(eps) s_1 in the null directions; the
    # callback's "rank below r" warning (s_r <= 1e-6 s_1) relies on seeing them small.
    generator = torch.Generator().manual_seed(6)
    B = torch.randn(40, 3, generator=generator) @ torch.randn(3, 12, generator=generator)
    A = torch.randn(12, 50, generator=generator)
    ours = svd_of_product(B, A, top=6)
    assert (ours.S[:3] > 0).all()
    assert (ours.S[3:] <= 1e-6 * ours.S[0]).all()


def test_grams_keep_full_precision_when_lower_precision_matmuls_are_allowed():
    # Lightning suggests set_float32_matmul_precision("high"): TF32 on CUDA, and on CPUs with bf16 support
    # "medium" runs float32 matmuls through bf16. Such Grams would lose digits; the engine computes at
    # "highest" and gives the user's setting back.
    generator = torch.Generator().manual_seed(7)
    B, A = factors("spread", 256, 192, 32, generator)
    B, A = B.float(), A.float()
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        full = svd_of_product(B, A, top=8)
        torch.set_float32_matmul_precision("medium")
        reduced = svd_of_product(B, A, top=8)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    for name in ("U", "S", "Vh"):
        assert torch.equal(getattr(reduced, name), getattr(full, name)), name


def test_every_layer_gets_the_same_answer_alone_or_in_a_batch():
    # The R x R work of layers with equal R runs as one batch; mixing shapes and tops must not change anything.
    generator = torch.Generator().manual_seed(8)
    shapes = [(50, 40, 16, 4), (40, 50, 16, 8), (30, 30, 12, 3), (50, 40, 16, 2)]
    products = [factors("gaussian", out, inp, R, generator) for out, inp, R, _ in shapes]
    products = [(B.float(), A.float()) for B, A in products]
    tops = [top for *_, top in shapes]
    together = svd_of_products(products, tops)
    for (B, A), top, batched in zip(products, tops, together):
        alone = svd_of_product(B, A, top=top)
        torch.testing.assert_close(batched.U, alone.U, atol=1e-6, rtol=0)
        torch.testing.assert_close(batched.S, alone.S, atol=1e-6, rtol=0)
        torch.testing.assert_close(batched.Vh, alone.Vh, atol=1e-6, rtol=0)


def test_inputs_in_bfloat16_are_decomposed_in_the_compute_dtype():
    generator = torch.Generator().manual_seed(9)
    B, A = factors("gaussian", 64, 48, 16, generator)
    B16, A16 = B.to(torch.bfloat16), A.to(torch.bfloat16)
    ours = svd_of_products([(B16, A16)], [4])[0]
    assert ours.U.dtype == ours.S.dtype == ours.Vh.dtype == torch.float32
    _, _, Vh = dense_reference(B16, A16)
    assert sin_largest_angle(ours.Vh, Vh[:4]) < 1e-4
