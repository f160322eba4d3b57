"""What every recipe's LightningModule shares: the init by name, LoRA on the base model, the optimizer
and learning-rate schedule, agreement with its data, and checkpoints of what training changed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lightning_hrp._validation import check_choice
from lightning_hrp.engine.lora import find_lora_targets
from lightning_hrp.inits import InitMethod, LoraInit
from lightning_hrp.recipes.checkpoints import (
    BASE_IDENTITY_KEY,
    BaseIdentity,
    base_identity,
    keys_to_keep,
    loads_through_the_module,
)

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

    Checkpoints hold what training changed (:func:`~lightning_hrp.recipes.checkpoints.keys_to_keep`:
    adapters, heads, buffers, base weights an init rewrote), the optimizer and loop state, and the
    identity of the base; the frozen base is rebuilt from its source when the module is built, and a
    checkpoint of another base is refused. Under sharded strategies (FSDP, ``ModelParallelStrategy``,
    DeepSpeed), which load checkpoints themselves, checkpoints keep the whole model.

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
        self.base_identity: BaseIdentity | None = None  # set by with_lora
        self.save_hyperparameters()  # the recipe's own arguments too: Lightning reads the whole __init__ chain
        self.hparams.init_method = self.lora_init.method.value  # a plain string in checkpoints and hparams.yaml

    def with_lora(self, base: nn.Module, source: str, **lora_config: Any) -> nn.Module:
        """``base`` with peft LoRA adapters (``LoraConfig(**lora_config)`` plus what the init needs), in training mode.

        Without LoRA (``init_method="full"``) ``base`` itself trains. Call it in ``__init__``: the
        adapters must exist before any strategy wraps the module, as HRP and the inits write them in place.

        Args:
            base: The pretrained model as loaded (its identity is taken here, before any init rewrites it).
            source: Where ``base`` came from (a folder, hub name, or how it was generated), for messages.
            **lora_config: ``LoraConfig`` arguments.
        """
        self.lora_init.check_base(base)
        self.base_identity = base_identity(base, source)
        if not self.lora_init.uses_lora:
            return base.train()
        model = get_peft_model(base, LoraConfig(**lora_config, **self.lora_init.lora_config_kwargs()))
        # from_pretrained returns eval mode; fine-tuning trains with the model's dropout, and
        # Lightning keeps each submodule's mode as it finds it.
        return model.train()

    def checkpoint_keys(self) -> set[str]:
        """The state-dict keys this module's checkpoints hold (the rest is the frozen base, rebuilt from its source)."""
        rewritten = []
        if self.lora_init.info.changes_base_weights:
            rewritten = [target.layer.get_base_layer().weight for target in find_lora_targets(self)]
        return keys_to_keep(self, rewritten)

    def _built_base(self) -> BaseIdentity:
        if self.base_identity is None:
            raise RuntimeError(f"{type(self).__name__} never called with_lora, so it cannot tell which base it holds.")
        return self.base_identity

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[BASE_IDENTITY_KEY] = asdict(self._built_base())
        if loads_through_the_module(self.trainer.strategy):
            kept = self.checkpoint_keys()
            checkpoint["state_dict"] = {key: value for key, value in checkpoint["state_dict"].items() if key in kept}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(BASE_IDENTITY_KEY)
        if saved is None:
            return  # written before checkpoints held only what training changed: it holds the whole model
        problem = BaseIdentity(**saved).mismatch(self._built_base())
        if problem is not None:
            raise ValueError(f"ckpt_path: {problem} Build the model from the config the checkpoint was trained with.")

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, where a strict load also accepts this module's checkpoints.

        Those lack the frozen base weights; every key of :meth:`checkpoint_keys` must be there, and no
        key this module does not have.
        """
        if not strict:
            return super().load_state_dict(state_dict, strict=False, assign=assign)
        own = self.state_dict(keep_vars=True).keys()
        missing = sorted((self.checkpoint_keys() & own) - state_dict.keys())
        unexpected = sorted(state_dict.keys() - own)
        if missing or unexpected:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                "(a checkpoint of another recipe configuration, e.g. other target modules or init_method)."
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

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
