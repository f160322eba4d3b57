"""``lightning_hrp.hrp_init`` in a plain PyTorch loop: the callback's result, checks and guarantees, without Lightning."""

import random
import subprocess
import sys
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from peft.tuners.lora import LoraLayer
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from lightning_hrp import HRPConfigurationError, HRPPreheatCallback, PreheatFailedError, hrp_init
from modules import (
    TinyCausalLM,
    all_weights,
    assert_bitwise_equal,
    causal_lm_loss,
    lora_llama,
    lora_weights,
    tiny_llama,
    token_dataset,
    with_injected_failure,
)

PROBE_INPUT = torch.arange(24).reshape(2, 12) % 64


def batches(n: int = 64, **kwargs) -> DataLoader:
    return DataLoader(token_dataset(n), batch_size=8, **kwargs)


def _no_trace_of_preheating(model) -> bool:
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    return all(not layer._forward_hooks for layer in layers) and all(p.grad is None for p in model.parameters())


class LoraAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.lora = lora_weights(pl_module.model)


def test_hrp_init_gives_what_the_callback_gives_on_the_same_batches():
    pl.seed_everything(0)
    module = TinyCausalLM(lr=1e-2)
    hrp = HRPPreheatCallback(preheat_rank=16, preheat_steps=4, seed=3, mode="classic", init_rule="keep_progress")
    probe = LoraAtTrainStart()
    pl.Trainer(
        accelerator="cpu", max_steps=1, callbacks=[hrp, probe], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    ).fit(module)  # fmt: skip

    pl.seed_everything(0)
    network = TinyCausalLM(lr=1e-2).model
    report = hrp_init(
        network, batches(), causal_lm_loss, preheat_rank=16, preheat_steps=4, preheat_lr=1e-2, seed=3,
        mode="classic", init_rule="keep_progress",
    )  # fmt: skip

    assert report.preheat_losses == hrp.report.preheat_losses
    assert [layer.singular_values for layer in report.layers] == [layer.singular_values for layer in hrp.report.layers]
    assert_bitwise_equal(lora_weights(network), probe.lora)


def test_output_kept_adapters_moved_and_nothing_left_behind():
    network = lora_llama()
    network.train()
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-2)
    identity = [id(p) for p in network.parameters()]
    flags = [p.requires_grad for p in network.parameters()]
    before = lora_weights(network)
    with torch.no_grad():
        logits_before = network.eval()(input_ids=PROBE_INPUT).logits
    network.train()
    loader = batches(shuffle=True, generator=torch.Generator().manual_seed(5))
    np.random.seed(1)
    random.seed(2)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(), loader.generator.get_state()

    report = hrp_init(network, loader, causal_lm_loss, preheat_rank=16, preheat_steps=3, preheat_lr=1e-2)

    assert torch.equal(states[0], torch.get_rng_state()) and np.array_equal(states[1], np.random.get_state()[1])
    assert states[2] == random.getstate() and torch.equal(states[3], loader.generator.get_state())
    assert _no_trace_of_preheating(network) and not optimizer.state
    assert identity == [id(p) for p in network.parameters()] and flags == [p.requires_grad for p in network.parameters()]
    assert network.training
    after = lora_weights(network)
    moved = [name for name in before if "lora_A" in name and not torch.equal(before[name], after[name])]
    assert len(moved) == len(report.layers) == 8
    assert all(torch.count_nonzero(after[name]) == 0 for name in after if "lora_B" in name)
    with torch.no_grad():
        assert torch.equal(network.eval()(input_ids=PROBE_INPUT).logits, logits_before)
    network.train()
    # Training goes on from here, with the optimizer built before.
    loss = causal_lm_loss(network, next(iter(loader)))
    loss.backward()
    optimizer.step()
    assert not torch.equal(lora_weights(network)[moved[0].replace("lora_A", "lora_B")], after[moved[0].replace("lora_A", "lora_B")])


def test_the_main_loop_sees_the_batches_it_sees_without_hrp():
    def epoch_after(with_hrp: bool) -> list[torch.Tensor]:
        torch.manual_seed(11)
        network = lora_llama()
        loader = batches(shuffle=True)  # a RandomSampler without a generator draws from the global RNG
        if with_hrp:
            hrp_init(network, loader, causal_lm_loss, preheat_rank=8, preheat_steps=2, preheat_lr=1e-2)
        return [tokens for (tokens,) in loader]

    assert all(torch.equal(a, b) for a, b in zip(epoch_after(True), epoch_after(False), strict=True))


def _non_scalar_loss(model, batch):
    (tokens,) = batch
    return model(input_ids=tokens).logits.mean(dim=-1)


def _too_few():
    yield from batches(16)


