"""lightning-hrp: High-Rank Preheating (HRP) LoRA initialisation for PyTorch Lightning."""

from lightning_hrp.callback import HRPPreheatCallback, HRPReport, LayerDiagnostics
from lightning_hrp.errors import HRPConfigurationError, PreheatFailedError

__all__ = ["HRPConfigurationError", "HRPPreheatCallback", "HRPReport", "LayerDiagnostics", "PreheatFailedError"]
__version__ = "0.1.0"
