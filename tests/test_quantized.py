"""HRP on 4-bit (NF4) and 8-bit bases (QLoRA) with bitsandbytes on CPU: ``hrp_init`` and the Lightning callback.

The tiny Llama is built from a config, saved, and loaded back through transformers'
``BitsAndBytesConfig`` as a real checkpoint would be. On a CPU with AVX512-BF16, bitsandbytes 0.50
repacks a 4-bit weight in place at its first eval-mode forward without gradients; after that the
layer passes no gradient to its input (see :mod:`lightning_hrp.engine.quantized`), and the repacking
fails outright for a layer whose ``in_features`` is not a multiple of the block size (64, hence the
hidden size). So the outputs here are compared in training mode (no dropout anywhere: the same
function as eval mode), and one test shows HRP refusing a repacked model.

The math SFT recipe on a quantized base: it turns the repacking off, so that validation between
training steps leaves the training as it was; the inits that read the base weights refuse it.
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
from lightning_hrp.engine.quantized import cpu_inference_packed_layers, quantized_weights
from lightning_hrp.inits import LoraGAInit, LoraInit, LoraOneInit
from lightning_hrp.recipes.math_sft import MathSFTModule
from lightning_hrp.recipes.math_sft_data import MathSFTDataModule
from modules import VOCAB, causal_lm_loss, cpu_trainer, lora_weights, token_dataset

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


# ---------------------------------------------------------------------------------------------
# The math SFT recipe on a quantized base
# ---------------------------------------------------------------------------------------------


def fit_math_sft(folder: str, quantization: str | None, validate_every_step: bool, **module_options) -> MathSFTModule:
    pl.seed_everything(0)
    module = MathSFTModule(
        model_name_or_path=folder, quantization=quantization, lora_rank=4, lora_alpha=8, learning_rate=1e-2, max_new_tokens=2,
        warmup_ratio=0.0, **module_options,
    )  # fmt: skip
    data = MathSFTDataModule(
        model_name_or_path=folder, train_size=12, val_size=2, test_size=2, batch_size=4, eval_batch_size=2, max_length=64
    )
    validation = {"val_check_interval": 1} if validate_every_step else {"limit_val_batches": 0}
    cpu_trainer(max_steps=3, num_sanity_val_steps=0, **validation).fit(module, data)
    return module


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_math_sft_on_a_quantized_base_trains_the_same_with_validation_between_steps(tiny_llama_64_dir, bits):
    """Validation with generation after every step leaves the training exactly as it would have been without it.

    On a CPU with AVX512-BF16, bitsandbytes would repack the 4-bit weights at the first validation (scales
    rounded to bfloat16, no gradient to the layers' inputs afterwards) unless the recipe turns that off.
    """
    # HRP on the 4-bit base (the QLoRA config's init); plain LoRA on the 8-bit one, which bitsandbytes never repacks.
    options = {"init_method": "hrp", "init_options": {"preheat_rank": 8, "preheat_steps": 2}} if bits == "4bit" else {}
    validated = fit_math_sft(tiny_llama_64_dir, bits, validate_every_step=True, **options)
    unvalidated = fit_math_sft(tiny_llama_64_dir, bits, validate_every_step=False, **options)

    trained = lora_weights(validated)
    assert trained.keys() == lora_weights(unvalidated).keys()
    assert all(torch.equal(trained[name], weight) for name, weight in lora_weights(unvalidated).items())
    assert quantized_weights(validated) and not cpu_inference_packed_layers(validated)
    # Every adapter learned (B starts at zero).
    assert all(torch.count_nonzero(weight) for name, weight in trained.items() if "lora_B" in name)


@pytest.mark.parametrize("method", ["pissa", "olora", "lora_ga", "lora_one", "full"])
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_inits_that_read_the_base_weights_refuse_a_quantized_base(tiny_llama_64_dir, bits, method):
    with pytest.raises(HRPConfigurationError, match=f"init_method='{method}'"):
        MathSFTModule(model_name_or_path=tiny_llama_64_dir, quantization=bits, init_method=method)


def test_pissa_refuses_a_4bit_base_stored_as_floats(checkpoint):
    """With a float quant storage, peft's PiSSA would decompose the packed storage as if it were the weight."""
    storage = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32
    )
    base = LlamaForCausalLM.from_pretrained(checkpoint, quantization_config=storage, device_map="cpu")
    assert base.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # peft's dtype check lets it through
    with pytest.raises(HRPConfigurationError, match="init_method='pissa'"):
        LoraInit("pissa").check_base(base)
    LoraInit("hrp", {"preheat_rank": 8, "preheat_steps": 1}).check_base(base)  # HRP never reads the weights


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
@pytest.mark.parametrize("init", [LoraGAInit, LoraOneInit])
def test_gradient_inits_as_callbacks_refuse_a_quantized_base(checkpoint, init, bits):
    module = QuantizedLM(quantized_lora(checkpoint, bits).train())
    before = lora_weights(module)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, callbacks=[init()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(HRPConfigurationError, match=f"{init.name}.*bitsandbytes"):
        trainer.fit(module)
    assert all(torch.equal(before[name], weight) for name, weight in lora_weights(module).items())


@pytest.mark.parametrize(("method", "options"), [("lora", None), ("eva", {"tau": 0.9})])
def test_inits_that_never_read_the_base_weights_train_a_4bit_base(tiny_llama_64_dir, method, options):
    module = fit_math_sft(tiny_llama_64_dir, "4bit", validate_every_step=False, init_method=method, init_options=options)
    assert all(torch.count_nonzero(weight) for name, weight in lora_weights(module).items() if "lora_B" in name)
