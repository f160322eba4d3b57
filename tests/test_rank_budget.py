"""``rank_budget``: ranks allocated from the preheated spectra, peft adapters resized, the config round-trips."""

import json
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from lightning_hrp import HRPConfigurationError, HRPPreheatCallback, hrp_init
from lightning_hrp.engine.lora import find_lora_targets
from lightning_hrp.engine.resize import resize_adapters, resize_on_load
from lightning_hrp.inits import HRPInit, LoraInit
from lightning_hrp.report import allocation_summary, summary_metrics
from lightning_hrp.recipes.multi_layer_regression import MultiLayerRegressionDataModule, MultiLayerRegressionModule
from modules import all_weights, assert_bitwise_equal, causal_lm_loss, cpu_trainer, lora_llama, tiny_llama, token_dataset
from test_hrp_init import PROBE_INPUT, batches

OPTIONS = dict(preheat_rank=16, preheat_steps=4, preheat_lr=1e-2, seed=0)


def _layers(model) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _allocated(budget: int = 29, **options):
    model = lora_llama()  # 8 LoRA layers of rank 4: 32 is the uniform budget
    scales = {name: layer.scaling["default"] for name, layer in _layers(model).items()}
    with torch.no_grad():
        before = model(input_ids=PROBE_INPUT).logits
    report = hrp_init(model, batches(), causal_lm_loss, **OPTIONS, rank_budget=budget, **options)
    return model, report, scales, before


def test_ranks_follow_the_allocation_and_each_adapter_starts_from_its_top_directions():
    model, report, scales, before = _allocated()
    ranks = [d.rank for d in report.layers]
    assert sum(ranks) == 29 and len(set(ranks)) > 1 and report.rank_budget == 29
    assert [d.rank_before for d in report.layers] == [4] * 8
    for target, d in zip(find_lora_targets(model), report.layers):
        A, B = target.lora_A.detach().double(), target.lora_B.detach()
        assert target.rank == d.rank and A.shape == (d.rank, target.in_features) and B.shape == (target.out_features, d.rank)
        assert torch.count_nonzero(B) == 0
        # Orthogonal rows of one norm (the mean row norm of peft's default init): directions, scaled.
        gram = A @ A.T
        torch.testing.assert_close(gram, gram[0, 0] * torch.eye(d.rank, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        # The energy kept is the allocated rank's.
        s = torch.tensor(d.singular_values, dtype=torch.float64) ** 2
        assert d.energy_kept == pytest.approx(float(s[: d.rank].sum() / s.sum()))
    # The LoRA scale of every layer is what it was; the output at the start is the base model's.
    assert {name: layer.scaling["default"] for name, layer in _layers(model).items()} == pytest.approx(scales)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=PROBE_INPUT).logits, before)


def test_the_budget_goes_to_the_largest_preheated_energies_of_all_layers():
    # The default rule: beyond each layer's first direction, the smallest energy given is at least the
    # largest left out; with energy_share, the same holds for the shares of each layer's energy.
    for rule in ("energy", "energy_share"):
        _, report, _, _ = _allocated(allocation_rule=rule)
        given, left = [], []
        for d in report.layers:
            s = torch.tensor(d.singular_values, dtype=torch.float64) ** 2
            values = (s if rule == "energy" else s / s.sum()).tolist()
            given += values[1 : d.rank]
            left += values[d.rank : d.preheat_rank]
        assert min(given) >= max(left), rule


