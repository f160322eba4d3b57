"""The sequence-classification recipe: data split and loading, model building, errors, and real fits
of a tiny random BERT (with and without HRP) on a slice of the real Rotten Tomatoes data."""

from __future__ import annotations

import bz2
import importlib.util
import random
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from peft.tuners.lora import LoraLayer

from lightning_hrp import HRPPreheatCallback
from lightning_hrp.recipes.classification import SequenceClassifier, lora_target_modules
from lightning_hrp.recipes.classification_data import (
    GlueDataModule,
    LengthGroupedSampler,
    RottenTomatoesDataModule,
    default_rotten_tomatoes_path,
    load_rotten_tomatoes,
    split_rotten_tomatoes,
)
from lightning_hrp.recipes.pretrained import resolve_pretrained
from modules import cpu_trainer

NUM_LAYERS = 2


def tiny_data(model_dir: str, **overrides) -> RottenTomatoesDataModule:
    settings = dict(train_size=48, val_size=24, test_size=24, tokenizer=model_dir, max_length=32, batch_size=8, eval_batch_size=16)
    return RottenTomatoesDataModule(**{**settings, **overrides})


def trainer(max_steps: int, callbacks: list[Callback] | None = None, **overrides) -> pl.Trainer:
    settings = dict(max_steps=max_steps, val_check_interval=max_steps, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    return cpu_trainer(**{**settings, "callbacks": callbacks or [], **overrides})


def lora_layers(module: torch.nn.Module) -> dict[str, LoraLayer]:
    return {name: layer for name, layer in module.named_modules() if isinstance(layer, LoraLayer)}


# ---------------------------------------------------------------------------- data


def test_rotten_tomatoes_split_is_fixed_disjoint_and_order_independent():
    examples = load_rotten_tomatoes(default_rotten_tomatoes_path())
    split = split_rotten_tomatoes(examples)
    assert {name: len(part) for name, part in split.items()} == {"train": 10752, "validation": 1000, "test": 1000}
    texts = {name: {text for text, _ in part} for name, part in split.items()}
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    assert {label for part in split.values() for _, label in part} == {0, 1}

    shuffled = list(examples)
    random.Random(1).shuffle(shuffled)
    assert split_rotten_tomatoes(shuffled) == split


def test_rotten_tomatoes_drops_plot_rows_and_duplicates(tmp_path):
    path = tmp_path / "reviews.csv.bz2"
    rows = [
        "category,text,movie_name",
        "fresh,A joy.,m1",
        "rotten,A bore.,m2",
        "fresh,A joy.,m3",  # duplicate text, same label: kept once
        "fresh,Mixed.,m4",
        "rotten,Mixed.,m5",  # same text with both labels: dropped
        "plot,Somebody does something.,m6",
    ]
    path.write_bytes(bz2.compress("\n".join(rows).encode()))
    assert sorted(load_rotten_tomatoes(path)) == [("A bore.", 0), ("A joy.", 1)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no file at"),
        (b"category,text\nfresh,plain text, not bz2\n", "could not read"),
        (bz2.compress(b"label,sentence\nfresh,A joy.\n"), "lacks the column(s) ['category', 'text']"),
        (bz2.compress(b"category,text\nplot,Only plots.\n"), "no rows of category fresh or rotten"),
    ],
)
def test_bad_data_file_names_the_path_and_what_was_expected(tmp_path, content, message):
    path = tmp_path / "reviews.csv.bz2"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises((FileNotFoundError, ValueError)) as error:
        load_rotten_tomatoes(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)
    assert "category" in str(error.value)


