"""A preheat optimizer that keeps almost no state: Adam's normalised step with Adafactor's factored second moment.

AdamW keeps two buffers the size of every parameter, twice the preheat adapters themselves: for
LLaMA-7B with LoRA on every linear layer at ``R = 64`` that is 1.3 GB in float32, most of what
preheating adds to a QLoRA run. This optimizer keeps, per ``(m, n)`` matrix, the running means of
the squared gradient over its rows (``m`` numbers) and over its columns (``n``), as Adafactor does
(Shazeer & Stern 2018, arXiv 1804.04235), and estimates the second moment of each entry from their
outer product. Unlike Adafactor it steps at an absolute learning rate, with Adam's bias correction
and no momentum, so ``lr`` means what it means for Adam (a step of about ``lr`` per entry) and the
main run's learning rate fits; like Adafactor it caps each update's RMS at 1.

Parameters of any floating dtype: the step is computed in float32 and rounded into the parameter once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_hrp._validation import is_positive_number, is_real_number


class FactoredRMS(Optimizer):
    """``p -= lr * g / sqrt(v_hat)``, ``v_hat`` the factored, bias-corrected running mean of ``g**2``; update RMS <= 1.

    Args:
        params: The tensors to train.
        lr: Step size, on Adam's scale.
        beta2: Decay of the running means of the squared gradient.
        eps: Added to the squared gradient (a row or column whose gradient is all zero then gets no step).
    """

    def __init__(self, params: Iterable[Tensor], lr: float, beta2: float = 0.999, eps: float = 1e-30) -> None:
        if not is_positive_number(lr):
            raise ValueError(f"FactoredRMS: lr must be a positive, finite number (e.g. lr=1e-3), got {lr!r}.")
        if not (is_real_number(beta2) and 0 <= beta2 < 1):
            raise ValueError(f"FactoredRMS: beta2 must be a number in [0, 1), got {beta2!r}.")
        if not (is_real_number(eps) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"FactoredRMS: eps must be a finite number >= 0, got {eps!r}.")
        super().__init__(params, {"lr": float(lr), "beta2": float(beta2), "eps": float(eps)})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor | None] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta2, eps = group["lr"], group["beta2"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] = step = state.get("step", 0) + 1
                squared = p.grad.float().square().add_(eps)
                if p.ndim >= 2:
                    rows, columns = _running_means(state, squared, beta2)
                    # v_hat = rows x columns / mean(rows); the (1 - beta2**t) of one factor cancels with the mean.
                    correction = (1 - beta2**step) * rows.mean(dim=-2, keepdim=True)
                    update = p.grad.to(torch.float32, copy=True).mul_(rows.rsqrt()).mul_(columns.rsqrt()).mul_(correction.sqrt())
                else:
                    variance = state.setdefault("variance", torch.zeros_like(squared))
                    variance.lerp_(squared, 1 - beta2)
                    update = p.grad.to(torch.float32, copy=True).mul_((variance / (1 - beta2**step)).rsqrt_())
                # Adafactor's cap: an update whose RMS exceeds 1 (a poor factored estimate) is scaled down.
                update.div_(update.square().mean().sqrt_().clamp_(min=1.0))
                p.copy_(p.float().sub_(update, alpha=lr))
        return loss


def _running_means(state: dict, squared: Tensor, beta2: float) -> tuple[Tensor, Tensor]:
    """The running means of ``squared`` over each row (``(..., m, 1)``) and each column (``(..., 1, n)``)."""
    rows = state.setdefault("rows", torch.zeros_like(squared.mean(dim=-1, keepdim=True)))
    columns = state.setdefault("columns", torch.zeros_like(squared.mean(dim=-2, keepdim=True)))
    rows.lerp_(squared.mean(dim=-1, keepdim=True), 1 - beta2)
    columns.lerp_(squared.mean(dim=-2, keepdim=True), 1 - beta2)
    return rows, columns
