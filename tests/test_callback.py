"""HRPPreheatCallback through a real Trainer on real peft models."""

import csv
import math
import os
import random
import signal
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.exceptions import SIGTERMException
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch.utils.data import DataLoader, TensorDataset

from lightning_hrp import HRPConfigurationError, HRPPreheatCallback, PreheatFailedError
from lightning_hrp.demos import FactorisationToy
from lightning_hrp.engine import distributed
from modules import TinyCausalLM, tiny_llama, all_weights, assert_bitwise_equal, cpu_trainer, lora_weights, token_dataset, with_injected_failure


def make_trainer(**overrides) -> pl.Trainer:
    return cpu_trainer(**{"max_steps": 3, "num_sanity_val_steps": 0, "limit_val_batches": 0, **overrides})


class WeightsAtTrainStart(Callback):
    """Records the LoRA weights and outputs right after the callbacks before it ran on_train_start."""

    def on_train_start(self, trainer, pl_module):
        self.lora = lora_weights(pl_module)
        pl_module.eval()
        with torch.no_grad():
            self.logits = pl_module(PROBE_INPUT)
        pl_module.train()


PROBE_INPUT = torch.arange(24).reshape(2, 12) % 64


def _lora_layers(module):
    return [m for m in module.modules() if isinstance(m, LoraLayer)]


# --- the initialisation itself ------------------------------------------------------------------


def test_default_init_keeps_model_output_and_sets_orthogonal_directions():
    pl.seed_everything(0)
    module = TinyCausalLM()
    module.eval()
    with torch.no_grad():
        logits_before = module(PROBE_INPUT)
    module.train()
    before = lora_weights(module)
    hrp = HRPPreheatCallback(preheat_rank=16, preheat_steps=4)
    probe = WeightsAtTrainStart()
    make_trainer(callbacks=[hrp, probe], max_steps=1).fit(module)

    assert torch.equal(probe.logits, logits_before)
    changed_A = [n for n in before if "lora_A" in n and not torch.equal(before[n], probe.lora[n])]
    assert len(changed_A) == len(hrp.report.layers) == 14
    for name, A in probe.lora.items():
        if "lora_B" in name:
            assert torch.count_nonzero(A) == 0
        else:
            gram = A @ A.T
            # Rows are orthogonal with equal norms, and the norm is the default init's.
            torch.testing.assert_close(gram, torch.eye(4) * gram[0, 0], atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.linalg.matrix_norm(A), torch.linalg.matrix_norm(before[name]), rtol=1e-5, atol=0)
    assert all(not layer._forward_hooks for layer in _lora_layers(module))


def test_preheating_trains_through_the_users_training_step_and_reports():
    pl.seed_everything(0)
    module = TinyCausalLM()
    hrp = HRPPreheatCallback(preheat_rank=8, preheat_steps=6, preheat_lr=3e-2)
    make_trainer(callbacks=[hrp], max_steps=2).fit(module)
    losses = hrp.report.preheat_losses
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert len(module.seen_batches) == 6 + 2
    for layer in hrp.report.layers:
        assert layer.preheat_rank == 8 and len(layer.singular_values) == 8
        assert 0 < layer.energy_kept <= 1
        assert layer.singular_values == sorted(layer.singular_values, reverse=True)


def test_keep_progress_starts_main_training_from_the_truncated_preheated_update():
    pl.seed_everything(0)
    toy = FactorisationToy(rank=4)
    initial_loss = float((toy.target**2).sum())
    hrp = HRPPreheatCallback(preheat_rank=32, preheat_steps=30, mode="classic", init_rule="keep_progress", preheat_lr=2e-2)
    probe = ToyLossAtTrainStart()
    make_trainer(callbacks=[hrp, probe], max_steps=1).fit(toy)
    # The best rank-4 approximation of M leaves sum_{i>4} 1/i^2; the kept progress lies between.
    optimum = sum(1 / i**2 for i in range(5, 65))
    assert optimum < probe.loss < 0.9 * initial_loss
    # ||M - T_r(W)|| <= ||M - W|| + ||W - T_r(W)|| <= 2 ||M - W|| + ||M - M_r|| for the preheated W.
    bound = 2 * math.sqrt(hrp.report.preheat_losses[-1]) + math.sqrt(optimum)
    assert math.sqrt(probe.loss) <= bound


class ToyLossAtTrainStart(Callback):
    def on_train_start(self, trainer, toy):
        with torch.no_grad():
            eye = torch.eye(toy.hparams.n)
            self.loss = float(((toy(eye) - eye @ toy.target.T) ** 2).sum())


def test_same_seed_same_init_and_seed_everything_governs_the_default():
    def init(seed_everything, seed=None):
        pl.seed_everything(seed_everything)
        module = TinyCausalLM()
        probe = WeightsAtTrainStart()
        make_trainer(callbacks=[HRPPreheatCallback(8, 2, seed=seed), probe], max_steps=1).fit(module)
        return probe.lora

    assert_bitwise_equal(init(3), init(3))
    first, second = init(3), init(4)
    assert any(not torch.equal(first[n], second[n]) for n in first)


# --- the spec's section 3 toy through the real callback -----------------------------------------

N, RANK = 64, 4
NORM_M = sum(1 / i**2 for i in range(1, N + 1))
RANDOM_EXPECTATION = (1 - RANK / N) * NORM_M  # E over random A of the converged asymmetric loss
OPTIMUM = sum(1 / i**2 for i in range(RANK + 1, N + 1))


