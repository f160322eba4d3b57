"""The recipes' checkpoints hold what training changed (adapters, heads, base weights an init rewrote) and the
identity of the base; the frozen base is rebuilt from its source, and a checkpoint of another base is refused.

Each recipe on a tiny model: matrix regression (LoRA-GA and PiSSA rewrite its base weight), classification
on a tiny BERT (a trained head), math SFT on a tiny LLaMA (unquantized and 4-bit).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lightning_hrp.recipes.checkpoints import BASE_IDENTITY_KEY
from lightning_hrp.recipes.classification import SequenceClassifier
from lightning_hrp.recipes.classification_data import RottenTomatoesDataModule
from lightning_hrp.recipes.math_sft import MathSFTModule
from lightning_hrp.recipes.math_sft_data import MathSFTDataModule
from lightning_hrp.recipes.matrix_regression import MatrixRegressionDataModule, MatrixRegressionModule
from modules import all_weights, assert_bitwise_equal, cpu_trainer

TASK = dict(in_features=32, out_features=24, task_seed=3)


class InOrderRegressionData(MatrixRegressionDataModule):
    """The regression data without shuffling, so that a resumed fit sees the batches a continuous one does
    (the recipe's shuffling generator starts afresh in every fit)."""

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.train_set, batch_size=self.hparams.batch_size)


def regression(init_method: str = "lora", task_seed: int = 3) -> tuple[MatrixRegressionModule, InOrderRegressionData]:
    task = {**TASK, "task_seed": task_seed}
    pl.seed_everything(0)
    module = MatrixRegressionModule(**task, lora_rank=4, init_method=init_method)
    return module, InOrderRegressionData(**task, train_size=64, val_size=32, test_size=64, batch_size=16)


def checkpointing_trainer(folder: Path, **overrides) -> pl.Trainer:
    checkpoint = ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0)
    return cpu_trainer(enable_checkpointing=True, callbacks=[checkpoint], num_sanity_val_steps=0, **overrides)


def saved(folder: Path) -> dict:
    return torch.load(folder / "last.ckpt", weights_only=False)


