"""HRP on 4-bit (NF4) and 8-bit bases (QLoRA) with bitsandbytes on CPU: ``hrp_init`` and the Lightning callback.

The tiny Llama is built from a config, saved, and loaded back through transformers'
``BitsAndBytesConfig`` as a real checkpoint would be. On a CPU with AVX512-BF16, bitsandbytes 0.50
repacks a 4-bit weight in place at its first eval-mode forward without gradients; after that the
layer passes no gradient to its input (see :mod:`lightning_hrp.engine.quantized`), and the repacking
fails outright for a layer whose ``in_features`` is not a multiple of the block size (64, hence the
hidden size). So the outputs here are compared in training mode (no dropout anywhere: the same
function as eval mode), and one test shows HRP refusing a repacked model.
"""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch.utils.data import DataLoader
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from lightning_hrp import HRPConfigurationError, HRPPreheatCallback, hrp_init
from modules import VOCAB, lora_weights, token_dataset

PROBE_INPUT = torch.arange(24).reshape(2, 12) % VOCAB
QUANTIZATION = {
    "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "8bit": BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def quantized_lora(checkpoint: Path, bits: str, prepared: bool = False):
    base = LlamaForCausalLM.from_pretrained(checkpoint, quantization_config=QUANTIZATION[bits], device_map="cpu")
    if prepared:  # the usual QLoRA recipe: gradient checkpointing, inputs that require grad
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    return get_peft_model(base, config)


def logits_with_and_without_adapters(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of the LoRA model and of its quantized base, in training mode (see the module docstring)."""
    assert model.training
    with torch.no_grad():
        with_adapters = model(input_ids=PROBE_INPUT).logits
        with model.disable_adapter():
            base = model(input_ids=PROBE_INPUT).logits
    return with_adapters, base


def base_weights(model) -> dict[str, torch.Tensor]:
    """The quantized weights (and every other non-LoRA parameter) as stored."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" not in name}


def causal_lm_loss(model, batch):
    (tokens,) = batch
    return model(input_ids=tokens, labels=tokens).loss


@pytest.mark.parametrize(("bits", "prepared"), [("4bit", False), ("4bit", True), ("8bit", False)])
def test_hrp_init_on_a_quantized_base(checkpoint, bits, prepared):
    model = quantized_lora(checkpoint, bits, prepared).train()
    logits_before_hrp, _ = logits_with_and_without_adapters(model)
    before = lora_weights(model)
    stored = base_weights(model)

    report = hrp_init(model, DataLoader(token_dataset(), batch_size=8), causal_lm_loss, preheat_rank=16, preheat_steps=3, preheat_lr=1e-2)

    logits, base_logits = logits_with_and_without_adapters(model)
    assert torch.equal(logits, base_logits) and torch.equal(logits, logits_before_hrp)
    after = lora_weights(model)
    assert len([n for n in before if "lora_A" in n and not torch.equal(before[n], after[n])]) == len(report.layers) == 8
    assert not report.learned_nothing
    assert all(torch.equal(stored[name], weight) for name, weight in base_weights(model).items())
    # Training continues from the HRP start.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for (tokens,) in DataLoader(token_dataset(), batch_size=8):
        loss = causal_lm_loss(model, (tokens,))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]


class QuantizedLM(pl.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return causal_lm_loss(self.model, batch)

    def train_dataloader(self):
        return DataLoader(token_dataset(), batch_size=8)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


class OutputsAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.logits, self.base_logits = logits_with_and_without_adapters(pl_module.model)
        self.lora = lora_weights(pl_module)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_the_callback_on_a_quantized_base(checkpoint, bits):
    module = QuantizedLM(quantized_lora(checkpoint, bits).train())
    before = lora_weights(module)
    stored = base_weights(module)
    hrp = HRPPreheatCallback(preheat_rank=16, preheat_steps=3)
    probe = OutputsAtTrainStart()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=4, callbacks=[hrp, probe], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module)

    assert torch.equal(probe.logits, probe.base_logits)
    assert not hrp.report.learned_nothing
    assert len([n for n in before if "lora_A" in n and not torch.equal(before[n], probe.lora[n])]) == len(hrp.report.layers) == 8
    assert all(torch.equal(stored[name], weight) for name, weight in base_weights(module).items())
    # The main run trained the adapters HRP started (B leaves zero).
    assert trainer.global_step == 4
    final = lora_weights(module)
    assert all(torch.count_nonzero(final[n]) > 0 for n in final if "lora_B" in n)


def test_a_base_that_bitsandbytes_repacked_for_cpu_inference_is_refused(checkpoint):
    model = quantized_lora(checkpoint, "4bit")
    model.eval()
    with torch.no_grad():
        model(input_ids=PROBE_INPUT)  # repacks on a CPU with AVX512-BF16 (bitsandbytes' own check)
    model.train()
    repacked = [m for m in model.modules() if getattr(getattr(m, "weight", None), "quant_state", None) is not None]
    if not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in repacked):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    before = lora_weights(model)
    loader = DataLoader(token_dataset(), batch_size=8)
    with pytest.raises(HRPConfigurationError, match="state_dict"):
        hrp_init(model, loader, causal_lm_loss, preheat_rank=16, preheat_steps=2, preheat_lr=1e-2)
    assert all(torch.equal(before[n], w) for n, w in lora_weights(model).items())
    model.state_dict()  # unpacks, as the error says
    report = hrp_init(model, loader, causal_lm_loss, preheat_rank=16, preheat_steps=2, preheat_lr=1e-2)
    assert not report.learned_nothing