def _toy_converged_loss(seed: int, preheat_rank: int | None) -> float:
    pl.seed_everything(seed)
    toy = FactorisationToy(n=N, rank=RANK)
    callbacks = [HRPPreheatCallback(preheat_rank, 20, mode="asymmetric")] if preheat_rank else []
    make_trainer(callbacks=callbacks, max_steps=1).fit(toy)
    return toy.converged_asymmetric_loss()


def test_toy_hrp_beats_random_init_and_improves_with_preheat_rank():
    seeds = range(5)
    by_rank = {R: [_toy_converged_loss(s, R) for s in seeds] for R in (4 * RANK, 16 * RANK)}
    means = {R: sum(v) / len(v) for R, v in by_rank.items()}
    assert all(loss >= OPTIMUM - 1e-6 for losses in by_rank.values() for loss in losses)
    assert means[4 * RANK] < RANDOM_EXPECTATION
    assert means[16 * RANK] < means[4 * RANK]


def test_toy_main_training_reaches_the_projection_the_theory_predicts():
    pl.seed_everything(0)
    toy = FactorisationToy(n=N, rank=RANK, lr=2e-2)
    hrp = HRPPreheatCallback(16 * RANK, 20, mode="asymmetric")
    trainer = make_trainer(callbacks=[hrp], max_steps=400)
    trainer.fit(toy)
    eye = torch.eye(N)
    with torch.no_grad():
        final = float(((toy(eye) - eye @ toy.target.T) ** 2).sum())
    assert final == pytest.approx(toy.converged_asymmetric_loss(), rel=0.02)
    assert final < RANDOM_EXPECTATION


# --- the main run is the run it would have been -------------------------------------------------


def test_main_run_sees_the_same_data_order_steps_and_schedule():
    def run(with_hrp: bool):
        pl.seed_everything(0)
        module = TinyCausalLM(shuffle=True)
        callbacks = [HRPPreheatCallback(8, 3)] if with_hrp else []
        trainer = make_trainer(callbacks=callbacks, max_steps=5, accumulate_grad_batches=2)
        trainer.fit(module)
        return module, trainer

    plain, plain_trainer = run(False)
    hrp, hrp_trainer = run(True)
    preheat_batches = 3 * 2
    assert len(hrp.seen_batches) == preheat_batches + len(plain.seen_batches)
    for a, b in zip(plain.seen_batches, hrp.seen_batches[preheat_batches:]):
        assert torch.equal(a, b)
    assert hrp_trainer.global_step == plain_trainer.global_step == 5
    assert hrp_trainer.lr_scheduler_configs[0].scheduler.last_epoch == 5
    assert not hrp_trainer.optimizers[0].state.keys() - {p for p in hrp.parameters() if p.requires_grad}


def test_logging_goes_to_hrp_metrics_without_polluting_the_main_run(tmp_path):
    pl.seed_everything(0)
    module = TinyCausalLM()
    logger = CSVLogger(tmp_path, name="run")
    make_trainer(callbacks=[HRPPreheatCallback(8, 5)], max_steps=3, logger=logger, log_every_n_steps=1).fit(module)
    import csv

    with open(f"{logger.log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    preheat = [r for r in rows if r.get("hrp/preheat_loss")]
    main = [r for r in rows if r.get("train_loss")]
    assert len(preheat) == 5
    assert len(main) == 3  # the preheat steps' self.log calls left no rows
    assert any(r.get("hrp/energy_kept_mean") for r in rows)
    assert any(key.startswith("hrp/energy_kept/") for key in rows[0])


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_epochs_validation_and_precision(precision):
    pl.seed_everything(0)
    module = TinyCausalLM(dataset_size=16)
    hrp = HRPPreheatCallback(8, 3)
    trainer = make_trainer(
        callbacks=[hrp], max_steps=-1, max_epochs=2, precision=precision, limit_val_batches=1.0, num_sanity_val_steps=1
    )
    trainer.fit(module)
    assert trainer.current_epoch == 2 and trainer.global_step == 4
    assert "val_loss" in trainer.callback_metrics
    assert all(math.isfinite(x) for x in hrp.report.preheat_losses)


class DictOrSkip(TinyCausalLM):
    def training_step(self, batch, batch_idx):
        if batch_idx % 2 == 1:
            return None
        return {"loss": super().training_step(batch, batch_idx)}


def test_training_step_returning_a_dict_or_none():
    pl.seed_everything(0)
    module = DictOrSkip()
    hrp = HRPPreheatCallback(8, 4)
    make_trainer(callbacks=[hrp], max_steps=2).fit(module)
    assert len(hrp.report.preheat_losses) == 4


# --- resume --------------------------------------------------------------------------------------


def test_resume_after_preheating_does_not_preheat_again_and_continues_identically(tmp_path):
    def fit(max_steps, ckpt_path=None, checkpoint=None):
        pl.seed_everything(0)
        module = TinyCausalLM(dataset_size=24)  # 3 batches: the checkpoint at step 3 ends an epoch
        hrp = HRPPreheatCallback(8, 4)
        callbacks = [hrp] + ([checkpoint] if checkpoint else [])
        trainer = make_trainer(callbacks=callbacks, max_steps=max_steps, enable_checkpointing=checkpoint is not None)
        trainer.fit(module, ckpt_path=ckpt_path)
        return module, hrp

    straight, _ = fit(6)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    fit(3, checkpoint=checkpoint)
    resumed, hrp = fit(6, ckpt_path=tmp_path / "epoch=0-step=3.ckpt")
    assert hrp.report is None  # not preheated again
    assert len(resumed.seen_batches) == 3
    assert_bitwise_equal(lora_weights(straight), lora_weights(resumed))


def test_state_dict_round_trip():
    hrp = HRPPreheatCallback(8, 2)
    restored = HRPPreheatCallback(8, 2)
    restored.load_state_dict({"preheat_finished": True})
    assert hrp.state_dict() == {"preheat_finished": False}
    assert restored.state_dict() == {"preheat_finished": True}


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(preheat_rank=1, preheat_steps=5), "preheat_rank"),
        (dict(preheat_rank=8.0, preheat_steps=5), "preheat_rank"),
        (dict(preheat_rank=8, preheat_steps=0), "preheat_steps"),
        (dict(preheat_rank=8, preheat_steps=True), "preheat_steps"),
        (dict(preheat_rank=8, preheat_steps=5, mode="symmetric"), "mode"),
        (dict(preheat_rank=8, preheat_steps=5, init_rule="pissa"), "init_rule"),
        (dict(preheat_rank=8, preheat_steps=5, direction_scale="big"), "direction_scale"),
        (dict(preheat_rank=8, preheat_steps=5, on_failure="ignore"), "on_failure"),
        (dict(preheat_rank=8, preheat_steps=5, svd_dtype="float16"), "svd_dtype"),
        (dict(preheat_rank=8, preheat_steps=5, preheat_lr=-1.0), "preheat_lr"),
        (dict(preheat_rank=8, preheat_steps=5, preheat_lr=1e-3, preheat_optimizer=torch.optim.SGD), "preheat_optimizer"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, argument):
    with pytest.raises(HRPConfigurationError, match=argument):
        HRPPreheatCallback(**kwargs)


