"""The math of the baseline LoRA initialisations that HRP is compared with (plain torch, no Lightning).

* :func:`lora_one_init`: LoRA-One's spectral init from one full gradient (Zhang, Liu, Chen,
  "One-step full gradient suffices for low-rank fine-tuning, provably and efficiently",
  arXiv 2502.01235).
* :func:`oracle_direction_init`: the direction a perfect estimate would give, the top right singular
  vectors of the true update ``M`` (spec section 1): available only where ``M`` is known, as in the
  matrix-regression recipe; an upper reference for HRP, not a method.
* :func:`top_singular_triplets`: the exact, sign-fixed SVD both use.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_hrp.engine.decompose import _fix_signs
from lightning_hrp.engine.init_rules import DirectionScale, direction_init

_COMPUTE_DTYPES = (torch.float32, torch.float64)


def top_singular_triplets(matrix: Tensor, rank: int, *, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """The top-``rank`` singular triplets of a dense ``(out, in)`` matrix.

    Args:
        matrix: ``(out, in)``.
        rank: How many triplets; at most ``min(out, in)``.
        dtype: Compute dtype, float32 or float64, whatever the input's.

    Returns:
        ``U`` ``(out, rank)``, ``S`` ``(min(out, in),)`` (all singular values, descending) and
        ``Vh`` ``(rank, in)``, each pair's sign fixed so that the largest-magnitude entry of ``U[:, j]``
        is positive (the answer does not depend on the LAPACK build).
    """
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}.")
    if matrix.dim() != 2:
        raise ValueError(f"expected a 2-D (out, in) matrix, got shape {tuple(matrix.shape)}.")
    if not 0 < rank <= min(matrix.shape):
        raise ValueError(f"rank must lie in [1, {min(matrix.shape)}] for a {tuple(matrix.shape)} matrix, got {rank}.")
    U, S, Vh = torch.linalg.svd(matrix.to(dtype), full_matrices=False)
    U, Vh = _fix_signs(U[:, :rank], Vh[:rank])
    return U, S, Vh


def lora_one_init(gradient: Tensor, rank: int, *, gamma: float, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """LoRA-One's ``(A, B)`` for one layer from the full gradient ``G`` of the loss w.r.t. its frozen weight.

    The rule (that of the authors' code, "OS-LoRA-Full-N" with their ``stable_gamma``): with
    ``-G = U S V^T`` (exact SVD) and ``d = sqrt(S[:r] / S[0])``,

        ``A = diag(d) V_r^T / sqrt(gamma)``  (``r x in``, from the top-r right singular vectors),
        ``B = U_r diag(d) / sqrt(gamma)``    (``out x r``, from the top-r left singular vectors),

    so that ``B @ A = [-G]_r / (gamma * S[0])``: the adapter starts as one step of full-batch
    gradient descent restricted to the best rank-r subspace, of a size that makes the update's top
    singular value ``1 / gamma`` (times the LoRA scale ``s``). The frozen weight is not changed, so
    the model's output moves by that one step, as in LoRA-One.

    Args:
        gradient: ``(out, in)`` gradient of the training loss w.r.t. the frozen base weight.
        rank: LoRA rank ``r``.
        gamma: LoRA-One's ``stable_gamma`` (the authors use 128); larger means a smaller first step.
        dtype: Compute dtype of the SVD.

    Returns:
        ``A`` ``(r, in)`` and ``B`` ``(out, r)`` in ``dtype``.

    Raises:
        ValueError: A zero or non-finite gradient (nothing to align with), or ``gamma <= 0``.
    """
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a positive number, got {gamma}.")
    if not bool(torch.isfinite(gradient).all()):
        raise ValueError("the gradient holds NaN or Inf; LoRA-One cannot align with it.")
    U, S, Vh = top_singular_triplets(-gradient, rank, dtype=dtype)
    if not S[0] > 0:
        raise ValueError("the gradient is zero; LoRA-One has no direction to start from (is the layer used by the loss?).")
    d = torch.sqrt(S[:rank] / S[0]) / math.sqrt(gamma)
    return d[:, None] * Vh, U * d[None, :]


def oracle_direction_init(
    target_update: Tensor, current_A: Tensor, *, scale: DirectionScale = "match_init_norm", dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``A = c * V_r(M)^T``, ``B = 0``: HRP's ``"direction"`` rule fed the true update ``M`` instead of an estimate.

    Args:
        target_update: ``M`` ``(out, in)``, the update the adapter should learn.
        current_A: The adapter's ``A`` ``(r, in)`` before (sets ``r`` and, for ``"match_init_norm"``, ``c``).
        scale: ``"unit"`` rows or ``"match_init_norm"`` (see :func:`lightning_hrp.engine.init_rules.direction_init`).
        dtype: Compute dtype of the SVD.

    Returns:
        ``A`` ``(r, in)`` and ``B = 0`` ``(out, r)``; the model's output is unchanged.
    """
    rank = current_A.shape[0]
    if target_update.shape[1] != current_A.shape[1]:
        raise ValueError(
            f"the target update {tuple(target_update.shape)} and the adapter's A {tuple(current_A.shape)} "
            "disagree on the input dimension."
        )
    _, _, Vh = top_singular_triplets(target_update, rank, dtype=dtype)
    A = direction_init(Vh, current_A, scale)
    return A, A.new_zeros(target_update.shape[0], rank)
