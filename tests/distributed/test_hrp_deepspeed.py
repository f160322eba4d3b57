"""HRP refuses DeepSpeed with a clear message, before anything is preheated."""

from __future__ import annotations

import importlib.util

import lightning.pytorch as pl
import pytest

from hrp_dist_toy import ToyLoRARegression, hrp_callback
from lightning_hrp import HRPConfigurationError


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed, and Lightning's DeepSpeedStrategy cannot be constructed without it "
    "(MisconfigurationException in its __init__), so neither a Trainer nor a strategy instance can reach the check",
)
def test_deepspeed_is_refused_at_setup_with_the_alternatives_named() -> None:
    trainer = pl.Trainer(
        strategy="deepspeed_stage_3",
        accelerator="auto",
        devices=1,
        max_steps=1,
        callbacks=[hrp_callback()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    with pytest.raises(HRPConfigurationError, match="does not support DeepSpeed") as refused:
        trainer.fit(ToyLoRARegression(batch_size=4))
    assert "strategy='ddp'" in str(refused.value) and "ModelParallelStrategy" in str(refused.value)