class PlainModule(TinyCausalLM):
    def __init__(self):
        super().__init__()
        self.model = tiny_llama()


class FrozenAdapter(TinyCausalLM):
    def __init__(self):
        super().__init__()
        for name, p in self.named_parameters():
            if "lora_" in name:
                p.requires_grad_(False)
        self.extra = torch.nn.Parameter(torch.zeros(1))  # so the optimizer has something to hold


class TwoAdapters(TinyCausalLM):
    def __init__(self):
        super().__init__()
        self.model.add_adapter("second", LoraConfig(r=4, target_modules=["q_proj"]))


class ManualOptimization(TinyCausalLM):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


class DataloaderIterStep(TinyCausalLM):
    def training_step(self, dataloader_iter):
        batch, batch_idx, _ = next(dataloader_iter)
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(
    ("module_class", "callback_kwargs", "argument"),
    [
        (TinyCausalLM, dict(preheat_rank=4), "preheat_rank"),
        (PlainModule, {}, "LoraLayer"),
        (TwoAdapters, {}, "adapter_name"),
        (TwoAdapters, dict(adapter_name="third"), "adapter_name"),
        (FrozenAdapter, {}, "trainable"),
        (ManualOptimization, {}, "automatic"),
        (DataloaderIterStep, {}, "dataloader_iter"),
    ],
)
def test_bad_setups_are_refused_before_anything_changes(module_class, callback_kwargs, argument):
    pl.seed_everything(0)
    module = module_class()
    before = all_weights(module)
    kwargs = dict(preheat_rank=8, preheat_steps=2) | callback_kwargs
    with pytest.raises(HRPConfigurationError, match=argument):
        make_trainer(callbacks=[HRPPreheatCallback(**kwargs)]).fit(module)
    assert_bitwise_equal(before, all_weights(module))


def test_two_adapters_work_with_adapter_name():
    pl.seed_everything(0)
    module = TwoAdapters()
    hrp = HRPPreheatCallback(8, 2, adapter_name="default")
    make_trainer(callbacks=[hrp], max_steps=1).fit(module)
    assert len(hrp.report.layers) == 14


