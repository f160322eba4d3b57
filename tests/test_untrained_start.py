"""HRP initialises adapters at their untrained start only: every entry point refuses to overwrite trained or
otherwise initialised adapters (nothing changed) unless ``reinitialise_trained=True`` says so."""

import functools
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from lightning_hrp import FactoredRMS, HRPConfigurationError, HRPOptions, HRPPreheatCallback, hrp_init
from lightning_hrp.inits import HRPInit, LoraGAInit
from lightning_hrp.integrations.transformers import HRPTrainerCallback
from modules import TinyCausalLM, all_weights, assert_bitwise_equal, causal_lm_loss, cpu_trainer, lora_llama, tiny_llama, token_dataset
from test_transformers_integration import make_trainer

OPTIONS = dict(preheat_rank=16, preheat_steps=2, preheat_lr=1e-2, seed=0)


def batches() -> DataLoader:
    return DataLoader(token_dataset(32), batch_size=8)


def trained(model, steps: int = 2) -> torch.optim.Optimizer:
    """``steps`` AdamW steps on ``model``'s trainable weights; the optimizer, holding its moments."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch, _ in zip(batches(), range(steps)):
        causal_lm_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def pissa_llama():
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    return get_peft_model(tiny_llama(), config)


def refused_unchanged(run, model) -> str:
    """Runs ``run()``, expecting a refusal that leaves every weight of ``model`` bit for bit; the message."""
    before = all_weights(model)
    with pytest.raises(HRPConfigurationError, match="reinitialise_trained=True") as refusal:
        run()
    assert_bitwise_equal(before, all_weights(model))
    return str(refusal.value)


# --- hrp_init ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("before", ["trained", "hrp_init_twice", "keep_progress_then_hrp"])
def test_hrp_init_refuses_adapters_past_their_untrained_start(before):
    model = lora_llama()
    if before == "trained":
        trained(model)
    elif before == "hrp_init_twice":
        hrp_init(model, batches(), causal_lm_loss, **OPTIONS)  # B = 0 again afterwards: only the record tells
    else:
        hrp_init(model, batches(), causal_lm_loss, **OPTIONS, init_rule="keep_progress")
    message = refused_unchanged(lambda: hrp_init(model, batches(), causal_lm_loss, **OPTIONS), model)
    assert "q_proj" in message  # names the layers it found


def test_hrp_init_refuses_a_residual_init_and_says_so():
    model = pissa_llama()
    message = refused_unchanged(lambda: hrp_init(model, batches(), causal_lm_loss, **OPTIONS), model)
    assert "'pissa'" in message and "residual" in message


def test_reinitialise_trained_re_initialises_and_warns_on_a_residual_base():
    model = pissa_llama()
    with pytest.warns(UserWarning, match="residual"):
        report = hrp_init(model, batches(), causal_lm_loss, **OPTIONS, reinitialise_trained=True)
    assert report is not None
    assert all(not p.any() for name, p in model.named_parameters() if "lora_B" in name)


def test_a_residual_base_left_by_this_projects_lora_ga_is_named():
    # LoraGAInit rewrites the base outside peft's config (init_lora_weights stays True): only its record tells.
    module = TinyCausalLM(target_modules=("q_proj", "v_proj"))
    cpu_trainer(max_steps=1, callbacks=[LoraGAInit(gradient_batches=2)]).fit(module)
    message = refused_unchanged(lambda: hrp_init(module.model, batches(), causal_lm_loss, **OPTIONS), module)
    assert "'lora_ga'" in message and "residual" in message
    with pytest.warns(UserWarning, match="residual"):
        hrp_init(module.model, batches(), causal_lm_loss, **OPTIONS, reinitialise_trained=True)


def test_a_residual_base_with_b_zero_is_initialised_without_a_word_about_reinitialising():
    # B = 0 on a PiSSA base (e.g. an HRP start saved and loaded into a fresh model): the output is the residual's
    # before and after HRP, nothing is overwritten, and reinitialise_trained was not given.
    model = pissa_llama()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert hrp_init(model, batches(), causal_lm_loss, **OPTIONS) is not None
    assert not [w for w in caught if "reinitialise_trained" in str(w.message)]


def test_reinitialise_trained_after_training_starts_again_from_hrp():
    model = lora_llama()
    trained(model)
    hrp_init(model, batches(), causal_lm_loss, **OPTIONS, reinitialise_trained=True)
    assert all(not p.any() for name, p in model.named_parameters() if "lora_B" in name)
    # And once more: the flag also covers HRP's own earlier start.
    hrp_init(model, batches(), causal_lm_loss, **OPTIONS, reinitialise_trained=True)


# --- the Lightning callback and HRPInit -------------------------------------------------------------------


class CachedOptimizer(TinyCausalLM):
    """Hands every Trainer the same optimizer (as a module that builds it once does): its moments survive a fit."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.optimizer: torch.optim.Optimizer | None = None

    def configure_optimizers(self):
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)
        return self.optimizer


class OptimizerStateAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        lora = {p for name, p in pl_module.named_parameters() if "lora_" in name}
        self.lora_states = [state for p, state in trainer.optimizers[0].state.items() if p in lora and state]


@pytest.mark.parametrize("entry_point", [HRPPreheatCallback, HRPInit])
def test_a_module_trained_by_an_earlier_trainer_is_refused_by_a_new_one(entry_point):
    module = TinyCausalLM()
    cpu_trainer(max_steps=2).fit(module)
    hrp = entry_point(preheat_rank=16, preheat_steps=2)
    message = refused_unchanged(lambda: cpu_trainer(max_steps=1, callbacks=[hrp]).fit(module), module)
    assert "lora_B is not zero" in message


