"""Matrix regression with several LoRA layers whose true updates have different, known ranks.

The single-layer recipe (:mod:`~lightning_hrp.recipes.matrix_regression`) has one LoRA layer, so
every rank is spent there. Here ``len(update_ranks)`` frozen linear heads read the same input and
each must learn its own update ``M_i`` of rank ``update_ranks[i]`` (singular values
``update_scale * j**-spectrum_decay`` for ``j = 1 .. update_ranks[i]``, then 0):
``y_i = (W0_i + M_i) x + noise``, the heads' outputs concatenated, one mean squared error. The
same rank ``r`` everywhere wastes ranks on the low-rank heads (where they fit noise) and misses
directions of the high-rank ones; a rank budget allocated from the preheated spectra
(``init_options.rank_budget``) can follow the true ranks at the same number of trainable parameters
(all heads have one shape).

Everything is seeded by ``task_seed`` (the ``W0_i``, ``M_i``, input covariance, samples, noise and
data order), LoRA's random start by ``seed_everything``; inputs are anisotropic Gaussian as in the
single-layer recipe.

Run: ``lightning-hrp fit --config recipes/configs/multi_layer_regression_lora.yaml``; the comparison
of a rank budget against uniform rank: ``recipes/configs/compare_multi_layer_regression_rank_budget.yaml``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hrp._validation import check_int
from lightning_hrp.inits import KnownTargetUpdates
from lightning_hrp.recipes.lora_module import ModelRequirements
from lightning_hrp.recipes.matrix_regression import (
    RegressionModule,
    RegressionSamples,
    check_regression_data,
    make_base_weights,
    random_input_covariance_sqrt,
    random_update,
)


@dataclass(frozen=True)
class MultiLayerTask:
    """The ground truth: per head ``W0_i`` and ``M_i`` ``(out, in)``; ``Sigma**0.5`` ``(in, in)`` of the inputs."""

    base_weights: list[Tensor]
    target_updates: list[Tensor]
    input_covariance_sqrt: Tensor


def make_multi_layer_task(
    in_features: int,
    out_features: int,
    update_ranks: Sequence[int],
    task_seed: int,
    update_scale: float,
    spectrum_decay: float,
    input_condition: float,
) -> MultiLayerTask:
    """Build the ``W0_i``, the rank-``update_ranks[i]`` updates ``M_i`` and an anisotropic input covariance from one seed."""
    base_weights = make_base_weights(in_features, out_features, len(update_ranks), task_seed)
    generator = torch.Generator().manual_seed(task_seed + 1)  # a second stream: W0 does not depend on the rest
    updates = [random_update(in_features, out_features, rank, update_scale, spectrum_decay, generator) for rank in update_ranks]
    return MultiLayerTask(base_weights, updates, random_input_covariance_sqrt(in_features, input_condition, generator))


class MultiLayerRegressionDataModule(RegressionSamples, KnownTargetUpdates, ModelRequirements):
    """Finite noisy samples of ``y_i = (W0_i + M_i) x + noise`` for every head, concatenated: train, validation, test.

    Args:
        in_features: Input dimension (the module's follows it).
        out_features: Output dimension of each head (the module's follows it).
        update_ranks: The rank of each head's true update; one head each (the module's ``heads`` must match).
        task_seed: Seeds the task and all samples (the module's, which builds the ``W0_i``, follows it).
        update_scale: Largest singular value of every ``M_i``.
        spectrum_decay: Within a head, ``M_i``'s singular values decay as ``j**-spectrum_decay``.
        input_condition: Ratio of the largest to the smallest input variance.
        noise_std: Standard deviation of the Gaussian label noise.
        train_size: Training examples.
        val_size: Validation examples.
        test_size: Test examples.
        batch_size: Training and evaluation batch size.
    """

    def __init__(
        self,
        in_features: int = 64,
        out_features: int = 64,
        update_ranks: list[int] | None = None,
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
        update_ranks = list(update_ranks if update_ranks is not None else [1, 2, 4, 8])
        sizes = {"in_features": in_features, "out_features": out_features, "train_size": train_size, "val_size": val_size,
                 "test_size": test_size, "batch_size": batch_size}  # fmt: skip
        check_regression_data(sizes, input_condition, noise_std)
        if not update_ranks or any(isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(in_features, out_features) for r in update_ranks):
            raise ValueError(f"update_ranks must be a non-empty list of ranks in [1, min(in, out)], got {update_ranks}.")
        self.save_hyperparameters()
        self.hparams.update_ranks = update_ranks
        self.task = make_multi_layer_task(in_features, out_features, update_ranks, task_seed, update_scale, spectrum_decay, input_condition)
        weight = torch.cat([w + m for w, m in zip(self.task.base_weights, self.task.target_updates)])  # the heads stacked
        self.draw_samples(weight, self.task.input_covariance_sqrt, noise_std, [train_size, val_size, test_size], task_seed)

    def model_requirements(self) -> dict[str, Any]:
        """Module and data each build the ``W0_i`` from these: another value would train towards another target."""
        return {"in_features": self.hparams.in_features, "out_features": self.hparams.out_features,
                "task_seed": self.hparams.task_seed, "heads": len(self.hparams.update_ranks)}

    def target_updates(self) -> Mapping[str, Tensor]:
        """``{"heads.i": M_i}``: the true update of every LoRA layer (serves the ``oracle`` init)."""
        return {f"heads.{i}": m.clone() for i, m in enumerate(self.task.target_updates)}


class ParallelHeads(nn.Module):
    """The pretrained model: bias-free linear heads ``heads.0``, ``heads.1``, ... on one input, outputs concatenated."""

    def __init__(self, in_features: int, out_features: int, heads: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(in_features, out_features, bias=False) for _ in range(heads)])

    def forward(self, inputs: Tensor) -> Tensor:
        return torch.cat([head(inputs) for head in self.heads], dim=-1)


class MultiLayerRegressionModule(RegressionModule):
    """A peft LoRA adapter on every frozen head ``W0_i``, trained with mean squared error.

    Args:
        in_features: Input dimension (set from the data's on the command line).
        out_features: Output dimension of each head (set from the data's on the command line).
        task_seed: Seeds the ``W0_i`` (set from the data's on the command line).
        heads: Number of heads; must equal the data's ``len(update_ranks)``.
        lora_rank: LoRA rank ``r`` of every head (with ``init_options.rank_budget`` HRP reallocates it).
        lora_alpha: LoRA alpha; each adapter's scale is ``alpha / r``.
        use_rslora: Use rank-stabilised scaling.
        learning_rate: AdamW learning rate (constant by default).
        **kwargs: ``init_method``, ``init_options``, ``weight_decay``, ``warmup_ratio``, ``scheduler``: see
            :class:`~lightning_hrp.recipes.lora_module.LoraRecipeModule`.
    """

    def __init__(
        self,
        in_features: int = 64,
        out_features: int = 64,
        task_seed: int = 0,
        heads: int = 4,
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        use_rslora: bool = False,
        learning_rate: float = 1e-2,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        check_int("heads", heads, minimum=1)
        base = ParallelHeads(in_features, out_features, heads)
        with torch.no_grad():
            for head, weight in zip(base.heads, make_base_weights(in_features, out_features, heads, task_seed)):
                head.weight.copy_(weight)
        source = f"generated W0_i (in_features={in_features}, out_features={out_features}, heads={heads}, task_seed={task_seed})"
        self.model = self.with_lora(
            base, source, r=lora_rank, lora_alpha=lora_alpha, use_rslora=use_rslora, target_modules=r"heads\.\d+"
        )
