"""The inits that start from the gradient of the training loss w.r.t. each frozen base weight: LoRA-One and LoRA-GA."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_hrp._lightning import loss_of, training_step
from lightning_hrp._validation import check_int, is_positive_number
from lightning_hrp.engine.baselines import lora_one_init
from lightning_hrp.engine.distributed import all_reduce_mean_
from lightning_hrp.engine.lora import LoraTarget
from lightning_hrp.engine.quantized import quantized_weights
from lightning_hrp.engine.untrained import mark_residual_base
from lightning_hrp.errors import HRPConfigurationError
from lightning_hrp.inits.setup_time import InitReport, SetupTimeInit, missing_peft_feature, only_trainable, training_batches


class GradientInit(SetupTimeInit):
    """Shared by LoRA-GA and LoRA-One: the mean gradient of the training loss w.r.t. each frozen base weight."""

    def __init__(self, gradient_batches: int = 8, adapter_name: str | None = None) -> None:
        super().__init__(adapter_name)
        check_int("gradient_batches", gradient_batches, minimum=1)
        self.gradient_batches = gradient_batches

    def base_weight_gradients(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, targets: list[LoraTarget], report: InitReport
    ) -> list[Tensor]:
        """``(out, in)`` gradients, averaged over ``gradient_batches`` training batches (and over ranks)."""
        quantized = [t.name for t in targets if quantized_weights(t.layer.get_base_layer())]
        if quantized:
            # A quantized weight's storage holds packed codes: it has no gradient, and reading it as one is garbage.
            raise HRPConfigurationError(
                f"{self.name} needs the gradient of the loss with respect to each base weight, and the base weights of "
                f"{quantized} are quantized by bitsandbytes, which have none. Use hrp, eva or lora on a quantized base, "
                f"or load the base unquantized for {self.name}."
            )
        weights = [t.layer.get_base_layer().weight for t in targets]
        for target, weight in zip(targets, weights):
            if getattr(target.layer, "fan_in_fan_out", False) or weight.shape != (target.out_features, target.in_features):
                raise HRPConfigurationError(
                    f"{self.name} supports LoRA on nn.Linear weights (out, in); {target.name} has "
                    f"{tuple(weight.shape)} (Conv1D or fan_in_fan_out). Leave it out of target_modules."
                )
        sums = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
        with only_trainable(pl_module, weights), torch.enable_grad():
            count = 0
            for batch_idx, batch in enumerate(training_batches(trainer, pl_module, self.gradient_batches)):
                loss = loss_of(training_step(trainer, batch, batch_idx), self.name)
                if loss is None:
                    continue
                loss.backward()
                for total, weight in zip(sums, weights):
                    if weight.grad is None:
                        raise HRPConfigurationError(
                            f"{self.name}: the loss has no gradient w.r.t. a LoRA target's base weight "
                            f"({targets[weights.index(weight)].name}); is the layer used in training_step?"
                        )
                    total += weight.grad.float()
                    weight.grad = None
                count += 1
        if count == 0:
            raise HRPConfigurationError(f"{self.name}: training_step skipped every batch; no gradient to start from.")
        report.batches = count
        gradients = [total / count for total in sums]
        all_reduce_mean_(gradients)
        return gradients


class LoraOneInit(GradientInit):
    """LoRA-One (arXiv 2502.01235): start from one rank-r step of full-batch gradient descent.

    ``G`` is the gradient of the module's training loss w.r.t. each frozen base weight, averaged
    over ``gradient_batches`` training batches. Then, with ``-G = U S V^T``,
    ``A = diag(sqrt(S_r/S_1)) V_r^T / sqrt(gamma)`` and ``B = U_r diag(sqrt(S_r/S_1)) / sqrt(gamma)``
    (:func:`lightning_hrp.engine.baselines.lora_one_init`). The base weights are not changed, so the
    output moves by ``s B A`` from the start, as in LoRA-One.

    Args:
        gamma: LoRA-One's ``stable_gamma`` (the authors' default 128); the first step's top singular
            value is ``s / gamma``.
        gradient_batches: Training batches the gradient is averaged over (the authors use 8-64 examples).
        adapter_name: See :class:`SetupTimeInit`.
    """

    name = "lora_one"

    def __init__(self, gamma: float = 128.0, gradient_batches: int = 8, adapter_name: str | None = None) -> None:
        super().__init__(gradient_batches, adapter_name)
        if not is_positive_number(gamma):
            raise HRPConfigurationError(f"gamma must be a positive number, got {gamma!r}.")
        self.gamma = float(gamma)

    def initialise(self, trainer: pl.Trainer, pl_module: pl.LightningModule, targets: list[LoraTarget], report: InitReport) -> None:
        gradients = self.base_weight_gradients(trainer, pl_module, targets, report)
        with torch.no_grad():
            for target, gradient in zip(targets, gradients):
                A, B = lora_one_init(gradient, target.rank, gamma=self.gamma)
                target.lora_A.copy_(A)
                target.lora_B.copy_(B)
                report.singular_values[target.name] = torch.linalg.svdvals(gradient).tolist()


class LoraGAInit(GradientInit):
    """LoRA-GA (arXiv 2407.05000) through peft's own ``LoraLayer.lora_ga_init``.

    peft's ``preprocess_loraga`` must run before ``get_peft_model``, when a Lightning recipe has no
    data yet; this callback does its two halves on the built model instead: it averages the gradient
    of the module's training loss w.r.t. each frozen base weight over ``gradient_batches`` batches
    (what peft's ``estimate_gradients`` does) and hands it to ``lora_ga_init``, which sets ``A``, ``B``
    from its SVD and rewrites the base weight to ``W - s B A`` (so the output is unchanged).

    Args:
        direction: peft ``LoraGAConfig.direction`` (``"ArB2r"``, the paper's choice, by default).
        scale: peft ``LoraGAConfig.scale`` (``"stable"``, ``"weight_svd"``, ``"gd_scale"``, ``"unit"``).
        stable_gamma: peft ``LoraGAConfig.stable_gamma``.
        gradient_batches: Training batches the gradient is averaged over.
        adapter_name: See :class:`SetupTimeInit`.
    """

    name = "lora_ga"

    def __init__(
        self,
        direction: str = "ArB2r",
        scale: str = "stable",
        stable_gamma: int = 16,
        gradient_batches: int = 8,
        adapter_name: str | None = None,
    ) -> None:
        super().__init__(gradient_batches, adapter_name)
        try:
            from peft import LoraGAConfig
            from peft.tuners.lora import LoraLayer

            if not callable(LoraLayer.lora_ga_init):
                raise AttributeError("LoraLayer.lora_ga_init is not callable")
        except (ImportError, AttributeError) as error:
            raise missing_peft_feature("lora_ga", "LoRA-GA (LoraGAConfig and LoraLayer.lora_ga_init)") from error
        try:
            self.config = LoraGAConfig(direction=direction, scale=scale, stable_gamma=stable_gamma)
        except (TypeError, ValueError) as error:
            raise HRPConfigurationError(f"lora_ga options: {error}") from error
        if direction not in ("ArBr", "A2rBr", "ArB2r", "random") or scale not in ("stable", "weight_svd", "gd_scale", "unit"):
            raise HRPConfigurationError(
                f"lora_ga: direction must be one of ArBr, A2rBr, ArB2r, random and scale one of stable, weight_svd, "
                f"gd_scale, unit (peft's LoraGAConfig); got direction={direction!r}, scale={scale!r}."
            )

    def initialise(self, trainer: pl.Trainer, pl_module: pl.LightningModule, targets: list[LoraTarget], report: InitReport) -> None:
        gradients = self.base_weight_gradients(trainer, pl_module, targets, report)
        for target, gradient in zip(targets, gradients):
            if 2 * target.rank > min(target.in_features, target.out_features):
                raise HRPConfigurationError(
                    f"lora_ga needs 2r <= min(in, out) (it takes 2r gradient directions); {target.name} is "
                    f"{target.out_features}x{target.in_features} with r={target.rank}."
                )
            base = target.layer.get_base_layer()
            base._peft_loraga_grad = gradient.to(base.weight.dtype)
            target.layer.lora_ga_init(target.adapter_name, self.config)
            # lora_ga_init silently falls back to peft's default init when it finds no gradient; it
            # deletes the gradient when it used it, which is how we know it did.
            if hasattr(base, "_peft_loraga_grad"):
                del base._peft_loraga_grad
                raise HRPConfigurationError(f"peft's lora_ga_init did not use the gradient of {target.name}.")
            # peft's config still says init_lora_weights=True: the record tells HRP the base is now a residual.
            mark_residual_base([base.weight], self.name)
            report.singular_values[target.name] = torch.linalg.svdvals(gradient).tolist()