def test_save_pretrained_round_trips_through_peft_alone(tmp_path):
    model, report, _, _ = _allocated()
    # One training step, so that B is nonzero and both factors must load at their new shapes.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    causal_lm_loss(model, (PROBE_INPUT,)).backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=PROBE_INPUT).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"input": PROBE_INPUT, "logits": expected}, tmp_path / "expected.pt")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["rank_pattern"].values()) == sorted(d.rank for d in report.layers if d.rank != 4)
    # A fresh process with peft and transformers only.
    script = textwrap.dedent(f"""
        import sys, torch
        from peft import PeftModel
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        torch.manual_seed(0)
        base = LlamaForCausalLM(config)
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(input_ids=expected["input"]).logits
        torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=0)
        assert not any(name.startswith("lightning_hrp") for name in sys.modules)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_rslora_keeps_each_layers_scale_too():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True))
    report = hrp_init(model, batches(), causal_lm_loss, **OPTIONS, rank_budget=12)
    assert [layer.scaling["default"] for layer in _layers(model).values()] == pytest.approx([8 / 2.0] * 4, rel=1e-12)
    assert sum(d.rank for d in report.layers) == 12 and len({d.rank for d in report.layers}) > 1


def test_an_optimizer_built_before_the_resize_fails_at_its_first_step():
    model = lora_llama()
    stale = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hrp_init(model, batches(), causal_lm_loss, **OPTIONS, rank_budget=29)
    causal_lm_loss(model, (PROBE_INPUT,)).backward()
    with pytest.raises(HRPConfigurationError, match="rank_budget"):
        stale.step()
    fresh = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    fresh.step()  # one built afterwards steps


@pytest.mark.parametrize("budget", [7, 8 * 16 + 1])
def test_a_budget_that_cannot_be_placed_is_refused_before_anything_changes(budget):
    model = lora_llama()
    before = all_weights(model)
    with pytest.raises(HRPConfigurationError, match="rank_budget"):
        hrp_init(model, batches(), causal_lm_loss, **OPTIONS, rank_budget=budget)
    assert_bitwise_equal(before, all_weights(model))


def test_a_wrapped_model_or_dora_is_refused(one_process_group):
    with pytest.raises(HRPConfigurationError, match="rank_budget"):
        hrp_init(DistributedDataParallel(lora_llama()), batches(), causal_lm_loss, **OPTIONS, rank_budget=29)
    torch.manual_seed(0)
    dora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(HRPConfigurationError, match="DoRA"):
        hrp_init(dora, batches(), causal_lm_loss, **OPTIONS, rank_budget=5)



def test_a_failure_after_the_resize_puts_the_old_adapters_back_bit_for_bit(monkeypatch):
    # The adapters are resized, then the block fails later (here: putting the trained head back), as a
    # warning turned error or a Ctrl-C there would. The old shapes, values and config come back.
    model = lora_llama()
    before = all_weights(model)
    stale_before = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def fails(saved):
        raise RuntimeError("late failure")

    monkeypatch.setattr("lightning_hrp.orchestration.restore_values", fails)
    with pytest.warns(UserWarning, match="late failure"):
        report = hrp_init(model, batches(), causal_lm_loss, **OPTIONS, rank_budget=29, other_params="train_and_discard", on_failure="continue")
    assert report is None
    assert [t.rank for t in find_lora_targets(model)] == [4] * 8
    assert model.peft_config["default"].rank_pattern == {} and model.peft_config["default"].alpha_pattern == {}
    assert_bitwise_equal(before, all_weights(model))
    # The parameters are the old ones again: an optimizer built before the call is not stale.
    causal_lm_loss(model, (PROBE_INPUT,)).backward()
    stale_before.step()

def test_resizing_undone_leaves_the_model_and_its_config_as_they_were():
    model = lora_llama()
    before = all_weights(model)
    flags = [(name, p.requires_grad) for name, p in model.named_parameters()]
    targets = find_lora_targets(model)
    resizing = resize_adapters(model, targets, [1, 2, 3, 4, 5, 6, 7, 8])
    assert [t.rank for t in targets] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert len(model.peft_config["default"].rank_pattern) == 7  # every layer but the one still at r = 4
    resizing.undo()
    assert [t.rank for t in targets] == [4] * 8
    assert model.peft_config["default"].rank_pattern == {} and model.peft_config["default"].alpha_pattern == {}
    assert_bitwise_equal(before, all_weights(model))
    assert flags == [(name, p.requires_grad) for name, p in model.named_parameters()]


def test_a_fresh_model_loads_an_allocated_state_dict_once_it_resizes_on_load():
    allocated, report, _, _ = _allocated()
    fresh = lora_llama()
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(allocated.state_dict())
    handle = resize_on_load(fresh, find_lora_targets(fresh))
    fresh.load_state_dict(allocated.state_dict())
    assert [t.rank for t in find_lora_targets(fresh)] == [d.rank for d in report.layers]
    assert fresh.peft_config["default"].rank_pattern == allocated.peft_config["default"].rank_pattern
    assert_bitwise_equal(all_weights(allocated), all_weights(fresh))
    handle.remove()


def test_frozen_factors_stay_frozen_after_the_resize():
    model = lora_llama()
    for target in find_lora_targets(model):
        target.lora_A.requires_grad_(False)  # asymmetric LoRA: B trains, A stays
    report = hrp_init(model, batches(), causal_lm_loss, **OPTIONS, rank_budget=29)
    assert sum(d.rank for d in report.layers) == 29
    assert all(not t.lora_A.requires_grad and t.lora_B.requires_grad for t in find_lora_targets(model))


def test_the_report_and_logs_show_each_layers_rank_and_energy(caplog):
    with caplog.at_level("INFO", logger="lightning_hrp"):
        _, report, _, _ = _allocated()
    summary = allocation_summary(report)
    assert summary in caplog.text
    for d in report.layers:
        assert f"4 -> {d.rank}" in next(line for line in summary.splitlines() if d.name.endswith(line.split()[0]))
    metrics = summary_metrics(report, layer_metrics=True)
    assert sorted(v for k, v in metrics.items() if k.startswith("hrp/rank/")) == sorted(d.rank for d in report.layers)


# --------------------------------------------------------------------------------------------
# Lightning: init_method hrp with rank_budget runs HRPInit at setup, before the strategy
# --------------------------------------------------------------------------------------------

TASK = dict(in_features=16, out_features=12, task_seed=1)
HRP_OPTIONS = {"preheat_rank": 8, "preheat_steps": 8, "mode": "classic"}


class _RegressionData(MultiLayerRegressionDataModule):
    """Two heads whose true updates have ranks 1 and 4 (flat spectra, isotropic inputs: clearly resolved).

    Read in order: the callback's preheat pass starts after the main run created its epoch iterator,
    which a shuffled loader's generator would have moved on since setup.
    """

    def __init__(self) -> None:
        super().__init__(**TASK, update_ranks=[1, 4], spectrum_decay=0.0, input_condition=1.0, train_size=128,
                         val_size=16, test_size=16, batch_size=16)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size)


def _regression(init_method: str, init_options: dict | None, callbacks=(), max_steps: int = 2):
    pl.seed_everything(0, verbose=False)
    module = MultiLayerRegressionModule(**TASK, heads=2, lora_rank=2, init_method=init_method, init_options=init_options)
    trainer = cpu_trainer(max_steps=max_steps, num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks))
    trainer.fit(module, _RegressionData())
    return module, trainer


def test_the_registry_takes_hrpinit_when_a_rank_budget_is_given():
    assert isinstance(LoraInit("hrp", HRP_OPTIONS).callback, HRPPreheatCallback)
    assert isinstance(LoraInit("hrp", {**HRP_OPTIONS, "rank_budget": 4}).callback, HRPInit)


def test_a_recipe_with_a_rank_budget_trains_the_allocated_adapters():
    module, trainer = _regression("hrp", {**HRP_OPTIONS, "rank_budget": 4})
    ranks = [t.rank for t in find_lora_targets(module)]
    # The true updates have ranks 1 and 4: of the budget of 2 x 2, one rank moves to the second head.
    assert ranks == [1, 3]
    # The optimizer holds exactly the resized parameters, and they trained.
    (optimizer,) = trainer.optimizers
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in module.parameters() if p.requires_grad}
    assert all(torch.count_nonzero(t.lora_B) > 0 for t in find_lora_targets(module))
    report = module.lora_init.callback.hrp_report
    assert [d.rank for d in report.layers] == ranks and module.lora_init.callback.report.batches == 8


def test_a_checkpoint_of_an_allocated_run_tests_in_a_fresh_module(tmp_path):
    module, trainer = _regression("hrp", {**HRP_OPTIONS, "rank_budget": 4})
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    expected = cpu_trainer().test(module, _RegressionData(), verbose=False)[0]["test/loss"]
    pl.seed_everything(1, verbose=False)  # another default init: only the checkpoint can make them agree
    fresh = MultiLayerRegressionModule(**TASK, heads=2, lora_rank=2, init_method="hrp", init_options={**HRP_OPTIONS, "rank_budget": 4})
    tested = cpu_trainer().test(fresh, _RegressionData(), ckpt_path=tmp_path / "last.ckpt", verbose=False)[0]["test/loss"]
    assert [t.rank for t in find_lora_targets(fresh)] == [1, 3]
    assert tested == pytest.approx(expected, rel=1e-6)


def test_hrpinit_without_a_budget_starts_where_the_callback_does():
    # The same preheat batches and learning rate (configure_optimizers', read at setup): only the path differs.
    starts = {}
    for path, (method, options, callbacks) in {
        "callback": ("hrp", HRP_OPTIONS, ()),
        "setup": ("lora", None, [HRPInit(**HRP_OPTIONS)]),
    }.items():
        probe = _StartProbe()
        _regression(method, options, callbacks=[*callbacks, probe], max_steps=1)
        starts[path] = probe.starts
    for at_setup, at_train_start in zip(starts["setup"], starts["callback"]):
        torch.testing.assert_close(at_setup, at_train_start, rtol=1e-4, atol=1e-6)
        # Both are HRP starts (orthogonal rows), not peft's default init.
        gram = at_setup @ at_setup.T
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), rtol=0, atol=1e-6)


class _StartProbe(pl.Callback):
    """The LoRA ``A`` factors at the first training batch, after every init."""

    def __init__(self) -> None:
        self.starts: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.starts:
            self.starts = [t.lora_A.detach().clone() for t in find_lora_targets(pl_module)]


class _ManualOptimization(MultiLayerRegressionModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False


class _DataloaderIterStep(MultiLayerRegressionModule):
    def training_step(self, dataloader_iter):
        batch, batch_idx, _ = next(dataloader_iter)
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(("module_class", "argument"), [(_ManualOptimization, "automatic"), (_DataloaderIterStep, "dataloader_iter")])
def test_hrpinit_refuses_what_the_callback_refuses_before_anything_changes(module_class, argument):
    # Both feed training_step HRP's own batches and optimizer: the same checks, in _lightning.py.
    pl.seed_everything(0, verbose=False)
    module = module_class(**TASK, heads=2, lora_rank=2, init_method="hrp", init_options={**HRP_OPTIONS, "rank_budget": 4})
    before = all_weights(module)
    with pytest.raises(HRPConfigurationError, match=argument):
        cpu_trainer(max_steps=1, num_sanity_val_steps=0, limit_val_batches=0).fit(module, _RegressionData())
    assert_bitwise_equal(before, all_weights(module))


def test_hrpinit_refuses_a_gradient_scaler_before_anything_changes():
    # Its plain backward would leave float16 preheat gradients unscaled: small ones underflow to zero.
    pl.seed_everything(0, verbose=False)
    module = MultiLayerRegressionModule(**TASK, heads=2, lora_rank=2, init_method="hrp", init_options={**HRP_OPTIONS, "rank_budget": 4})
    before = all_weights(module)
    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(HRPConfigurationError, match="precision"):
        cpu_trainer(max_steps=1, num_sanity_val_steps=0, limit_val_batches=0, plugins=[scaled]).fit(module, _RegressionData())
    assert_bitwise_equal(before, all_weights(module))

