"""Exact SVD of many low-rank products ``P = B @ A`` without forming them (spec sections 2 and 6).

``B`` is ``(out, R)``, ``A`` is ``(R, in)``. Two routes, both exact up to rounding:

* **Gram route** (what :func:`svd_of_products` runs first). Per layer, the two ``R x R`` Gram matrices
  ``G_A = A A^T`` and ``G_B = B^T B`` (one GEMM each over the long side, nothing stacked). Then, in
  float64 and batched over all layers: ``G_A = L L^T`` (Cholesky), so ``A = L Q`` with orthonormal
  rows ``Q = L^{-1} A``, and ``P^T P = Q^T K Q`` with ``K = L^T G_B L = W diag(s^2) W^T`` (eigh): ``s``
  are the singular values of ``P``. Back with one thin product per side:
  ``V_r^T = (L^{-T} W_r)^T A`` and ``U_r = B (L W_r) / s_r``. Cost: the Grams (``(in + out) R^2``),
  ``O(R^3)`` and ``(in + out) R r``.
* **QR route** (:func:`qr_svd_of_product`). Thin QRs ``B = Q_b R_b``, ``A^T = Q_a R_a``, the SVD of the
  ``R x R`` core ``R_b R_a^T``. Backward stable, and about ten times the Grams' time on a CPU.

The Grams square the factors' condition numbers. The top-r right subspace then carries an error of
about ``eps s_1^2 / (s_r^2 - s_{r+1}^2)``, against ``eps s_1 / (s_r - s_{r+1})`` for the QR route: their
ratio grows with the steepness ``s_1 / (s_r + s_{r+1})``. Measured in float32 (``BENCHMARKS.md``), the
Gram route was the more accurate (by about 5x on Gaussian and preheat-like factors) below a steepness
of 4 and lost on steeper spectra. So each layer takes the cheapest step that resolves it:

1. the Gram route with Grams in the compute dtype;
2. if that cannot resolve the layer, the Gram route with float64 Grams. "Cannot resolve" means: the
   spectrum is too steep for Grams of that precision (``eps_grams s_1 > 3 eps_out (s_r + s_{r+1})``),
   a top-r singular value is below the Grams' rounding, ``A A^T`` is not numerically positive
   definite, or the right singular vectors come out orthonormal to worse than ``100 eps``;
3. if float64 Grams cannot either (``A`` rank-deficient), the QR route in float64; layers with
   ``R > in`` (``A A^T`` singular by shape) go there directly.

On the Gram route, singular values below the Grams' rounding (``s_j^2 <= R eps s_1^2`` at the precision
the Grams were formed in) are reported as exactly 0, and their singular vectors are an orthonormal
completion. The ``R x R`` work runs on the host whatever the factors' device (see ``_SMALL_WORK_DEVICE``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_hrp.engine.batching import map_grouped

_COMPUTE_DTYPES = (torch.float32, torch.float64)
# Step up a precision when eps_grams * s_1 > _STEEPNESS * eps_out * (s_r + s_{r+1}): from there on the Gram
# route's predicted error approaches the QR route's. Measured (benchmarks/gram_route_study.py, BENCHMARKS.md):
# in float32 the Gram route lost to the QR route in some products from a steepness s_1 / (s_r + s_{r+1}) of
# 4 on and in the median from about 7, never below 4; 3 keeps a margin.
_STEEPNESS = 3.0
# Right singular vectors must be orthonormal to this many eps of the output dtype, or the layer steps up.
_ORTHONORMALITY_EPS = 100.0
# The R x R work is latency-bound; on the host, LAPACK runs it without the per-matrix launches that
# cuSOLVER's eigh makes for R > 32.
_SMALL_WORK_DEVICE = torch.device("cpu")


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


def svd_of_products(
    products: Sequence[tuple[Tensor, Tensor]],
    tops: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
) -> list[ProductSVD]:
    """The top singular triplets of every ``B @ A``, without forming the products.

    Each layer's Grams are formed on its own (no stacked copies of the factors); the small ``R x R``
    work of all layers with the same ``R`` runs as one batch. See the module docstring for the route.

    Args:
        products: ``(B, A)`` pairs, one per layer: ``B`` ``(out, R)``, ``A`` ``(R, in)``.
        tops: For each pair, how many singular vectors to keep (``1 <= top <= min(out, in, R)``).
        dtype: Compute and output dtype, float32 or float64, whatever the factors' dtype.

    Returns:
        One :class:`ProductSVD` per pair, in input order, in ``dtype``. The largest-magnitude entry of
        each left singular vector is positive (the right vector flipped with it), so the answer does not
        depend on the BLAS/LAPACK build that computed it.
    """
    _check_dtype(dtype)
    if len(products) != len(tops):
        raise ValueError(f"got {len(products)} products but {len(tops)} values of top.")
    for (B, A), top in zip(products, tops):
        if B.dim() != 2 or A.dim() != 2:
            raise ValueError(f"each product needs 2-D factors, got B {tuple(B.shape)} and A {tuple(A.shape)}.")
        _check_top(B, A, top)

    results: list[ProductSVD | None] = [None] * len(products)
    # With R > in, A A^T is singular whatever the precision: straight to the QR route.
    pending = [i for i, (_, A) in enumerate(products) if A.shape[0] <= A.shape[1]]
    singular = [i for i, (_, A) in enumerate(products) if A.shape[0] > A.shape[1]]
    gram_precisions = (torch.float32, torch.float64) if dtype == torch.float32 else (torch.float64,)
    with _full_precision_float32_matmuls():
        for precision in gram_precisions:
            if pending:
                steps = _gram_step(products, tops, pending, precision, dtype, keep_unresolved=False)
                for index, step in zip(pending, steps):
                    if step is not None and step[1]:
                        results[index] = step[0]
                pending = [index for index in pending if results[index] is None]
        pending += singular
        if pending:
            exact = qr_svd_of_products([products[i] for i in pending], [tops[i] for i in pending], dtype=torch.float64)
            for index, svd in zip(pending, exact):
                results[index] = ProductSVD(svd.U.to(dtype), svd.S.to(dtype), svd.Vh.to(dtype))
    return results  # type: ignore[return-value]


def svd_of_product(
    B: Tensor, A: Tensor, *, top: int | None = None, dtype: torch.dtype = torch.float32
) -> ProductSVD:
    """Thin SVD of ``B @ A`` without forming it, batched over leading dimensions.

    The same computation as :func:`svd_of_products`, with the leading dimensions as the layers.

    Args:
        B: ``(..., out, R)``.
        A: ``(..., R, in)``.
        top: How many singular vectors to return (default: all ``min(out, in, R)``).
        dtype: Compute and output dtype, float32 or float64, whatever the inputs' dtype.
    """
    _check_dtype(dtype)
    top = _check_top(B, A, top)
    batch = B.shape[:-2]
    flat_B, flat_A = B.reshape(-1, *B.shape[-2:]), A.reshape(-1, *A.shape[-2:])
    if flat_B.shape[0] == 0:  # nothing to stack
        return qr_svd_of_product(B, A, top=top, dtype=dtype)
    svds = svd_of_products(list(zip(flat_B, flat_A)), [top] * flat_B.shape[0], dtype=dtype)
    return ProductSVD(
        U=torch.stack([svd.U for svd in svds]).reshape(*batch, *svds[0].U.shape),
        S=torch.stack([svd.S for svd in svds]).reshape(*batch, *svds[0].S.shape),
        Vh=torch.stack([svd.Vh for svd in svds]).reshape(*batch, *svds[0].Vh.shape),
    )


def gram_route_only(
    products: Sequence[tuple[Tensor, Tensor]],
    tops: Sequence[int],
    *,
    gram_dtype: torch.dtype = torch.float32,
    dtype: torch.dtype = torch.float32,
) -> list[ProductSVD | None]:
    """The Gram route alone, with Grams in ``gram_dtype`` and none of :func:`svd_of_products`' steps up.

    For measuring where that route loses accuracy (``benchmarks/gram_route_study.py``); use
    :func:`svd_of_products` for answers. ``None`` where ``A A^T`` is not numerically positive definite.
    """
    _check_dtype(dtype)
    _check_dtype(gram_dtype)
    with _full_precision_float32_matmuls():
        steps = _gram_step(products, tops, list(range(len(products))), gram_dtype, dtype, keep_unresolved=True)
    return [None if step is None else step[0] for step in steps]


def qr_svd_of_product(
    B: Tensor, A: Tensor, *, top: int | None = None, dtype: torch.dtype = torch.float32
) -> ProductSVD:
    """The QR route (spec section 2): thin QRs of ``B`` and ``A^T``, SVD of the ``R x R`` core.

    Backward stable whatever the factors' conditioning; :func:`svd_of_products` uses it for the
    layers the Gram route cannot resolve. Same arguments and sign convention as :func:`svd_of_product`.
    """
    _check_dtype(dtype)
    top = _check_top(B, A, top)
    k = min(B.shape[-2], A.shape[-1], B.shape[-1])
    q_b, r_b = torch.linalg.qr(B.to(dtype))  # (..., out, kb), (..., kb, R)
    q_a, r_a = torch.linalg.qr(A.to(dtype).mT)  # (..., in, ka), (..., ka, R)
    u_core, S, vh_core = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)
    U, Vh = _fix_signs(q_b @ u_core[..., :top], vh_core[..., :top, :] @ q_a.mT)
    return ProductSVD(U=U, S=S[..., :k], Vh=Vh)


def qr_svd_of_products(
    products: Sequence[tuple[Tensor, Tensor]], tops: Sequence[int], *, dtype: torch.dtype = torch.float32
) -> list[ProductSVD]:
    """:func:`qr_svd_of_product` for many layers: one call per group of equal shapes, stacked."""

    def decompose_stacked(_: list[int], group: list[tuple[tuple[Tensor, Tensor], int]]) -> list[ProductSVD]:
        top = group[0][1]
        stacked = qr_svd_of_product(
            torch.stack([B for (B, _), _ in group]), torch.stack([A for (_, A), _ in group]), top=top, dtype=dtype
        )
        return [ProductSVD(stacked.U[i], stacked.S[i], stacked.Vh[i]) for i in range(len(group))]

    keys = [product_group_key(B, A, top) for (B, A), top in zip(products, tops)]
    return map_grouped(list(zip(products, tops)), keys, decompose_stacked)


def product_group_key(B: Tensor, A: Tensor, top: int) -> tuple:
    """Products sharing this key can be stacked into one batched decomposition."""
    return (tuple(B.shape), tuple(A.shape), top, B.device)


@dataclass(frozen=True)
class _SmallParts:
    """One layer's results of the ``R x R`` work.

    Attributes:
        S: The ``R`` singular values of ``P``, descending, exact zeros below the Grams' rounding, on the
            factors' device in the output dtype.
        right: ``(L^{-T} W_t)^T`` (``t x R``, ``t`` the largest top of its batch): ``Vh = right A``.
        left: ``(L W_t / s)^T`` (``t x R``, zero rows where ``s = 0``): ``U = B left^T``. Both
            contiguous (MKL's GEMM was up to 1.9x faster with the narrow operand laid out so), on the
            factors' device, in the Grams' dtype.
        factored: ``A A^T`` has a Cholesky factor (and ``B^T B`` is finite).
        sharp: The spectrum is resolved at this precision (the steepness rule).
        complete_left: A top singular value is zero or near the Grams' rounding, so ``U`` needs an
            orthonormal completion.
    """

    S: Tensor
    right: Tensor
    left: Tensor
    factored: bool
    sharp: bool
    complete_left: bool


def _gram_step(
    products: Sequence[tuple[Tensor, Tensor]],
    tops: Sequence[int],
    indices: list[int],
    precision: torch.dtype,
    out_dtype: torch.dtype,
    *,
    keep_unresolved: bool,
) -> list[tuple[ProductSVD, bool] | None]:
    """The Gram route for ``products[indices]`` with Grams formed in ``precision``.

    Returns:
        Per index: the answer in ``out_dtype`` and whether this precision resolves it (see the module
        docstring), or ``None`` where ``A A^T`` is not numerically positive definite, or where the answer
        is unresolved and ``keep_unresolved`` is false (its thin products are then skipped).
    """
    factors = [(products[i][0].to(precision), products[i][1].to(precision)) for i in indices]
    grams = [(A @ A.mT, B.mT @ B) for B, A in factors]
    parts: list[_SmallParts] = map_grouped(
        [(G_A, G_B, tops[i]) for (G_A, G_B), i in zip(grams, indices)],
        [G_A.shape[-1] for G_A, _ in grams],
        lambda _, group: _small_parts(group, precision=precision, out_dtype=out_dtype),
    )

    # Back to the factors in reverse order: the last layers' factors are still in cache from their Grams.
    mapped = [
        (*_map_back(B, A, part, tops[index]), part) if part.factored and (part.sharp or keep_unresolved) else None
        for index, (B, A), part in reversed(list(zip(indices, factors, parts)))
    ][::-1]
    # Right vectors that are not orthonormal betray an ill-conditioned A A^T.
    defects = iter(_orthonormality_defects([entry[1] for entry in mapped if entry is not None]))
    tolerance = _ORTHONORMALITY_EPS * torch.finfo(out_dtype).eps
    steps: list[tuple[ProductSVD, bool] | None] = []
    for index, entry in zip(indices, mapped):
        if entry is None:
            steps.append(None)
            continue
        U, Vh, part = entry
        B, A = products[index]
        k = min(B.shape[0], A.shape[1], B.shape[1])
        svd = ProductSVD(U.to(out_dtype), part.S[:k], Vh.to(out_dtype))
        defect = next(defects)
        steps.append((svd, part.sharp and defect <= tolerance))
    return steps


def _orthonormality_defects(Vhs: list[Tensor]) -> list[float]:
    """``max |Vh Vh^T - I|`` per matrix of orthonormal rows, batched by row count (one transfer)."""

    def defects(_: list[int], group: list[Tensor]) -> Tensor:
        gram = torch.stack([Vh @ Vh.mT for Vh in group])
        identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        return (gram - identity).abs().amax(dim=(-2, -1))

    per_matrix = map_grouped(Vhs, [(Vh.shape[0], Vh.device) for Vh in Vhs], defects)
    return torch.stack(per_matrix).tolist() if per_matrix else []


def _map_back(B: Tensor, A: Tensor, part: _SmallParts, top: int) -> tuple[Tensor, Tensor]:
    """``U`` and ``Vh`` of one layer: one thin product each, the sign convention folded into ``Vh``'s."""
    # Computed as U^T: the sign convention's reductions along U's columns then run over contiguous memory.
    U = (part.left[:top] @ B.mT).mT
    if part.complete_left:
        U = _orthonormal_columns(U)
    signs = _signs_of_largest_entries(U)
    U.mul_(signs)
    return U, (part.right[:top] * signs[:, None]) @ A


def _small_parts(
    group: list[tuple[Tensor, Tensor, int]], *, precision: torch.dtype, out_dtype: torch.dtype
) -> list[_SmallParts]:
    """The float64 ``R x R`` work of layers with equal ``R``, batched: Cholesky, ``K``, eigh, criteria."""
    G_A = torch.stack([g[0] for g in group]).to(device=_SMALL_WORK_DEVICE, dtype=torch.float64)
    G_B = torch.stack([g[1] for g in group]).to(device=_SMALL_WORK_DEVICE, dtype=torch.float64)
    tops = torch.tensor([g[2] for g in group])
    widest = int(tops.max())
    rank = G_A.shape[-1]

    L, info = torch.linalg.cholesky_ex(G_A)
    factored = (info == 0) & G_B.sum(dim=(-2, -1)).isfinite()
    if not bool(factored.all()):
        # Layers whose Cholesky failed go to the next step; a harmless stand-in keeps the batch going.
        L = torch.where(factored[:, None, None], L, torch.eye(rank, dtype=torch.float64))
        G_B = torch.where(factored[:, None, None], G_B, 0.0)
    eigenvalues, W = torch.linalg.eigh(L.mT @ G_B @ L)
    eigenvalues, W = eigenvalues.flip(-1), W[..., -widest:].flip(-1)  # descending

    eps = torch.finfo(precision).eps
    s_1 = eigenvalues[:, 0].clamp_min(0).sqrt()
    resolved_value = eigenvalues > rank * eps * eigenvalues[:, :1]
    S = torch.where(resolved_value, eigenvalues.clamp_min(0).sqrt(), 0.0)

    # The smallest singular value the top-r answer must tell apart from the next one: s_r, or the last
    # nonzero one when the product's rank (at this precision) is below r.
    in_top = torch.arange(rank) < tops[:, None]
    nonzero_in_top = (resolved_value & in_top).sum(dim=1)
    last = nonzero_in_top.clamp_min(1)[:, None]
    padded = torch.cat([S, S.new_zeros(len(group), 1)], dim=1)
    separation = (padded.gather(1, last - 1) + padded.gather(1, last)).squeeze(1)
    eps_ratio = eps / torch.finfo(out_dtype).eps
    sharp = (eps_ratio * s_1 <= _STEEPNESS * separation) | (s_1 == 0)
    if precision != torch.float64:
        # Below the Grams' rounding a singular value may be small rather than zero: ask more precision.
        sharp &= (nonzero_in_top == tops) | (s_1 == 0)

    right = torch.linalg.solve_triangular(L.mT, W, upper=True)
    top_S = S[:, :widest, None].mT
    left = (L @ W) / torch.where(top_S > 0, top_S, 1.0) * (top_S > 0)
    complete_left = ((S <= eps**0.5 * s_1[:, None]) & in_top).any(dim=1)  # with s_1 = 0: every value
    device = group[0][0].device
    right = right.mT.to(device=device, dtype=precision, memory_format=torch.contiguous_format)
    left = left.mT.to(device=device, dtype=precision, memory_format=torch.contiguous_format)
    S = S.to(device=device, dtype=out_dtype)
    return [
        _SmallParts(S=S[i], right=right[i], left=left[i], factored=f, sharp=sh, complete_left=c)
        for i, (f, sh, c) in enumerate(zip(factored.tolist(), sharp.tolist(), complete_left.tolist()))
    ]


def _orthonormal_columns(U: Tensor) -> Tensor:
    """Orthonormal columns spanning ``U``'s leading columns; zero columns become a completion."""
    Q, R = torch.linalg.qr(U)
    signs = torch.diagonal(R).sign()
    return Q * torch.where(signs == 0, 1.0, signs)


def _fix_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each singular pair so that the largest-magnitude entry of ``U[..., :, j]`` is positive."""
    signs = _signs_of_largest_entries(U)
    return U * signs[..., None, :], Vh * signs[..., :, None]


def _signs_of_largest_entries(U: Tensor) -> Tensor:
    """Per column of ``U``, the sign that makes its largest-magnitude entry positive (+1 on a tie)."""
    return torch.where(U.amax(dim=-2) >= -U.amin(dim=-2), 1.0, -1.0).to(U.dtype)


@contextmanager
def _full_precision_float32_matmuls() -> Iterator[None]:
    """TF32 (CUDA) or bf16 (oneDNN) float32 matmuls, if a user allowed them, would ruin the Grams."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}.")


def _check_top(B: Tensor, A: Tensor, top: int | None) -> int:
    """``top`` (default: all ``min(out, in, R)``) after checking that ``B @ A`` is a product."""
    if B.dim() < 2 or B.shape[-1] != A.shape[-2] or B.shape[:-2] != A.shape[:-2]:
        raise ValueError(f"B {tuple(B.shape)} and A {tuple(A.shape)} do not form a product B @ A.")
    k = min(B.shape[-2], A.shape[-1], B.shape[-1])
    top = k if top is None else top
    if not 0 < top <= k:
        raise ValueError(f"top must lie in [1, {k}] for B {tuple(B.shape)} and A {tuple(A.shape)}, got {top}.")
    return top


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
