"""The math SFT recipe: answer extraction, prompt masking, splits, bad paths, short fits.

Fits use a tiny LLaMA built from a config with SmolLM2's real tokenizer (read from the packaged
GGUF once per session); the real SmolLM2 runs are marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from lightning_hrp import HRPPreheatCallback
from lightning_hrp.recipes.math_sft import MathSFTModule
from lightning_hrp.recipes.math_sft_data import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    MathSFTDataModule,
    TokenizedMathDataset,
    collate_math_batch,
    extract_final_number,
    gsm8k_example,
    is_exact_match,
    metamath_example,
    packaged_gsm8k_file,
    read_gsm8k_jsonl,
    reference_final_number,
    split_gsm8k_file,
)
from lightning_hrp.recipes.pretrained import load_causal_lm, resolve_model_location
from modules import cpu_trainer

GSM8K_LINES = packaged_gsm8k_file().read_text(encoding="utf-8").splitlines()
GSM8K_ROWS = [json.loads(line) for line in GSM8K_LINES]


@pytest.fixture(scope="session")
def tokenizer(tiny_llama_dir: str):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------


def test_reference_is_the_number_after_the_hashes_on_real_gsm8k_lines() -> None:
    assert len(GSM8K_ROWS) == 1319
    references = [reference_final_number(row["answer"]) for row in GSM8K_ROWS]
    assert references[0] == "18"  # Janet's ducks
    for row, reference in zip(GSM8K_ROWS, references):
        raw = row["answer"].rsplit("####", 1)[1].strip()
        assert reference == raw.replace(",", "")
        assert re.fullmatch(r"-?\d+", reference)
    assert "2125" in references  # written "2,125" in the file


def test_a_correct_solution_is_an_exact_match_on_every_gsm8k_line() -> None:
    """The solutions we train on end in their own final number, so extraction recovers it."""
    for row in GSM8K_ROWS:
        example = gsm8k_example(row)
        assert "<<" not in example.solution  # calculator annotations are dropped
        assert is_exact_match(example.solution, example.final_answer)
    # ...and a solution is not a match for a different problem's answer.
    first, second = gsm8k_example(GSM8K_ROWS[0]), gsm8k_example(GSM8K_ROWS[1])
    assert not is_exact_match(first.solution, second.final_answer)


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        (" So the profit is $70,000.", "70000"),
        ("The answer is: 18.00", "18"),
        ("It takes 2.5 hours", "2.5"),
        ("The temperature drops to -4 degrees", "-4"),
        ("The answer is 12.\n\nQuestion: Tom has 7 apples. How many", "12"),
        ("I do not know.", None),
    ],
)
def test_final_number_extraction(generated: str, expected: str | None) -> None:
    assert extract_final_number(generated) == expected


def test_metamath_rows_train_on_the_whole_response() -> None:
    row = {
        "query": "What is the total cost of 3 pens at $2 each?",
        "response": "Each pen costs $2, so 3 pens cost 3 * 2 = $6.\nThe answer is: 6",
        "type": "GSM_Rephrased",
    }
    example = metamath_example(row)
    assert example.question == row["query"]
    assert example.solution == row["response"]
    assert example.final_answer == "6"
    assert is_exact_match(example.solution, example.final_answer)


def test_reference_without_hashes_is_refused() -> None:
    with pytest.raises(ValueError, match="####"):
        reference_final_number("The answer is 18")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def test_labels_mask_exactly_the_prompt_and_the_padding(tokenizer) -> None:
    examples = [gsm8k_example(row) for row in GSM8K_ROWS[:6]]
    dataset = TokenizedMathDataset(examples, tokenizer, max_length=512)
    features = [dataset[i] for i in range(len(dataset))]
    batch = collate_math_batch(features, pad_token_id=tokenizer.pad_token_id)
    longest = batch["input_ids"].shape[1]
    assert len({len(f["prompt_ids"]) + len(f["solution_ids"]) for f in features}) > 1  # padding happens

    for row, (example, feature) in enumerate(zip(examples, features)):
        prompt_length = len(feature["prompt_ids"])
        length = prompt_length + len(feature["solution_ids"])
        labels = batch["labels"][row]
        # -100 exactly on the prompt and the padding; the solution's own ids everywhere else.
        expected_masked = [i < prompt_length or i >= length for i in range(longest)]
        assert (labels == IGNORE_INDEX).tolist() == expected_masked
        assert torch.equal(labels[prompt_length:length], batch["input_ids"][row, prompt_length:length])
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (longest - length)
        # The trained tokens are the solution and EOS; the masked ones the prompt.
        assert tokenizer.decode(labels[prompt_length:length]) == " " + example.solution + tokenizer.eos_token
        assert tokenizer.decode(batch["input_ids"][row, :prompt_length]) == PROMPT_TEMPLATE.format(
            question=example.question
        )
        # Generation prompts are the same prompt tokens, left-padded.
        prompt_ids = batch["prompt_input_ids"][row]
        prompt_mask = batch["prompt_attention_mask"][row]
        assert torch.equal(prompt_ids[prompt_mask.bool()], torch.tensor(feature["prompt_ids"]))
        assert prompt_mask.tolist() == sorted(prompt_mask.tolist())  # zeros first
    assert batch["final_answers"] == [e.final_answer for e in examples]


def test_truncation_keeps_the_prompt_end_and_some_solution(tokenizer) -> None:
    examples = [gsm8k_example(row) for row in GSM8K_ROWS[:20]]
    whole = TokenizedMathDataset(examples, tokenizer, max_length=4096)
    truncated = TokenizedMathDataset(examples, tokenizer, max_length=64)
    for index in range(len(examples)):
        full, cut = whole[index], truncated[index]
        assert len(cut["prompt_ids"]) + len(cut["solution_ids"]) <= 64
        # The prompt loses its start, never its end; the solution loses its end, keeping >= 32 tokens.
        assert cut["prompt_ids"] == full["prompt_ids"][-len(cut["prompt_ids"]) :]
        assert tokenizer.decode(cut["prompt_ids"]).endswith("\nAnswer:")
        assert cut["solution_ids"] == full["solution_ids"][: len(cut["solution_ids"])]
        assert len(cut["solution_ids"]) >= min(32, len(full["solution_ids"]))
    assert any(len(truncated[i]["prompt_ids"]) < len(whole[i]["prompt_ids"]) for i in range(len(examples)))


def test_gsm8k_splits_are_disjoint_deterministic_and_documented_sizes() -> None:
    path = packaged_gsm8k_file()
    splits = split_gsm8k_file(path, train_size=1000, val_size=64, test_size=None, split_seed=0)
    again = split_gsm8k_file(path, train_size=1000, val_size=64, test_size=None, split_seed=0)
    reseeded = split_gsm8k_file(path, train_size=1000, val_size=64, test_size=None, split_seed=1)

    assert (len(splits.train), len(splits.val), len(splits.test)) == (1000, 64, 255)
    assert splits == again
    assert splits.val != reseeded.val
    questions = [{e.question for e in part} for part in (splits.train, splits.val, splits.test)]
    assert not questions[0] & questions[1] and not questions[0] & questions[2] and not questions[1] & questions[2]
    assert len(questions[0] | questions[1] | questions[2]) == len({row["question"] for row in GSM8K_ROWS})
    # A smaller test split is a prefix of the default one: the sizes do not reshuffle.
    small = split_gsm8k_file(path, train_size=1000, val_size=64, test_size=10, split_seed=0)
    assert small.test == splits.test[:10] and small.train == splits.train


def test_oversized_splits_are_refused() -> None:
    with pytest.raises(ValueError, match="holds 1319 examples"):
        split_gsm8k_file(packaged_gsm8k_file(), train_size=1300, val_size=64, test_size=None, split_seed=0)


# ---------------------------------------------------------------------------------------------
# Bad locations get errors that name them
# ---------------------------------------------------------------------------------------------


def test_missing_gsm8k_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        read_gsm8k_jsonl(missing)


@pytest.mark.parametrize(
    "bad_line",
    ["not json at all", json.dumps({"question": "q only"}), json.dumps({"question": "q", "answer": "no hashes"})],
)
def test_malformed_gsm8k_line_is_named_with_its_line_number(tmp_path: Path, bad_line: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(GSM8K_LINES[0] + "\n" + bad_line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2")):
        read_gsm8k_jsonl(path)


def test_model_folder_without_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path)) + ".*config.json"):
        load_causal_lm(str(tmp_path), torch.float32)


def test_missing_gguf_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "model.gguf"))):
        resolve_model_location(str(tmp_path), "model.gguf", str(tmp_path / "cache"))


def test_malformed_gguf_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"this is not a GGUF file")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "model.gguf"))):
        resolve_model_location(str(tmp_path), "model.gguf", str(tmp_path / "cache"))
    assert not any((tmp_path / "cache").glob("*/config.json"))  # nothing half-made is left to reuse


def test_hub_data_without_datasets_says_how_to_install(tiny_llama_dir: str) -> None:
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("`datasets` is installed here; this checks the message shown without it.")
    data = MathSFTDataModule(model_name_or_path=tiny_llama_dir, data_source="hub")
    with pytest.raises(ImportError, match="pip install datasets"):
        data.setup("fit")


def test_module_and_data_with_different_models_are_refused(tiny_llama_dir: str, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_llama_dir, tmp_path / "copy")
    module = MathSFTModule(model_name_or_path=tiny_llama_dir)
    data = MathSFTDataModule(model_name_or_path=str(copy), train_size=8, val_size=4, test_size=4)
    trainer = cpu_trainer(max_steps=1)
    with pytest.raises(ValueError, match="model_name_or_path"):
        trainer.fit(module, data)


# ---------------------------------------------------------------------------------------------
# Short fits on a tiny LLaMA
# ---------------------------------------------------------------------------------------------


def fit_tiny(tiny_llama_dir: str, callbacks: list) -> tuple[MathSFTModule, MathSFTDataModule, pl.Trainer]:
    pl.seed_everything(0)
    module = MathSFTModule(
        model_name_or_path=tiny_llama_dir, lora_rank=4, lora_alpha=8, learning_rate=1e-3, max_new_tokens=4
    )
    data = MathSFTDataModule(
        model_name_or_path=tiny_llama_dir, train_size=16, val_size=4, test_size=4, batch_size=4, eval_batch_size=4,
        max_length=128,
    )
    # max_steps=4 is one epoch of 16 examples: validation runs at its end.
    trainer = cpu_trainer(max_steps=4, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(module, data)
    return module, data, trainer


def lora_weights(module: MathSFTModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_hrp", [False, True], ids=["lora", "hrp"])
def test_tiny_llama_fits_and_is_scored(tiny_llama_dir: str, use_hrp: bool) -> None:
    hrp = [HRPPreheatCallback(preheat_rank=16, preheat_steps=2)] if use_hrp else []
    module, data, trainer = fit_tiny(tiny_llama_dir, hrp)

    assert trainer.global_step == 4
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    assert math.isfinite(trainer.callback_metrics["val/loss"].item())
    assert 0.0 <= trainer.callback_metrics["val/exact_match"].item() <= 1.0
    trainable = lora_weights(module)
    assert trainable and all("lora_" in name for name in trainable)
    # Training moved the adapters off B = 0.
    assert any(torch.count_nonzero(w) for n, w in trainable.items() if "lora_B" in n)
    if use_hrp:
        report = hrp[0].report
        assert len(report.preheat_losses) == 2 and all(math.isfinite(x) for x in report.preheat_losses)
        # Two decoder layers x seven projections.
        assert len(report.layers) == 14

    result = trainer.test(module, data, verbose=False)[0]
    assert math.isfinite(result["test/loss"]) and 0.0 <= result["test/exact_match"] <= 1.0


@pytest.fixture(scope="session")
def memorizing_llama_dir(tiny_llama_dir: str, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """The tiny LLaMA trained (all weights, before any LoRA) to answer the 4 validation problems of
    ``MEMORIZED_SPLIT`` with ``" #### <number>"``: the right number for two, a wrong one for the others."""
    splits = split_gsm8k_file(packaged_gsm8k_file(), **MEMORIZED_SPLIT)
    answers = [e.final_answer if i % 2 == 0 else str(int(e.final_answer) + 1) for i, e in enumerate(splits.val)]
    features = [
        {
            "prompt_ids": tokenizer(PROMPT_TEMPLATE.format(question=e.question))["input_ids"],
            "solution_ids": tokenizer(" #### " + a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
            "final_answer": a,
        }
        for e, a in zip(splits.val, answers)
    ]
    batch = collate_math_batch(features, tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # Logits only where there are labels: the 49k-token head over whole prompts would dominate.
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    for _ in range(100):  # enough for greedy decoding to reproduce all four (loss ~0.004)
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = model.lm_head(hidden[:, :-1][scored])
        loss = torch.nn.functional.cross_entropy(logits, targets[scored])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("memorizing-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder), answers


MEMORIZED_SPLIT = dict(train_size=8, val_size=4, test_size=4, split_seed=0)


def test_validation_scores_greedy_generation_by_exact_match(memorizing_llama_dir: tuple[str, list[str]]) -> None:
    folder, memorized = memorizing_llama_dir
    module = MathSFTModule(model_name_or_path=folder, max_new_tokens=12)
    data = MathSFTDataModule(model_name_or_path=folder, eval_batch_size=4, **MEMORIZED_SPLIT)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    generated = module.generate_answers(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    assert [extract_final_number(text) for text in generated] == memorized
    # Two memorised answers are right, two are off by one.
    trainer = cpu_trainer()
    result = trainer.validate(module, data, verbose=False)[0]
    assert result["val/exact_match"] == pytest.approx(0.5)
    assert math.isfinite(result["val/loss"])


def test_batched_generation_matches_one_by_one(memorizing_llama_dir: tuple[str, list[str]]) -> None:
    """Left padding does not change what a prompt generates."""
    folder, _ = memorizing_llama_dir
    module = MathSFTModule(model_name_or_path=folder, max_new_tokens=12)
    data = MathSFTDataModule(model_name_or_path=folder, eval_batch_size=4, **MEMORIZED_SPLIT)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    assert not batch["prompt_attention_mask"].all()  # the prompts do differ in length
    batched = module.generate_answers(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    assert len(set(batched)) == 4
    for row in range(4):
        mask = batch["prompt_attention_mask"][row].bool()
        prompt = batch["prompt_input_ids"][row][mask][None]
        alone = module.generate_answers(prompt, torch.ones_like(prompt))
        assert alone[0] == batched[row]


# ---------------------------------------------------------------------------------------------
# The real SmolLM2 (slow: dequantises a 135M-parameter GGUF)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf_is_dequantised_once_and_fits_with_hrp(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    location = resolve_model_location(None, None, cache)
    weights = Path(location) / "model.safetensors"
    assert weights.is_file() and (Path(location) / "tokenizer.json").is_file()
    written = weights.stat().st_mtime_ns
    assert resolve_model_location(None, None, cache) == location
    assert weights.stat().st_mtime_ns == written  # reused, not rewritten

    pl.seed_everything(0)
    module = MathSFTModule(cache_dir=cache, max_new_tokens=16)
    # Two batches of 4: max_steps=2 is one epoch, so validation (with generation) runs at its end.
    data = MathSFTDataModule(cache_dir=cache, train_size=8, val_size=4, test_size=4, batch_size=4, eval_batch_size=4)
    hrp = HRPPreheatCallback(preheat_rank=32, preheat_steps=2)
    trainer = cpu_trainer(max_steps=2, num_sanity_val_steps=0, callbacks=[hrp])
    trainer.fit(module, data)
    assert len(hrp.report.layers) == 30 * 7
    assert math.isfinite(trainer.callback_metrics["val/loss"].item())
