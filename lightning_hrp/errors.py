"""Exceptions raised by lightning-hrp."""


class HRPConfigurationError(ValueError):
    """An argument, model or strategy that HRP cannot work with; raised before anything changes."""


class PreheatFailedError(RuntimeError):
    """Preheating produced no usable result (a non-finite loss, adapter or decomposition)."""


def reevaluating_optimizer_refused(optimizer_name: str) -> HRPConfigurationError:
    """The refusal of a preheat optimizer that evaluates the loss more than once per step (LBFGS, a line search)."""
    # A second evaluation would read the next batches into gradients not zeroed in between and report the first loss.
    return HRPConfigurationError(
        f"preheat_optimizer: {optimizer_name} evaluates the loss more than once per step (a line search or a "
        "re-evaluating optimizer), which preheating does not support: each preheat step reads its own batches once. "
        "Use a single-evaluation optimizer (the default AdamW, lightning_hrp.FactoredRMS, SGD)."
    )
