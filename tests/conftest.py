"""Shared fixtures: quiet Lightning, and tiny real model folders built once per session from configs."""

import importlib.util
import logging
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist


@pytest.fixture(autouse=True)
def _quiet_lightning():
    # Lightning's banner lines (GPU available, tips) drown the test output.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LitLogger.*")
        yield


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 2-layer BERT encoder (hidden 32, 64 positions, no head, like the MiniLM folder) with the
    offline MiniLM tokenizer: a real model folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lightning_hrp.recipes.pretrained import default_model_path

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random LLaMA with SmolLM2's real tokenizer (read from the packaged GGUF), saved as a local model folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lightning_hrp.recipes.pretrained import SMOLLM2_GGUF_FILE, SMOLLM2_PACKAGE

    smollm2_dir = Path(next(iter(importlib.util.find_spec(SMOLLM2_PACKAGE).submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, gguf_file=SMOLLM2_GGUF_FILE)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama_64_dir(tiny_llama_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``tiny_llama_dir``'s model with 64-wide layers, whose in_features are multiples of bitsandbytes' CPU
    quantization block (64), so that quantizing and repacking happen as for SmolLM2 (576 = 9 x 64)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_llama_dir)
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama-64")
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one: HRP takes its distributed paths (all-reduces, broadcasts) in one process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
