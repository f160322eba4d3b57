"""Exceptions raised by lightning-hrp."""


class HRPConfigurationError(ValueError):
    """An argument, model or strategy that HRP cannot work with; raised before anything changes."""


class PreheatFailedError(RuntimeError):
    """Preheating produced no usable result (a non-finite loss, adapter or decomposition)."""