def test_the_callback_with_reinitialise_trained_clears_the_stale_moments():
    module = CachedOptimizer()
    cpu_trainer(max_steps=2).fit(module)
    assert module.optimizer.state  # moments of the first fit's steps
    probe = OptimizerStateAtTrainStart()
    hrp = HRPPreheatCallback(preheat_rank=16, preheat_steps=2, reinitialise_trained=True)
    cpu_trainer(max_steps=1, callbacks=[hrp, probe]).fit(module)
    assert hrp.report is not None and probe.lora_states == []


def test_the_callback_refuses_moments_in_the_optimizer_even_with_b_zero():
    module = CachedOptimizer()
    cpu_trainer(max_steps=1).fit(module)
    with torch.no_grad():  # B back to zero: only the optimizer's moments show the adapters were trained
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.zero_()
    hrp = HRPPreheatCallback(preheat_rank=16, preheat_steps=2)
    message = refused_unchanged(lambda: cpu_trainer(max_steps=1, callbacks=[hrp]).fit(module), module)
    assert "optimizer already holds state" in message


# --- the transformers Trainer -----------------------------------------------------------------------------


def test_a_second_train_call_without_resume_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.train()  # plain LoRA first
    hrp = HRPTrainerCallback(preheat_rank=16, preheat_steps=2).attach(trainer)
    refused_unchanged(trainer.train, trainer.model)
    assert hrp.report is None


class LoraOptimizerStateAtTrainBegin(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer
        self.lora_states: list | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        lora = {p for name, p in self.trainer.model.named_parameters() if "lora_" in name}
        self.lora_states = [s for p, s in self.trainer.optimizer.state.items() if p in lora and s]


def test_a_second_train_call_with_reinitialise_trained_clears_the_reused_optimizers_moments(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.train()  # builds the optimizer; the second train() reuses it, moments included
    hrp = HRPTrainerCallback(preheat_rank=16, preheat_steps=2, reinitialise_trained=True).attach(trainer)
    probe = LoraOptimizerStateAtTrainBegin(trainer)
    trainer.add_callback(probe)  # after HRP's: sees the optimizer as the main run's first step will
    trainer.train()
    assert hrp.report is not None and probe.lora_states == []


# --- preheat optimizers that evaluate the loss more than once per step ------------------------------------


class TwiceEvaluating(torch.optim.SGD):
    def step(self, closure=None):
        closure()
        return super().step(closure)


@pytest.mark.parametrize(
    "factory",
    [torch.optim.LBFGS, lambda params: torch.optim.LBFGS(params, lr=0.1), lambda params: TwiceEvaluating(params, lr=0.1)],
    ids=["LBFGS-class", "LBFGS-factory", "closure-called-twice"],
)
def test_optimizers_that_re_evaluate_are_refused_and_the_model_is_left_as_it_was(factory):
    model = lora_llama()
    run = functools.partial(hrp_init, model, batches(), causal_lm_loss, preheat_rank=16, preheat_steps=2, preheat_optimizer=factory)
    before = all_weights(model)
    with pytest.raises(HRPConfigurationError, match="preheat_optimizer"):
        run(on_failure="continue")  # a configuration error is never swallowed
    assert_bitwise_equal(before, all_weights(model))


# --- option checks that used to leak internal errors ------------------------------------------------------


@pytest.mark.parametrize(
    "factory",
    [lambda params: None, lambda params: [torch.optim.SGD(params, lr=0.1)], FactoredRMS],
    ids=["returns-None", "returns-a-list", "FactoredRMS-class-without-lr"],
)
def test_a_preheat_optimizer_that_is_no_optimizer_factory_is_refused_naming_the_option(factory):
    model = lora_llama()
    before = all_weights(model)
    with pytest.raises(HRPConfigurationError, match="preheat_optimizer"):
        hrp_init(model, batches(), causal_lm_loss, preheat_rank=16, preheat_steps=2, preheat_optimizer=factory)
    assert_bitwise_equal(before, all_weights(model))


def test_an_optimizer_class_needing_lr_names_functools_partial():
    with pytest.raises(HRPConfigurationError, match=r"functools\.partial\(FactoredRMS, lr="):
        HRPOptions(preheat_rank=16, preheat_steps=2, preheat_optimizer=FactoredRMS)


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), "1e-3", None, 0.0, -1e-3, True])
def test_factored_rms_refuses_a_learning_rate_that_is_no_positive_finite_number(lr):
    with pytest.raises(ValueError, match="lr"):
        FactoredRMS([torch.zeros(2, 2, requires_grad=True)], lr=lr)


@pytest.mark.parametrize("number", [np.float32, np.float64, np.float16])
def test_numpy_numbers_are_accepted_where_python_numbers_are(number):
    options = HRPOptions(preheat_rank=np.int64(16), preheat_steps=np.int32(2), preheat_lr=number(1e-2), drift_tolerance=number(0.02))
    assert type(options.preheat_lr) is float and type(options.preheat_rank) is int
    FactoredRMS([torch.zeros(2, 2, requires_grad=True)], lr=number(1e-3))
    with pytest.raises(HRPConfigurationError, match="preheat_lr"):
        HRPOptions(preheat_rank=16, preheat_steps=2, preheat_lr=np.bool_(True))