def test_a_main_run_shorter_than_the_preheat_warns():
    """pyproject.toml hides this warning in the tests' tiny runs; here it must still be raised."""
    pl.seed_everything(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(callbacks=[HRPPreheatCallback(8, 2)], max_steps=1).fit(TinyCausalLM(dataset_size=16))
    assert len([w for w in caught if "max_steps=1 is smaller than preheat_steps=2" in str(w.message)]) == 1


def test_short_dataloader_is_cycled_with_one_warning():
    pl.seed_everything(0)
    module = TinyCausalLM(dataset_size=16)  # 2 batches
    hrp = HRPPreheatCallback(8, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(callbacks=[hrp], max_steps=1).fit(module)
    cycled = [w for w in caught if "cycled" in str(w.message)]
    assert len(cycled) == 1
    assert len(hrp.report.preheat_losses) == 5


def test_preheat_rank_above_layer_size_is_clamped_with_one_warning():
    pl.seed_everything(0)
    toy = FactorisationToy(n=16, rank=2)
    hrp = HRPPreheatCallback(preheat_rank=40, preheat_steps=3)
    with pytest.warns(UserWarning, match="preheat_rank=40") as caught:
        make_trainer(callbacks=[hrp], max_steps=1).fit(toy)
    assert len([w for w in caught if "preheat_rank=40" in str(w.message)]) == 1
    assert hrp.report.layers[0].preheat_rank == 16


# --- failures leave the model as it was ---------------------------------------------------------


class FailsDuringPreheat(TinyCausalLM):
    def __init__(self, failure: str, on_call: int = 2):
        super().__init__()
        self.failure, self.on_call, self.calls = failure, on_call, 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        loss = super().training_step(batch, batch_idx)
        return with_injected_failure(loss, self.failure) if self.calls == self.on_call else loss


@pytest.mark.parametrize(("failure", "error"), [("nan", PreheatFailedError), ("error", RuntimeError)])
def test_failed_preheat_raises_and_leaves_the_model_bit_identical(failure, error):
    pl.seed_everything(0)
    module = FailsDuringPreheat(failure)
    before = all_weights(module)
    with pytest.raises(error):
        make_trainer(callbacks=[HRPPreheatCallback(8, 4)]).fit(module)
    assert_bitwise_equal(before, all_weights(module))
    assert all(not layer._forward_hooks for layer in _lora_layers(module))
    assert all(p.grad is None for p in module.parameters())


def test_interrupted_preheat_leaves_the_model_bit_identical():
    pl.seed_everything(0)
    module = FailsDuringPreheat("interrupt")
    before = all_weights(module)
    trainer = make_trainer(callbacks=[HRPPreheatCallback(8, 4)])
    with pytest.raises(SystemExit):  # Lightning turns the KeyboardInterrupt into a graceful exit
        trainer.fit(module)
    assert trainer.interrupted
    assert_bitwise_equal(before, all_weights(module))
    assert all(not layer._forward_hooks for layer in _lora_layers(module))


def test_on_failure_continue_warns_and_trains_from_the_untouched_default_init():
    pl.seed_everything(0)
    module = FailsDuringPreheat("nan")
    before = lora_weights(module)
    probe = WeightsAtTrainStart()
    hrp = HRPPreheatCallback(8, 4, on_failure="continue")
    with pytest.warns(UserWarning, match="on_failure='continue'"):
        trainer = make_trainer(callbacks=[hrp, probe], max_steps=2)
        trainer.fit(module)
    assert_bitwise_equal(before, probe.lora)
    assert trainer.global_step == 2 and hrp.report is None


def test_engine_does_not_import_lightning():
    code = "import sys, lightning_hrp.engine; assert not any(m.startswith('lightning.') or m == 'lightning' for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_subspace_drift_is_tracked_and_can_stop_preheating_early():
    pl.seed_everything(0)
    toy = FactorisationToy(n=N, rank=RANK)
    tracked = HRPPreheatCallback(32, 30, track_subspace_drift=True)
    make_trainer(callbacks=[tracked], max_steps=1).fit(toy)
    drift = tracked.report.subspace_drift
    assert len(drift) == 29 and all(0 <= d <= 1 for d in drift)
    assert drift[-1] < drift[0]  # the subspace settles as preheating converges

    pl.seed_everything(0)
    toy = FactorisationToy(n=N, rank=RANK)
    tolerance = sorted(drift)[len(drift) // 2]  # reached somewhere within the 30 steps
    stopping = HRPPreheatCallback(32, 30, drift_tolerance=tolerance)
    make_trainer(callbacks=[stopping], max_steps=1).fit(toy)
    first_below = next(i for i, d in enumerate(drift) if d < tolerance)
    assert len(stopping.report.preheat_losses) == first_below + 2
    assert stopping.report.subspace_drift == drift[: first_below + 1]


# --- the edges of real runs (issue 9) ---------------------------------------------------------------


class RecordsMainBatches(TinyCausalLM):
    """Records, apart from every batch ``training_step`` sees, the batches the main run's loop starts."""

    def __init__(self, loader_kwargs: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.loader_kwargs = loader_kwargs or {}
        self.main_batches: list[torch.Tensor] = []

    def on_train_batch_start(self, batch, batch_idx):
        self.main_batches.append(batch[0].clone())

    def train_dataloader(self) -> DataLoader:
        data = token_dataset(self.hparams.dataset_size)
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=self.hparams.shuffle, **self.loader_kwargs)


@pytest.mark.parametrize(
    "loader_kwargs",
    [
        pytest.param(lambda: dict(num_workers=1, persistent_workers=True), id="persistent_workers"),
        pytest.param(lambda: dict(generator=torch.Generator().manual_seed(3)), id="loader_generator"),
    ],
)
def test_the_main_run_sees_the_batches_it_sees_without_hrp(loader_kwargs):
    def main_batches(with_hrp: bool) -> list[torch.Tensor]:
        pl.seed_everything(0)
        module = RecordsMainBatches(loader_kwargs(), shuffle=True)
        callbacks = [HRPPreheatCallback(8, 5)] if with_hrp else []
        make_trainer(callbacks=callbacks, max_steps=-1, max_epochs=2).fit(module)
        return module.main_batches

    plain, with_hrp = main_batches(False), main_batches(True)
    assert len(plain) == len(with_hrp) == 2 * 8
    assert all(torch.equal(a, b) for a, b in zip(plain, with_hrp))


class DrawsRandomNumbers(TinyCausalLM):
    """Draws from every RNG in training_step (augmentation-style) and records draws at each main batch."""

    def __init__(self):
        super().__init__()
        self.main_draws: list[tuple[float, float, float]] = []

    def training_step(self, batch, batch_idx):
        np.random.rand(), random.random(), torch.rand(1)
        return super().training_step(batch, batch_idx)

    def on_train_batch_start(self, batch, batch_idx):
        self.main_draws.append((float(np.random.rand()), random.random(), float(torch.rand(1))))


def test_preheating_leaves_every_rng_of_the_main_run_alone():
    def main_draws(with_hrp: bool) -> list[tuple[float, float, float]]:
        pl.seed_everything(0)
        module = DrawsRandomNumbers()
        make_trainer(callbacks=[HRPPreheatCallback(8, 3)] if with_hrp else [], max_steps=3).fit(module)
        return module.main_draws

    assert main_draws(True) == main_draws(False)


class CombinedMinSize(TinyCausalLM):
    """Two loaders in a min_size CombinedLoader: the main run sees 3 batches of the long one per epoch."""

    def train_dataloader(self):
        long, short = token_dataset(64), token_dataset(24, seed=2)
        return CombinedLoader({"long": DataLoader(long, batch_size=8), "short": DataLoader(short, batch_size=8)}, "min_size")

    def training_step(self, batch, batch_idx):
        return super().training_step(batch["long"], batch_idx)


class CombinedSequential(CombinedMinSize):
    def train_dataloader(self):
        loader = super().train_dataloader()
        return CombinedLoader(loader.iterables, "sequential")


PREHEAT_BATCHES = 5


@pytest.mark.parametrize(
    ("trainer_kwargs", "module", "per_epoch"),
    [
        (dict(limit_train_batches=3), lambda: TinyCausalLM(), 3),
        (dict(limit_train_batches=0.25), lambda: TinyCausalLM(), 2),
        (dict(overfit_batches=2), lambda: TinyCausalLM(shuffle=True), 2),
        (dict(fast_dev_run=2), lambda: TinyCausalLM(), 2),
        (dict(), lambda: CombinedMinSize(), 3),
    ],
    ids=["limit_int", "limit_fraction", "overfit_batches", "fast_dev_run", "combined_min_size"],
)
def test_preheating_reads_exactly_the_batches_the_main_run_sees_cycled(trainer_kwargs, module, per_epoch):
    pl.seed_everything(0)
    module = module()
    make_trainer(callbacks=[HRPPreheatCallback(8, PREHEAT_BATCHES)], max_steps=per_epoch, **trainer_kwargs).fit(module)
    preheat, main = module.seen_batches[:PREHEAT_BATCHES], module.seen_batches[PREHEAT_BATCHES:]
    assert len(main) == per_epoch
    assert all(torch.equal(batch, main[i % per_epoch]) for i, batch in enumerate(preheat))


def test_a_sequential_combined_loader_is_refused_before_anything_changes():
    pl.seed_everything(0)
    module = CombinedSequential()
    before = all_weights(module)
    with pytest.raises(HRPConfigurationError, match="sequential"):
        make_trainer(callbacks=[HRPPreheatCallback(8, 2)]).fit(module)
    assert_bitwise_equal(before, all_weights(module))



class OneShotTrainData(TinyCausalLM):
    def train_dataloader(self):
        return iter(list(super().train_dataloader()))


def test_a_one_shot_iterator_as_train_data_is_refused_before_anything_changes():
    # Preheating would consume batches the main run's first epoch then never sees.
    pl.seed_everything(0)
    module = OneShotTrainData()
    before = all_weights(module)
    with pytest.raises(HRPConfigurationError, match="one-shot"):
        make_trainer(callbacks=[HRPPreheatCallback(8, 2)], max_steps=2).fit(module)
    assert_bitwise_equal(before, all_weights(module))

def test_a_reused_callback_preheats_again_in_a_new_fit():
    hrp = HRPPreheatCallback(8, 2)
    pl.seed_everything(0)
    make_trainer(callbacks=[hrp], max_steps=1).fit(TinyCausalLM())
    first_report = hrp.report

    pl.seed_everything(1)
    module = TinyCausalLM()
    before = lora_weights(module)
    probe = WeightsAtTrainStart()
    make_trainer(callbacks=[hrp, probe], max_steps=1).fit(module)
    assert hrp.report is not None and hrp.report is not first_report
    assert any(not torch.equal(before[n], probe.lora[n]) for n in before if "lora_A" in n)


def test_resuming_a_checkpoint_saved_without_hrp_is_refused_and_keeps_its_adapters(tmp_path):
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    make_trainer(callbacks=[checkpoint], max_steps=2, enable_checkpointing=True).fit(TinyCausalLM())
    ckpt_path = tmp_path / "epoch=0-step=2.ckpt"
    trained = {k: v for k, v in torch.load(ckpt_path, weights_only=False)["state_dict"].items() if "lora_" in k}

    module = TinyCausalLM()
    with pytest.raises(HRPConfigurationError, match="global_step=2"):
        make_trainer(callbacks=[HRPPreheatCallback(8, 2)], max_steps=4).fit(module, ckpt_path=ckpt_path)
    assert_bitwise_equal(trained, {k: v for k, v in all_weights(module).items() if "lora_" in k})


class QueryAdaptersFrozen(TinyCausalLM):
    def __init__(self):
        super().__init__()
        for name, p in self.named_parameters():
            if "q_proj.lora_" in name:
                p.requires_grad_(False)


def test_only_trainable_adapters_are_initialised_and_the_frozen_ones_are_counted():
    pl.seed_everything(0)
    module = QueryAdaptersFrozen()
    before = lora_weights(module)
    probe = WeightsAtTrainStart()
    hrp = HRPPreheatCallback(8, 2)
    make_trainer(callbacks=[hrp, probe], max_steps=1).fit(module)
    frozen = {n for n in before if "q_proj.lora_" in n}
    assert len(frozen) == 4  # A and B of q_proj in both decoder layers
    assert_bitwise_equal({n: before[n] for n in frozen}, {n: probe.lora[n] for n in frozen})
    assert all(not torch.equal(before[n], probe.lora[n]) for n in before if "lora_A" in n and n not in frozen)
    assert len(hrp.report.frozen_layers) == 2 and all("q_proj" in name for name in hrp.report.frozen_layers)
    assert len(hrp.report.layers) == 12


class GradientHooks(Callback):
    """Counts the gradients computed for the main run's trainable parameters, during preheating and after."""

    def __init__(self):
        self.computed: list[str] = []
        self.during_preheating: list[str] | None = None

    def on_fit_start(self, trainer, pl_module):
        self.flags = {n: p.requires_grad for n, p in pl_module.named_parameters()}
        for name, p in pl_module.named_parameters():
            if p.requires_grad:
                p.register_hook(lambda grad, name=name: self.computed.append(name))


class PreheatingEnded(Callback):
    def __init__(self, hooks: GradientHooks):
        self.hooks = hooks

    def on_train_start(self, trainer, pl_module):
        self.hooks.during_preheating = list(self.hooks.computed)
        self.flags = {n: p.requires_grad for n, p in pl_module.named_parameters()}


def test_preheating_computes_no_gradient_for_the_main_runs_parameters():
    pl.seed_everything(0)
    module = QueryAdaptersFrozen()
    hooks = GradientHooks()
    ended = PreheatingEnded(hooks)
    make_trainer(callbacks=[hooks, HRPPreheatCallback(8, 3), ended], max_steps=1).fit(module)
    assert hooks.during_preheating == []
    assert len(hooks.computed) == 24  # the main step's backward reached every trainable LoRA weight
    assert ended.flags == hooks.flags  # requires_grad restored exactly, frozen adapters included


def test_a_failed_preheat_restores_requires_grad_exactly():
    pl.seed_everything(0)
    module = FailsDuringPreheat("error")
    module.model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(callbacks=[HRPPreheatCallback(8, 4)]).fit(module)
    assert flags == {n: p.requires_grad for n, p in module.named_parameters()}


class ZeroGradient(TinyCausalLM):
    """The loss depends on the adapters with an exactly zero gradient: preheating learns nothing."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * 0.0


class LossWithoutAdapters(TinyCausalLM):
    """The loss depends on a parameter of the main run only, not on any LoRA layer."""

    def __init__(self):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx).detach() + self.offset


@pytest.mark.parametrize(("module_class", "message"), [(ZeroGradient, "learned nothing"), (LossWithoutAdapters, "does not depend")])
@pytest.mark.parametrize("init_rule", ["keep_progress", "direction"])
def test_a_preheat_that_learns_nothing_has_failed(module_class, message, init_rule):
    pl.seed_everything(0)
    module = module_class()
    before = lora_weights(module)
    with pytest.raises(PreheatFailedError, match=message):
        make_trainer(callbacks=[HRPPreheatCallback(8, 2, init_rule=init_rule)], max_steps=1).fit(module)
    assert_bitwise_equal(before, lora_weights(module))

    pl.seed_everything(0)
    module = module_class()
    probe = WeightsAtTrainStart()
    with pytest.warns(UserWarning, match="on_failure='continue'"):
        make_trainer(callbacks=[HRPPreheatCallback(8, 2, init_rule=init_rule, on_failure="continue"), probe], max_steps=1).fit(module)
    assert_bitwise_equal(before, probe.lora)  # the default init, not a dead A = 0, B = 0


class _HalfUsed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.used(x) + 0.0 * self.unused(x)


class OneLayerUnused(pl.LightningModule):
    """LoRA on two layers, one of which the loss has no gradient through."""

    def __init__(self):
        super().__init__()
        self.model = get_peft_model(_HalfUsed(), LoraConfig(r=2, lora_alpha=4, target_modules=["used", "unused"]))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x), y)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(32, 8, generator=generator), torch.randn(32, 8, generator=generator)), batch_size=8)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


class LoraAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.lora = lora_weights(pl_module)


def test_a_layer_that_learned_nothing_keeps_its_init_and_is_named():
    pl.seed_everything(0)
    module = OneLayerUnused()
    before = lora_weights(module)
    probe = LoraAtTrainStart()
    hrp = HRPPreheatCallback(8, 3, init_rule="keep_progress")
    with pytest.warns(UserWarning, match="exactly zero"):
        make_trainer(callbacks=[hrp, probe], max_steps=1).fit(module)
    unused = {n for n in before if ".unused." in n}
    assert len(unused) == 2
    assert_bitwise_equal({n: before[n] for n in unused}, {n: probe.lora[n] for n in unused})
    assert all(not torch.equal(before[n], probe.lora[n]) for n in before if n not in unused)
    assert [name.rsplit(".", 1)[-1] for name in hrp.report.learned_nothing] == ["unused"]


class WithBatchNorm(OneLayerUnused):
    def __init__(self):
        pl.LightningModule.__init__(self)
        network = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
        self.model = get_peft_model(network, LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))


class BuffersAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.buffers = {name: b.clone() for name, b in pl_module.named_buffers()}


def test_preheat_forwards_leave_the_main_runs_buffers_alone():
    pl.seed_everything(0)
    module = WithBatchNorm()
    before = {name: b.clone() for name, b in module.named_buffers()}
    probe = BuffersAtTrainStart()
    make_trainer(callbacks=[HRPPreheatCallback(4, 3), probe], max_steps=1).fit(module)
    assert_bitwise_equal(before, probe.buffers)  # BatchNorm's running statistics included


class SkipsEveryBatch(TinyCausalLM):
    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        return None


def test_skipped_batches_are_not_zero_losses_and_a_preheat_without_any_loss_fails(tmp_path):
    pl.seed_everything(0)
    logger = CSVLogger(tmp_path, name="run")
    hrp = HRPPreheatCallback(8, 4)
    make_trainer(callbacks=[hrp], max_steps=2, logger=logger, log_every_n_steps=1).fit(DictOrSkip())
    losses = hrp.report.preheat_losses
    assert [math.isnan(x) for x in losses] == [False, True, False, True]  # odd batches are skipped
    assert hrp.report.skipped_batches == 2
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        logged = [float(r["hrp/preheat_loss"]) for r in csv.DictReader(handle) if r.get("hrp/preheat_loss")]
    assert logged == [losses[0], losses[2]]

    pl.seed_everything(0)
    module = SkipsEveryBatch()
    before = lora_weights(module)
    with pytest.raises(PreheatFailedError, match="no loss"):
        make_trainer(callbacks=[HRPPreheatCallback(8, 3)], max_steps=1).fit(module)
    assert_bitwise_equal(before, lora_weights(module))


@pytest.fixture
def default_sigint_handler():
    # Lightning ignores SIGINT after it handled a KeyboardInterrupt; give the test Python's default back.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_second_ctrl_c_cannot_cut_the_restore_short(monkeypatch, default_sigint_handler):
    real_write = distributed.write_full_
    writes = []

    def write_and_press_ctrl_c(param, value):
        real_write(param, value)
        writes.append(param)
        # The 3rd write of HRP's new weights gets a Ctrl-C, and so does the 1st write of the restore.
        if len(writes) in (3, 4):
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(distributed, "write_full_", write_and_press_ctrl_c)
    pl.seed_everything(0)
    module = TinyCausalLM()
    before = all_weights(module)
    with pytest.raises(SystemExit):  # Lightning turns the KeyboardInterrupt into a graceful exit
        make_trainer(callbacks=[HRPPreheatCallback(8, 2)]).fit(module)
    assert len(writes) == 3 + 28  # the restore wrote all 14 layers' A and B
    assert_bitwise_equal(before, all_weights(module))


class SendsSigterm(TinyCausalLM):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        if self.calls == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().training_step(batch, batch_idx)


def test_sigterm_during_preheating_restores_and_exits_as_lightning_does():
    pl.seed_everything(0)
    module = SendsSigterm()
    before = all_weights(module)
    trainer = make_trainer(callbacks=[HRPPreheatCallback(8, 4)], max_steps=3)
    with pytest.raises(SIGTERMException):
        trainer.fit(module)
    assert module.calls == 2  # preheating stopped at the next batch; no main step ran
    assert_bitwise_equal(before, all_weights(module))


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(seed=-1), "seed"),
        (dict(seed=2**63), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(seed=True), "seed"),
        (dict(preheat_optimizer="adamw"), "preheat_optimizer"),
        (dict(preheat_lr=True), "preheat_lr"),
        (dict(track_subspace_drift="no"), "track_subspace_drift"),
        (dict(log_layer_metrics=1), "log_layer_metrics"),
        (dict(adapter_name=0), "adapter_name"),
    ],
)
def test_more_bad_arguments_are_refused_at_construction(kwargs, argument):
    with pytest.raises(HRPConfigurationError, match=argument):
        HRPPreheatCallback(8, 5, **kwargs)


class NarrowLayer(pl.LightningModule):
    """LoRA r=2 on Linear(1, 8) and Linear(8, 1): no layer can hold two independent directions."""

    def __init__(self):
        super().__init__()
        network = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.model = get_peft_model(network, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x), y)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(32, 1, generator=generator), torch.randn(32, 1, generator=generator)), batch_size=8)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


class ReturnsAString(TinyCausalLM):
    def training_step(self, batch, batch_idx):
        return "loss"


@pytest.mark.parametrize(("module_class", "argument"), [(NarrowLayer, "r=2"), (ReturnsAString, "training_step")])
def test_configuration_errors_are_raised_even_with_on_failure_continue(module_class, argument):
    pl.seed_everything(0)
    module = module_class()
    before = all_weights(module)
    with pytest.raises(HRPConfigurationError, match=argument):
        make_trainer(callbacks=[HRPPreheatCallback(8, 2, on_failure="continue")], max_steps=1).fit(module)
    assert_bitwise_equal(before, all_weights(module))


def test_max_steps_below_preheat_steps_warns():
    pl.seed_everything(0)
    with pytest.warns(UserWarning, match="max_steps=2"):
        make_trainer(callbacks=[HRPPreheatCallback(8, 4)], max_steps=2).fit(TinyCausalLM())


def test_preheat_steps_have_their_own_axis_and_layer_metrics_short_names(tmp_path):
    pl.seed_everything(0)
    logger = CSVLogger(tmp_path, name="run")
    make_trainer(callbacks=[HRPPreheatCallback(8, 5)], max_steps=3, logger=logger, log_every_n_steps=1).fit(TinyCausalLM())
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    preheat = [r for r in rows if r.get("hrp/preheat_loss")]
    assert [int(float(r["hrp/preheat_step"])) for r in preheat] == list(range(5))
    # On the main run's axis preheating happens at its step 0, before the first main step.
    assert {r["step"] for r in preheat} == {"0"}
    assert not any(r.get("hrp/preheat_step") for r in rows if r.get("train_loss"))
    layer_keys = [key for key in rows[0] if key.startswith(("hrp/energy_kept/", "hrp/sigma_1/"))]
    assert len(layer_keys) == 28 and not any("base_model" in key for key in layer_keys)
    assert "hrp/energy_kept/model.layers.0.self_attn.q_proj" in layer_keys


def _wandb_records(run_dir: Path):
    """The complete protobuf records of an offline W&B run's ``.wandb`` file (a LevelDB-style log).

    Reading stops at the first record that is not fully on disk yet (short, or its CRC32 does not match), so a
    file W&B's service is still writing yields a prefix of the run, never a torn record.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a record header never straddles a block: the rest is padding
            position += block - position % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        payload = data[position + 7 : position + 7 + length]
        if len(payload) < length or zlib.crc32(payload, zlib.crc32(bytes([kind]))) != checksum:
            return
        position += 7 + length
        if kind in (1, 2):  # a full record, or the first fragment of one
            pending = payload
        elif kind in (3, 4):
            pending += payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_charts_preheat_metrics_against_the_preheat_step(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    pl.seed_everything(0)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lightning-hrp-tests")
    make_trainer(callbacks=[HRPPreheatCallback(8, 3)], max_steps=2, logger=logger, log_every_n_steps=1).fit(TinyCausalLM())
    logger.experiment.finish()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    # W&B's service may still be writing the file when finish() returns on a loaded machine: read until
    # the run's closing record is there (it is written last), for at most two minutes.
    deadline = time.monotonic() + 120
    records = list(_wandb_records(run_dir))
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, f"W&B never wrote the run's exit record to {run_dir}"
        time.sleep(0.5)
        records = list(_wandb_records(run_dir))
    step_metric = {r.metric.name: r.metric.step_metric for r in records if r.WhichOneof("record_type") == "metric"}
    assert step_metric["hrp/preheat_loss"] == "hrp/preheat_step"
    rows = [
        {item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [row["hrp/preheat_step"] for row in rows if "hrp/preheat_loss" in row] == ["0", "1", "2"]

    # The poll above relies on a file cut mid-record reading as a prefix of the run, not as a torn record.
    (run_file,) = run_dir.glob("run-*.wandb")
    data = run_file.read_bytes()
    for cut in (len(data) // 2, len(data) - 3):
        partial_dir = tmp_path / f"cut-{cut}"
        partial_dir.mkdir()
        (partial_dir / run_file.name).write_bytes(data[:cut])
        partial = [r.SerializeToString() for r in _wandb_records(partial_dir)]
        assert 0 < len(partial) < len(records)
        assert partial == [r.SerializeToString() for r in records[: len(partial)]]


def recorded_infos(monkeypatch) -> list[str]:
    """The callback's informational messages, recorded as they are sent."""
    from lightning_hrp.callback import _TrainerEntry

    infos: list[str] = []
    monkeypatch.setattr(_TrainerEntry, "info", lambda self, message: infos.append(message))
    return infos


class ShardedShuffled(RecordsMainBatches):
    """A DistributedSampler over one replica, shuffled (what Lightning builds on several processes)."""

    def train_dataloader(self) -> DataLoader:
        data = token_dataset(self.hparams.dataset_size)
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=7)
        return DataLoader(data, batch_size=self.hparams.batch_size, sampler=sampler)


@pytest.mark.parametrize(
    ("module", "loader_kwargs"),
    [
        pytest.param(RecordsMainBatches, lambda: {}, id="RandomSampler"),
        pytest.param(RecordsMainBatches, lambda: dict(generator=torch.Generator().manual_seed(3)), id="loader_generator"),
        pytest.param(ShardedShuffled, lambda: {}, id="DistributedSampler"),
        pytest.param(RecordsMainBatches, lambda: dict(num_workers=2), id="RandomSampler-workers"),
        pytest.param(RecordsMainBatches, lambda: dict(num_workers=1, persistent_workers=True), id="RandomSampler-persistent_workers"),
    ],
)
def test_with_shuffling_preheating_reads_the_main_runs_first_epoch(module, loader_kwargs, monkeypatch):
    infos = recorded_infos(monkeypatch)
    # Two batches an epoch and two epochs: the preheat's two batches are the first epoch's, not the second's.
    pl.seed_everything(0)
    module = module(loader_kwargs(), shuffle=True)
    make_trainer(callbacks=[HRPPreheatCallback(8, 2)], max_steps=4, limit_train_batches=2).fit(module)
    preheat = module.seen_batches[:2]
    first_epoch, second_epoch = module.main_batches[:2], module.main_batches[2:]
    assert len(second_epoch) == 2 and not all(torch.equal(a, b) for a, b in zip(preheat, second_epoch))
    assert all(torch.equal(a, b) for a, b in zip(preheat, first_epoch))
    assert not [m for m in infos if "another permutation" in m]


class DrawsInTrainDataloader(RecordsMainBatches):
    """Draws from the global RNG in ``train_dataloader``, after ``on_fit_start``."""

    def train_dataloader(self) -> DataLoader:
        torch.rand(())
        return super().train_dataloader()


@pytest.mark.parametrize(
    ("module", "loader_kwargs"),
    [
        pytest.param(RecordsMainBatches, lambda: dict(num_workers=1, generator=torch.Generator().manual_seed(3)), id="loader_generator"),
        pytest.param(DrawsInTrainDataloader, lambda: dict(num_workers=1), id="train_dataloader_draws"),
    ],
)
def test_shuffling_workers_whose_first_epoch_cannot_be_replayed_are_named(module, loader_kwargs, monkeypatch):
    # The permutation was drawn in setup_data from a state HRP cannot recover: it says that it reads another one.
    infos = recorded_infos(monkeypatch)
    pl.seed_everything(0)
    make_trainer(callbacks=[HRPPreheatCallback(8, 2)], max_steps=2, limit_train_batches=2).fit(module(loader_kwargs(), shuffle=True))
    assert [m for m in infos if "num_workers" in m and "another permutation" in m]
