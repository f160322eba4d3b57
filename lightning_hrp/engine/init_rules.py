"""How the rank-r adapter starts from the SVD of the preheated update (spec section 2, step 3)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_hrp.engine.decompose import ProductSVD

InitRule = Literal["direction", "keep_progress"]
DirectionScale = Literal["unit", "match_init_norm"]


def direction_init(Vh_top: Tensor, current_A: Tensor, scale: DirectionScale) -> Tensor:
    """``A = c * V_r^T``, ``B`` becomes 0: only the start direction changes (the spec's reading of the paper, section 2).

    Args:
        Vh_top: ``(r, in)`` orthonormal rows, the top right singular vectors of the preheated update.
        current_A: The adapter's ``A`` before HRP.
        scale: ``"unit"`` gives unit rows (``c = 1``); ``"match_init_norm"`` keeps ``||A||_F`` of
            the current (default random) init, so learning rates tuned for plain LoRA keep their meaning.
            For an adapter given another rank than ``current_A``'s (a rank budget), it keeps the mean
            row norm, ``||A||_F / sqrt(rows)``, which peft's default init gives at every rank.

    Returns:
        The new ``A``.
    """
    if scale == "unit":
        return Vh_top
    init_norm = torch.linalg.matrix_norm(current_A.to(Vh_top.dtype))
    return Vh_top * (init_norm / math.sqrt(current_A.shape[0]))


def keep_progress_init(
    U_top: Tensor, S_top: Tensor, Vh_top: Tensor, *, preheat_scaling: float, scaling: float
) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``scaling * B @ A`` equal to the rank-r truncation of ``preheat_scaling * B_p @ A_p``.

    The singular values are split evenly (a square root on each side) so neither factor dominates.
    """
    root = torch.sqrt(S_top * (preheat_scaling / scaling))
    return root[:, None] * Vh_top, U_top * root[None, :]


def new_adapter_weights(
    svd: ProductSVD,
    *,
    rule: InitRule,
    scale: DirectionScale,
    current_A: Tensor,
    preheat_scaling: float,
    scaling: float,
) -> tuple[Tensor, Tensor]:
    """The rank-r ``(A, B)`` that HRP writes, from the top-r SVD of one layer's preheated update.

    Args:
        svd: ``U`` ``(out, r)``, ``S`` ``(k,)``, ``Vh`` ``(r, in)`` of the preheat adapter's ``B_p @ A_p``.
        rule: ``"direction"`` (``A = c V_r^T``, ``B = 0``) or ``"keep_progress"``.
        scale: How ``"direction"`` scales ``A`` (see :func:`direction_init`).
        current_A: The adapter's ``A`` before HRP.
        preheat_scaling: The preheat adapter's LoRA scale ``s_p``.
        scaling: The rank-r adapter's LoRA scale ``s``.
    """
    rank = svd.Vh.shape[0]
    if rule == "direction":
        A = direction_init(svd.Vh, current_A, scale)
        return A, svd.U.new_zeros(svd.U.shape[0], rank)
    return keep_progress_init(svd.U, svd.S[:rank], svd.Vh, preheat_scaling=preheat_scaling, scaling=scaling)
