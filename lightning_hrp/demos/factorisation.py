"""The spec's section 3 toy as a LightningModule: learn a fixed matrix ``M`` as a LoRA update.

A bias-free ``Linear`` with zero weight gets a rank-r peft LoRA adapter; fed the identity, its
output is ``(s * B @ A)^T``, so the loss is exactly ``||s * B @ A - M||_F^2``. ``M`` is ``n x n``
with singular values ``1/i`` and seeded random singular vectors. With ``train_A=False``
("asymmetric LoRA") training ``B`` from zero converges to ``M P_A``, so the final loss depends
only on the row space of ``A``: ``(1 - r/n) ||M||_F^2`` on average for a random ``A``, and the
optimum ``sum_{i>r} 1/i^2`` for the top singular vectors of ``M``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def factorisation_target(n: int = 64, seed: int = 0) -> Tensor:
    """``M = U diag(1, 1/2, ..., 1/n) V^T`` with seeded random orthogonal ``U`` and ``V``."""
    generator = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (U * (1.0 / torch.arange(1, n + 1, dtype=torch.float64))) @ V.T


class _Projection(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n, n, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class FactorisationToy(pl.LightningModule):
    """Fit ``M`` with a rank-``rank`` LoRA adapter on a zero ``Linear(n, n)``.

    Args:
        n: Size of ``M``.
        rank: LoRA rank ``r``.
        lr: Adam learning rate of the main run.
        train_A: Train ``A`` too (classic LoRA) instead of ``B`` alone (asymmetric LoRA).
        target_seed: Seed of ``M``'s singular vectors.
    """

    def __init__(self, n: int = 64, rank: int = 4, lr: float = 1e-2, train_A: bool = False, target_seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.model = get_peft_model(_Projection(n), LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"]))
        lora_layer = self.model.base_model.model.proj
        lora_layer.lora_A["default"].weight.requires_grad_(train_A)
        self.register_buffer("target", factorisation_target(n, target_seed).float())

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        (x,) = batch
        loss = ((self(x) - x @ self.target.T) ** 2).sum()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.eye(self.hparams.n)), batch_size=self.hparams.n)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)

    def lora_A(self) -> Tensor:
        """The adapter's current ``A`` (``r x n``)."""
        return self.model.base_model.model.proj.lora_A["default"].weight.detach()

    @torch.no_grad()
    def current_loss(self) -> float:
        """``||s * B @ A - M||_F^2`` now."""
        eye = torch.eye(self.hparams.n, device=self.target.device)
        return float(((self(eye) - eye @ self.target.T) ** 2).sum())

    def converged_asymmetric_loss(self) -> float:
        """``||M||_F^2 - ||M P_A||_F^2``: where asymmetric training from the current ``A`` ends."""
        M = self.target.double()
        Q, _ = torch.linalg.qr(self.lora_A().double().T)
        return float((M**2).sum() - ((M @ Q) ** 2).sum())
