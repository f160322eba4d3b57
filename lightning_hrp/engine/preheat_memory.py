"""What preheating holds on top of the model, computed from the layer shapes before the first preheat step.

Per process (every process holds all preheat adapters whole, also under FSDP): the adapters
``A_p`` (``R x in``) and ``B_p`` (``out x R``) of every layer in their dtype; a gradient for each
trained one; the preheat optimizer's state; and, with several processes, the flattened copy of the
gradients that the per-step all-reduce sends. Activations depend on the batch: a preheat forward
keeps, per token and layer, the ``R`` values of ``A_p x`` (a main step keeps the rank-r adapter's
``r``); the rest it keeps equals what a main step keeps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.optim import SGD, Adam, AdamW, Optimizer

from lightning_hrp.engine.lean_optimizer import FactoredRMS

# Warn when preheating would take more than this share of the device's free memory: its forward's
# activations, and after it the main run's own gradients and optimizer state, need the rest.
FREE_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class PreheatMemory:
    """Bytes preheating holds per process on top of the model (see the module docstring).

    Attributes:
        adapters: ``A_p`` and ``B_p`` of every layer.
        gradients: The trained ones' gradients.
        optimizer_state: The preheat optimizer's state once it has stepped.
        all_reduce: The flattened gradients of the per-step all-reduce (several processes only).
        activations_per_token: What a preheat forward keeps per token beyond a main step's.
        optimizer_known: Whether the optimizer's state was computed (AdamW, Adam, SGD, FactoredRMS)
            or assumed to be AdamW's (two buffers per parameter).
    """

    adapters: int
    gradients: int
    optimizer_state: int
    all_reduce: int
    activations_per_token: int
    optimizer_known: bool = True

    @property
    def total(self) -> int:
        """Everything but the activations."""
        return self.adapters + self.gradients + self.optimizer_state + self.all_reduce

    def describe(self) -> str:
        parts = [f"adapters {_gib(self.adapters)}", f"gradients {_gib(self.gradients)}"]
        state = f"optimizer state {_gib(self.optimizer_state)}"
        parts.append(state if self.optimizer_known else f"{state} (assumed: two buffers per parameter, as AdamW)")
        if self.all_reduce:
            parts.append(f"all-reduce buffer {_gib(self.all_reduce)}")
        return f"{_gib(self.total)} ({', '.join(parts)}; activations: {self.activations_per_token} bytes per token more than a main step)"


def estimate_preheat_memory(
    A: list[Tensor], B: list[Tensor], trainable: list[Tensor], optimizer: Optimizer, skipped_ranks: list[int], world_size: int
) -> PreheatMemory:
    """The memory of preheat adapters ``A`` and ``B`` trained as ``trainable`` by ``optimizer`` (not stepped yet).

    ``skipped_ranks``: per layer, the rank of its own adapter if preheating leaves it out of the forward
    (``B = 0``, plain LoRA: its ``r`` activations are not kept), else 0.
    """
    adapters = sum(_bytes(t) for t in (*A, *B))
    gradients = sum(_bytes(t) for t in trainable)
    state, known = _optimizer_state(optimizer)
    activations = sum((a.shape[0] - r) * a.element_size() for a, r in zip(A, skipped_ranks))
    return PreheatMemory(
        adapters=adapters,
        gradients=gradients,
        optimizer_state=state,
        all_reduce=gradients if world_size > 1 else 0,
        activations_per_token=max(activations, 0),
        optimizer_known=known,
    )


def _optimizer_state(optimizer: Optimizer) -> tuple[int, bool]:
    """Bytes of the state ``optimizer`` will hold after its first step, and whether its kind is known."""
    total, known = 0, True
    for group in optimizer.param_groups:
        for p in group["params"]:
            if isinstance(optimizer, FactoredRMS):
                total += 4 * (p.shape[-2] + p.shape[-1]) if p.ndim >= 2 else 4 * p.numel()
            elif isinstance(optimizer, (Adam, AdamW)):
                total += _bytes(p) * (3 if group.get("amsgrad") else 2)
            elif isinstance(optimizer, SGD):
                total += _bytes(p) if group.get("momentum", 0) else 0
            else:
                total += 2 * _bytes(p)
                known = False
    return total, known


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` (CUDA: the driver's free memory plus the caching
    allocator's unused reserve; CPU: the kernel's ``MemAvailable``), or None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        except OSError:
            return None
        return int(match.group(1)) * 1024 if match else None
    return None


def _bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"
