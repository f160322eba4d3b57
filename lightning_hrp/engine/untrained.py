"""Whether LoRA adapters still hold their untrained start, so that re-initialising them loses nothing.

HRP's direction rule writes ``B = 0`` and a new ``A``: on an adapter that was trained, or that another
init (PiSSA, OLoRA, LoRA-GA, LoRA-One, ``keep_progress``) started with ``B != 0``, that silently throws
work away and, where the base weights hold a residual ``W0 - B A``, changes the model's output. An
adapter is taken as untrained when its ``B`` is exactly zero (peft's default start) and HRP has not
already written its ``A`` in this process. A residual base is told by peft's ``init_lora_weights``
or, for an init that rewrites the base itself (this project's LoRA-GA, through ``lora_ga_init``), by
its record. The records (what HRP wrote, which base weights hold a residual) are registries of weak
references keyed by the Parameter objects, not attributes on the modules: they end with the
parameters, and they do not travel with a ``state_dict`` (a saved, HRP-initialised but untrained
adapter loaded into a fresh model is taken as untrained; nothing trained is lost there).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from peft.tuners.lora import LoraModel
from torch import Tensor, nn

from lightning_hrp.engine.lora import LoraTarget

# peft's init_lora_weights values that rewrite the base weights to a residual W0 - B A (with "pissa_niter_*").
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class _ParameterRecord:
    """A value per Parameter object, kept while the Parameter lives (keyed by identity, not by an equal value)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref[Tensor], str]] = {}

    def add(self, param: Tensor, value: str) -> None:
        key = id(param)
        self._entries[key] = (weakref.ref(param, lambda _, key=key: self._entries.pop(key, None)), value)

    def get(self, param: Tensor) -> str | None:
        ref, value = self._entries.get(id(param), (None, None))
        return value if ref is not None and ref() is param else None


_written_by_hrp = _ParameterRecord()
_residual_bases = _ParameterRecord()


def mark_initialised_by_hrp(params: Iterable[Tensor]) -> None:
    """Record that HRP wrote these ``lora_A`` weights (until the parameters are freed)."""
    for param in params:
        _written_by_hrp.add(param, "hrp")


def initialised_by_hrp(param: Tensor) -> bool:
    """Whether HRP wrote ``param`` in this process (the very Parameter object, not an equal value)."""
    return _written_by_hrp.get(param) is not None


def mark_residual_base(base_weights: Iterable[Tensor], init: str) -> None:
    """Record that ``init`` rewrote these base weights to a residual ``W0 - s B A`` outside peft's config."""
    for weight in base_weights:
        _residual_bases.add(weight, init)


def residual_init(model: nn.Module, targets: Sequence[LoraTarget]) -> str | None:
    """The init that left a residual in the base weights of ``targets``, else ``None``.

    peft's ``init_lora_weights`` of their adapter when it names a residual init, else the init recorded
    by :func:`mark_residual_base` for one of their base weights.
    """
    adapter_name = targets[0].adapter_name
    for module in model.modules():
        if isinstance(module, LoraModel) and adapter_name in module.peft_config:
            init = module.peft_config[adapter_name].init_lora_weights
            if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
                return init
    return next((init for t in targets if (init := _residual_bases.get(t.layer.get_base_layer().weight))), None)


@dataclass(frozen=True)
class TrainedAdapters:
    """The adapters that are not at their untrained start, and why.

    Attributes:
        nonzero_B: Layers whose ``lora_B`` is not exactly zero (trained, or started by another init).
        initialised_by_hrp: Layers whose ``lora_A`` HRP already wrote in this process.
        optimizer_state: Layers whose weights already have state in the main run's optimizer (moments of
            steps taken).
        residual_init: The init that left a residual in the base weights (peft's ``init_lora_weights``, or
            one recorded by :func:`mark_residual_base`).
    """

    nonzero_B: list[str]
    initialised_by_hrp: list[str]
    optimizer_state: list[str]
    residual_init: str | None

    def __bool__(self) -> bool:
        return bool(self.nonzero_B or self.initialised_by_hrp or self.optimizer_state)

    def describe(self) -> str:
        """What was found, one clause per kind, each with a count and the first layers' names."""
        found = []
        if self.nonzero_B:
            found.append(f"lora_B is not zero in {_layers(self.nonzero_B)} (trained, or started by another init)")
        if self.residual_init is not None:
            found.append(
                f"the base weights hold a residual W0 - s B A left by the {self.residual_init!r} init, so B = 0 would "
                "change the model's output"
            )
        if self.initialised_by_hrp:
            found.append(f"HRP already initialised {_layers(self.initialised_by_hrp)}")
        if self.optimizer_state:
            found.append(f"the optimizer already holds state (moments of earlier steps) for {_layers(self.optimizer_state)}")
        return "; ".join(found)


def find_trained_adapters(
    targets: Sequence[LoraTarget],
    originals: Sequence[tuple[Tensor, Tensor]],
    *,
    residual: str | None = None,
    optimizer_state: Sequence[str] = (),
) -> TrainedAdapters:
    """Which of ``targets`` are not at their untrained start; ``originals``: their whole ``(A, B)``."""
    return TrainedAdapters(
        nonzero_B=[t.name for t, (_, B) in zip(targets, originals) if bool(B.any())],
        initialised_by_hrp=[t.name for t in targets if initialised_by_hrp(t.lora_A)],
        optimizer_state=list(optimizer_state),
        residual_init=residual,
    )


def _layers(names: Sequence[str]) -> str:
    shown = ", ".join(names[:3])
    return f"{len(names)} layer(s) ({shown}{', ...' if len(names) > 3 else ''})"
