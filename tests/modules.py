"""Tiny LightningModules around real transformers + peft models built from configs (no download), and a test Trainer."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64
SEQ_LEN = 12


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def token_dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    """Sequences with learnable structure: each token is the previous one plus a fixed step, mod VOCAB."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=generator)
    step = torch.randint(1, 4, (n, 1), generator=generator)
    return TensorDataset((start + step * torch.arange(SEQ_LEN)) % VOCAB)


def lora_llama(rank: int = 4):
    """``tiny_llama`` with LoRA rank ``rank`` on q, v, gate and down projections (seeded), for ``hrp_init`` tests."""
    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    return get_peft_model(tiny_llama(), config)


def causal_lm_loss(model, batch):
    (tokens,) = batch
    return model(input_ids=tokens, labels=tokens).loss


class TinyCausalLM(pl.LightningModule):
    """A 2-layer Llama with LoRA on attention and MLP projections."""

    def __init__(
        self,
        rank: int = 4,
        lr: float = 1e-2,
        target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        batch_size: int = 8,
        shuffle: bool = False,
        dataset_size: int = 64,
        use_rslora: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), use_rslora=use_rslora)
        self.model = get_peft_model(tiny_llama(), config)
        self.seen_batches: list[Tensor] = []

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        (input_ids,) = batch
        self.seen_batches.append(input_ids.detach().clone())
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        (input_ids,) = batch
        self.log("val_loss", self.model(input_ids=input_ids, labels=input_ids).loss)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(token_dataset(self.hparams.dataset_size), batch_size=self.hparams.batch_size, shuffle=self.hparams.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(token_dataset(16, seed=1), batch_size=8)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lora_weights(module: torch.nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if "lora_" in name}


def all_weights(module: torch.nn.Module) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def assert_bitwise_equal(left: dict[str, Tensor], right: dict[str, Tensor]) -> None:
    assert left.keys() == right.keys()
    different = [name for name in left if not torch.equal(left[name], right[name])]
    assert not different, f"changed: {different[:5]}"


def cpu_trainer(**overrides) -> pl.Trainer:
    """A one-process CPU Trainer that writes nothing and prints no progress; ``overrides`` set the rest."""
    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**settings, **overrides})


def with_injected_failure(loss: Tensor, failure: str) -> Tensor:
    """``loss`` made to fail as ``failure`` says: ``"nan"`` (a NaN loss), ``"error"`` (RuntimeError), else Ctrl-C."""
    if failure == "nan":
        return loss * float("nan")
    if failure == "error":
        raise RuntimeError("boom")
    raise KeyboardInterrupt
