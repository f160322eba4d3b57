"""What every recipe's LightningModule shares: the init by name, LoRA on the base model, the optimizer
and learning-rate schedule, and agreement with its data."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lightning_hrp._validation import check_choice
from lightning_hrp.inits import InitMethod, LoraInit

Scheduler = Literal["linear", "cosine", "constant"]
# transformers' schedule of each name: warm-up from 0, then decay to 0 (linear, cosine) or none.
_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


class ModelRequirements:
    """Mixin for a DataModule whose data only fits a module with certain hyperparameters.

    The recipe's module refuses to train on data whose :meth:`model_requirements` differ from its
    own ``hparams`` (the command line links these arguments; Python callers pass them twice).
    """

    def model_requirements(self) -> dict[str, Any]:
        """The module hyperparameters (by name) that must equal these values."""
        raise NotImplementedError


class LoraRecipeModule(pl.LightningModule):
    """Base of the recipes' LightningModules: the LoRA and init wiring, the optimizer, the data check.

    A recipe's ``__init__`` takes its own arguments (with its own ``learning_rate`` and, where they
    differ from these defaults, ``warmup_ratio`` and ``scheduler``) and ``**kwargs`` for the rest of
    these, calls ``super().__init__(...)`` and wraps its base model with :meth:`with_lora`. Every
    argument of the chain lands in ``hparams``. Data-driven inits (``lora_ga``, ``eva``, ``lora_one``,
    ``hrp``, ``oracle``) run as callbacks of the fit (:meth:`configure_callbacks`).

    Args:
        learning_rate: Peak AdamW learning rate.
        init_method: How the adapters start (:class:`lightning_hrp.inits.InitMethod`: ``lora``,
            ``gaussian``, ``pissa``, ``olora``, ``lora_ga``, ``eva``, ``lora_one``, ``hrp``, ``oracle``
            (only for a task with a known update), or ``full`` for full fine-tuning without LoRA).
        init_options: The method's options (e.g. ``{"preheat_rank": 32, "preheat_steps": 8}`` for ``hrp``).
        weight_decay: AdamW weight decay on the trainable parameters.
        warmup_ratio: Fraction of the training steps with linear warm-up from 0.
        scheduler: Learning-rate shape after warm-up: linear or cosine decay to 0, or constant.
    """

    def __init__(
        self,
        learning_rate: float,
        init_method: InitMethod = InitMethod.lora,
        init_options: dict[str, Any] | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        scheduler: Scheduler = "constant",
    ) -> None:
        super().__init__()
        check_choice("scheduler", scheduler, Scheduler)
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}.")
        self.lora_init = LoraInit(init_method, init_options)
        self.save_hyperparameters()  # the recipe's own arguments too: Lightning reads the whole __init__ chain
        self.hparams.init_method = self.lora_init.method.value  # a plain string in checkpoints and hparams.yaml

    def with_lora(self, base: nn.Module, **lora_config: Any) -> nn.Module:
        """``base`` with peft LoRA adapters (``LoraConfig(**lora_config)`` plus what the init needs), in training mode.

        Without LoRA (``init_method="full"``) ``base`` itself trains. Call it in ``__init__``: the
        adapters must exist before any strategy wraps the module, as HRP and the inits write them in place.
        """
        if not self.lora_init.uses_lora:
            return base.train()
        model = get_peft_model(base, LoraConfig(**lora_config, **self.lora_init.lora_config_kwargs()))
        # from_pretrained returns eval mode; fine-tuning trains with the model's dropout, and
        # Lightning keeps each submodule's mode as it finds it.
        return model.train()

    def configure_callbacks(self) -> list[pl.Callback]:
        return self.lora_init.callbacks(self.trainer.callbacks)

    def setup(self, stage: str) -> None:
        # A mismatch (another task seed, another tokenizer, another number of classes) would train
        # silently towards the wrong thing.
        datamodule = self.trainer.datamodule
        if isinstance(datamodule, ModelRequirements):
            for name, value in datamodule.model_requirements().items():
                if self.hparams[name] != value:
                    raise ValueError(
                        f"{type(self).__name__} and {type(datamodule).__name__} disagree: {name}={self.hparams[name]!r} "
                        f"vs {value!r} (model vs data). Give the model the data's value (model.init_args.{name})."
                    )

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the trainable parameters, stepped by transformers' schedule with a linear warm-up from 0."""
        from transformers import get_scheduler

        hp = self.hparams
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = get_scheduler(
            _SCHEDULES[hp.scheduler], optimizer, num_warmup_steps=int(hp.warmup_ratio * total), num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
