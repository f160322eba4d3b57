"""``HRPTrainerCallback`` in a real transformers ``Trainer`` on CPU, with a tiny Llama built from a config."""

import ast
import warnings
from pathlib import Path

import pytest
import torch
from accelerate.state import GradientState
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import lightning_hrp
from lightning_hrp import HRPConfigurationError
from lightning_hrp.integrations.transformers import HRPTrainerCallback
from modules import lora_llama, lora_weights, token_dataset

PROBE_INPUT = torch.arange(24).reshape(2, 12) % 64
PREHEAT_STEPS = 3
ACCUMULATE = 2
MAIN_STEPS = 3


class TokenDataset(Dataset):
    def __init__(self, n: int = 64):
        self.tokens = token_dataset(n).tensors[0]

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


class RecordingTrainer(Trainer):
    """A Trainer with its own compute_loss (as users and TRL write them) that records every batch it sees, and the mode."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.seen = getattr(self, "seen", []) + [inputs["input_ids"].clone()]
        self.training_modes = getattr(self, "training_modes", []) + [model.training]
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


class Probe(TrainerCallback):
    """What the main run starts from: at on_train_begin (after HRP) and at the first step, before any optimizer step."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, train_dataloader=None, **kwargs):
        self.optimizer_state_empty = not optimizer.state
        self.scheduler_state = lr_scheduler.state_dict()
        self.global_step = state.global_step
        self.lora = lora_weights(model)
        self.modes = [m.training for m in model.modules()]
        # accelerate's GradientState registers a loader while a pass over it runs (and keeps one the
        # Trainer stopped iterating early: hence a check of this run's loader only).
        self.loader_registered = any(ref is train_dataloader for ref in GradientState().dataloader_references)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and not hasattr(self, "logits"):
            training = model.training
            with torch.no_grad():
                self.logits = model.eval()(input_ids=PROBE_INPUT).logits
            model.train(training)