def test_data_module_batches_are_padded_and_labelled(tiny_bert_dir):
    data = tiny_data(tiny_bert_dir, group_by_length=True)
    data.setup("fit")
    assert [len(data.datasets[split]) for split in ("train", "validation", "test")] == [48, 24, 24]
    assert isinstance(data.train_dataloader().sampler, LengthGroupedSampler)
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 32
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["labels"].dtype == torch.long and set(batch["labels"].tolist()) <= {0, 1}
    lengths = [int(b["attention_mask"].sum(dim=1).max()) for b in data.val_dataloader()]
    assert lengths == sorted(lengths)  # evaluation goes in order of length


def test_length_grouped_sampler_is_a_seeded_permutation_with_little_padding():
    lengths = [int(n) for n in torch.randint(1, 60, (1000,), generator=torch.Generator().manual_seed(0))]
    sampler = LengthGroupedSampler(lengths, batch_size=10, window=20)
    torch.manual_seed(3)
    order = list(sampler)
    assert sorted(order) == list(range(1000))
    torch.manual_seed(3)
    assert list(sampler) == order
    assert list(sampler) != order  # the next epoch draws a new order

    def padded_tokens(indices: list[int]) -> int:
        batches = [indices[i : i + 10] for i in range(0, len(indices), 10)]
        return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)

    random_order = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    assert padded_tokens(order) < 0.7 * padded_tokens(random_order)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed here")
def test_glue_without_datasets_says_how_to_install_it(tiny_bert_dir):
    data = GlueDataModule(task="mnli", tokenizer=tiny_bert_dir)
    assert data.num_labels == 3
    with pytest.raises(ImportError, match="pip install datasets"):
        data.prepare_data()


def test_glue_can_hold_out_training_examples_as_validation(monkeypatch):
    rows = {
        "train": [{"sentence": f"train {i}", "label": i % 2} for i in range(30)],
        "validation": [{"sentence": f"glue validation {i}", "label": i % 2} for i in range(7)],
    }
    monkeypatch.setattr(GlueDataModule, "_load_dataset", lambda self: rows)
    shared = GlueDataModule(task="sst2").load_splits()
    assert shared["validation"] == shared["test"] and len(shared["train"]) == 30
    held = GlueDataModule(task="sst2", val_from_train=10).load_splits()
    assert len(held["validation"]) == 10 and len(held["train"]) == 20 and len(held["test"]) == 7
    # Disjoint, together the whole training split, and the test split is GLUE's validation split.
    assert sorted(held["train"] + held["validation"]) == sorted((r["sentence"], r["label"]) for r in rows["train"])
    assert all(text.startswith("glue validation") for text, _ in held["test"])
    # A fixed order, whatever the order of the rows.
    monkeypatch.setattr(GlueDataModule, "_load_dataset", lambda self: {**rows, "train": rows["train"][::-1]})
    assert GlueDataModule(task="sst2", val_from_train=10).load_splits()["validation"] == held["validation"]


def test_glue_rejects_unknown_task():
    with pytest.raises(ValueError, match="stsb"):
        GlueDataModule(task="stsb")


# ---------------------------------------------------------------------------- model


def test_lora_targets_attention_and_optionally_mlp(tiny_bert_dir):
    attention = lora_layers(SequenceClassifier(tiny_bert_dir, lora_r=4))
    suffixes = {name.split(f"layer.{i}.", 1)[1] for name in attention for i in range(NUM_LAYERS) if f"layer.{i}." in name}
    assert suffixes == {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"}
    assert len(attention) == 4 * NUM_LAYERS

    with_mlp = lora_layers(SequenceClassifier(tiny_bert_dir, lora_r=4, lora_on_mlp=True))
    assert len(with_mlp) == 6 * NUM_LAYERS
    assert not any("pooler" in name for name in with_mlp)


def test_only_adapters_and_head_train_and_explicit_targets_work(tiny_bert_dir):
    module = SequenceClassifier(tiny_bert_dir, lora_r=4, target_modules=["query", "value"], use_rslora=True)
    layers = lora_layers(module)
    assert len(layers) == 2 * NUM_LAYERS
    assert all(layer.scaling["default"] == pytest.approx(16.0 / 4**0.5) for layer in layers.values())
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "classifier" in name for name in trainable)
    assert module.model.training  # dropout on, as in fine-tuning


