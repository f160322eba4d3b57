"""Temporary rank-R preheat adapters that live outside the model (spec section 4).

The strategy (DDP, FSDP) has already wrapped the model and bound its parameters when preheating
starts, so the preheat adapters must not be registered on it: they are plain tensors owned here
and added to each LoRA layer's output through a forward hook that is removed afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_hrp.engine.lora import LoraTarget

PreheatMode = Literal["classic", "asymmetric"]


class PreheatAdapters:
    """One rank-R adapter ``s_p * B_p @ A_p`` per LoRA target, ``A_p`` random, ``B_p = 0``.

    Args:
        targets: The LoRA layers to preheat.
        preheat_rank: ``R``; clamped per layer to ``min(in, out)``, beyond which a higher rank adds
            nothing the layer can express.
        mode: ``"classic"`` trains ``A_p`` and ``B_p``; ``"asymmetric"`` trains ``B_p`` only.
        seed: Seeds ``A_p``'s draw, which is made on the CPU so every rank and device gets the
            same start.
        device: Where the layers compute (default: where each LoRA weight lives). Differs from
            the weights' device when a strategy offloads parameters to the CPU.
    """

    def __init__(
        self,
        targets: Sequence[LoraTarget],
        preheat_rank: int,
        mode: PreheatMode,
        seed: int,
        device: torch.device | None = None,
    ) -> None:
        self.targets = list(targets)
        self.mode = mode
        generator = torch.Generator().manual_seed(seed)
        self.ranks = [min(preheat_rank, t.in_features, t.out_features) for t in self.targets]
        self.scalings = [t.scaling_for_rank(rank) for t, rank in zip(self.targets, self.ranks)]
        self.A: list[Tensor] = []
        self.B: list[Tensor] = []
        for target, rank in zip(self.targets, self.ranks):
            reference = target.lora_A
            dtype = torch.promote_types(reference.dtype, torch.float32)
            on = device if device is not None else reference.device
            # peft's default A init: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / math.sqrt(target.in_features)
            A = (torch.rand(rank, target.in_features, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            self.A.append(A.to(device=on, dtype=dtype).requires_grad_(mode == "classic"))
            self.B.append(torch.zeros(target.out_features, rank, device=on, dtype=dtype, requires_grad=True))

    def trainable(self) -> list[Tensor]:
        """The tensors the preheat optimizer steps, in a fixed order shared by every rank."""
        return [*self.B, *self.A] if self.mode == "classic" else list(self.B)

    def products(self) -> list[tuple[Tensor, Tensor]]:
        """``(B_p, A_p)`` per target, detached."""
        return [(B.detach(), A.detach()) for B, A in zip(self.B, self.A)]

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (*self.A, *self.B))

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Add each preheat adapter's output to its layer's output while the context is open."""
        handles = [
            target.layer.register_forward_hook(self._hook(A, B, scaling, target.dropout), with_kwargs=True)
            for target, A, B, scaling in zip(self.targets, self.A, self.B, self.scalings)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _hook(A: Tensor, B: Tensor, scaling: float, dropout: nn.Module):
        def add_preheat_update(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Tensor) -> Tensor:
            x = args[0] if args else kwargs["x"]
            update = F.linear(F.linear(dropout(x).to(A.dtype), A), B) * scaling
            return output + update.to(output.dtype)

        return add_preheat_update
