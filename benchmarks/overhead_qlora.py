"""The overhead benchmark's QLoRA recipe: a scaled-down LLaMA on a 4-bit (NF4) base, LoRA on every linear layer.

LLaMA-7B's block (hidden 4096, MLP 11008, 32 heads) scaled by 1/2 to hidden 2048, MLP 5504, 16
heads; 4 blocks and a 2,048-token vocabulary, so that, as in LLaMA-7B, the linear layers hold
almost all the weights (202M of them, 101 MB at 4 bits; the embeddings and head 8.4M, float32). Random
weights (built from the config, saved once to a temporary folder and loaded back through
transformers' ``BitsAndBytesConfig``: NF4 without the recipe's double quantization, which changes the
quantization constants' storage, not the matmuls), prepared as QLoRA prepares a base
(``prepare_model_for_kbit_training``: gradient checkpointing, float32 norms). LoRA r=4 on q, k, v,
o, gate, up and down of every block (28 layers), AdamW at 2e-4, causal LM loss on random tokens,
batch 2 x 256.

The ratio that matters here, preheat adapters against the 4-bit base, goes with ``R / hidden``:
``R = 8r = 32`` on hidden 2048 is LLaMA-7B's ``R = 64`` on hidden 4096 (``r = 8``).
"""

from __future__ import annotations

import argparse
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_hrp.recipes.runs import Run

SHAPE = dict(
    hidden_size=2048, intermediate_size=5504, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16,
    vocab_size=2048, max_position_embeddings=512,
)  # fmt: skip
LORA_RANK = 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQUENCE = 256
BATCH = 2
LEARNING_RATE = 2e-4


@cache
def random_checkpoint() -> Path:
    """A randomly initialised LLaMA of :data:`SHAPE`, saved once per process (seeded: the same weights every time)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp(prefix="hrp_qlora_base_"))
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(path)
    return path


class QLoraLM(pl.LightningModule):
    """The 4-bit base with LoRA adapters; ``training_step`` is the causal LM loss."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig, LlamaForCausalLM

        compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 matmuls are slow on most CPUs
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
        device_map = {"": device.index or 0} if device.type == "cuda" else "cpu"
        base = LlamaForCausalLM.from_pretrained(random_checkpoint(), quantization_config=quantization, device_map=device_map)
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
        self.model = get_peft_model(base, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=TARGETS)).train()

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=0.0)


class RandomTokens(pl.LightningDataModule):
    def __init__(self, batches: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, SHAPE["vocab_size"], (batches * BATCH, SEQUENCE), generator=generator)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.tokens), batch_size=BATCH, shuffle=True)


def build_qlora_run(main_steps: int, args: argparse.Namespace, seed: int, callbacks: list[Callback]) -> Run:
    """A Trainer of ``main_steps`` steps (no validation, no outputs), the 4-bit model and its data."""
    device = torch.device(args.device)
    pl.seed_everything(seed, verbose=False)
    trainer_options: dict[str, Any] = dict(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=[device.index or 0] if device.type == "cuda" else 1,
        precision=args.precision, max_steps=main_steps, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    return Run(trainer=pl.Trainer(**trainer_options), model=QLoraLM(device), datamodule=RandomTokens(batches=64))
