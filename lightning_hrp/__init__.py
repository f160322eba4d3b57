"""lightning-hrp: High-Rank Preheating (HRP) LoRA initialisation for PyTorch Lightning, plain PyTorch and transformers."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from lightning_hrp.errors import HRPConfigurationError, PreheatFailedError

if TYPE_CHECKING:
    from lightning_hrp.callback import HRPPreheatCallback
    from lightning_hrp.engine.lean_optimizer import FactoredRMS
    from lightning_hrp.functional import hrp_init
    from lightning_hrp.options import HRPOptions
    from lightning_hrp.report import HRPReport, LayerDiagnostics

__all__ = [
    "FactoredRMS",
    "HRPConfigurationError",
    "HRPOptions",
    "HRPPreheatCallback",
    "HRPReport",
    "LayerDiagnostics",
    "PreheatFailedError",
    "hrp_init",
]
__version__ = "0.1.0"

# Imported on first use: `import lightning_hrp` stays light, and only the callback imports Lightning.
_LAZY = {
    "FactoredRMS": "lightning_hrp.engine.lean_optimizer",
    "HRPPreheatCallback": "lightning_hrp.callback",
    "hrp_init": "lightning_hrp.functional",
    "HRPOptions": "lightning_hrp.options",
    "HRPReport": "lightning_hrp.report",
    "LayerDiagnostics": "lightning_hrp.report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_hrp' has no attribute {name!r}")


def __dir__() -> list[str]:
    # Lists the lazily imported names too, without importing them.
    return sorted(set(globals()) | set(__all__))
