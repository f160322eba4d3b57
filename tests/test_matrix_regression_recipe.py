"""The matrix regression recipe: a seeded low-rank task, LoRA on it, with and without HRP."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_hrp import FactoredRMS, HRPPreheatCallback
from lightning_hrp.recipes.matrix_regression import MatrixRegressionDataModule, MatrixRegressionModule
from modules import cpu_trainer

SMALL_TASK = dict(in_features=32, out_features=24, task_seed=3, train_size=128, val_size=64, test_size=256)


def make_trainer(callbacks: list[Callback], **overrides) -> pl.Trainer:
    return cpu_trainer(**{"max_epochs": 2, "num_sanity_val_steps": 0, **overrides}, callbacks=callbacks)


class RecordStartOfTraining(Callback):
    """Keeps a copy of the LoRA factors as the first main training step sees them."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0 and batch_idx == 0:
            layer = pl_module.lora_layer()
            self.lora_A = layer.lora_A["default"].weight.detach().clone()
            self.lora_B = layer.lora_B["default"].weight.detach().clone()


def top_right_subspace_overlap(A: torch.Tensor, M: torch.Tensor, rank: int) -> float:
    """``||V_r(M)^T Q_A||_F^2 / r``: 1 when A's rows span M's top-r right singular vectors."""
    top = torch.linalg.svd(M)[2][:rank].T
    rows = torch.linalg.qr(A.T)[0]
    return float(torch.linalg.matrix_norm(top.T @ rows) ** 2 / rank)


def test_task_is_seeded_and_has_the_requested_structure() -> None:
    data = MatrixRegressionDataModule(**SMALL_TASK, update_scale=2.0, spectrum_decay=1.0, input_condition=10.0)
    again = MatrixRegressionDataModule(**SMALL_TASK, update_scale=2.0, spectrum_decay=1.0, input_condition=10.0)
    other_seed = MatrixRegressionDataModule(**{**SMALL_TASK, "task_seed": 4})

    assert torch.equal(data.target_update(), again.target_update())
    assert torch.equal(data.train_set.tensors[0], again.train_set.tensors[0])
    assert torch.equal(data.test_set.tensors[1], again.test_set.tensors[1])
    assert not torch.equal(data.target_update(), other_seed.target_update())

    # M's singular values are update_scale / i.
    singular_values = torch.linalg.svdvals(data.target_update())
    expected = 2.0 / torch.arange(1, 25, dtype=torch.float32)
    torch.testing.assert_close(singular_values, expected, rtol=1e-4, atol=1e-5)

    # The input covariance is a rotation of variances log-spaced from 1 to 1/10: not diagonal.
    covariance = data.input_covariance()
    torch.testing.assert_close(covariance, covariance.T, rtol=1e-5, atol=1e-6)
    variances = torch.linalg.eigvalsh(covariance)
    torch.testing.assert_close(variances, 10.0 ** -torch.linspace(1.0, 0.0, 32), rtol=1e-4, atol=1e-6)
    off_diagonal = covariance - torch.diag(torch.diagonal(covariance))
    assert off_diagonal.abs().max() > 0.05

    # Train, validation and test are different draws.
    assert not torch.equal(data.train_set.tensors[0][:64], data.val_set.tensors[0])

    # The accessors hand out copies: an oracle init cannot corrupt the task.
    data.target_update().zero_()
    assert torch.equal(data.target_update(), again.target_update())


def test_labels_are_the_target_map_plus_noise_of_the_requested_size() -> None:
    data = MatrixRegressionDataModule(**{**SMALL_TASK, "test_size": 4096}, noise_std=0.3)
    inputs, targets = data.test_set.tensors
    target_weight = data.base_weight() + data.target_update()
    residual = targets - inputs @ target_weight.T
    assert residual.mean().abs() < 0.01
    assert residual.std().item() == pytest.approx(0.3, rel=0.02)
    # The inputs' empirical covariance is the task's.
    empirical = inputs.T @ inputs / len(inputs)
    assert torch.linalg.matrix_norm(empirical - data.input_covariance()) / torch.linalg.matrix_norm(
        data.input_covariance()
    ) < 0.1


def test_module_starts_at_the_base_model_and_only_lora_trains() -> None:
    data = MatrixRegressionDataModule(**SMALL_TASK)
    module = MatrixRegressionModule(in_features=32, out_features=24, task_seed=3, lora_rank=2)
    inputs, _ = data.test_set.tensors
    # B = 0 at peft's default init: the model is exactly W0.
    torch.testing.assert_close(module(inputs), inputs @ data.base_weight().T)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert module.learned_update().shape == (24, 32)


def test_plain_lora_fit_lowers_the_held_out_loss() -> None:
    pl.seed_everything(0)
    data = MatrixRegressionDataModule(**SMALL_TASK)
    module = MatrixRegressionModule(in_features=32, out_features=24, task_seed=3, lora_rank=4, learning_rate=0.02)
    trainer = make_trainer([], max_epochs=3)
    before = trainer.test(module, data, verbose=False)[0]["test/loss"]
    base_weight = module.lora_layer().base_layer.weight.detach().clone()
    trainer.fit(module, data)
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    assert math.isfinite(trainer.callback_metrics["val/loss"].item())
    after = trainer.test(module, data, verbose=False)[0]["test/loss"]

    assert after < before
    # The frozen base weight is untouched; what LoRA learned moves towards M.
    assert torch.equal(module.lora_layer().base_layer.weight, base_weight)
    M = data.target_update()
    assert torch.linalg.matrix_norm(module.learned_update() - M) < torch.linalg.matrix_norm(M)


