"""What a preheat step computes and holds: zero rank-r adapters left out of the forward, the preheat dtype, the memory estimate."""

import logging
import warnings

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch.utils.data import DataLoader

from lightning_hrp import hrp_init, orchestration
from lightning_hrp.engine import preheat
from lightning_hrp.engine.lean_optimizer import FactoredRMS
from modules import assert_bitwise_equal, causal_lm_loss, lora_llama, lora_weights, token_dataset

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
    run_hrp(model, reinitialise_trained=True)  # B != 0 on purpose
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


def test_the_preheat_adapters_take_the_preheat_dtype():
    dtypes = []

    def recording_adamw(params):
        params = list(params)
        dtypes.extend(p.dtype for p in params)
        return torch.optim.AdamW(params, lr=1e-2)

    model = lora_llama()
    report = hrp_init(
        model, DataLoader(token_dataset(32), batch_size=8), causal_lm_loss, preheat_rank=16, preheat_steps=3,
        preheat_optimizer=recording_adamw, preheat_dtype="bfloat16",
    )  # fmt: skip
    assert set(dtypes) == {torch.bfloat16} and len(dtypes) == 16  # A_p and B_p of 8 layers
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model's own weights keep theirs
    assert all(layer.energy_kept > 0 for layer in report.layers)



@pytest.mark.parametrize("distributed", [False, True], ids=["one process", "one-process group"])
def test_bfloat16_preheat_adapters_report_the_loss_in_float32(request, distributed):
    if distributed:  # the gradients (bfloat16) and the flags with the loss (float32) are all-reduced
        request.getfixturevalue("one_process_group")
    seen = []

    def recording_loss(model, batch):
        loss = causal_lm_loss(model, batch)
        seen.append(loss.item())
        return loss

    report = hrp_init(
        lora_llama(), DataLoader(token_dataset(32), batch_size=8), recording_loss, preheat_rank=16, preheat_steps=3,
        preheat_lr=1e-2, preheat_dtype="bfloat16",
    )  # fmt: skip
    # One batch per step; rounded to bfloat16 (8 bits of mantissa) a loss near 4 is off by up to 0.008.
    assert report.preheat_losses == pytest.approx(seen, rel=1e-6)

# (in, out) of the LoRA targets of tiny_llama: q_proj, v_proj (2 key-value heads of 8), gate_proj, down_proj; 2 layers.
SHAPES = [(32, 32), (32, 16), (32, 48), (48, 32)] * 2
R = 16  # no layer is narrower, so no clamping


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # AdamW in float32: adapters, gradients (classic: both factors), two state buffers.
        (dict(preheat_lr=1e-2), 4 * 4 * R * sum(i + o for i, o in SHAPES)),
        (dict(preheat_lr=1e-2, preheat_dtype="bfloat16"), 4 * 2 * R * sum(i + o for i, o in SHAPES)),
        # Asymmetric: only B_p gets a gradient and state.
        (dict(preheat_lr=1e-2, mode="asymmetric"), 4 * R * sum(i + o for i, o in SHAPES) + 3 * 4 * R * sum(o for _, o in SHAPES)),
        # FactoredRMS: per matrix one float32 per row and per column: A_p (R x in), B_p (out x R).
        (
            dict(preheat_optimizer=lambda params: FactoredRMS(params, lr=1e-2)),
            2 * 4 * R * sum(i + o for i, o in SHAPES) + 4 * sum(i + o + 2 * R for i, o in SHAPES),
        ),
    ],
)
def test_the_memory_estimate_is_the_sum_over_the_layer_shapes(options, expected):
    report = run_hrp_with(lora_llama(), **options)
    assert report.preheat_memory_bytes == expected


def run_hrp_with(model, **options):
    batches = DataLoader(token_dataset(32), batch_size=8)
    return hrp_init(model, batches, causal_lm_loss, preheat_rank=R, preheat_steps=2, seed=0, **options)


@pytest.mark.parametrize(("free_bytes", "warns"), [(200_000, True), (300_000, False)])  # the estimate: 139,264 bytes
def test_a_warning_when_preheating_would_take_more_than_half_the_free_memory(monkeypatch, free_bytes, warns):
    monkeypatch.setattr(orchestration, "free_memory", lambda device: free_bytes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run_hrp_with(lora_llama(), preheat_lr=1e-2)
    assert report.preheat_memory_bytes == 139_264
    assert len([w for w in caught if "free there" in str(w.message)]) == int(warns)


def test_factored_rms_steps_by_the_sign_of_a_rank_one_gradient_and_not_at_all_without_one():
    gradient = torch.outer(torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, -1.0]))  # its square is rank 1: exact
    weight = torch.zeros(3, 2, requires_grad=True)
    still = torch.ones(2, 2, dtype=torch.bfloat16, requires_grad=True)
    optimizer = FactoredRMS([weight, still], lr=0.1)
    weight.grad, still.grad = gradient.clone(), torch.zeros_like(still)
    optimizer.step()
    torch.testing.assert_close(weight.detach(), -0.1 * gradient.sign())
    assert torch.equal(still.detach(), torch.ones(2, 2, dtype=torch.bfloat16))  # zero gradient: no step, no NaN
    # The gradients are read, never written (a caller may clip or log them after the step).
    assert torch.equal(weight.grad, gradient) and torch.equal(still.grad, torch.zeros_like(still))
    vector = torch.zeros(3, requires_grad=True)
    vector.grad = torch.tensor([0.5, -1.0, 2.0])
    FactoredRMS([vector], lr=0.1).step()
    assert torch.equal(vector.grad, torch.tensor([0.5, -1.0, 2.0]))


@pytest.mark.parametrize("trained_before", [False, True])
def test_the_activations_estimate_subtracts_only_the_adapters_left_out_of_the_forward(caplog, trained_before):
    # Per token a preheat forward keeps R values per layer; a rank-r adapter left out (B = 0) saves its r.
    model = lora_llama()
    if trained_before:  # B != 0: every adapter stays in the forward
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=1e-3)
    with caplog.at_level(logging.INFO, logger="lightning_hrp"):
        run_hrp_with(model, preheat_lr=1e-2, reinitialise_trained=trained_before)
    r = 4  # lora_llama's rank
    expected = 4 * len(SHAPES) * (R if trained_before else R - r)
    assert f"activations: {expected} bytes per token" in caplog.text
