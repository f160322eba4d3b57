"""The calculation: what preheating adds to the memory of a LLaMA-7B QLoRA or bf16-LoRA run, per preheat setting.

LLaMA-7B (32 blocks; q, k, v, o 4096 x 4096; gate, up 4096 -> 11008; down 11008 -> 4096) with LoRA
``r = 8`` on all 224 linear layers and preheating at ``R = 64``. The preheat adapters, their
gradients and optimizer state come from :func:`lightning_hrp.engine.preheat_memory.estimate_preheat_memory`,
the same function that logs the estimate before a real preheat, on meta tensors of the real shapes
with the real optimizers (nothing is allocated). The main run's figures are computed alike: the
rank-8 adapters in float32 with their gradients and AdamW's two buffers.

Bases: bf16 (2 bytes per weight); 4-bit NF4 with double quantization as QLoRA stores it (4.127
bits per linear weight: a float8 absmax per 64 weights, a float32 constant per 256 of those) and
the embeddings and head in bf16. Activations depend on batch, sequence and checkpointing; the
ratio is shown for a few assumed amounts (the same in both phases; a preheat step keeps, per token
and layer, ``R - r`` values more, which gradient checkpointing recomputes instead of keeping).

Peak during preheating: base + rank-r adapters (no gradient, no optimizer state yet) + preheat
adapters, gradients and optimizer state + activations. Peak of a main step: base + rank-r adapters,
gradients and AdamW state + activations. Run: ``python -m benchmarks.memory_at_scale``.
"""

from __future__ import annotations

import functools
import sys

if not __package__:
    sys.exit("Run this from the repository root as a module: python -m benchmarks.memory_at_scale")

import torch

from benchmarks.harness import markdown_table
from benchmarks.svd_layers import LAYER_SETS
from lightning_hrp.engine.lean_optimizer import FactoredRMS
from lightning_hrp.engine.preheat_memory import estimate_preheat_memory

GIB = 2**30
LLAMA_7B = LAYER_SETS["llama-7b"]
# (in, out) of every LoRA target of LLaMA-7B, block after block.
LAYERS = [(shape.in_features, shape.out_features) for shape in LLAMA_7B.layer_shapes()]
VOCAB = 32000
HIDDEN = 4096
LORA_RANK = 8
PREHEAT_RANK = 64
NF4_BITS = 4.127  # QLoRA's NF4 with double quantization
ACTIVATIONS_GIB = (1.0, 2.0, 4.0)

SETTINGS = {
    "float32, AdamW": (torch.float32, functools.partial(torch.optim.AdamW, lr=1e-4)),
    "bfloat16, AdamW": (torch.bfloat16, functools.partial(torch.optim.AdamW, lr=1e-4)),
    "float32, FactoredRMS": (torch.float32, functools.partial(FactoredRMS, lr=1e-4)),
    "bfloat16, FactoredRMS": (torch.bfloat16, functools.partial(FactoredRMS, lr=1e-4)),
}


def factors(rank: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    A = [torch.empty(rank, i, device="meta", dtype=dtype, requires_grad=True) for i, _ in LAYERS]
    B = [torch.empty(o, rank, device="meta", dtype=dtype, requires_grad=True) for _, o in LAYERS]
    return A, B


def main_adapters() -> tuple[float, float]:
    """GiB of the rank-r adapters alone, and with their gradients and AdamW state (a main step's peak)."""
    A, B = factors(LORA_RANK, torch.float32)
    memory = estimate_preheat_memory(A, B, [*B, *A], torch.optim.AdamW([*B, *A], lr=1e-4), [0] * len(A), world_size=1)
    return memory.adapters / GIB, memory.total / GIB


def bases() -> dict[str, float]:
    linear = sum(i * o for i, o in LAYERS)
    other = 2 * VOCAB * HIDDEN + (2 * LLAMA_7B.blocks + 1) * HIDDEN  # embeddings, head, norms
    return {"4-bit NF4": (linear * NF4_BITS / 8 + 2 * other) / GIB, "bf16": (2 * (linear + other)) / GIB}


def main() -> dict[str, list[float]]:
    """Print the calculation; returns, per setting, the peak ratios in the order of the table's columns."""
    adapters_only, adapters_trained = main_adapters()
    print("LLaMA-7B, LoRA on all 224 linear layers, r = 8, R = 64; one process (GiB):\n")
    base_sizes = bases()
    print(f"Bases: {', '.join(f'{name} {size:.2f}' for name, size in base_sizes.items())}. Rank-8 adapters: "
          f"{adapters_only:.3f} alone, {adapters_trained:.3f} with gradients and AdamW state (a main step).\n")  # fmt: skip
    rows, ratios_by_setting = [], {}
    for name, (dtype, optimizer) in SETTINGS.items():
        A, B = factors(PREHEAT_RANK, dtype)
        memory = estimate_preheat_memory(A, B, [*B, *A], optimizer([*B, *A]), [LORA_RANK] * len(A), world_size=1)
        preheat = memory.total / GIB
        ratios = []
        for base_name, base in base_sizes.items():
            for activations in ACTIVATIONS_GIB:
                during_preheat = base + adapters_only + preheat + activations
                main_step = base + adapters_trained + activations
                ratios.append(during_preheat / main_step)
        ratios_by_setting[name] = ratios
        rows.append([
            name, f"{memory.adapters / GIB:.3f}", f"{memory.gradients / GIB:.3f}", f"{memory.optimizer_state / GIB:.3f}",
            f"{preheat:.3f}", *(f"{ratio:.2f}" for ratio in ratios),
        ])  # fmt: skip
    columns = ["preheat dtype, optimizer", "adapters", "gradients", "optimizer state", "preheat total"]
    columns += [f"peak ratio, {b} base, {a:g} GiB activations" for b in base_sizes for a in ACTIVATIONS_GIB]
    print(markdown_table(columns, rows))
    return ratios_by_setting


if __name__ == "__main__":
    main()