@pytest.mark.parametrize("mode", ["classic", "asymmetric"])
def test_hrp_points_lora_at_the_target_update(mode: str) -> None:
    """Preheating on the data finds M's leading input directions that a random A misses."""
    rank = 4
    starts = {}
    for use_hrp in (False, True):
        pl.seed_everything(0)
        data = MatrixRegressionDataModule()
        module = MatrixRegressionModule(lora_rank=rank)
        record = RecordStartOfTraining()
        hrp = [HRPPreheatCallback(preheat_rank=32, preheat_steps=8, mode=mode)] if use_hrp else []
        trainer = make_trainer([*hrp, record], max_steps=1, limit_val_batches=0)
        trainer.fit(module, data)
        starts[use_hrp] = top_right_subspace_overlap(record.lora_A, data.target_update(), rank)
        if use_hrp:
            report = hrp[0].report
            assert len(report.preheat_losses) == 8
            assert [layer.rank for layer in report.layers] == [rank]
            # The paper's default: a new direction, and B = 0, so the model starts at W0.
            assert torch.count_nonzero(record.lora_B) == 0

    # A random start overlaps r/n = 4/64 in expectation.
    assert starts[False] < 2 * rank / 64
    assert starts[True] > 2 * rank / 64
    assert starts[True] > starts[False]


def test_the_lean_preheat_optimizer_points_lora_at_the_target_update_at_least_as_well_as_adamw() -> None:
    """FactoredRMS keeps no per-entry state (BENCHMARKS.md, memory at scale); the directions it finds must not suffer."""
    rank = 4
    overlaps = {}
    for name in ("adamw", "factored"):
        pl.seed_everything(0)
        data = MatrixRegressionDataModule()
        module = MatrixRegressionModule(lora_rank=rank)
        lean = {"preheat_optimizer": functools.partial(FactoredRMS, lr=module.hparams.learning_rate)}
        record = RecordStartOfTraining()
        hrp = HRPPreheatCallback(preheat_rank=32, preheat_steps=8, **(lean if name == "factored" else {}))
        make_trainer([hrp, record], max_steps=1, limit_val_batches=0).fit(module, data)
        overlaps[name] = top_right_subspace_overlap(record.lora_A, data.target_update(), rank)
    # Measured (seeds 0, 1, 2): AdamW 0.41, 0.36, 0.36; FactoredRMS 0.49, 0.46, 0.47; a random A 4/64.
    assert overlaps["factored"] >= overlaps["adamw"] > 2 * rank / 64


def test_hrp_fit_runs_to_the_end_and_tests() -> None:
    pl.seed_everything(1)
    data = MatrixRegressionDataModule(**SMALL_TASK)
    module = MatrixRegressionModule(in_features=32, out_features=24, task_seed=3, lora_rank=2)
    hrp = HRPPreheatCallback(preheat_rank=8, preheat_steps=3)
    trainer = make_trainer([hrp], max_epochs=2)
    trainer.fit(module, data)
    result = trainer.test(module, data, verbose=False)[0]
    assert hrp.report is not None and len(hrp.report.preheat_losses) == 3
    assert math.isfinite(result["test/loss"])
    assert trainer.global_step == 2 * math.ceil(128 / 32)


def test_mismatched_module_and_data_are_refused() -> None:
    data = MatrixRegressionDataModule(**SMALL_TASK)
    module = MatrixRegressionModule(in_features=32, out_features=24, task_seed=4)
    with pytest.raises(ValueError, match=r"task_seed=4 vs 3"):
        make_trainer([], max_steps=1).fit(module, data)


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [("train_size", 0, "train_size must be a positive integer"), ("input_condition", 0.5, "input_condition"),
     ("noise_std", -1.0, "noise_std")],
)
def test_bad_data_arguments_are_named(argument: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MatrixRegressionDataModule(**{argument: value})


DISTRIBUTED_FIT = """
import sys
import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning_hrp import HRPPreheatCallback
from lightning_hrp.recipes.matrix_regression import MatrixRegressionDataModule, MatrixRegressionModule

pl.seed_everything(0)
strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if sys.argv[1] == "model_parallel" else DDPStrategy()
hrp = HRPPreheatCallback(preheat_rank=16, preheat_steps=4)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=2, callbacks=[hrp], logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
module = MatrixRegressionModule(in_features=32, out_features=24, task_seed=3)
data = MatrixRegressionDataModule(in_features=32, out_features=24, task_seed=3, train_size=128, val_size=64, test_size=256)
trainer.fit(module, data)
result = trainer.test(module, data, verbose=False)[0]
if trainer.is_global_zero:
    print("RESULT", len(hrp.report.preheat_losses), result["test/loss"])
"""


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "model_parallel"])
def test_recipe_fits_and_tests_with_hrp_on_two_cpu_processes(strategy: str, tmp_path) -> None:
    """DDP wraps the module; ModelParallelStrategy has configure_model shard it (FSDP2), once for
    fit and test together."""
    script = tmp_path / "fit.py"
    script.write_text(DISTRIBUTED_FIT)
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(script), strategy], cwd=repo, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    preheat_steps, test_loss = line.split()[1:]
    assert int(preheat_steps) == 4 and math.isfinite(float(test_loss))
