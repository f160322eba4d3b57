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
