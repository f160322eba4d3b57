"""The multi-layer matrix regression recipe: heads whose true updates have known, different ranks."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_hrp.recipes.multi_layer_regression import MultiLayerRegressionDataModule, MultiLayerRegressionModule
from modules import cpu_trainer

TASK = dict(in_features=12, out_features=10, task_seed=2)
SIZES = dict(train_size=32, val_size=16, test_size=16, batch_size=16)


def test_each_head_has_an_update_of_its_rank_and_the_task_is_seeded():
    data = MultiLayerRegressionDataModule(**TASK, update_ranks=[1, 3, 5], update_scale=2.0, spectrum_decay=1.0, **SIZES)
    again = MultiLayerRegressionDataModule(**TASK, update_ranks=[1, 3, 5], update_scale=2.0, spectrum_decay=1.0, **SIZES)
    updates = data.target_updates()
    assert list(updates) == ["heads.0", "heads.1", "heads.2"]
    for update, rank in zip(updates.values(), [1, 3, 5]):
        singular_values = torch.linalg.svdvals(update.double())
        expected = 2.0 / torch.arange(1, rank + 1, dtype=torch.float64)
        torch.testing.assert_close(singular_values[:rank], expected, rtol=1e-5, atol=1e-6)
        assert singular_values[rank:].max() < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(data.train_set.tensors, again.train_set.tensors))
    # The targets are the heads' outputs side by side, with the module's W0_i.
    module = MultiLayerRegressionModule(**TASK, heads=3)
    inputs, targets = data.test_set.tensors
    weights = torch.cat([module.model.get_submodule(f"base_model.model.heads.{i}").base_layer.weight + m for i, m in enumerate(updates.values())])
    assert (targets - inputs @ weights.T).std() == pytest.approx(0.1, rel=0.1)  # the label noise only


def test_a_module_with_another_number_of_heads_is_refused():
    data = MultiLayerRegressionDataModule(**TASK, update_ranks=[1, 2], **SIZES)
    module = MultiLayerRegressionModule(**TASK, heads=3)
    with pytest.raises(ValueError, match="heads"):
        cpu_trainer(max_steps=1).fit(module, data)


def test_lora_on_every_head_trains():
    data = MultiLayerRegressionDataModule(**TASK, update_ranks=[1, 2], **SIZES)
    pl.seed_everything(0, verbose=False)
    module = MultiLayerRegressionModule(**TASK, heads=2, lora_rank=2, learning_rate=0.05)
    trainer = cpu_trainer(max_epochs=4, num_sanity_val_steps=0)
    before = trainer.validate(module, data, verbose=False)[0]["val/loss"]
    trainer.fit(module, data)
    assert trainer.validate(module, data, verbose=False)[0]["val/loss"] < before
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all("lora_" in name for name in trainable)
