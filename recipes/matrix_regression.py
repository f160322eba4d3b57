"""Low-rank matrix regression: the theory of spec sections 1 and 3 (this project's summary of the HRP paper) made concrete.

A frozen linear layer ``W0`` must be fine-tuned to ``W_target = W0 + M``, where the update ``M``
is low-rank dominated (singular values ``sigma_i = update_scale * i**-spectrum_decay``). LoRA
learns ``s * B @ A`` on a finite, noisy sample: ``y = W_target x + noise`` with anisotropic
Gaussian inputs (a seeded random rotation of log-spaced variances). A held-out set measures how
well the rank-r update generalises, which is where the start direction of LoRA matters.

Everything is seeded: the task (``W0``, ``M``, input covariance, samples and noise) by
``task_seed``; LoRA's random start by ``seed_everything``.

Run: ``lightning-hrp fit --config recipes/configs/matrix_regression_lora.yaml`` (plain LoRA) or
``..._hrp.yaml`` (with High-Rank Preheating).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_hrp._validation import check_int
from lightning_hrp.inits import KnownTargetUpdates
from lightning_hrp.recipes.lora_module import LoraRecipeModule, ModelRequirements

# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegressionTask:
    """The ground truth of one seeded regression task.

    Attributes:
        base_weight: ``W0``, ``(out, in)``: the frozen pretrained weight.
        target_update: ``M = W_target - W0``, ``(out, in)``: what LoRA should learn.
        input_covariance_sqrt: ``Sigma**0.5``, ``(in, in)``, symmetric: inputs are ``z @ Sigma**0.5``.
    """

    base_weight: Tensor
    target_update: Tensor
    input_covariance_sqrt: Tensor


def make_base_weights(in_features: int, out_features: int, heads: int, task_seed: int) -> list[Tensor]:
    """``heads`` weights ``W0_i ~ N(0, 1/in)``, the same for a given seed wherever they are built (module and data)."""
    generator = torch.Generator().manual_seed(task_seed)
    return [torch.randn(out_features, in_features, generator=generator) / in_features**0.5 for _ in range(heads)]


def make_base_weight(in_features: int, out_features: int, task_seed: int) -> Tensor:
    """``W0 ~ N(0, 1/in)``, the same for a given seed wherever it is built (module and data)."""
    return make_base_weights(in_features, out_features, 1, task_seed)[0]


def _random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator))
    # Fix QR's sign ambiguity so the result depends on the seed only, not on the LAPACK build.
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def random_update(
    in_features: int, out_features: int, rank: int, update_scale: float, spectrum_decay: float, generator: torch.Generator
) -> Tensor:
    """A rank-``rank`` update ``(out, in)`` with random singular vectors and singular values ``update_scale * j**-spectrum_decay``."""
    left = _random_orthonormal(out_features, rank, generator)
    right = _random_orthonormal(in_features, rank, generator)
    singular_values = update_scale * torch.arange(1, rank + 1, dtype=torch.float32) ** -spectrum_decay
    return left @ torch.diag(singular_values) @ right.T


def random_input_covariance_sqrt(in_features: int, input_condition: float, generator: torch.Generator) -> Tensor:
    """``Sigma**0.5`` of a randomly rotated covariance whose variances are log-spaced from 1 down to 1/input_condition."""
    rotation = _random_orthonormal(in_features, in_features, generator)
    variances = input_condition ** -torch.linspace(0.0, 1.0, in_features)
    return rotation @ torch.diag(variances.sqrt()) @ rotation.T


def make_task(
    in_features: int,
    out_features: int,
    task_seed: int,
    update_scale: float,
    spectrum_decay: float,
    input_condition: float,
) -> RegressionTask:
    """Build ``W0``, a low-rank-dominated ``M`` and an anisotropic input covariance from one seed."""
    base_weight = make_base_weight(in_features, out_features, task_seed)
    # A second stream, so that W0 does not depend on the other task parameters.
    generator = torch.Generator().manual_seed(task_seed + 1)
    full_rank = min(in_features, out_features)
    target_update = random_update(in_features, out_features, full_rank, update_scale, spectrum_decay, generator)
    return RegressionTask(base_weight, target_update, random_input_covariance_sqrt(in_features, input_condition, generator))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def check_regression_data(sizes: Mapping[str, int], input_condition: float, noise_std: float) -> None:
    """Refuse a size below 1, an ``input_condition`` below 1 or a negative ``noise_std``, naming the argument."""
    for name, value in sizes.items():
        check_int(name, value, minimum=1)
    if input_condition < 1.0:
        raise ValueError(f"input_condition is a ratio of variances, largest over smallest: >= 1, got {input_condition}.")
    if noise_std < 0.0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}.")


class RegressionSamples(pl.LightningDataModule):
    """Train, validation and test sets of ``y = W x + noise``, drawn in ``__init__`` by :meth:`draw_samples`.

    Subclasses save ``task_seed`` and ``batch_size`` as hyperparameters.
    """

    train_set: TensorDataset
    val_set: TensorDataset
    test_set: TensorDataset

    def draw_samples(
        self, weight: Tensor, input_covariance_sqrt: Tensor, noise_std: float, sizes: Sequence[int], task_seed: int
    ) -> None:
        """Draw the train, validation and test sets (``sizes``) of ``y = weight x + noise``, ``x = z @ Sigma**0.5``.

        Drawn here, not in ``setup``, so every process and every stage sees the same data.
        """
        generator = torch.Generator().manual_seed(task_seed + 2)
        sets = []
        for size in sizes:
            inputs = torch.randn(size, weight.shape[1], generator=generator) @ input_covariance_sqrt
            noise = noise_std * torch.randn(size, weight.shape[0], generator=generator)
            sets.append(TensorDataset(inputs, inputs @ weight.T + noise))
        self.train_set, self.val_set, self.test_set = sets

    def train_dataloader(self) -> DataLoader:
        # Shuffled with its own seeded generator: the data order does not depend on global RNG use.
        generator = torch.Generator().manual_seed(self.hparams.task_seed + 3)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.hparams.batch_size)


class MatrixRegressionDataModule(RegressionSamples, KnownTargetUpdates, ModelRequirements):
    """Finite noisy samples of ``y = (W0 + M) x + noise``: train, validation and test sets.

    Args:
        in_features: Input dimension (the module's follows it).
        out_features: Output dimension (the module's follows it).
        task_seed: Seeds the task and all samples (the module's, which builds ``W0``, follows it).
        update_scale: Largest singular value of ``M``.
        spectrum_decay: ``M``'s singular values decay as ``i**-spectrum_decay`` (1.0: the spec's 1/i).
        input_condition: Ratio of the largest to the smallest input variance (1.0: isotropic).
        noise_std: Standard deviation of the Gaussian label noise.
        train_size: Training examples; small enough that a high-rank update overfits the noise.
        val_size: Validation examples.
        test_size: Test examples.
        batch_size: Training and evaluation batch size.
    """

    def __init__(
        self,
        in_features: int = 64,
        out_features: int = 64,
        task_seed: int = 0,
        update_scale: float = 1.0,
        spectrum_decay: float = 1.0,
        input_condition: float = 10.0,
        noise_std: float = 0.1,
        train_size: int = 256,
        val_size: int = 512,
        test_size: int = 2048,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        sizes = {"in_features": in_features, "out_features": out_features, "train_size": train_size, "val_size": val_size,
                 "test_size": test_size, "batch_size": batch_size}  # fmt: skip
        check_regression_data(sizes, input_condition, noise_std)
        self.save_hyperparameters()
        self.task = make_task(in_features, out_features, task_seed, update_scale, spectrum_decay, input_condition)
        weight = self.task.base_weight + self.task.target_update
        self.draw_samples(weight, self.task.input_covariance_sqrt, noise_std, [train_size, val_size, test_size], task_seed)

    def model_requirements(self) -> dict[str, Any]:
        """Module and data each build ``W0`` from these: another value would train towards another target."""
        return {name: self.hparams[name] for name in ("in_features", "out_features", "task_seed")}

    def target_update(self) -> Tensor:
        """The true update ``M = W_target - W0``, ``(out, in)`` (for oracle inits and diagnostics)."""
        return self.task.target_update.clone()

    def target_updates(self) -> Mapping[str, Tensor]:
        """``{"proj": M}``: the true update of the one LoRA target (serves the ``oracle`` init)."""
        return {"proj": self.target_update()}

    def base_weight(self) -> Tensor:
        """The frozen weight ``W0``, ``(out, in)``."""
        return self.task.base_weight.clone()

    def input_covariance(self) -> Tensor:
        """The input covariance ``Sigma``, ``(in, in)``."""
        return self.task.input_covariance_sqrt @ self.task.input_covariance_sqrt


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class LinearRegressor(nn.Module):
    """The pretrained model: one bias-free linear layer named ``proj`` (LoRA's target)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.proj(inputs)


class RegressionModule(LoraRecipeModule):
    """Trains ``self.model`` (set by subclasses) with mean squared error; logs ``train/``, ``val/`` and ``test/loss``."""

    def forward(self, inputs: Tensor) -> Tensor:
        return self.model(inputs)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        return F.mse_loss(self(inputs), targets)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True, sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("test/loss", self._loss(batch), sync_dist=True)


class MatrixRegressionModule(RegressionModule):
    """A peft LoRA adapter on the frozen ``W0``, trained with mean squared error.

    Args:
        in_features: Input dimension (set from the data's on the command line).
        out_features: Output dimension (set from the data's on the command line).
        task_seed: Seeds ``W0`` (set from the data's on the command line).
        lora_rank: LoRA rank ``r``.
        lora_alpha: LoRA alpha; the adapter's scale is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        use_rslora: Use rank-stabilised scaling.
        learning_rate: AdamW learning rate (constant by default: no warm-up, no decay).
        **kwargs: ``init_method`` (``full`` trains ``W0`` itself), ``init_options``, ``weight_decay``,
            ``warmup_ratio``, ``scheduler``: see :class:`~lightning_hrp.recipes.lora_module.LoraRecipeModule`.
    """

    def __init__(
        self,
        in_features: int = 64,
        out_features: int = 64,
        task_seed: int = 0,
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        use_rslora: bool = False,
        learning_rate: float = 1e-2,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        base = LinearRegressor(in_features, out_features)
        with torch.no_grad():
            base.proj.weight.copy_(make_base_weight(in_features, out_features, task_seed))
        # Full fine-tuning (init_method="full") trains W0 itself.
        source = f"generated W0 (in_features={in_features}, out_features={out_features}, task_seed={task_seed})"
        self.model = self.with_lora(
            base, source, r=lora_rank, lora_alpha=lora_alpha, use_rslora=use_rslora, target_modules=["proj"]
        )

    def configure_model(self) -> None:
        # ModelParallelStrategy hands the module a device mesh and expects it to shard itself;
        # other strategies wrap the module on their own and leave device_mesh unset.
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        # fit then test calls this twice; sharding is applied once.
        if not isinstance(self.model, FSDPModule):
            fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

    def lora_layer(self) -> LoraLayer:
        """The one peft LoRA layer (wrapping ``proj``)."""
        if not self.lora_init.uses_lora:
            raise ValueError("init_method='full' trains W0 directly; the model has no LoRA layer.")
        return self.model.get_submodule("base_model.model.proj")

    @torch.no_grad()
    def learned_update(self) -> Tensor:
        """The update the adapter currently adds to ``W0``: ``s * B @ A``, ``(out, in)``."""
        layer = self.lora_layer()
        adapter = self.model.active_adapter
        return layer.get_delta_weight(adapter).detach().clone()
