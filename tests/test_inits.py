"""The LoRA initialisations by name (lightning_hrp.inits): each keeps the promises the registry makes."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import Tensor

from lightning_hrp import HRPConfigurationError, HRPPreheatCallback
from lightning_hrp.engine.baselines import lora_one_init, oracle_direction_init, top_singular_triplets
from lightning_hrp.inits import INIT_METHODS, InitMethod, LoraInit, LoraOneInit, SetupTimeInit
from lightning_hrp.recipes.matrix_regression import MatrixRegressionDataModule, MatrixRegressionModule
from modules import cpu_trainer

IN, OUT, RANK = 16, 12, 2
TASK = dict(in_features=IN, out_features=OUT, task_seed=5)
OPTIONS = {
    InitMethod.hrp: {"preheat_rank": 8, "preheat_steps": 3},
    InitMethod.lora_ga: {"gradient_batches": 2},
    InitMethod.lora_one: {"gradient_batches": 2},
}


class FirstStepProbe(pl.Callback):
    """Records the model's output and weights at the first training batch, after every init hook ran."""

    def __init__(self, inputs: Tensor) -> None:
        self.inputs = inputs
        self.output: Tensor | None = None
        self.batch: Tensor | None = None
        self.module: MatrixRegressionModule | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.output is None:
            with torch.no_grad():
                self.output = pl_module(self.inputs).clone()
            self.batch = batch[0].clone()
            self.module = pl_module
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _data(**overrides) -> MatrixRegressionDataModule:
    return MatrixRegressionDataModule(**{**TASK, "train_size": 64, "val_size": 16, "test_size": 16, "batch_size": 16, **overrides})


def _start(method: InitMethod, data: MatrixRegressionDataModule | None = None, seed: int = 0, **options) -> FirstStepProbe:
    """Fit one step and return what the model looked like right before it."""
    data = data or _data()
    pl.seed_everything(seed, verbose=False)
    module = MatrixRegressionModule(
        **TASK, lora_rank=RANK, init_method=method, init_options={**OPTIONS.get(method, {}), **options} or None
    )
    probe = FirstStepProbe(data.val_set.tensors[0])
    trainer = cpu_trainer(max_steps=1, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[probe])
    trainer.fit(module, data)
    return probe


def _pretrained_output(data: MatrixRegressionDataModule) -> Tensor:
    return data.val_set.tensors[0] @ data.base_weight().T


def test_registry_documents_every_method() -> None:
    assert set(INIT_METHODS) == set(InitMethod)
    for method, info in INIT_METHODS.items():
        if method not in (InitMethod.full, InitMethod.oracle):
            assert "arXiv" in info.paper, method
        assert info.rule
    # Members are named by their value, so a YAML or command-line value is the name itself.
    assert all(m.name == m.value for m in InitMethod)
    # A setup-time init reports itself under its method's name.
    for method, info in INIT_METHODS.items():
        if info.callback is not None and issubclass(info.callback, SetupTimeInit):
            assert info.callback.name == method.value


@pytest.mark.parametrize("method", [m for m in InitMethod if INIT_METHODS[m].keeps_output], ids=lambda m: m.value)
def test_output_at_the_start_is_the_pretrained_models(method: InitMethod) -> None:
    data = _data()
    probe = _start(method, data)
    torch.testing.assert_close(probe.output, _pretrained_output(data), rtol=1e-5, atol=1e-5)
    if INIT_METHODS[method].uses_lora:
        base = probe.state["model.base_model.model.proj.base_layer.weight"]
        changed = not torch.equal(base, data.base_weight())
        assert changed == INIT_METHODS[method].changes_base_weights


def test_lora_one_moves_the_output_by_one_rank_r_gradient_step() -> None:
    data = _data()
    probe = _start(InitMethod.lora_one, data)
    A = probe.state["model.base_model.model.proj.lora_A.default.weight"]
    B = probe.state["model.base_model.model.proj.lora_B.default.weight"]
    assert B.abs().max() > 0
    scaling = probe.module.lora_layer().scaling["default"]
    expected = _pretrained_output(data) + data.val_set.tensors[0] @ (scaling * B @ A).T
    torch.testing.assert_close(probe.output, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probe.state["model.base_model.model.proj.base_layer.weight"], data.base_weight())


