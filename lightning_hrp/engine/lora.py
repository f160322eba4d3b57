"""Finding the rank-r LoRA adapters of a peft model."""

from __future__ import annotations

from dataclasses import dataclass

from peft.tuners.lora import LoraLayer
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from lightning_hrp.errors import HRPConfigurationError

# Prefixes that wrappers (FSDP1, activation checkpointing, torch.compile) add to module names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass(frozen=True)
class LoraTarget:
    """One peft LoRA layer and the adapter HRP initialises in it."""

    name: str
    layer: LoraLayer
    adapter_name: str

    @property
    def lora_A(self) -> nn.Parameter:
        """``(r, in)`` down-projection."""
        return self.layer.lora_A[self.adapter_name].weight

    @property
    def lora_B(self) -> nn.Parameter:
        """``(out, r)`` up-projection."""
        return self.layer.lora_B[self.adapter_name].weight

    @property
    def rank(self) -> int:
        return self.layer.r[self.adapter_name]

    @property
    def lora_alpha(self) -> float:
        return self.layer.lora_alpha[self.adapter_name]

    @property
    def use_rslora(self) -> bool:
        return self.layer.use_rslora[self.adapter_name]

    @property
    def scaling(self) -> float:
        return self.layer.scaling[self.adapter_name]

    @property
    def use_dora(self) -> bool:
        return self.layer.use_dora.get(self.adapter_name, False)

    @property
    def in_features(self) -> int:
        return self.layer.lora_A[self.adapter_name].in_features

    @property
    def out_features(self) -> int:
        return self.layer.lora_B[self.adapter_name].out_features

    @property
    def dropout(self) -> nn.Module:
        return self.layer.lora_dropout[self.adapter_name]

    @property
    def trainable(self) -> bool:
        return self.lora_A.requires_grad or self.lora_B.requires_grad

    def scaling_for_rank(self, rank: int) -> float:
        """The scale peft would give this layer's adapter at ``rank`` (``alpha/r`` or rsLoRA's ``alpha/sqrt(r)``)."""
        return self.lora_alpha / (rank**0.5 if self.use_rslora else rank)


def find_lora_targets(model: nn.Module, adapter_name: str | None = None) -> list[LoraTarget]:
    """Every peft LoRA layer of ``model`` that holds the chosen adapter.

    Args:
        model: Any module containing peft ``LoraLayer`` modules (a ``PeftModel`` or a
            LightningModule holding one).
        adapter_name: The adapter to initialise; may be omitted when the model has exactly one.

    Raises:
        HRPConfigurationError: No LoRA layer, an ambiguous or unknown adapter, or a LoRA layer
            kind HRP does not support (only ``nn.Linear`` adapters are).
    """
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    if not layers:
        raise HRPConfigurationError(
            f"No peft LoRA layer found in {type(model).__name__}: HRP searched its modules for "
            "peft.tuners.lora.LoraLayer. Wrap the network with peft.get_peft_model(model, LoraConfig(...)) "
            "before training starts (in __init__ or configure_model)."
        )
    adapters = sorted({adapter for _, layer in layers for adapter in (*layer.lora_A, *layer.lora_embedding_A)})
    if adapter_name is None:
        if len(adapters) != 1:
            raise HRPConfigurationError(
                f"The model holds several LoRA adapters {adapters}; choose one with adapter_name=... "
                "(an option of every HRP entry point)."
            )
        adapter_name = adapters[0]
    elif adapter_name not in adapters:
        raise HRPConfigurationError(f"adapter_name={adapter_name!r} is not in the model; its adapters are {adapters}.")

    unsupported = [
        name
        for name, layer in layers
        if adapter_name in layer.lora_embedding_A
        or (adapter_name in layer.lora_A and not isinstance(_unwrapped(layer.lora_A[adapter_name]), nn.Linear))
    ]
    if unsupported:
        raise HRPConfigurationError(
            f"HRP supports LoRA on Linear layers only, but adapter {adapter_name!r} also targets "
            f"{unsupported}; leave those modules out of LoraConfig(target_modules=...)."
        )
    return [
        LoraTarget(name=_clean_name(name), layer=layer, adapter_name=adapter_name)
        for name, layer in layers
        if adapter_name in layer.lora_A
    ]


def _unwrapped(module: nn.Module) -> nn.Module:
    # FSDP1 without use_orig_params wraps each LoRA Linear as its own unit.
    return module.module if isinstance(module, FullyShardedDataParallel) else module


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name
