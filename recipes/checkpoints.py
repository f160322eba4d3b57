"""What a recipe's checkpoint holds: the weights training changed, and the identity of the base they belong to.

The frozen base model is rebuilt from where it was loaded whenever a recipe's module is built, so a
checkpoint need not carry it (for SmolLM2 that was nearly the whole file; for a 7B model ~13 GB; a
4-bit base could not even be loaded back). :class:`~lightning_hrp.recipes.lora_module.LoraRecipeModule`
saves only :func:`keys_to_keep` (trainable weights, buffers, base weights an init rewrote) and a
:class:`BaseIdentity`, and refuses a checkpoint whose base was another model. :func:`read_checkpoint`
refuses a ``--ckpt_path`` that is not a checkpoint at all, in one line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, Strategy
from torch import nn

# The checkpoint entry that holds the base's identity (a dict of BaseIdentity's fields).
BASE_IDENTITY_KEY = "lightning_hrp_base"
# Values read from each tensor for the fingerprint: every one of a small tensor, evenly spaced ones of a large.
_SAMPLES_PER_TENSOR = 1024


@dataclass(frozen=True)
class BaseIdentity:
    """Which frozen base a module was built on.

    Attributes:
        source: Where it came from, for people: a folder, a hub name, or how it was generated
            (with its quantization). Not compared: the same weights may move to another folder.
        fingerprint: SHA-256 over every tensor of the base as loaded (before LoRA and any init):
            its name, dtype, shape and :data:`_SAMPLES_PER_TENSOR` evenly spaced values. Another model,
            another revision, another quantization or another random head all change it; reading it
            costs a few thousand values per tensor, not a pass over the weights.
        tensors: How many tensors the fingerprint covers.
    """

    source: str
    fingerprint: str
    tensors: int

    def mismatch(self, built: BaseIdentity) -> str | None:
        """Why a checkpoint trained on this base cannot be loaded into a module ``built`` on another; None if it can."""
        if self.fingerprint == built.fingerprint:
            return None
        trained = f"{self.source!r} ({self.tensors} tensors, fingerprint {self.fingerprint[:12]})"
        here = f"{built.source!r} ({built.tensors} tensors, fingerprint {built.fingerprint[:12]})"
        if self.source == built.source:
            return (
                f"the checkpoint was trained on {trained}, and the same source now gives other weights {here}: another "
                "revision, files changed since, or another seed_everything for weights the recipe draws at random "
                "(a new classification head)."
            )
        return f"the checkpoint was trained on {trained}, not on this run's base {here}: another model or revision."


def base_identity(base: nn.Module, source: str) -> BaseIdentity:
    """The :class:`BaseIdentity` of ``base`` as it is now (call it before LoRA is added and any init runs)."""
    digest = hashlib.sha256()
    count = 0
    for name, tensor in base.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            continue
        flat = tensor.detach().reshape(-1)
        if flat.numel() > _SAMPLES_PER_TENSOR:
            flat = flat[torch.arange(_SAMPLES_PER_TENSOR, device=flat.device) * flat.numel() // _SAMPLES_PER_TENSOR]
        values = flat.cpu().contiguous().view(torch.uint8).numpy().tobytes()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(values)
        count += 1
    return BaseIdentity(source=source, fingerprint=digest.hexdigest(), tensors=count)


def keys_to_keep(module: nn.Module, rewritten_base_weights: Iterable[torch.Tensor] = ()) -> set[str]:
    """The state-dict keys a recipe's checkpoint keeps: what training (and the init) changed.

    That is every trainable parameter (adapters, heads; all of them in full fine-tuning), every
    buffer (a training-mode module may update them, and they are small), and the base weights
    an init rewrote (PiSSA, OLoRA and LoRA-GA leave a residual in the base). Everything else is
    the frozen base as loaded, rebuilt from its source.
    """
    rewritten = {id(weight) for weight in rewritten_base_weights}
    keys = {name for name, p in module.named_parameters(remove_duplicate=False) if p.requires_grad or id(p) in rewritten}
    keys.update(name for name, _ in module.named_buffers(remove_duplicate=False))
    return keys


def loads_through_the_module(strategy: Strategy) -> bool:
    """Whether ``strategy`` loads a checkpoint with ``LightningModule.load_state_dict`` (one device, DDP).

    Sharded strategies (FSDP, ``ModelParallelStrategy``, DeepSpeed) load the model's state themselves,
    strictly and shard by shard; their checkpoints keep the whole state.
    """
    return isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, DeepSpeedStrategy)


class DamagedCheckpointError(ValueError):
    """A ``--ckpt_path`` that does not load as a Lightning checkpoint."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded as ``LightningCLI`` loads it for its hyper-parameters (CPU, weights only).

    Raises:
        DamagedCheckpointError: The file does not load (truncated, empty, garbage) or holds no
            Lightning checkpoint; the message is one line with the path and what to do.
    """
    fix = "give the checkpoint a lightning-hrp fit wrote (e.g. runs/<run>/checkpoints/last.ckpt), or copy it again if it was cut short."
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # whatever torch.load raises on such a file (EOFError, RuntimeError, UnpicklingError, ...)
        reason = (str(error).strip().splitlines() or [""])[0][:120]
        raise DamagedCheckpointError(
            f"ckpt_path: {path} is damaged or not a checkpoint ({type(error).__name__}{': ' + reason if reason else ''}); {fix}"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise DamagedCheckpointError(
            f"ckpt_path: {path} is damaged or not a checkpoint (it holds a {type(checkpoint).__name__} without a state_dict); {fix}"
        )
    return checkpoint