@pytest.mark.parametrize(
    ("network", "batches_", "loss_fn", "kwargs", "argument"),
    [
        ("lora", "loader", causal_lm_loss, dict(preheat_rank=4), "preheat_rank"),
        ("lora", "loader", causal_lm_loss, dict(preheat_steps=0), "preheat_steps"),
        ("lora", "loader", causal_lm_loss, dict(accumulate_grad_batches=0), "accumulate_grad_batches"),
        ("lora", "loader", causal_lm_loss, dict(preheat_lr=None), "preheat_lr"),
        ("lora", "loader", causal_lm_loss, dict(mode="symmetric"), "mode"),
        ("lora", "loader", "loss", {}, "loss_fn"),
        ("lora", 3, causal_lm_loss, {}, "batches"),
        ("plain", "loader", causal_lm_loss, {}, "LoraLayer"),
        # Found during preheating: the adapters are restored, and on_failure never swallows these.
        ("lora", "loader", _non_scalar_loss, dict(on_failure="continue"), "loss_fn"),
        ("lora", [], causal_lm_loss, dict(on_failure="continue"), "empty"),
        ("lora", "one_shot", causal_lm_loss, dict(on_failure="continue"), "one-shot"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(network, batches_, loss_fn, kwargs, argument):
    model = lora_llama() if network == "lora" else tiny_llama()
    data = {"loader": batches(), "one_shot": _too_few()}.get(batches_, batches_) if isinstance(batches_, str) else batches_
    before = all_weights(model)
    options = dict(preheat_rank=8, preheat_steps=3, preheat_lr=1e-2) | kwargs
    with pytest.raises(HRPConfigurationError, match=argument):
        hrp_init(model, data, loss_fn, **options)
    assert_bitwise_equal(before, all_weights(model))
    assert _no_trace_of_preheating(model)


class FailingLoss:
    def __init__(self, failure: str):
        self.failure, self.calls = failure, 0

    def __call__(self, model, batch):
        self.calls += 1
        loss = causal_lm_loss(model, batch)
        return with_injected_failure(loss, self.failure) if self.calls == 2 else loss


@pytest.mark.parametrize(("failure", "error"), [("nan", PreheatFailedError), ("error", RuntimeError), ("interrupt", KeyboardInterrupt)])
def test_a_failed_preheat_restores_the_model_bit_for_bit(failure, error):
    model = lora_llama()
    before = all_weights(model)
    flags = [p.requires_grad for p in model.parameters()]
    state = torch.get_rng_state()
    with pytest.raises(error):
        hrp_init(model, batches(), FailingLoss(failure), preheat_rank=8, preheat_steps=3, preheat_lr=1e-2)
    assert_bitwise_equal(before, all_weights(model))
    assert _no_trace_of_preheating(model) and flags == [p.requires_grad for p in model.parameters()]
    assert torch.equal(state, torch.get_rng_state())


def test_on_failure_continue_warns_returns_none_and_keeps_the_init():
    model = lora_llama()
    before = all_weights(model)
    with pytest.warns(UserWarning, match="on_failure='continue'"):
        report = hrp_init(model, batches(), FailingLoss("nan"), preheat_rank=8, preheat_steps=3, preheat_lr=1e-2, on_failure="continue")
    assert report is None
    assert_bitwise_equal(before, all_weights(model))


def test_a_short_reiterable_is_cycled_with_one_warning():
    model = lora_llama()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = hrp_init(model, list(batches(16)), causal_lm_loss, preheat_rank=8, preheat_steps=5, preheat_lr=1e-2)
    assert len([w for w in caught if "cycled" in str(w.message)]) == 1
    assert len(report.preheat_losses) == 5


class Wrapper(torch.nn.Module):
    """A module around a DDP-wrapped network, as Lightning Fabric's is."""

    def __init__(self, network):
        super().__init__()
        self.inner = DistributedDataParallel(network)

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def test_ddp_inside_another_wrapper_is_refused_and_the_inner_module_works(one_process_group):
    network = lora_llama()
    wrapper = Wrapper(network)
    before = all_weights(network)
    with pytest.raises(HRPConfigurationError, match="DistributedDataParallel"):
        hrp_init(wrapper, batches(), causal_lm_loss, preheat_rank=8, preheat_steps=2, preheat_lr=1e-2)
    assert_bitwise_equal(before, all_weights(network))
    assert hrp_init(wrapper.inner, batches(), causal_lm_loss, preheat_rank=8, preheat_steps=2, preheat_lr=1e-2) is not None


def test_hrp_init_and_its_modules_import_no_lightning():
    code = (
        "import sys; from lightning_hrp import hrp_init, HRPOptions, HRPReport; import lightning_hrp.orchestration; "
        "assert not any(m == 'lightning' or m.startswith(('lightning.', 'lightning_fabric')) for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