def test_lora_one_matches_a_hand_computation_on_a_linear_model() -> None:
    # One batch holding the whole training set: G = d/dW mean((X W^T - Y)^2) = 2 (X W^T - Y)^T X / (N out).
    data = _data(train_size=32, batch_size=32)
    gamma = 4.0
    probe = _start(InitMethod.lora_one, data, gradient_batches=1, gamma=gamma)
    X, Y = (t.double() for t in data.train_set.tensors)
    W = data.base_weight().double()
    G = 2.0 * (X @ W.T - Y).T @ X / (X.shape[0] * OUT)
    U, S, Vt = np.linalg.svd(-G.numpy())
    d = np.sqrt(S[:RANK] / S[0]) / math.sqrt(gamma)
    expected_A = d[:, None] * Vt[:RANK]
    expected_B = U[:, :RANK] * d[None, :]
    A = probe.state["model.base_model.model.proj.lora_A.default.weight"].double().numpy()
    B = probe.state["model.base_model.model.proj.lora_B.default.weight"].double().numpy()
    # Singular vectors are defined up to a joint sign per pair.
    signs = np.sign(np.sum(A * expected_A, axis=1))
    np.testing.assert_allclose(A, signs[:, None] * expected_A, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(B, expected_B * signs[None, :], rtol=1e-4, atol=1e-6)
    # B A is the best rank-r part of -G, scaled so that its top singular value is 1 / gamma.
    truncated = (U[:, :RANK] * S[:RANK]) @ Vt[:RANK]
    np.testing.assert_allclose(B @ A, truncated / (gamma * S[0]), rtol=1e-4, atol=1e-7)


def test_lora_one_init_engine_refuses_a_zero_gradient() -> None:
    with pytest.raises(ValueError, match="gradient is zero"):
        lora_one_init(torch.zeros(4, 3), 2, gamma=1.0)
    with pytest.raises(ValueError, match="gamma"):
        lora_one_init(torch.ones(4, 3), 2, gamma=0.0)


def test_oracle_starts_from_the_target_updates_top_directions() -> None:
    data = _data()
    probe = _start(InitMethod.oracle, data)
    A = probe.state["model.base_model.model.proj.lora_A.default.weight"]
    B = probe.state["model.base_model.model.proj.lora_B.default.weight"]
    assert torch.count_nonzero(B) == 0
    _, _, Vh = torch.linalg.svd(data.target_update().double())
    top = Vh[:RANK]
    # Rows of A are the top right singular vectors up to sign and one common scale c.
    c = torch.linalg.matrix_norm(A.double()) / math.sqrt(RANK)
    signs = torch.sign((A.double() * top).sum(dim=1))
    torch.testing.assert_close(A.double(), c * signs[:, None] * top, rtol=1e-4, atol=1e-6)
    # match_init_norm: c keeps the Frobenius norm of peft's default A, drawn with the same seed.
    pl.seed_everything(0, verbose=False)
    default = MatrixRegressionModule(**TASK, lora_rank=RANK).lora_layer().lora_A["default"].weight
    torch.testing.assert_close(torch.linalg.matrix_norm(A), torch.linalg.matrix_norm(default.detach()))


def test_oracle_direction_init_engine_unit_rows() -> None:
    M = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    A, B = oracle_direction_init(M, torch.randn(3, 5), scale="unit")
    torch.testing.assert_close(A @ A.T, torch.eye(3), atol=1e-5, rtol=0)
    _, _, Vh = top_singular_triplets(M, 3)
    torch.testing.assert_close(A, Vh)
    assert B.shape == (7, 3) and torch.count_nonzero(B) == 0


def test_eva_takes_the_inputs_principal_directions_and_keeps_shapes() -> None:
    # Strongly anisotropic inputs, so the top principal subspace is well determined by the sample.
    data = _data(input_condition=1000.0, train_size=256, batch_size=64)
    probe = _start(InitMethod.eva, data)
    A = probe.state["model.base_model.model.proj.lora_A.default.weight"].double()
    assert A.shape == (RANK, IN)
    assert torch.count_nonzero(probe.state["model.base_model.model.proj.lora_B.default.weight"]) == 0
    torch.testing.assert_close(A @ A.T, torch.eye(RANK, dtype=torch.float64), atol=1e-4, rtol=0)
    X = data.train_set.tensors[0].double()
    _, _, Vh = torch.linalg.svd(X - X.mean(dim=0), full_matrices=False)
    overlap = float((A @ Vh[:RANK].T).pow(2).sum()) / RANK  # 1 = the same subspace, r/in for a random one
    assert overlap > 0.9


def test_full_fine_tuning_has_no_adapter_and_trains_w0() -> None:
    module = MatrixRegressionModule(**TASK, init_method=InitMethod.full)
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["model.proj.weight"]
    with pytest.raises(ValueError, match="no LoRA layer"):
        module.lora_layer()


def test_data_driven_inits_leave_the_main_runs_data_order_alone() -> None:
    baseline = _start(InitMethod.lora)
    for method in (InitMethod.lora_one, InitMethod.lora_ga, InitMethod.eva):
        torch.testing.assert_close(_start(method).batch, baseline.batch, rtol=0, atol=0)


def test_methods_are_chosen_by_name_and_bad_options_are_refused() -> None:
    assert LoraInit("pissa").method is InitMethod.pissa
    assert LoraInit(InitMethod.pissa).lora_config_kwargs() == {"init_lora_weights": "pissa"}
    with pytest.raises(HRPConfigurationError, match="init_method must be one of"):
        LoraInit("pissa_niter_4")
    with pytest.raises(HRPConfigurationError, match="takes no init_options"):
        LoraInit("lora", {"preheat_rank": 8})
    with pytest.raises(HRPConfigurationError, match="do not fit HRPPreheatCallback"):
        LoraInit("hrp", {"preheat_rank": 8})  # preheat_steps missing
    with pytest.raises(HRPConfigurationError, match="do not fit LoraOneInit"):
        LoraInit("lora_one", {"rho": 2})
    with pytest.raises(HRPConfigurationError, match="gamma"):
        LoraOneInit(gamma=-1.0)
    with pytest.raises(HRPConfigurationError, match="lora_ga: direction"):
        LoraInit("lora_ga", {"direction": "sideways"})
    with pytest.raises(HRPConfigurationError, match="no LoraConfig"):
        LoraInit("full").lora_config_kwargs()


def test_a_second_initialiser_in_the_trainer_is_refused() -> None:
    hrp = HRPPreheatCallback(preheat_rank=8, preheat_steps=2)
    assert LoraInit("lora").callbacks([hrp]) == []  # HRP on peft's default init: the classic setup
    for method in ("pissa", "lora_one", "hrp"):
        with pytest.raises(HRPConfigurationError, match="would both initialise"):
            LoraInit(method, OPTIONS.get(InitMethod(method))).callbacks([hrp])


def test_pissa_with_an_hrp_callback_fails_the_fit_before_training() -> None:
    module = MatrixRegressionModule(**TASK, lora_rank=RANK, init_method="pissa")
    trainer = cpu_trainer(max_steps=1, callbacks=[HRPPreheatCallback(preheat_rank=8, preheat_steps=2)])
    with pytest.raises(HRPConfigurationError, match="would both initialise"):
        trainer.fit(module, _data())


def test_oracle_refuses_a_task_without_a_known_update() -> None:
    data = _data()

    class PlainData(pl.LightningDataModule):
        def train_dataloader(self):
            return data.train_dataloader()

    module = MatrixRegressionModule(**TASK, lora_rank=RANK, init_method="oracle")
    trainer = cpu_trainer(max_steps=1)
    with pytest.raises(HRPConfigurationError, match="KnownTargetUpdates"):
        trainer.fit(module, PlainData())


def test_lora_ga_refuses_a_rank_above_half_the_layer() -> None:
    module = MatrixRegressionModule(**TASK, lora_rank=7, init_method="lora_ga")
    trainer = cpu_trainer(max_steps=1)
    with pytest.raises(HRPConfigurationError, match="2r <= min"):
        trainer.fit(module, _data())


# --------------------------------------------------------------------------------------------
# On a transformer with padded token batches (the classification recipe, a tiny random BERT)
# --------------------------------------------------------------------------------------------


class FirstBatchLogits(pl.Callback):
    """Eval-mode logits of the first training batch, after every init hook, before the first step."""

    def __init__(self) -> None:
        self.batch: dict[str, Tensor] | None = None
        self.logits: Tensor | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.logits is None:
            pl_module.eval()
            with torch.no_grad():
                self.logits = pl_module(batch).clone()
            pl_module.train()
            self.batch = {k: v.clone() for k, v in batch.items()}


@pytest.mark.parametrize(
    "method", [InitMethod.pissa, InitMethod.lora_ga, InitMethod.eva, InitMethod.lora_one], ids=lambda m: m.value
)
def test_token_models_start_where_the_registry_says(method: InitMethod, tiny_bert_dir: str) -> None:
    from transformers import AutoModelForSequenceClassification

    from lightning_hrp.recipes.classification import SequenceClassifier
    from lightning_hrp.recipes.classification_data import RottenTomatoesDataModule

    data = RottenTomatoesDataModule(train_size=32, val_size=8, test_size=8, tokenizer=tiny_bert_dir, max_length=60, batch_size=8)
    pl.seed_everything(0, verbose=False)
    module = SequenceClassifier(tiny_bert_dir, lora_r=4, init_method=method, init_options=OPTIONS.get(method))
    probe = FirstBatchLogits()
    trainer = cpu_trainer(max_steps=1, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[probe])
    trainer.fit(module, data)
    assert int((probe.batch["attention_mask"] == 0).sum()) > 0  # padded batches: EVA must skip padding
    # The pretrained model with the same classifier head (the head's init is the first draw after the seed).
    pl.seed_everything(0, verbose=False)
    pretrained = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).eval()
    with torch.no_grad():
        expected = pretrained(**{k: v for k, v in probe.batch.items() if k != "labels"}).logits
    if INIT_METHODS[method].keeps_output:
        torch.testing.assert_close(probe.logits, expected, rtol=1e-4, atol=1e-5)
    else:
        assert not torch.allclose(probe.logits, expected, rtol=1e-4, atol=1e-5)


