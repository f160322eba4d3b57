"""Reading the main run's batches for preheating without disturbing the main run's own iteration.

Plain torch: the shuffling generators' states, a DataLoader with persistent workers, and a cycled
iterator for entry points that get an arbitrary iterable of batches (``hrp_init``, the
transformers callback). The Lightning callback's batches are in :mod:`lightning_hrp._lightning`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from lightning_hrp.errors import HRPConfigurationError


def generator_states(loaders: Sequence[Any]) -> list[tuple[torch.Generator, Tensor]]:
    """The state of every torch.Generator the loaders' iterators draw from (worker seeds, random samplers)."""
    generators: list[torch.Generator] = []
    for loader in loaders:
        if not isinstance(loader, DataLoader):
            continue
        samplers = [loader.sampler]
        if isinstance(loader.batch_sampler, BatchSampler):
            samplers.append(loader.batch_sampler.sampler)
        candidates = [loader.generator] + [s.generator for s in samplers if isinstance(s, RandomSampler)]
        generators += [g for g in candidates if isinstance(g, torch.Generator)]
    return [(g, g.get_state()) for g in dict.fromkeys(generators)]


def restore_generator_states(states: list[tuple[torch.Generator, Tensor]]) -> None:
    for generator, state in states:
        generator.set_state(state)


@contextmanager
def generators_restored(loaders: Sequence[Any]) -> Iterator[None]:
    """Give the torch.Generators the loaders shuffle with (worker seeds, random samplers) their state back afterwards."""
    states = generator_states(loaders)
    try:
        yield
    finally:
        restore_generator_states(states)


def samplers_drawn_at_creation(loaders: Sequence[Any]) -> list[RandomSampler]:
    """The RandomSamplers whose epoch permutation is drawn when their loader's iterator is created.

    A DataLoader with worker processes sends its first index batches to the workers as its iterator is
    created, so its RandomSampler draws the epoch's permutation then, not at the first batch.
    """
    samplers: list[RandomSampler] = []
    for loader in loaders:
        if isinstance(loader, DataLoader) and loader.num_workers > 0:
            sampler = loader.batch_sampler.sampler if isinstance(loader.batch_sampler, BatchSampler) else loader.sampler
            if isinstance(sampler, RandomSampler):
                samplers.append(sampler)
    return samplers


def with_own_workers(loader: Any) -> Any:
    """``loader``, or for a DataLoader with persistent workers a copy that starts workers of its own.

    Such a DataLoader keeps one iterator (and its workers) for the whole run: iterating it for
    preheating would hand the main run an iterator that HRP started.
    """
    if isinstance(loader, DataLoader) and loader.persistent_workers and loader.num_workers > 0:
        own = copy.copy(loader)
        own._iterator = None  # private: the shared persistent iterator is the main run's
        return own
    return loader


class CycledBatches:
    """An iterator of ``(batch, batch_idx)`` pairs from any iterable of batches, restarted (with one warning) when it runs out.

    ``batch_idx`` counts from 0 in each pass, as in an epoch. A one-shot iterator (a generator) cannot
    be restarted: running out of it is an :class:`HRPConfigurationError`. Call :meth:`close` when done:
    it ends the current pass, which shuts down that pass's worker processes.

    Args:
        batches: A re-iterable (a DataLoader, a list) or a one-shot iterator.
        needed: How many batches preheating needs, for the messages.
        warn: Called once, when a pass is restarted.
    """

    def __init__(self, batches: Iterable[Any], needed: int, warn: Callable[[str], None]) -> None:
        if not isinstance(batches, Iterable):
            raise HRPConfigurationError(
                f"batches must be an iterable of batches (a DataLoader, a list, a generator), got {type(batches).__name__}."
            )
        self._cycle = self._passes(batches, needed, warn)

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        return self

    def __next__(self) -> tuple[Any, int]:
        return next(self._cycle)

    def close(self) -> None:
        self._cycle.close()

    @staticmethod
    def _passes(batches: Iterable[Any], needed: int, warn: Callable[[str], None]) -> Iterator[tuple[Any, int]]:
        produced = 0
        while True:
            one_pass = iter(batches)
            batch_idx = -1
            for batch_idx, batch in enumerate(one_pass):
                yield batch, batch_idx
            per_pass = batch_idx + 1
            if per_pass == 0 and produced == 0:
                raise HRPConfigurationError("The batches are empty; HRP has nothing to preheat on.")
            if per_pass == 0:
                raise HRPConfigurationError(
                    f"The batches ran out after {produced} of the {needed} batches preheating needs (preheat_steps x "
                    "batches per step) and a new pass gave none (a one-shot iterator cannot be cycled): pass a "
                    "re-iterable (a DataLoader or a list) or enough batches."
                )
            if produced == 0 and one_pass is not batches:
                warn(
                    f"The batches hold {per_pass} batches per pass but preheating needs {needed} (preheat_steps x "
                    "batches per step); they are cycled."
                )
            produced += per_pass
