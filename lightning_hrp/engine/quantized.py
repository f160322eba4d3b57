"""Quantized (bitsandbytes) bases: what HRP must know about them. bitsandbytes is never imported here.

HRP never reads or writes the base weights, so a 4-bit or 8-bit base is preheated like any other:
only the gradient has to reach the LoRA layers through the quantized ones.
"""

from __future__ import annotations

import sys

from torch import nn


def cpu_inference_packed_layers(model: nn.Module) -> list[str]:
    """The 4-bit bitsandbytes layers of ``model`` whose weight was repacked for CPU inference.

    bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a ``Linear4bit`` weight in place at its first
    eval-mode forward whose input needs no gradient, and from then on computes that layer with a kernel
    outside autograd: its backward passes no gradient to its input, so no LoRA layer before it can learn,
    in preheating or in training. ``model.state_dict()`` unpacks the weights again.
    """
    bitsandbytes = sys.modules.get("bitsandbytes")  # a model with such layers has imported it
    if bitsandbytes is None:
        return []
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, bitsandbytes.nn.Linear4bit)
        and getattr(module.weight.quant_state, "packing_format_for_cpu", False)  # bitsandbytes' own flag
    ]


def quantized_weights(model: nn.Module) -> list[str]:
    """The names of ``model``'s bitsandbytes-quantized parameters (4-bit ``Params4bit``, 8-bit ``Int8Params``).

    Their storage is packed codes, not the weights: whatever reads a weight as a matrix (an SVD, a QR,
    a gradient with respect to it) must refuse them, or dequantise first.
    """
    bitsandbytes = sys.modules.get("bitsandbytes")
    if bitsandbytes is None:
        return []
    quantized = (bitsandbytes.nn.Params4bit, bitsandbytes.nn.Int8Params)
    return [name for name, parameter in model.named_parameters(remove_duplicate=False) if isinstance(parameter, quantized)]