@pytest.mark.parametrize("layout", ["missing", "file", "no_config", "no_safetensors"])
def test_bad_model_folder_names_the_path_and_what_was_expected(tmp_path, tiny_bert_dir, layout):
    target = tmp_path / "model"
    if layout == "file":
        target.write_text("not a folder")
    elif layout == "no_config":
        target.mkdir()
    elif layout == "no_safetensors":
        target.mkdir()
        (target / "config.json").write_text((Path(tiny_bert_dir) / "config.json").read_text())
        (target / "pytorch_model.bin").write_bytes(b"pickles are refused")
    expected = {"missing": "no folder at", "file": "is a file", "no_config": "no config.json", "no_safetensors": "no model.safetensors"}
    with pytest.raises(OSError) as error:
        SequenceClassifier(str(target))
    assert expected[layout] in str(error.value)
    assert str(target) in str(error.value)


def test_hub_names_pass_through_and_paths_do_not():
    assert resolve_pretrained("FacebookAI/roberta-base", "model_name_or_path", needs_weights=True) == "FacebookAI/roberta-base"
    assert resolve_pretrained("roberta-base", "model_name_or_path", needs_weights=True) == "roberta-base"
    for path in ("./no/such/model", "/no/such/model", "no/such/model"):
        with pytest.raises(FileNotFoundError, match="no folder at"):
            resolve_pretrained(path, "model_name_or_path", needs_weights=True)


def test_unknown_architecture_asks_for_explicit_targets():
    with pytest.raises(ValueError, match="pass target_modules explicitly"):
        lora_target_modules("gpt2", include_mlp=False)


@pytest.mark.parametrize("argument", ["train_size", "val_size", "test_size"])
def test_subset_sizes_must_be_positive(argument):
    with pytest.raises(ValueError, match=argument):
        RottenTomatoesDataModule(**{argument: 0})


