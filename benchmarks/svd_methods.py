"""What the decomposition benchmark compares the engine with (floor, dense, randomised, float64 reference) and how it grades them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_hrp.engine.decompose import ProductSVD, qr_svd_of_product


def gram_floor(products: Sequence[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """The two ``R x R`` Gram matrices of every layer: the one pass over the factors a Gram route needs."""
    return [(B.mT @ B, A @ A.mT) for B, A in products]


def reference_svd(B: Tensor, A: Tensor, *, dtype: torch.dtype) -> ProductSVD:
    """All ``min(out, in, R)`` singular triplets in float64, computed independently of the methods compared.

    For float32 methods, the QR route in float64 (exact to ~1e-15 here, far below their errors); for
    float64 methods that would grade the ``qr`` method against itself, so the dense SVD of the product
    formed in float64 (slow: use small layer sets with ``--dtype float64``).
    """
    k = min(B.shape[0], A.shape[1], B.shape[1])
    if dtype != torch.float64:
        return qr_svd_of_product(B, A, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
    return ProductSVD(U=U[:, :k], S=S[:k], Vh=Vh[:k])


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
