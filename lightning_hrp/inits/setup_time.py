"""The base of the data-driven inits: a callback that runs once at ``setup("fit")``, and what they share.

``setup("fit")`` comes after the DataModule is set up and before ``configure_model`` and the
strategy wrap the model, so an init can use the real training data through the module's own
``training_step`` and still see whole weights (PiSSA-like inits and LoRA-GA rewrite base weights,
EVA may reshape adapters: neither must happen to a wrapped model). None falls back to another init.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from lightning_hrp._lightning import batch_to_device, generators_restored, isolated_from_main_run, train_dataloader_at_setup
from lightning_hrp.engine.lora import LoraTarget, find_lora_targets
from lightning_hrp.errors import HRPConfigurationError


@dataclass
class InitReport:
    """What a data-driven init did, for logs and reports."""

    method: str
    seconds: float = 0.0
    batches: int = 0
    layers: list[str] = field(default_factory=list)
    singular_values: dict[str, list[float]] = field(default_factory=dict)


class SetupTimeInit(Callback):
    """Base of the data-driven inits: runs once at ``setup("fit")``, before the strategy wraps the model.

    Subclasses set :attr:`name` (their ``init_method`` value) and implement :meth:`initialise`. The
    global RNG (torch, CUDA, numpy, Python) is forked, so the main run's data order and dropout draws
    are those it would have had without the init; what ``training_step`` logs during the init is
    dropped with the results Lightning resets after setup. In a run resumed with
    ``fit(ckpt_path=...)`` the checkpoint, restored after setup, then replaces every weight the init
    wrote (base weights included), so the resumed run is exact.

    Args:
        adapter_name: The peft adapter to initialise; needed only when the model has several.
    """

    name: ClassVar[str]

    def __init__(self, adapter_name: str | None = None) -> None:
        self.adapter_name = adapter_name
        self.report: InitReport | None = None
        self._finished = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(adapter_name=self.adapter_name)

    def state_dict(self) -> dict[str, Any]:
        return {"finished": self._finished}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._finished = state_dict["finished"]

    def lora_config_kwargs(self) -> dict[str, Any]:
        """``LoraConfig`` arguments this init needs besides ``init_lora_weights`` (none by default)."""
        return {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._finished:
            return
        targets = find_lora_targets(pl_module, self.adapter_name)
        start = time.perf_counter()
        report = InitReport(method=self.name, layers=[t.name for t in targets])
        with _init_context(trainer, pl_module):
            self.initialise(trainer, pl_module, targets, report)
        report.seconds = time.perf_counter() - start
        self.report = report
        self._finished = True
        rank_zero_info(f"{self.name}: initialised {len(targets)} LoRA layers in {report.seconds:.2f} s.")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._finished:
            # setup() always runs first in fit; reaching here uninitialised means the hook was bypassed.
            raise HRPConfigurationError(
                f"The {self.name} init did not run before training; refusing to train from peft's default init."
            )

    def initialise(self, trainer: pl.Trainer, pl_module: pl.LightningModule, targets: list[LoraTarget], report: InitReport) -> None:
        """Write the initial adapter (and, where the method says so, base) weights in place."""
        raise NotImplementedError


def missing_peft_feature(method: str, feature: str) -> HRPConfigurationError:
    """The error for an init whose peft building block the installed peft lacks."""
    import peft

    return HRPConfigurationError(
        f"{method} needs peft's {feature}, which peft {peft.__version__} does not have; install a peft release "
        "that has it (0.21.2 does)."
    )


def training_batches(trainer: pl.Trainer, pl_module: pl.LightningModule, count: int) -> Iterator[Any]:
    """Up to ``count`` batches of a fresh pass over the train dataloader, on the module's device.

    The loader's shuffling generators get their state back afterwards, so the main run's data
    order is the one it would have had without the init.
    """
    loader = train_dataloader_at_setup(trainer)
    produced = 0
    with generators_restored([loader]):
        for batch in loader:
            if produced == count:
                return
            yield batch_to_device(trainer, batch, device=pl_module.device)
            produced += 1
    if produced == 0:
        raise HRPConfigurationError("The train dataloader is empty; a data-driven init has nothing to work on.")
    if produced < count:
        rank_zero_info(f"The train dataloader has {produced} batches, fewer than the {count} asked for; all are used.")


@contextmanager
def only_trainable(module: nn.Module, params: Sequence[Tensor]) -> Iterator[None]:
    """Gradients for ``params`` only (the others keep their flags), so backward does no extra work."""
    flags = {p: p.requires_grad for p in module.parameters()}
    wanted = {id(p) for p in params}
    try:
        for p in module.parameters():
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None


@contextmanager
def _init_context(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Compute on the strategy's device where it is safe to move the whole model there, in training mode; leave no trace."""
    if isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
        # The strategy moves the module to this device right after setup anyway.
        pl_module.to(trainer.strategy.root_device)
    training = pl_module.training
    pl_module.train()
    try:
        with isolated_from_main_run(trainer, pl_module):
            yield
    finally:
        pl_module.train(training)
