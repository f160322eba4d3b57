"""``other_params``: what HRP does with the module's other trainable parameters (a fresh head) while it preheats."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from peft import LoraConfig, get_peft_model

from lightning_hrp import HRPConfigurationError, HRPPreheatCallback, PreheatFailedError
from modules import TinyCausalLM, all_weights, assert_bitwise_equal, cpu_trainer, lora_weights, tiny_llama

HEAD = "model.base_model.model.lm_head.modules_to_save.default.weight"


class WithTrainableHead(TinyCausalLM):
    """The tiny Llama with LoRA and a trainable copy of its output head (peft's ``modules_to_save``), like a classifier's."""

    def __init__(self, fail_on_call: int | None = None):
        super().__init__()
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
        self.model = get_peft_model(tiny_llama(), config)
        self.fail_on_call, self.calls = fail_on_call, 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.calls == self.fail_on_call else loss


class AtTrainStart(Callback):
    """The LoRA weights and the head right after the callbacks before it ran on_train_start."""

    def on_train_start(self, trainer, pl_module):
        self.lora = lora_weights(pl_module)
        self.head = pl_module.get_parameter(HEAD).detach().clone()


def _preheat(other_params: str) -> tuple[torch.Tensor, AtTrainStart, HRPPreheatCallback]:
    pl.seed_everything(0)
    module = WithTrainableHead()
    head = module.get_parameter(HEAD).detach().clone()
    probe = AtTrainStart()
    hrp = HRPPreheatCallback(8, 3, other_params=other_params)
    cpu_trainer(max_steps=1, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[hrp, probe]).fit(module)
    return head, probe, hrp


def test_the_head_is_frozen_discarded_or_kept_as_asked() -> None:
    head, frozen, frozen_hrp = _preheat("frozen")
    assert torch.equal(frozen.head, head) and frozen_hrp.report.other_params == []

    head, discarded, discarded_hrp = _preheat("train_and_discard")
    assert torch.equal(discarded.head, head)  # trained during preheating, then put back bit for bit
    assert discarded_hrp.report.other_params == [HEAD]
    # The head moved while preheating, so the preheated directions differ from those learned through a frozen head.
    assert any(not torch.equal(frozen.lora[name], discarded.lora[name]) for name in frozen.lora)

    head, kept, _ = _preheat("train_and_keep")
    assert not torch.equal(kept.head, head)
    # The same preheat as train_and_discard, so the same adapters; only the head is kept.
    assert_bitwise_equal(kept.lora, discarded.lora)


@pytest.mark.parametrize("other_params", ["train_and_discard", "train_and_keep"])
def test_a_failed_preheat_restores_the_trained_head_too(other_params: str) -> None:
    pl.seed_everything(0)
    module = WithTrainableHead(fail_on_call=3)
    before = all_weights(module)
    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    with pytest.raises(PreheatFailedError):
        cpu_trainer(max_steps=1, num_sanity_val_steps=0, callbacks=[HRPPreheatCallback(8, 4, other_params=other_params)]).fit(module)
    assert_bitwise_equal(before, all_weights(module))
    assert flags == {name: p.requires_grad for name, p in module.named_parameters()}
    assert all(p.grad is None for p in module.parameters())


def test_training_other_params_under_a_sharding_strategy_is_refused_at_setup() -> None:
    hrp = HRPPreheatCallback(8, 3, other_params="train_and_keep")
    trainer = cpu_trainer(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), max_steps=1)
    with pytest.raises(HRPConfigurationError, match="other_params"):
        hrp.setup(trainer, WithTrainableHead(), "fit")
