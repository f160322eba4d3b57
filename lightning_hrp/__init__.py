"""lightning-hrp: High-Rank Preheating (HRP) LoRA initialisation for PyTorch Lightning."""

from typing import TYPE_CHECKING, Any

from lightning_hrp.errors import HRPConfigurationError, PreheatFailedError

if TYPE_CHECKING:
    from lightning_hrp.callback import HRPPreheatCallback, HRPReport, LayerDiagnostics

__all__ = ["HRPConfigurationError", "HRPPreheatCallback", "HRPReport", "LayerDiagnostics", "PreheatFailedError"]
__version__ = "0.1.0"

_CALLBACK_NAMES = {"HRPPreheatCallback", "HRPReport", "LayerDiagnostics"}


def __getattr__(name: str) -> Any:
    # Imported on first use so that `lightning_hrp.engine` stays free of Lightning.
    if name in _CALLBACK_NAMES:
        from lightning_hrp import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'lightning_hrp' has no attribute {name!r}")


def __dir__() -> list[str]:
    # Lists the lazily imported names too, without importing them.
    return sorted(set(globals()) | set(__all__))
