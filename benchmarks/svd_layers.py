"""The layer sets the decomposition benchmark runs on, and the factors ``B``, ``A`` it decomposes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from benchmarks.harness import by_name

@dataclass(frozen=True)
class LayerShape:
    """``per_block`` linear layers of weight shape ``(out_features, in_features)`` in each transformer block."""

    out_features: int
    in_features: int
    per_block: int

    @property
    def label(self) -> str:
        return f"{self.out_features}x{self.in_features}"


@dataclass(frozen=True)
class LayerSet:
    """The LoRA target layers of a model, by shape.

    Attributes:
        name: Command-line name.
        description: One line for the docs.
        shapes: Layer shapes of one block, in block order.
        blocks: Number of transformer blocks.
        dense_ranks: Preheat ranks at which the dense baseline runs by default (``None``: all);
            ``--dense-all-ranks`` overrides it.
    """

    name: str
    description: str
    shapes: tuple[LayerShape, ...]
    blocks: int
    dense_ranks: tuple[int, ...] | None = None

    def layer_shapes(self) -> list[LayerShape]:
        """One entry per layer, block after block."""
        return [shape for _ in range(self.blocks) for shape in self.shapes for _ in range(shape.per_block)]


LAYER_SETS: dict[str, LayerSet] = by_name(
    LayerSet(
        name="llama-7b",
        description="LLaMA-7B: per block q,k,v,o 4096x4096, gate,up 11008x4096, down 4096x11008; 32 blocks",
        shapes=(LayerShape(4096, 4096, 4), LayerShape(11008, 4096, 2), LayerShape(4096, 11008, 1)),
        blocks=32,
        # The dense SVDs of the three LLaMA shapes take minutes per R on a small CPU.
        dense_ranks=(64,),
    ),
    LayerSet(
        name="bert-base",
        description="BERT-base: per block q,k,v,attn-out 768x768, intermediate 3072x768, output 768x3072; 12 blocks",
        shapes=(LayerShape(768, 768, 4), LayerShape(3072, 768, 1), LayerShape(768, 3072, 1)),
        blocks=12,
    ),
    LayerSet(
        name="tiny",
        description="LLaMA-like toy: per block 4x 256x256, 2x 688x256, 1x 256x688; 2 blocks",
        shapes=(LayerShape(256, 256, 4), LayerShape(688, 256, 2), LayerShape(256, 688, 1)),
        blocks=2,
    ),
)

FACTORS = ("gaussian", "preheat", "steep")


def make_products(
    layer_set: LayerSet, rank: int, factors: str, *, dtype: torch.dtype, device: torch.device, seed: int
) -> list[tuple[Tensor, Tensor]]:
    """``B (out, R)``, ``A (R, in)`` per layer, scaled so ``B @ A`` entries are O(1/sqrt(in)); see ``--factors``."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def gaussian(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype, device=device)

    products = []
    for shape in layer_set.layer_shapes():
        A = gaussian(rank, shape.in_features) / math.sqrt(shape.in_features)
        if factors == "gaussian":
            B = gaussian(shape.out_features, rank) / math.sqrt(rank)
        else:
            kept, decades = (rank - rank // 4, 3.0) if factors == "preheat" else (rank, 8.0)
            spread = torch.logspace(0, -decades, kept, dtype=dtype, device=device)
            rotation = torch.linalg.qr(gaussian(kept, kept)).Q
            B = torch.zeros(shape.out_features, rank, dtype=dtype, device=device)
            B[:, :kept] = (gaussian(shape.out_features, kept) / math.sqrt(shape.out_features) * spread) @ rotation
        products.append((B, A))
    return products


def sample_layers(layer_set: LayerSet, per_shape: int) -> list[int]:
    """Indices of the first ``per_shape`` layers of each shape."""
    taken: dict[LayerShape, int] = {}
    indices = []
    for index, shape in enumerate(layer_set.layer_shapes()):
        if taken.get(shape, 0) < per_shape:
            taken[shape] = taken.get(shape, 0) + 1
            indices.append(index)
    return indices
