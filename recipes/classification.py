"""Sequence classification with LoRA (GLUE-style): a transformers encoder with a classification head.

:class:`SequenceClassifier` builds the peft LoRA model in ``__init__``, so the adapters exist before
any strategy wraps the model, as :class:`lightning_hrp.HRPPreheatCallback` requires; its data are
:mod:`lightning_hrp.recipes.classification_data` (Rotten Tomatoes offline, GLUE from the hub). Model
and tokenizer arguments take a local folder or a hub name alike; both go through ``from_pretrained``.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import Accuracy, F1Score, MatthewsCorrCoef

from lightning_hrp._validation import check_choice, check_int, is_positive_number
from lightning_hrp.recipes.classification_data import TextClassificationDataModule
from lightning_hrp.recipes.lora_module import LoraRecipeModule, Scheduler
from lightning_hrp.recipes.pretrained import default_model_path, resolve_pretrained

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


HeadInit = Literal["random", "linear_probe"]


class LinearProbeHead(Callback):
    """Start the classification head from a logistic regression on the frozen model's features (a linear probe).

    At ``setup("fit")``, before the data-driven inits and HRP see the head: the model runs in eval mode
    (no dropout, no gradient) over the first ``examples`` training examples in a fixed order (no RNG is
    drawn, so the main run's data order is untouched), the inputs of the head's final linear layer are
    collected, and a multinomial logistic regression with an L2 penalty ``l2 / 2 * ||W||^2`` on the mean
    cross-entropy is fitted to them by L-BFGS in float64; its weight and bias replace the head's.

    Args:
        examples: Training examples the probe is fitted on (None: the whole training split).
        l2: L2 penalty on the probe's weight.
    """

    def __init__(self, examples: int | None = 1024, l2: float = 1e-3) -> None:
        if examples is not None:
            check_int("probe_examples", examples, minimum=1)
        if not is_positive_number(l2):
            raise ValueError(f"probe_l2 must be a positive number, got {l2!r}.")
        self.examples = examples
        self.l2 = float(l2)
        self.finished = False

    def state_dict(self) -> dict[str, Any]:
        return {"finished": self.finished}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.finished = state_dict["finished"]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.finished:
            return
        head = _final_head_layer(pl_module)
        features, labels = self._features(trainer, pl_module, head)
        weight, bias, loss = fit_logistic_regression(features, labels, head.out_features, self.l2)
        with torch.no_grad():
            head.weight.copy_(weight.to(head.weight.dtype))
            head.bias.copy_(bias.to(head.bias.dtype))
        self.finished = True
        rank_zero_info(f"Linear probe: head fitted on {len(labels)} training examples (training cross-entropy {loss:.4f}).")

    def _features(self, trainer: pl.Trainer, pl_module: pl.LightningModule, head: nn.Linear) -> tuple[Tensor, Tensor]:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, TextClassificationDataModule):
            raise ValueError(
                f"head_init='linear_probe' needs a TextClassificationDataModule (it reads the training split in a fixed "
                f"order), got {type(datamodule).__name__}."
            )
        collected: list[Tensor] = []
        labels: list[Tensor] = []
        hook = head.register_forward_pre_hook(lambda module, args: collected.append(args[0].detach().double().cpu()))
        training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                for batch in datamodule.ordered_dataloader("train"):
                    seen = sum(len(t) for t in labels)
                    if self.examples is not None and seen >= self.examples:
                        break
                    batch = {key: value.to(pl_module.device) for key, value in batch.items()}
                    pl_module(batch)
                    labels.append(batch["labels"].cpu())
        finally:
            hook.remove()
            pl_module.train(training)
        features, targets = torch.cat(collected), torch.cat(labels)
        return features[: self.examples], targets[: self.examples]


def _final_head_layer(pl_module: pl.LightningModule) -> nn.Linear:
    """The one trainable ``nn.Linear`` with ``num_labels`` outputs: the head's final layer."""
    num_labels = pl_module.hparams.num_labels
    found = [
        m for m in pl_module.modules()
        if isinstance(m, nn.Linear) and m.out_features == num_labels and m.weight.requires_grad and m.bias is not None
    ]  # fmt: skip
    if len(found) != 1:
        raise ValueError(
            f"head_init='linear_probe' needs exactly one trainable nn.Linear with {num_labels} outputs and a bias (the "
            f"classification head's last layer), found {len(found)}."
        )
    return found[0]


def fit_logistic_regression(features: Tensor, labels: Tensor, classes: int, l2: float) -> tuple[Tensor, Tensor, float]:
    """Multinomial logistic regression by L-BFGS (float64): ``argmin mean CE(x W^T + b, y) + l2 / 2 * ||W||^2``.

    Returns:
        The weight ``(classes, features)``, the bias ``(classes,)`` and the final training cross-entropy.
    """
    x, y = features.double(), labels.long()
    weight = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    with torch.no_grad():
        cross_entropy = float(F.cross_entropy(x @ weight.T + bias, y))
    return weight.detach(), bias.detach(), cross_entropy


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
        warmup_ratio: Fraction of the training steps with linear warm-up from 0.
        scheduler: Learning-rate shape after warm-up: linear or cosine decay to 0, or constant.
        head_init: ``random`` (the head as ``from_pretrained`` initialises it), or ``linear_probe``: a
            logistic regression on the frozen model's features before any init sees the head
            (:class:`LinearProbeHead`).
        probe_examples: Training examples the linear probe is fitted on (None: all).
        probe_l2: L2 penalty of the linear probe.
        **kwargs: ``init_method`` (``full`` trains the whole model), ``init_options``, ``weight_decay``:
            see :class:`~lightning_hrp.recipes.lora_module.LoraRecipeModule`.
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
        warmup_ratio: float = 0.06,
        scheduler: Scheduler = "linear",
        head_init: HeadInit = "random",
        probe_examples: int | None = 1024,
        probe_l2: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        check_int("num_labels", num_labels, minimum=2)
        check_choice("head_init", head_init, HeadInit)
        probe = LinearProbeHead(probe_examples, probe_l2) if head_init == "linear_probe" else None
        check_int("lora_r", lora_r, minimum=1)
        if target_modules is not None and lora_on_mlp:
            raise ValueError("lora_on_mlp applies to the default targets only; add the MLP modules to target_modules instead.")
        super().__init__(learning_rate=learning_rate, warmup_ratio=warmup_ratio, scheduler=scheduler, **kwargs)
        self.probe = probe
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
            f"{source} (num_labels={hp.num_labels})",
            task_type=TaskType.SEQ_CLS,
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=targets,
            use_rslora=hp.use_rslora,
        )

    def configure_callbacks(self) -> list[pl.Callback]:
        # The probe first: the data-driven inits (at setup) and HRP then start from the probed head.
        return ([self.probe] if self.probe is not None else []) + super().configure_callbacks()

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