def frozen_names(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def trainable_names(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# What a checkpoint holds
# ---------------------------------------------------------------------------------------------


def test_a_lora_checkpoint_holds_the_adapters_and_the_base_identity(tmp_path):
    module, data = regression()
    checkpointing_trainer(tmp_path, max_epochs=1).fit(module, data)
    checkpoint = saved(tmp_path)
    assert set(checkpoint["state_dict"]) == trainable_names(module) == {
        "model.base_model.model.proj.lora_A.default.weight",
        "model.base_model.model.proj.lora_B.default.weight",
    }
    assert "task_seed=3" in checkpoint[BASE_IDENTITY_KEY]["source"]
    assert checkpoint["optimizer_states"] and checkpoint["loops"]
    loaded = MatrixRegressionModule.load_from_checkpoint(tmp_path / "last.ckpt")  # rebuilt from its hyperparameters
    assert_bitwise_equal(all_weights(loaded), all_weights(module))


@pytest.mark.parametrize("init_method", ["lora_ga", "pissa"])
def test_base_weights_an_init_rewrote_are_kept_and_restored_for_test(tmp_path, init_method):
    """LoRA-GA and PiSSA leave W0 - s B0 A0 in the base: the checkpoint keeps it, and a model built afresh tests
    exactly as the trained one (LoRA-GA runs only in fit, so without the saved residual the base would be W0)."""
    module, data = regression(init_method)
    trainer = checkpointing_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, data)
    base_weight = "model.base_model.model.proj.base_layer.weight"
    assert set(saved(tmp_path)["state_dict"]) == trainable_names(module) | {base_weight}
    assert not torch.equal(module.state_dict()[base_weight], data.base_weight())  # rewritten: W0 - s B0 A0
    expected = trainer.test(module, data, verbose=False)[0]

    fresh, _ = regression(init_method)
    tested = cpu_trainer().test(fresh, data, ckpt_path=tmp_path / "last.ckpt", verbose=False)[0]
    assert tested == expected
    assert_bitwise_equal(all_weights(fresh), all_weights(module))


def test_resuming_a_lora_ga_run_is_bit_exact(tmp_path):
    continuous, data = regression("lora_ga")
    cpu_trainer(max_epochs=2, num_sanity_val_steps=0).fit(continuous, data)

    first, data = regression("lora_ga")
    checkpointing_trainer(tmp_path, max_epochs=1).fit(first, data)
    resumed, data = regression("lora_ga")
    trainer = cpu_trainer(max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(resumed, data, ckpt_path=tmp_path / "last.ckpt")

    assert trainer.global_step == 8
    assert_bitwise_equal(all_weights(resumed), all_weights(continuous))  # adapters and the rewritten base


def test_a_classification_checkpoint_holds_the_adapters_and_the_head(tiny_bert_dir, tmp_path):
    pl.seed_everything(0)
    module = SequenceClassifier(model_name_or_path=tiny_bert_dir, lora_r=4)
    data = RottenTomatoesDataModule(tokenizer=tiny_bert_dir, train_size=16, val_size=8, test_size=8, max_length=32, batch_size=8)
    trainer = checkpointing_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, data)
    keys = set(saved(tmp_path)["state_dict"])
    assert trainable_names(module) <= keys and not keys & frozen_names(module)
    assert keys - trainable_names(module) <= {name for name, _ in module.named_buffers()}
    assert any("classifier.modules_to_save" in key for key in keys)
    expected = trainer.test(module, data, verbose=False)[0]

    pl.seed_everything(0)  # the frozen copy of the new head is drawn at random, as in the trained run
    fresh = SequenceClassifier(model_name_or_path=tiny_bert_dir, lora_r=4)
    assert cpu_trainer().test(fresh, data, ckpt_path=tmp_path / "last.ckpt", verbose=False)[0] == expected


# ---------------------------------------------------------------------------------------------
# Math SFT: an unquantized and a 4-bit base
# ---------------------------------------------------------------------------------------------


def math_sft(folder: str, quantization: str | None) -> tuple[MathSFTModule, MathSFTDataModule]:
    pl.seed_everything(0)
    module = MathSFTModule(model_name_or_path=folder, quantization=quantization, lora_rank=4, lora_alpha=8, max_new_tokens=2)
    data = MathSFTDataModule(model_name_or_path=folder, train_size=8, val_size=2, test_size=2, batch_size=4, eval_batch_size=2, max_length=64)
    return module, data


@pytest.mark.parametrize("quantization", [None, "4bit"])
def test_math_sft_checkpoints_leave_the_base_out_and_resume(tiny_llama_64_dir, tmp_path, quantization):
    """A 4-bit base's own state dict cannot even be loaded back (bitsandbytes' quantization statistics are
    unexpected keys to load_state_dict); a checkpoint without it resumes and tests."""
    module, data = math_sft(tiny_llama_64_dir, quantization)
    trainer = checkpointing_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, data)
    state = saved(tmp_path)["state_dict"]
    assert set(state) == trainable_names(module) and all("lora_" in key for key in state)
    expected = trainer.test(module, data, verbose=False)[0]
    trained = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}

    fresh, data = math_sft(tiny_llama_64_dir, quantization)
    assert cpu_trainer().test(fresh, data, ckpt_path=tmp_path / "last.ckpt", verbose=False)[0] == expected
    assert all(torch.equal(trained[name], p) for name, p in fresh.named_parameters() if p.requires_grad)
    resumed, data = math_sft(tiny_llama_64_dir, quantization)
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(resumed, data, ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 2


# ---------------------------------------------------------------------------------------------
# Another base is refused
# ---------------------------------------------------------------------------------------------


def test_a_checkpoint_of_another_base_is_refused_naming_both(tmp_path):
    module, data = regression(task_seed=3)
    checkpointing_trainer(tmp_path, max_epochs=1).fit(module, data)
    other, other_data = regression(task_seed=4)
    with pytest.raises(ValueError, match="ckpt_path") as refused:
        cpu_trainer().test(other, other_data, ckpt_path=tmp_path / "last.ckpt", verbose=False)
    assert "task_seed=3" in str(refused.value) and "task_seed=4" in str(refused.value)


def test_a_checkpoint_whose_source_now_holds_other_weights_is_refused(tiny_llama_dir, tmp_path):
    folder = tmp_path / "model"
    config = LlamaConfig.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    module, data = math_sft(str(folder), None)
    checkpointing_trainer(tmp_path / "checkpoints", max_steps=1, limit_val_batches=0).fit(module, data)

    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(folder)  # another revision in the same place
    revised, data = math_sft(str(folder), None)
    with pytest.raises(ValueError, match="ckpt_path") as refused:
        cpu_trainer().test(revised, data, ckpt_path=tmp_path / "checkpoints" / "last.ckpt", verbose=False)
    assert str(refused.value).count(str(folder)) >= 2  # both identities are shown, with their fingerprints


def test_a_state_dict_without_a_trained_weight_or_with_a_foreign_key_is_refused():
    module, _ = regression()
    state = module.state_dict()
    module.load_state_dict(state)  # the whole model, as checkpoints written before held it
    module.load_state_dict({key: value for key, value in state.items() if "lora_" in key})
    with pytest.raises(RuntimeError, match="lora_B"):
        module.load_state_dict({key: value for key, value in state.items() if "lora_B" not in key})
    with pytest.raises(RuntimeError, match="head.weight"):
        module.load_state_dict({**state, "model.head.weight": torch.zeros(1)})
