"""EVA (explained variance adaptation): ``A`` from the principal directions of each layer's inputs, through peft."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from peft import PeftModel
from torch import Tensor, nn

from lightning_hrp._lightning import batch_to_device, generators_restored, train_dataloader_at_setup, training_step
from lightning_hrp._validation import check_int
from lightning_hrp.engine.lora import LoraTarget, find_lora_targets
from lightning_hrp.errors import HRPConfigurationError
from lightning_hrp.inits.setup_time import InitReport, SetupTimeInit, missing_peft_feature


class EvaInit(SetupTimeInit):
    """EVA (arXiv 2410.07170) through peft's ``initialize_lora_eva_weights``, with shapes kept fixed.

    peft runs the model on training batches (here: the module's own ``training_step``) and fits an
    incremental PCA of each LoRA layer's inputs until the top components stop moving (cosine
    similarity ``tau``); ``A`` becomes the top-r components, ``B`` stays 0. EVA can move rank between
    layers (``rho > 1``), which changes shapes; a Lightning run keeps ``rho = 1`` so every adapter
    keeps its rank (checked afterwards). Padding positions (``attention_mask == 0``) are left out.

    The model must be built with ``LoraConfig(init_lora_weights="eva", **EvaInit(...).lora_config_kwargs())``;
    :class:`lightning_hrp.inits.LoraInit` does that.

    Args:
        tau: Convergence threshold of the components' cosine similarity (peft's default 0.99).
        whiten: Divide the components by the square root of their singular values.
        max_batches: peft cycles through the training data until every layer converged; past this
            many batches the init fails (lower ``tau``) instead of running on forever.
        adapter_name: See :class:`SetupTimeInit`.
    """

    name = "eva"

    def __init__(self, tau: float = 0.99, whiten: bool = False, max_batches: int = 1000, adapter_name: str | None = None) -> None:
        super().__init__(adapter_name)
        try:
            from peft import EvaConfig  # noqa: F401
            from peft.tuners.lora.eva import get_eva_state_dict  # noqa: F401
        except ImportError as error:
            raise missing_peft_feature("eva", "EVA (EvaConfig, peft.tuners.lora.eva)") from error
        if not 0.0 <= tau <= 1.0:
            raise HRPConfigurationError(f"eva: tau must lie in [0, 1], got {tau!r}.")
        check_int("max_batches", max_batches, minimum=1)
        self.tau = tau
        self.whiten = whiten
        self.max_batches = max_batches

    def lora_config_kwargs(self) -> dict[str, Any]:
        """peft's ``EvaConfig`` with ``rho = 1`` (no rank redistribution), as ``eva_config``."""
        from peft import EvaConfig

        # peft's label mask assumes token-level labels; padding is masked here from the attention mask instead.
        return {"eva_config": EvaConfig(rho=1.0, tau=self.tau, whiten=self.whiten, use_label_mask=False)}

    def initialise(self, trainer: pl.Trainer, pl_module: pl.LightningModule, targets: list[LoraTarget], report: InitReport) -> None:
        from peft.tuners.lora.eva import get_eva_state_dict, initialize_lora_eva_weights

        peft_model = _the_peft_model(pl_module)
        adapter = targets[0].adapter_name
        config = peft_model.peft_config[adapter]
        if config.init_lora_weights != "eva" or config.eva_config is None or config.eva_config.rho != 1.0:
            raise HRPConfigurationError(
                "eva needs the adapter built with LoraConfig(init_lora_weights='eva', eva_config=EvaConfig(rho=1.0)) "
                "(rho = 1 keeps every adapter's shape); build it through lightning_hrp.inits.LoraInit."
            )
        loader = train_dataloader_at_setup(trainer)
        shapes = [(tuple(t.lora_A.shape), tuple(t.lora_B.shape)) for t in targets]
        batches_seen = [0]

        def forward(model: nn.Module, batch: Any) -> None:
            if batches_seen[0] == self.max_batches:
                raise HRPConfigurationError(
                    f"eva: the input components of some layers did not converge (cosine similarity >= tau="
                    f"{self.tau}) within max_batches={self.max_batches}; lower tau or raise max_batches."
                )
            batches_seen[0] += 1
            batch = batch_to_device(trainer, batch, device=pl_module.device)
            training_step(trainer, batch, batches_seen[0] - 1)

        try:
            with generators_restored([loader]):
                state = get_eva_state_dict(
                    peft_model,
                    dataloader=loader,
                    forward_fn=forward,
                    prepare_model_inputs_fn=_token_mask,
                    prepare_layer_inputs_fn=_layer_input_rows,
                    adapter_name=adapter,
                    show_progress_bar=False,
                )
        except BaseException:
            _remove_eva_hooks(peft_model)  # peft leaves its hooks on the layers when interrupted
            raise
        # peft quietly gives layers missing from the state dict its default init; refuse that instead.
        wanted = {name for name, module in peft_model.named_modules() if any(module is t.layer for t in targets)}
        missing = sorted(wanted - set(state))
        if missing:
            raise HRPConfigurationError(f"eva found no input statistics for {missing}; it cannot initialise them.")
        initialize_lora_eva_weights(peft_model, eva_state_dict=state, adapter_name=adapter, show_progress_bar=False)
        after = [(tuple(t.lora_A.shape), tuple(t.lora_B.shape)) for t in find_lora_targets(pl_module, self.adapter_name)]
        if after != shapes:
            raise HRPConfigurationError("eva changed adapter shapes although rho = 1; refusing to train a reshaped model.")
        report.batches = batches_seen[0]


def _the_peft_model(pl_module: pl.LightningModule) -> PeftModel:
    models = [m for m in pl_module.modules() if isinstance(m, PeftModel)]
    if len(models) != 1:
        raise HRPConfigurationError(
            f"eva needs exactly one peft PeftModel inside {type(pl_module).__name__} (peft's EVA works on it), found {len(models)}."
        )
    return models[0]


def _remove_eva_hooks(model: nn.Module) -> None:
    from peft.tuners.lora.eva import _Hook

    for module in model.modules():
        for key in [k for k, hook in module._forward_hooks.items() if isinstance(hook, _Hook)]:
            del module._forward_hooks[key]


def _token_mask(batch: Any, peft_config: Any) -> Tensor | None:
    """EVA's model-input hook: the non-padding positions of a token batch (None: use every row)."""
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), Tensor):
        return batch["attention_mask"].bool()
    return None


def _layer_input_rows(layer_input: Any, mask: Tensor | None, layer_name: str) -> Tensor:
    """EVA's layer-input hook: a 2-D ``(rows, in_features)`` matrix of the layer's inputs."""
    inputs = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if not isinstance(inputs, Tensor):
        raise HRPConfigurationError(f"eva: layer {layer_name} received {type(inputs).__name__}, expected a tensor.")
    if mask is not None and inputs.dim() == mask.dim() + 1 and inputs.shape[:-1] == mask.shape:
        return inputs[mask]
    return inputs.reshape(-1, inputs.shape[-1])
