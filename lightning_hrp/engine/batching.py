"""Group work items by a key, run each group as one batch, and put the results back in input order.

The one place that does "group layers by shape, stack or batch, decompose" for the engine
(:mod:`.decompose`, :mod:`.distributed`) and the benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


def group_by_key(keys: Sequence[Hashable]) -> list[list[int]]:
    """Indices of ``keys`` grouped by equal key, groups in first-seen order."""
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def map_grouped(
    items: Sequence[ItemT],
    keys: Sequence[Hashable],
    batched: Callable[[list[int], list[ItemT]], Sequence[ResultT]],
) -> list[ResultT]:
    """``batched`` once per group of items with equal key; one result per item, in input order.

    Args:
        items: The work items (for instance ``(B, A)`` pairs).
        keys: One key per item; items with equal keys are handed over together.
        batched: Called with a group's indices into ``items`` and its items; returns one result
            per item of the group, in the same order.
    """
    if len(items) != len(keys):
        raise ValueError(f"got {len(items)} items but {len(keys)} keys.")
    results: list[ResultT | None] = [None] * len(items)
    for indices in group_by_key(keys):
        group_results = batched(indices, [items[i] for i in indices])
        if len(group_results) != len(indices):
            raise ValueError(f"a batch of {len(indices)} items gave {len(group_results)} results.")
        for index, result in zip(indices, group_results):
            results[index] = result
    return results  # type: ignore[return-value]
