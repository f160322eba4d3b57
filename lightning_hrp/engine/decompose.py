"""Exact, batched SVD of low-rank products ``B @ A`` through their QR core (spec section 2).

For ``B`` of shape ``(out, R)`` and ``A`` of shape ``(R, in)`` the product is never formed:
``B = Q_b R_b`` and ``A^T = Q_a R_a`` give ``B A = Q_b (R_b R_a^T) Q_a^T``, so the SVD of the
small core ``C = R_b R_a^T`` yields the SVD of the product. That costs ``O((in + out) R^2)``
instead of ``O(in * out * min(in, out))`` and is exact up to floating point.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

_COMPUTE_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class ProductSVD:
    """The leading singular triplets of ``B @ A``, batched over leading dimensions.

    Attributes:
        U: Left singular vectors, ``(..., out, top)``.
        S: All ``k = min(out, in, R)`` singular values, descending, ``(..., k)``.
        Vh: Right singular vectors as rows, ``(..., top, in)``.
    """

    U: Tensor
    S: Tensor
    Vh: Tensor


def svd_of_product(
    B: Tensor, A: Tensor, *, top: int | None = None, dtype: torch.dtype = torch.float32
) -> ProductSVD:
    """Thin SVD of ``B @ A`` without materialising the product.

    Args:
        B: ``(..., out, R)``.
        A: ``(..., R, in)``.
        top: How many singular vectors to return (default: all ``min(out, in, R)``).
        dtype: Compute dtype, float32 or float64, whatever the inputs' dtype.

    Returns:
        The singular triplets, in ``dtype``, with each left singular vector's largest-magnitude
        entry made positive (and the matching right vector flipped with it), so the answer does
        not depend on the LAPACK/cuSOLVER build that computed it.
    """
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}.")
    if B.shape[-1] != A.shape[-2] or B.shape[:-2] != A.shape[:-2]:
        raise ValueError(f"B {tuple(B.shape)} and A {tuple(A.shape)} do not form a product B @ A.")
    k = min(B.shape[-2], A.shape[-1], B.shape[-1])
    top = k if top is None else top
    if not 0 < top <= k:
        raise ValueError(f"top must lie in [1, {k}] for B {tuple(B.shape)} and A {tuple(A.shape)}, got {top}.")

    q_b, r_b = torch.linalg.qr(B.to(dtype))  # (..., out, kb), (..., kb, R)
    q_a, r_a = torch.linalg.qr(A.to(dtype).mT)  # (..., in, ka), (..., ka, R)
    u_core, S, vh_core = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)
    U = q_b @ u_core[..., :top]
    Vh = vh_core[..., :top, :] @ q_a.mT
    U, Vh = _fix_signs(U, Vh)
    return ProductSVD(U=U, S=S[..., :k], Vh=Vh)


def _fix_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each singular pair so that the largest-magnitude entry of ``U[:, j]`` is positive."""
    pivot = U.abs().argmax(dim=-2, keepdim=True)
    signs = torch.gather(U, -2, pivot).sign()
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs.mT


def group_by_key(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Indices of ``keys`` grouped by equal key, in first-seen order."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for index, key in enumerate(keys):
        groups[key].append(index)
    return dict(groups)


def product_group_key(B: Tensor, A: Tensor, top: int) -> tuple:
    """Products sharing this key can be stacked into one batched decomposition."""
    return (tuple(B.shape), tuple(A.shape), top, B.device)


def svd_of_products(
    products: Sequence[tuple[Tensor, Tensor]],
    tops: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
) -> list[ProductSVD]:
    """Decompose many products, one batched call per group of equal shapes.

    Args:
        products: ``(B, A)`` pairs, one per layer.
        tops: For each pair, how many singular vectors to keep.
        dtype: Compute dtype, float32 or float64.

    Returns:
        One unbatched :class:`ProductSVD` per pair, in input order.
    """
    if len(products) != len(tops):
        raise ValueError(f"got {len(products)} products but {len(tops)} values of top.")
    keys = [product_group_key(B, A, top) for (B, A), top in zip(products, tops)]
    results: list[ProductSVD | None] = [None] * len(products)
    for indices in group_by_key(keys).values():
        stacked = svd_of_product(
            torch.stack([products[i][0] for i in indices]),
            torch.stack([products[i][1] for i in indices]),
            top=tops[indices[0]],
            dtype=dtype,
        )
        for position, index in enumerate(indices):
            results[index] = ProductSVD(stacked.U[position], stacked.S[position], stacked.Vh[position])
    return results  # type: ignore[return-value]


def energy_kept(S: Tensor, top: int) -> float:
    """Share of the squared Frobenius norm that the ``top`` leading singular values hold (NaN for zero)."""
    total = float((S.double() ** 2).sum())
    return float((S[:top].double() ** 2).sum()) / total if total > 0 else float("nan")


def subspace_drift(previous: Tensor, current: Tensor) -> float:
    """How far the row space of ``current`` moved from ``previous`` (both ``(r, in)``, orthonormal rows).

    ``1 - ||previous @ current^T||_F^2 / r``: 0 for the same subspace, 1 for orthogonal ones (the
    mean squared sine of the principal angles).
    """
    overlap = previous.double() @ current.double().mT
    return float(1.0 - (overlap**2).sum() / previous.shape[-2])