def test_eva_feeds_only_real_tokens_to_the_pca() -> None:
    from lightning_hrp.inits.eva import _layer_input_rows, _token_mask

    hidden = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
    rows = _layer_input_rows((hidden,), _token_mask(batch, None), "layer")
    torch.testing.assert_close(rows, torch.stack([hidden[0, 0], hidden[0, 1], hidden[1, 0]]))
    # Batches without a mask (the regression recipe's tensors): every row counts.
    assert _token_mask((hidden, hidden), None) is None
    assert _layer_input_rows(hidden, None, "layer").shape == (6, 4)


def test_eva_that_does_not_converge_fails_cleanly() -> None:
    # tau = 1 asks for components that stop moving entirely: never met on fresh batches.
    probe_data = _data()
    pl.seed_everything(0, verbose=False)
    module = MatrixRegressionModule(**TASK, lora_rank=RANK, init_method="eva", init_options={"tau": 1.0, "max_batches": 6})
    trainer = cpu_trainer(max_steps=1)
    with pytest.raises(HRPConfigurationError, match="did not converge"):
        trainer.fit(module, probe_data)
    assert not any(m._forward_hooks for m in module.modules())  # peft's hooks are gone


@pytest.mark.parametrize("method", [InitMethod.lora_one, InitMethod.eva, InitMethod.full], ids=lambda m: m.value)
def test_math_sft_recipe_takes_the_init_by_name(method: InitMethod, tiny_llama_dir: str) -> None:
    from lightning_hrp.recipes.math_sft import MathSFTModule
    from lightning_hrp.recipes.math_sft_data import MathSFTDataModule

    pl.seed_everything(0, verbose=False)
    module = MathSFTModule(model_name_or_path=tiny_llama_dir, lora_rank=4, init_method=method, init_options=OPTIONS.get(method))
    data = MathSFTDataModule(model_name_or_path=tiny_llama_dir, train_size=8, val_size=4, test_size=4, batch_size=4, max_length=96)
    trainer = cpu_trainer(max_steps=1, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, data)
    if method is InitMethod.full:
        assert all(p.requires_grad for p in module.parameters())
        return
    report = module.lora_init.callback.report
    assert report is not None and len(report.layers) == 2 * 7  # every projection of both LLaMA layers
    assert report.batches > 0
    if method is InitMethod.lora_one:
        assert sorted(report.singular_values) == sorted(report.layers)  # one gradient spectrum per layer
