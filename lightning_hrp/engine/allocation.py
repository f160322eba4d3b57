"""Per-layer LoRA ranks from the preheated spectra, under a total rank budget.

HRP decomposes each layer's preheated update ``P_i`` anyway; its singular values ``s_ij`` say how the
update's energy spreads over directions. :func:`allocate_ranks` hands out a total of ``budget`` ranks:
every layer first gets ``min_rank``; the rest go, one at a time, to the direction of greatest *value*
among those not yet given, where (``rule``)

* ``"energy"`` (the default): ``s_ij^2`` itself. The budget then keeps the most preheated energy
  that any allocation of it can: the best use of it if each layer's loss falls with the energy its
  adapter captures, as when every layer's update is learned on its own (what the rank-1 ... rank-8
  heads of ``recipes/multi_layer_regression.py`` are). Layers whose preheated update is larger get
  more directions; a layer that learned little gets little.
* ``"energy_share"``: ``s_ij^2 / sum_j s_ij^2``, the share of layer ``i``'s preheated energy in
  direction ``j`` (the explained-variance ratio EVA ranks input directions by): each layer's spectrum
  counts by its shape, not its size, so a layer that learned little but spread it over many directions
  (noise) gets as many as one that learned much in as many.

Measured (``docs/results/multi_layer_regression_rank_budget``, 10 tasks each, paired): both rules beat
the uniform rank by far where the true updates have sharply different ranks, and there ``"energy"``
matched ``"energy_share"`` (the same allocation on 7 of 10 tasks, better on the other 3); with
singular values decaying as ``1/j`` only ``"energy"`` beat the uniform rank beyond its t-interval.

Values within a layer never increase with ``j``, so every layer receives a leading block of its
directions (its top ``r_i``). A layer never gets more than its ``max_rank`` (its preheat rank: no more
directions exist). Ties go to the earlier layer, then to the earlier direction, so the answer is a
pure function of its inputs (plain Python): processes that hold the same spectra take the same
decision, and :func:`agreed_ranks` makes it rank 0's on every rank all the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lightning_hrp.engine.distributed import broadcast_ints
from lightning_hrp.errors import PreheatFailedError

AllocationRule = Literal["energy_share", "energy"]


@dataclass(frozen=True)
class RankBudget:
    """A total rank for the LoRA layers and the rule that hands it out (see :func:`allocate_ranks`)."""

    total: int
    rule: AllocationRule = "energy"


def direction_values(singular_values: Sequence[float], rule: AllocationRule) -> list[float]:
    """The value of each direction of one layer under ``rule`` (all 0 for a zero spectrum)."""
    energies = [float(s) ** 2 for s in singular_values]
    if rule == "energy":
        return energies
    if rule != "energy_share":
        raise ValueError(f"rule must be 'energy_share' or 'energy', got {rule!r}.")
    total = sum(energies)
    return [e / total if total > 0 else 0.0 for e in energies]


def allocate_ranks(
    spectra: Sequence[Sequence[float]],
    budget: int,
    *,
    max_ranks: Sequence[int],
    min_rank: int = 1,
    rule: AllocationRule = "energy",
) -> list[int]:
    """The rank of each layer: ``min_rank`` each, the rest of ``budget`` to the most valuable directions.

    Args:
        spectra: Each layer's singular values, descending (a layer with fewer than ``max_rank`` values
            has zeros beyond them).
        budget: The total rank, ``sum(ranks) == budget``.
        max_ranks: The most each layer may get (at least ``min_rank``).
        min_rank: The least each layer gets.
        rule: How a direction's value is measured (see the module docstring).

    Returns:
        One rank per layer, in input order.

    Raises:
        ValueError: Inconsistent lengths, or a budget outside ``[len * min_rank, sum(max_ranks)]``.
    """
    if len(spectra) != len(max_ranks):
        raise ValueError(f"got {len(spectra)} spectra but {len(max_ranks)} maximum ranks.")
    if min_rank < 1 or any(m < min_rank for m in max_ranks):
        raise ValueError(f"every maximum rank must be at least min_rank={min_rank} >= 1, got {list(max_ranks)}.")
    if not len(spectra) * min_rank <= budget <= sum(max_ranks):
        raise ValueError(
            f"budget={budget} must lie between {len(spectra)} layers x min_rank={min_rank} = {len(spectra) * min_rank} "
            f"and the sum of the maximum ranks, {sum(max_ranks)}."
        )
    candidates = []
    for layer, (spectrum, top) in enumerate(zip(spectra, max_ranks)):
        values = direction_values(spectrum, rule)
        values += [0.0] * (top - len(values))
        candidates += [(-values[j], layer, j) for j in range(min_rank, top)]
    ranks = [min_rank] * len(spectra)
    for _, layer, _ in sorted(candidates)[: budget - len(spectra) * min_rank]:
        ranks[layer] += 1
    return ranks


def agreed_ranks(
    budget: RankBudget, spectra: Sequence[Sequence[float]], max_ranks: Sequence[int], *, layers_without_update: int
) -> list[int]:
    """:func:`allocate_ranks` under ``budget``, rank 0's decision on every rank of a process group.

    Raises:
        PreheatFailedError: The budget does not fit, which the entry points' checks before preheating
            leave possible only where layers that learned nothing (``layers_without_update``) take
            fewer ranks than their preheat rank.
    """
    try:
        ranks = allocate_ranks(spectra, budget.total, max_ranks=max_ranks, rule=budget.rule)
    except ValueError as error:
        raise PreheatFailedError(
            f"the rank budget cannot be placed: {error} ({layers_without_update} layer(s) learned nothing and take at "
            "most their current rank)."
        ) from error
    return broadcast_ints(ranks)