def make_trainer(tmp_path: Path, model=None, dataset_size: int = 64, **overrides) -> RecordingTrainer:
    args = dict(
        output_dir=str(tmp_path), max_steps=MAIN_STEPS, per_device_train_batch_size=8, gradient_accumulation_steps=ACCUMULATE,
        learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=1, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    args.update(overrides)
    # Eval mode, as from_pretrained leaves a model: the Trainer's training_step switches to train mode.
    model = (model or lora_llama()).eval()
    return RecordingTrainer(model=model, args=TrainingArguments(**args), train_dataset=TokenDataset(dataset_size))


def train(tmp_path: Path, with_hrp: bool, **overrides):
    trainer = make_trainer(tmp_path, **overrides)
    probe = Probe()
    hrp = HRPTrainerCallback(preheat_rank=16, preheat_steps=PREHEAT_STEPS).attach(trainer) if with_hrp else None
    trainer.add_callback(probe)
    trainer.train()
    return trainer, probe, hrp


@pytest.mark.parametrize(
    ("seedable_sampler", "dataset_size"),
    [(True, 64), (False, 64), (True, 32)],
    ids=["seedable_sampler", "random_sampler", "cycled"],  # 32 samples: 4 batches, preheating needs 6
)
def test_preheats_with_the_trainers_loss_and_leaves_the_main_run_as_it_was(tmp_path, seedable_sampler, dataset_size):
    overrides = dict(accelerator_config={"use_seedable_sampler": seedable_sampler}, dataset_size=dataset_size)
    base = lora_llama()
    with torch.no_grad():
        base_logits = base.eval()(input_ids=PROBE_INPUT).logits
    initial = lora_weights(base)
    plain, plain_probe, _ = train(tmp_path / "plain", with_hrp=False, **overrides)
    trainer, probe, hrp = train(tmp_path / "hrp", with_hrp=True, **overrides)

    # Preheating ran through the Trainer's own compute_loss, preheat_steps x gradient_accumulation_steps batches.
    preheat_batches = PREHEAT_STEPS * ACCUMULATE
    assert len(trainer.seen) == preheat_batches + len(plain.seen)
    assert trainer.training_modes[:preheat_batches] == [True] * preheat_batches
    assert len(hrp.report.preheat_losses) == PREHEAT_STEPS and hrp.report.preheat_losses[-1] < hrp.report.preheat_losses[0]
    # The adapters moved, and the model's output at the first main step is still the base model's.
    moved = [n for n in initial if "lora_A" in n and not torch.equal(initial[n], probe.lora[n])]
    assert len(moved) == len(hrp.report.layers) == 8
    assert all(torch.count_nonzero(probe.lora[n]) == 0 for n in probe.lora if "lora_B" in n)
    assert torch.equal(probe.logits, base_logits) and torch.equal(plain_probe.logits, base_logits)
    # The main run: the same batches in the same order, optimizer and scheduler untouched, the same steps and lrs.
    assert all(torch.equal(a, b) for a, b in zip(trainer.seen[preheat_batches:], plain.seen, strict=True))
    assert probe.optimizer_state_empty and probe.global_step == 0
    assert probe.modes == plain_probe.modes and not any(probe.modes)
    assert not probe.loader_registered and not plain_probe.loader_registered
    assert probe.scheduler_state == plain_probe.scheduler_state
    assert trainer.state.global_step == plain.state.global_step == MAIN_STEPS
    learning_rates = [[e["learning_rate"] for e in t.state.log_history if "learning_rate" in e] for t in (trainer, plain)]
    assert learning_rates[0] == learning_rates[1] and len(learning_rates[0]) == MAIN_STEPS
    # The preheat is in the log history, at step 0.
    logged = [e for e in trainer.state.log_history if "hrp/preheat_loss" in e]
    assert [e["step"] for e in logged] == [0] * PREHEAT_STEPS
    assert any("hrp/energy_kept_mean" in e for e in trainer.state.log_history)


def test_a_callback_not_attached_is_refused_before_anything_changes(tmp_path):
    trainer = make_trainer(tmp_path)
    before = lora_weights(trainer.model)
    trainer.add_callback(HRPTrainerCallback(preheat_rank=16, preheat_steps=2))
    with pytest.raises(HRPConfigurationError, match="attach"):
        trainer.train()
    after = lora_weights(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [(dict(preheat_rank=1), "preheat_rank"), (dict(on_failure="ignore"), "on_failure"), (dict(log_layer_metrics=1), "log_layer_metrics")],
)
def test_bad_arguments_are_refused_at_construction(kwargs, argument):
    with pytest.raises(HRPConfigurationError, match=argument):
        HRPTrainerCallback(**(dict(preheat_rank=16, preheat_steps=2) | kwargs))


def test_a_resumed_run_does_not_preheat_again_and_a_checkpoint_without_hrp_is_refused(tmp_path):
    with_hrp = make_trainer(tmp_path / "hrp", save_strategy="steps", save_steps=2, max_steps=2)
    HRPTrainerCallback(preheat_rank=16, preheat_steps=2).attach(with_hrp)
    with_hrp.train()
    without_hrp = make_trainer(tmp_path / "plain", save_strategy="steps", save_steps=2, max_steps=2)
    without_hrp.train()

    resumed = make_trainer(tmp_path / "hrp", max_steps=3)
    hrp = HRPTrainerCallback(preheat_rank=16, preheat_steps=2).attach(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "hrp" / "checkpoint-2"))
    assert hrp.report is None and len(resumed.seen) == ACCUMULATE  # one main step, no preheat batch
    assert resumed.state.global_step == 3

    refused = make_trainer(tmp_path / "plain", max_steps=3)
    before = lora_weights(refused.model)
    HRPTrainerCallback(preheat_rank=16, preheat_steps=2).attach(refused)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(HRPConfigurationError, match="without HRP"):
            refused.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-2"))


def test_only_the_integration_imports_transformers():
    # peft imports transformers itself, so the check is on lightning_hrp's own import statements.
    package = Path(lightning_hrp.__file__).parent
    importers = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            if any(module.split(".")[0] in ("transformers", "accelerate") for module in modules):
                importers.add(path.relative_to(package).as_posix())
    assert importers == {"integrations/transformers.py"}
