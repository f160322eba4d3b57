"""What a preheat step computes and holds: zero rank-r adapters left out of the forward, the preheat dtype, the memory estimate."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch.utils.data import DataLoader

from lightning_hrp import hrp_init
from lightning_hrp.engine import preheat
from modules import assert_bitwise_equal, lora_weights, tiny_llama, token_dataset

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def lora_llama(dropout: float = 0.0):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS)
    return get_peft_model(tiny_llama(), config).train()


def causal_lm_loss(model, batch):
    (tokens,) = batch
    return model(input_ids=tokens, labels=tokens).loss


def run_hrp(model, **options):
    batches = DataLoader(token_dataset(32), batch_size=8)
    return hrp_init(model, batches, causal_lm_loss, preheat_rank=16, preheat_steps=3, preheat_lr=1e-2, seed=0, **options)


def lora_A_modules(model):
    return {name: module for name, module in model.named_modules() if name.endswith("lora_A.default")}


def active_adapters(model) -> dict[str, list[str]]:
    return {name: list(layer.active_adapters) for name, layer in model.named_modules() if isinstance(layer, LoraLayer)}


def count_calls(modules) -> dict[str, int]:
    calls = dict.fromkeys(modules, 0)
    for name, module in modules.items():
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def test_rank_r_adapters_with_B_zero_are_left_out_of_the_preheat_forward_and_come_back_after():
    model = lora_llama()
    modules = lora_A_modules(model)
    nonzero = next(name for name in modules if "layers.1.mlp.down_proj" in name)
    layer = model.get_submodule(nonzero.removesuffix(".lora_A.default"))
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(1e-3)  # this adapter adds something: it must be computed
    calls = count_calls(modules)
    before = active_adapters(model)
    run_hrp(model)
    assert calls[nonzero] == 3  # one forward per preheat step
    assert all(count == 0 for name, count in calls.items() if name != nonzero)
    assert active_adapters(model) == before
    model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert all(count == (4 if name == nonzero else 1) for name, count in calls.items())


def test_leaving_zero_adapters_out_changes_nothing_that_preheating_learns(monkeypatch):
    with_them = lora_llama()
    run_hrp(with_them)
    without = lora_llama()
    monkeypatch.setattr(preheat, "_plain_lora", lambda target: False)  # computes every rank-r adapter, as before
    calls = count_calls(lora_A_modules(without))
    run_hrp(without)
    assert all(count == 3 for count in calls.values())
    assert_bitwise_equal(lora_weights(with_them), lora_weights(without))


def test_a_failed_preheat_puts_the_left_out_adapters_back():
    model = lora_llama()
    before = active_adapters(model)

    def fails(model, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        hrp_init(model, DataLoader(token_dataset(8), batch_size=8), fails, preheat_rank=16, preheat_steps=2, preheat_lr=1e-2)
    assert active_adapters(model) == before