def test_malformed_config_names_the_path(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{not json")
    (target / "model.safetensors").write_bytes(b"")
    with pytest.raises(OSError, match="could not load") as error:
        SequenceClassifier(str(target))
    assert str(target) in str(error.value)


def test_num_labels_must_match_the_data(tiny_bert_dir):
    module = SequenceClassifier(tiny_bert_dir, num_labels=3)
    with pytest.raises(ValueError, match="num_labels"):
        trainer(2).fit(module, datamodule=tiny_data(tiny_bert_dir))


# ---------------------------------------------------------------------------- training


class _RecordLearningRates(Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize(("scheduler", "factors"), [("linear", [0.0, 0.5, 1.0, 0.5]), ("constant", [0.0, 0.5, 1.0, 1.0])])
def test_warmup_then_schedule(tiny_bert_dir, scheduler, factors):
    recorder = _RecordLearningRates()
    module = SequenceClassifier(tiny_bert_dir, learning_rate=1e-3, warmup_ratio=0.5, scheduler=scheduler)
    trainer(4, [recorder], limit_val_batches=0).fit(module, datamodule=tiny_data(tiny_bert_dir))
    assert recorder.rates == pytest.approx([1e-3 * f for f in factors])


def test_lora_fit_trains_adapters_only_and_logs_metrics(tiny_bert_dir):
    pl.seed_everything(0)
    module = SequenceClassifier(tiny_bert_dir, lora_r=4, learning_rate=1e-2)
    frozen_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    fit = trainer(4)
    fit.fit(module, datamodule=tiny_data(tiny_bert_dir))

    assert fit.global_step == 4
    assert all(torch.equal(p, frozen_before[n]) for n, p in module.named_parameters() if not p.requires_grad)
    assert all(layer.lora_B["default"].weight.abs().sum() > 0 for layer in lora_layers(module).values())
    for key in ("train/loss", "val/loss", "val/acc", "val/f1", "val/mcc"):
        assert torch.isfinite(fit.callback_metrics[key])
    tested = fit.test(module, datamodule=tiny_data(tiny_bert_dir), verbose=False)[0]
    assert set(tested) == {"test/loss", "test/acc", "test/f1", "test/mcc"}
    assert 0.0 <= tested["test/acc"] <= 1.0


class _SnapshotAdapters(Callback):
    """Placed after HRP: sees the adapters as HRP left them, before the first main step."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.before = {n: l.lora_A["default"].weight.detach().clone() for n, l in lora_layers(pl_module).items()}

    def on_train_start(self, trainer, pl_module) -> None:
        layers = lora_layers(pl_module)
        self.A = {n: l.lora_A["default"].weight.detach().clone() for n, l in layers.items()}
        self.B = {n: l.lora_B["default"].weight.detach().clone() for n, l in layers.items()}


def test_hrp_fit_reinitialises_adapters_then_trains(tiny_bert_dir):
    pl.seed_everything(0)
    module = SequenceClassifier(tiny_bert_dir, lora_r=4, learning_rate=1e-2)
    hrp = HRPPreheatCallback(preheat_rank=16, preheat_steps=3, mode="classic", seed=0)
    snapshot = _SnapshotAdapters()
    fit = trainer(4, [hrp, snapshot])
    fit.fit(module, datamodule=tiny_data(tiny_bert_dir))

    assert fit.global_step == 4  # preheat steps come on top of the main steps
    assert hrp.report is not None and len(hrp.report.preheat_losses) == 3
    assert len(hrp.report.layers) == 4 * NUM_LAYERS
    for name, A in snapshot.A.items():
        assert not torch.allclose(A, snapshot.before[name])  # a new direction...
        assert torch.count_nonzero(snapshot.B[name]) == 0  # ...with B = 0 (the "direction" rule)
        gram = A @ A.T  # rows: scaled top singular vectors, so mutually orthogonal
        assert torch.allclose(gram, torch.diag(torch.diagonal(gram)), atol=1e-5 * float(gram.diagonal().max()))
    assert torch.isfinite(fit.callback_metrics["val/acc"])


class _HeadAtFitStart(Callback):
    """Placed after the module's callbacks: the head after every setup-time init, before training."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.weight = pl_module.model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
        self.bias = pl_module.model.base_model.model.classifier.modules_to_save["default"].bias.detach().clone()


def test_linear_probe_head_is_the_logistic_regression_on_the_frozen_features(tiny_bert_dir):
    pl.seed_everything(0)
    module = SequenceClassifier(tiny_bert_dir, lora_r=4, head_init="linear_probe", probe_examples=40, probe_l2=1e-2)
    data = tiny_data(tiny_bert_dir)
    head = _HeadAtFitStart()
    fit = trainer(1, [head])
    fit.fit(module, datamodule=data)
    # The features the head sees, recomputed independently: the pooled outputs of the frozen model (eval mode).
    backbone = module.model.base_model.model.eval()
    inputs = [batch for batch in data.ordered_dataloader("train")]
    with torch.no_grad():
        features = torch.cat([backbone.bert(**{k: v for k, v in b.items() if k != "labels"}).pooler_output for b in inputs])[:40]
    labels = torch.cat([b["labels"] for b in inputs])[:40]
    # At a minimum of mean cross-entropy + l2 / 2 ||W||^2 the gradient vanishes.
    weight = head.weight.double().requires_grad_(True)
    bias = head.bias.double().requires_grad_(True)
    objective = torch.nn.functional.cross_entropy(features.double() @ weight.T + bias, labels) + 0.5 * 1e-2 * weight.square().sum()
    objective.backward()
    assert weight.grad.abs().max() < 1e-4 and bias.grad.abs().max() < 1e-4
    assert fit.global_step == 1
