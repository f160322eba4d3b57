"""Giving peft LoRA adapters new ranks, as peft's EVA does, with the peft config recording them.

Each resized layer gets new ``lora_A``/``lora_B`` modules from peft's own ``LoraLayer.update_layer``
(what EVA's rank redistribution calls), in the dtype, device and ``requires_grad`` state of the
modules they replace; the adapter's ``LoraConfig`` gets ``rank_pattern`` and ``alpha_pattern`` entries,
so that ``save_pretrained`` and ``PeftModel.from_pretrained`` rebuild the same shapes and scales
without this library.

The LoRA scale ``s`` of every layer stays what it was (``alpha`` becomes ``s * r'``, or ``s * sqrt(r')``
with rsLoRA, as EVA's default ``adjust_scaling_factors=True`` does for ``alpha / r``): each direction
then learns at the rate it would have at the uniform rank, so a learning rate tuned for the uniform
adapter keeps its meaning.

New parameter objects cannot be in an optimizer built before, nor in a DDP or FSDP wrapper: resize
only a bare model, before any optimizer exists. :func:`guard_against_stale_optimizers` turns an
optimizer that still holds a replaced parameter into an error at its first step instead of a run
that silently never trains the new adapters. :func:`resize_on_load` lets a freshly built model load
a state dict (a checkpoint) whose adapters were given other ranks.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Sequence
from copy import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.lora import LoraLayer, LoraModel
from peft.utils.other import get_pattern_key
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from lightning_hrp.engine.lora import LoraTarget
from lightning_hrp.errors import HRPConfigurationError

# Per-adapter entries of a LoraLayer that update_layer rewrites.
_LAYER_DICTS = ("r", "lora_alpha", "scaling", "use_dora", "use_rslora", "lora_bias")
_LAYER_MODULES = ("lora_A", "lora_B", "lora_dropout")


def check_resizable(root: nn.Module, targets: Sequence[LoraTarget]) -> None:
    """Refuse (``HRPConfigurationError`` naming ``rank_budget``) a model whose adapters cannot change shape.

    Shapes can change only on a bare model inside a peft ``LoraModel`` (whose config records the new
    ranks), before DDP or FSDP wrap it, and with plain LoRA adapters (no DoRA).
    """
    wrapped = [type(m).__name__ for m in root.modules() if isinstance(m, (DistributedDataParallel, FullyShardedDataParallel, FSDPModule))]
    sharded = any(isinstance(p, DTensor) for p in root.parameters())
    if wrapped or sharded:
        raise HRPConfigurationError(
            f"rank_budget gives the LoRA adapters new shapes, which a model already wrapped or sharded "
            f"({wrapped[0] if wrapped else 'DTensor parameters'}) cannot take: the wrapper and any optimizer hold the old "
            "parameters. Allocate on the bare model, before wrapping it and before building the optimizer: hrp_init(model, "
            "..., rank_budget=...) first, then DistributedDataParallel / fully_shard; in Lightning, init_method: hrp with "
            "init_options.rank_budget (lightning_hrp.inits.HRPInit, which runs at setup, before the strategy wraps the model)."
        )
    if any(t.use_dora for t in targets):
        raise HRPConfigurationError("rank_budget resizes plain LoRA adapters; DoRA adapters (use_dora=True) are not supported.")
    _lora_models(root, targets)


def _lora_models(root: nn.Module, targets: Sequence[LoraTarget]) -> list[LoraModel]:
    """The peft ``LoraModel`` holding each target (its config records the ranks)."""
    homes = {module: lora_model for lora_model in root.modules() if isinstance(lora_model, LoraModel) for module in lora_model.modules()}
    missing = [t.name for t in targets if t.layer not in homes]
    if missing:
        raise HRPConfigurationError(
            f"rank_budget needs the peft model whose LoraConfig records the new ranks (peft.get_peft_model), but the "
            f"LoRA layer {missing[0]} is not inside a peft LoraModel."
        )
    return [homes[t.layer] for t in targets]


@dataclass
class _SavedLayer:
    target: LoraTarget
    entries: dict[str, Any]
    modules: dict[str, nn.Module]
    flags: list[tuple[nn.Parameter, bool]]


@dataclass
class Resizing:
    """What :func:`resize_adapters` replaced; :meth:`undo` puts it back."""

    saved: list[_SavedLayer] = field(default_factory=list)
    configs: list[tuple[Any, dict, dict]] = field(default_factory=list)

    def replaced_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.saved for module in layer.modules.values() for p in module.parameters()]

    @torch.no_grad()
    def undo(self) -> None:
        """Give every resized layer its old modules, ranks and scale, and every config its old patterns."""
        for param in self.replaced_parameters():  # in use again: no longer stale for an optimizer
            _REPLACED.pop(id(param), None)
        for layer in self.saved:
            adapter, peft_layer = layer.target.adapter_name, layer.target.layer
            for name, value in layer.entries.items():
                getattr(peft_layer, name)[adapter] = value
            for name, module in layer.modules.items():
                getattr(peft_layer, name)[adapter] = module
            for param, flag in layer.flags:
                param.requires_grad_(flag)
        for config, rank_pattern, alpha_pattern in self.configs:
            config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
        self.saved.clear()
        self.configs.clear()


def resize_adapters(root: nn.Module, targets: Sequence[LoraTarget], ranks: Sequence[int]) -> Resizing:
    """Give each target with a new rank fresh ``lora_A``/``lora_B`` of that rank, keeping its LoRA scale.

    The new weights hold peft's placeholder values (``init_lora_weights=False``): write the real start
    afterwards. The global RNG is left as it was. On an exception nothing stays changed.

    Args:
        root: The bare model holding the targets inside a peft ``LoraModel`` (see :func:`check_resizable`).
        targets: The layers, each with its new rank in ``ranks``.
        ranks: The new rank of each target.

    Returns:
        The record to undo it with.
    """
    resizing = Resizing()
    changed = [(t, r, m) for t, r, m in zip(targets, ranks, _lora_models(root, targets)) if r != t.rank]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for target, rank, lora_model in changed:
                resizing.saved.append(_resize_layer(lora_model, target, rank))
            # One record per (peft model, adapter), in a fixed order.
            for lora_model, adapter in dict.fromkeys((m, t.adapter_name) for t, _, m in changed):
                resizing.configs.append(_record_ranks(lora_model, adapter))
    except BaseException:
        resizing.undo()
        raise
    return resizing


def _resize_layer(lora_model: LoraModel, target: LoraTarget, rank: int) -> _SavedLayer:
    layer, adapter = target.layer, target.adapter_name
    old_A, old_B = target.lora_A, target.lora_B
    scaling = target.scaling
    saved = _SavedLayer(
        target,
        entries={name: getattr(layer, name)[adapter] for name in _LAYER_DICTS},
        modules={name: getattr(layer, name)[adapter] for name in _LAYER_MODULES},
        flags=[(p, p.requires_grad) for name in LoraLayer.adapter_layer_names for p in getattr(layer, name).parameters()],
    )
    config = copy(lora_model.peft_config[adapter])
    config.init_lora_weights = False  # the real start is written afterwards; no draw, no base-weight init
    alpha = scaling * (math.sqrt(rank) if target.use_rslora else rank)
    layer.update_layer(adapter_name=adapter, r=rank, lora_alpha=alpha, config=config)
    # update_layer casts to the base layer's dtype and re-enables every active adapter: keep what was.
    layer.lora_A[adapter] = layer.lora_A[adapter].to(device=old_A.device, dtype=old_A.dtype)
    layer.lora_B[adapter] = layer.lora_B[adapter].to(device=old_B.device, dtype=old_B.dtype)
    for param, flag in saved.flags:
        param.requires_grad_(flag)
    target.lora_A.requires_grad_(old_A.requires_grad)
    target.lora_B.requires_grad_(old_B.requires_grad)
    old_bias = saved.modules["lora_B"].bias
    if old_bias is not None:
        target.layer.lora_B[adapter].bias.copy_(old_bias)
    return saved


def _record_ranks(lora_model: LoraModel, adapter: str) -> tuple[Any, dict, dict]:
    """Write every LoRA layer's rank and alpha into the adapter's ``rank_pattern`` / ``alpha_pattern``.

    Keys are exact (``^`` + the escaped module name), put first, and only for layers the old patterns
    would rebuild differently; returns ``(config, old rank_pattern, old alpha_pattern)``.
    """
    config = lora_model.peft_config[adapter]
    old_ranks, old_alphas = dict(config.rank_pattern or {}), dict(config.alpha_pattern or {})
    layers = [(key, m) for key, m in lora_model.model.named_modules() if isinstance(m, LoraLayer) and adapter in m.r]
    patterns = []
    for old, default, attribute in ((old_ranks, config.r, "r"), (old_alphas, config.lora_alpha, "lora_alpha")):
        explicit = {
            "^" + re.escape(key): getattr(m, attribute)[adapter]
            for key, m in layers
            if _rebuilt(old, default, key) != getattr(m, attribute)[adapter]
        }
        pattern = {**explicit, **{k: v for k, v in old.items() if k not in explicit}}
        wrong = [key for key, m in layers if _rebuilt(pattern, default, key) != getattr(m, attribute)[adapter]]
        if wrong:  # cannot happen with exact keys first; a silent mismatch on reload would be worse than stopping
            raise RuntimeError(f"the peft config would rebuild {wrong[0]} with another {attribute}.")
        patterns.append(pattern)
    config.rank_pattern, config.alpha_pattern = patterns
    return config, old_ranks, old_alphas


def _rebuilt(pattern: dict, default: Any, key: str) -> Any:
    """The value peft gives the layer ``key`` when it builds the adapter from a config (``LoraModel._create_and_replace``)."""
    return pattern.get(get_pattern_key(pattern.keys(), key), default)


# The parameters resizing replaced, while anything keeps them alive: id -> weak reference (the entry goes
# when the parameter does). One optimizer pre-step hook, registered at the first resize, checks them.
_REPLACED: dict[int, weakref.ref] = {}
_STALE_OPTIMIZER_HOOK: list[RemovableHandle] = []


def guard_against_stale_optimizers(replaced: Sequence[Tensor]) -> None:
    """Make the next step of any optimizer that still holds one of ``replaced`` raise ``HRPConfigurationError``.

    One global optimizer pre-step hook for every resize, registered once and never removed (a hook
    removing itself while torch iterates the hooks would break every step); with no replaced
    parameter alive (the usual case: nothing else held the old adapters) it returns at once.
    """
    for param in replaced:
        _REPLACED[id(param)] = weakref.ref(param, lambda _, key=id(param): _REPLACED.pop(key, None))
    if not _STALE_OPTIMIZER_HOOK:
        _STALE_OPTIMIZER_HOOK.append(register_optimizer_step_pre_hook(_refuse_replaced_parameters))


def _refuse_replaced_parameters(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    if not _REPLACED:
        return
    if any(id(p) in _REPLACED for group in optimizer.param_groups for p in group["params"]):
        raise HRPConfigurationError(
            "This optimizer holds LoRA parameters that rank_budget replaced with resized ones: it was built before "
            "HRP allocated the ranks, so it would never train the new adapters. Build the optimizer after "
            "hrp_init(..., rank_budget=...)."
        )


def resize_on_load(root: nn.Module, targets: Sequence[LoraTarget]) -> RemovableHandle:
    """Make ``root.load_state_dict`` first give each target the rank the incoming state dict holds.

    A checkpoint of a run that allocated a rank budget holds other adapter shapes than a model built
    afresh from the same config; with this hook it loads (the peft config records the ranks, as
    after the allocation). On a model already wrapped or sharded the load is refused
    (``HRPConfigurationError``) instead of failing on a size mismatch. One hook on ``root`` resizes
    every changed adapter at once, before any child loads.

    Returns:
        The hook's handle (``handle.remove()`` unregisters it).
    """
    names = {id(m): name for name, m in root.named_modules()}
    keys = [(target, ".".join(filter(None, [names[id(target.layer)], "lora_A", target.adapter_name, "weight"]))) for target in targets]

    def take_incoming_ranks(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        incoming = {id(target): state_dict.get(prefix + key) for target, key in keys}
        changed = [t for t, _ in keys if incoming[id(t)] is not None and incoming[id(t)].shape[0] != t.rank]
        if not changed:
            return
        ranks = [incoming[id(t)].shape[0] for t in changed]
        try:
            check_resizable(root, changed)
        except HRPConfigurationError as error:
            raise HRPConfigurationError(
                f"The state dict being loaded gives {changed[0].name} rank {ranks[0]} (the model has "
                f"{changed[0].rank}), as after a rank_budget allocation, and the adapter cannot be resized: {error}"
            ) from None
        guard_against_stale_optimizers(resize_adapters(root, changed, ranks).replaced_parameters())

    return root.register_load_state_dict_pre_hook(take_incoming_ranks)
