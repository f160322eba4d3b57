"""Temporary rank-R preheat adapters that live outside the model (spec section 4).

The strategy (DDP, FSDP) has already wrapped the model and bound its parameters when preheating
starts, so the preheat adapters must not be registered on it: they are plain tensors owned here
and added to each LoRA layer's output through a forward hook that is removed afterwards.

While they are attached, a rank-r adapter whose ``B`` is exactly zero (peft's default start) is left
out of its layer's forward: it adds exactly nothing to the output, and computing it would cost each
preheat step a dropout mask, two products, their backward and the activations they keep (measured
on MiniLM classification at R = 64: a preheat step at 1.28x a main step with it, 1.08x without).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_hrp.engine.isolation import interrupts_deferred
from lightning_hrp.engine.lora import LoraTarget

PreheatMode = Literal["classic", "asymmetric"]


def layer_preheat_rank(target: LoraTarget, preheat_rank: int) -> int:
    """The rank of ``target``'s preheat adapter: ``preheat_rank``, at most the layer's smaller dimension."""
    return min(preheat_rank, target.in_features, target.out_features)


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
        zero_updates: Per target, whether its rank-r adapter's update is exactly zero (``B = 0``), as
            read whole from the weights (identical on every rank). Such an adapter is left out of its
            layer's forward while the preheat adapters are attached (see the module docstring).
        dtype: Of the preheat adapters (hence of their gradients and, for most optimizers, their
            optimizer state). Default: the LoRA weights' dtype, at least float32.
    """

    def __init__(
        self,
        targets: Sequence[LoraTarget],
        preheat_rank: int,
        mode: PreheatMode,
        seed: int,
        device: torch.device | None = None,
        zero_updates: Sequence[bool] = (),
        dtype: torch.dtype | None = None,
    ) -> None:
        self.targets = list(targets)
        self.mode = mode
        zero = list(zero_updates) or [False] * len(self.targets)
        if len(zero) != len(self.targets):
            raise ValueError(f"zero_updates has {len(zero)} entries for {len(self.targets)} targets.")
        # Left out only where peft's forward adds exactly lora_B(lora_A(dropout(x))) * scaling (no DoRA or
        # other variant, no LoRA bias), which B = 0 makes exactly zero.
        self.left_out = [t for t, is_zero in zip(self.targets, zero) if is_zero and _plain_lora(t)]
        generator = torch.Generator().manual_seed(seed)
        self.ranks = [layer_preheat_rank(t, preheat_rank) for t in self.targets]
        self.scalings = [t.scaling_for_rank(rank) for t, rank in zip(self.targets, self.ranks)]
        self.A: list[Tensor] = []
        self.B: list[Tensor] = []
        for target, rank in zip(self.targets, self.ranks):
            reference = target.lora_A
            layer_dtype = dtype if dtype is not None else torch.promote_types(reference.dtype, torch.float32)
            on = device if device is not None else reference.device
            # peft's default A init: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / math.sqrt(target.in_features)
            A = (torch.rand(rank, target.in_features, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            self.A.append(A.to(device=on, dtype=layer_dtype).requires_grad_(mode == "classic"))
            self.B.append(torch.zeros(target.out_features, rank, device=on, dtype=layer_dtype, requires_grad=True))

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
        """Add each preheat adapter's output to its layer's output while the context is open.

        The rank-r adapters with a zero update are left out of their layers' forward meanwhile.
        """
        handles = [
            target.layer.register_forward_hook(self._hook(A, B, scaling, target.dropout), with_kwargs=True)
            for target, A, B, scaling in zip(self.targets, self.A, self.B, self.scalings)
        ]
        try:
            with _left_out_of_forward(self.left_out):
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


def _plain_lora(target: LoraTarget) -> bool:
    """Whether peft computes this adapter as ``lora_B(lora_A(dropout(x))) * scaling`` and nothing else."""
    layer = target.layer
    return target.adapter_name not in layer.lora_variant and not layer.lora_bias.get(target.adapter_name, False)


@contextmanager
def _left_out_of_forward(targets: Sequence[LoraTarget]) -> Iterator[None]:
    """Each target's adapter out of its layer's active adapters (which peft's forward runs), restored exactly.

    Writes peft's private ``_active_adapter``: its public ``set_adapter`` would also change which
    adapters require gradients.
    """
    saved = [(target.layer, target.layer._active_adapter) for target in targets]  # noqa: SLF001
    try:
        for target in targets:
            active = target.layer.active_adapters
            target.layer._active_adapter = [name for name in active if name != target.adapter_name]  # noqa: SLF001
        yield
    finally:
        with interrupts_deferred():
            for layer, active in saved:
                layer._active_adapter = active  # noqa: SLF001
