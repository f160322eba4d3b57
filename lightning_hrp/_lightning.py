"""Every Lightning internal lightning-hrp relies on, in one place, each done one way.

The callback (:mod:`lightning_hrp.callback`) and the setup-time inits (:mod:`lightning_hrp.inits`)
move batches, call ``training_step``, read its loss, isolate their work from the main run and log
through these helpers only. Several reach into Lightning's private API (marked ``private``), which
is why ``pyproject.toml`` pins ``lightning`` to the minor series the tests run on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.logger import _add_prefix
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.precision import FSDPPrecision, MixedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import RandomSampler

from lightning_hrp.engine.batches import (  # generators_restored: for lightning_hrp.inits
    generator_states,
    generators_restored,
    restore_generator_states,
    samplers_drawn_at_creation,
    with_own_workers,
)
from lightning_hrp.engine.isolation import interrupts_deferred, isolated_rng
from lightning_hrp.errors import HRPConfigurationError
from lightning_hrp.options import initial_learning_rate
from lightning_hrp.report import PREHEAT_STEP


def batch_to_device(trainer: pl.Trainer, batch: Any, *, device: torch.device | None = None) -> Any:
    """A training batch moved as Lightning's training loop moves it.

    Precision conversion, the module's ``on_before_batch_transfer`` / ``transfer_batch_to_device`` /
    ``on_after_batch_transfer`` hooks, then the strategy's ``batch_to_device`` (to ``device``, by
    default the strategy's root device).
    """
    batch = trainer.precision_plugin.convert_input(batch)
    batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=0)  # private
    return call._call_strategy_hook(trainer, "batch_to_device", batch, dataloader_idx=0, device=device)  # private


def training_step(trainer: pl.Trainer, batch: Any, batch_idx: int) -> Any:
    """The module's ``training_step`` as the strategy runs it, except that DDP's wrapper is not entered.

    DDP's forward would broadcast buffers and arm its gradient reducer, collectives that a rank
    failing before its forward never joins; HRP needs neither (its own adapters are averaged by
    its own all-reduce, the main run's parameters get no gradient while preheating). The precision
    plugin's autocast applies either way. Other strategies (FSDP, whose forward must all-gather the
    shards) run through the strategy.
    """
    if isinstance(trainer.strategy.model, DistributedDataParallel):
        with trainer.precision_plugin.train_step_context():
            return call._call_lightning_module_hook(trainer, "training_step", batch, batch_idx)  # private
    return call._call_strategy_hook(trainer, "training_step", batch, batch_idx)  # private


def check_preheats_through_training_step(trainer: pl.Trainer, pl_module: pl.LightningModule, entry_point: str) -> None:
    """Refuse what feeding ``training_step`` HRP's own batches and optimizer cannot do.

    Raises:
        HRPConfigurationError: DeepSpeed, manual optimization, or a ``training_step(dataloader_iter)``.
    """
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        raise HRPConfigurationError(
            f"{entry_point} does not support DeepSpeed: ZeRO partitions the LoRA weights outside "
            "torch.distributed's DTensor/FSDP APIs that HRP writes through. Use strategy='ddp', 'fsdp' "
            "or ModelParallelStrategy."
        )
    if not pl_module.automatic_optimization:
        raise HRPConfigurationError(
            f"{entry_point} needs automatic optimization: with manual optimization the training_step would step "
            f"the main optimizers during preheating. Set self.automatic_optimization = True or drop {entry_point}."
        )
    if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
        raise HRPConfigurationError(
            f"{entry_point} feeds training_step one batch at a time; a training_step(dataloader_iter) would draw "
            f"the main run's batches itself. Take (batch, batch_idx) or drop {entry_point}."
        )


def preheat_loss(trainer: pl.Trainer, batch: Any, batch_idx: int) -> Tensor | None:
    """The loss of ``training_step`` on a preheat batch; ``None`` skips the batch (a ``None`` batch, as Lightning's loop does)."""
    if batch is None:
        return None
    return loss_of(training_step(trainer, batch, batch_idx), "HRP")


def loss_of(output: Any, who: str) -> Tensor | None:
    """The loss in a ``training_step`` output, as Lightning's automatic optimization reads it.

    Args:
        output: What ``training_step`` returned.
        who: Names the caller in the error message.

    Returns:
        The loss tensor, or ``None`` for a skipped batch.

    Raises:
        HRPConfigurationError: A dict without ``"loss"``, or any other type.
    """
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        if "loss" in output:
            return output["loss"]
        raise HRPConfigurationError(
            f"{who}: training_step returned a dict without the key 'loss' (keys: {sorted(map(str, output))}); "
            "return the loss tensor, a dict with 'loss', or None to skip the batch."
        )
    raise HRPConfigurationError(
        f"{who}: training_step returned {type(output).__name__}; it must return the loss tensor, a dict with "
        "'loss', or None to skip the batch."
    )


def grad_scaler(trainer: pl.Trainer) -> Any | None:
    """The precision plugin's gradient scaler (16-mixed on CUDA, or one passed in), else ``None``."""
    precision = trainer.precision_plugin
    return precision.scaler if isinstance(precision, (MixedPrecision, FSDPPrecision)) else None


@contextmanager
def isolated_from_main_run(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Leave no trace of the block in the main run.

    What ``training_step`` logs with ``self.log`` goes to a throwaway collection; the grad scaler's
    state (16-mixed) and every RNG the main run draws from (torch CPU and CUDA, NumPy, Python) are
    restored; every gradient of the module is dropped. The restore completes even under a second Ctrl-C.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    main_results = epoch_loop._results  # private
    epoch_loop._results = _ResultCollection(training=True)  # private
    scaler = grad_scaler(trainer)
    scaler_state = scaler.state_dict() if scaler is not None else None
    cuda_devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    try:
        with isolated_rng(cuda_devices):
            yield
    finally:
        with interrupts_deferred():
            epoch_loop._results = main_results
            if scaler is not None:
                scaler.load_state_dict(scaler_state)
            pl_module.zero_grad(set_to_none=True)


class MainRunBatches:
    """The batches the main run's first epoch sees, from iterators of HRP's own, cycled; close when done.

    The same dataloaders the fit loop set up (after ``limit_train_batches``, ``fast_dev_run``,
    ``overfit_batches`` and the distributed sampler), combined in the same ``CombinedLoader`` mode,
    and ``trainer.num_training_batches`` of them per pass. The main run's own iteration is left
    alone: a DataLoader with persistent workers is iterated through a copy with workers of its own
    (its iterator would otherwise be the main run's), and the state of every torch.Generator the
    loaders shuffle with is restored on :meth:`close`.

    Raises:
        HRPConfigurationError: No train dataloader, a ``"sequential"`` CombinedLoader (Lightning's
            training loop refuses it too), or a one-shot iterator as the train data.
    """

    def __init__(
        self, trainer: pl.Trainer, rng_at_fit_start: Tensor | None = None, info: Callable[[str], None] = rank_zero_info
    ) -> None:
        main: CombinedLoader | None = trainer.fit_loop._combined_loader  # private
        if main is None:
            raise HRPConfigurationError("HRP needs a train dataloader to preheat on; none is set for this fit.")
        mode = main._mode  # private
        if mode == "sequential":
            raise HRPConfigurationError(
                "The train data is a CombinedLoader in mode 'sequential', which Lightning's training loop does "
                "not support; use 'max_size_cycle', 'min_size' or 'max_size'."
            )
        one_shot = [type(it).__name__ for it in main.flattened if isinstance(it, Iterator)]
        if one_shot:
            raise HRPConfigurationError(
                f"The train data includes a one-shot iterator ({one_shot[0]}); HRP would consume the main run's "
                "batches from it. Return a DataLoader or another re-iterable."
            )
        self._generator_states = generator_states(main.flattened)
        self._combined = CombinedLoader(main.iterables, mode)
        self._combined.flattened = [with_own_workers(loader) for loader in main.flattened]
        self._combined.limits = main.limits
        self.per_pass = trainer.num_training_batches
        self._rng_at_fit_start = rng_at_fit_start
        self._info = info

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        """``(batch, batch_idx)`` pairs, ``batch_idx`` counting from 0 in each pass, as in an epoch."""
        first_pass = True
        while True:
            produced = 0
            # CombinedLoader.__iter__ returns the loader itself and a second iter() starts it over: step it with next().
            iterator = self._first_epochs_iterator() if first_pass else iter(self._combined)
            first_pass = False
            for batch, batch_idx, _ in _stepped(iterator):
                yield batch, batch_idx
                produced += 1
                if produced >= self.per_pass:
                    break
            if produced == 0:
                raise HRPConfigurationError("The train dataloader is empty; HRP has nothing to preheat on.")

    def _first_epochs_iterator(self) -> Iterator[Any]:
        """An iterator whose random sampler draws the permutation the main run's first epoch will draw.

        The fit loop created the main run's iterator before ``on_train_start`` (``setup_data``): that drew the
        workers' base seed from the global RNG (or the loader's generator), while its ``RandomSampler`` draws
        its seed at the first batch, after HRP. Creating this iterator draws a base seed too; putting those
        RNG states back before its first batch lets its sampler draw the very seed the main run's will.
        """
        global_state = torch.get_rng_state()
        loader_states = generator_states(self._combined.flattened)
        drawn_at_creation = samplers_drawn_at_creation(self._combined.flattened)
        iterator = self._replayed_iterator(global_state, drawn_at_creation) if drawn_at_creation else None
        if iterator is None:
            iterator = iter(self._combined)
            torch.set_rng_state(global_state)
        restore_generator_states(loader_states)
        return iterator

    def _replayed_iterator(self, global_state: Tensor, samplers: list[RandomSampler]) -> Iterator[Any] | None:
        """With worker processes, an iterator created from the global RNG state the main run's was created from.

        Such a loader's ``RandomSampler`` drew the first epoch's permutation when ``setup_data`` created the
        main run's iterator, before ``on_train_start``. The state at ``on_fit_start`` is that state (the
        sanity check in between runs RNG-isolated) unless user code drew in between: this iterator ending
        at the state the main run's left proves it drew the same. ``None`` (after a message saying that
        preheating reads another permutation) where that cannot be done.
        """
        reason = None
        if any(s.generator is not None for s in samplers):
            reason = "it shuffles with its own torch.Generator, whose earlier state HRP cannot know"
        elif self._rng_at_fit_start is None:
            reason = "the global RNG state before it was not recorded (on_fit_start)"
        else:
            torch.set_rng_state(self._rng_at_fit_start)
            iterator = iter(self._combined)
            if torch.equal(torch.get_rng_state(), global_state):
                return iterator
            self._combined.reset()  # shuts down the workers it started
            torch.set_rng_state(global_state)
            reason = "something drew from the global RNG between on_fit_start and the fit loop's setup_data"
        self._info(
            "HRP: the train dataloader shuffles in worker processes (num_workers > 0), so the main run's first-epoch "
            f"permutation was drawn before on_train_start, and {reason}: preheating reads another permutation of the "
            "same training data, not the first epoch's batches. num_workers=0, or a DistributedSampler (its order is "
            "set by its seed and epoch), gives preheating the first epoch's batches."
        )
        return None

    def close(self) -> None:
        """Shut down the worker processes HRP started; give the shuffling generators back their state."""
        self._combined.reset()
        restore_generator_states(self._generator_states)


def _stepped(iterator: Iterator[Any]) -> Iterator[Any]:
    """``iterator``'s items by ``next`` alone (a ``for`` loop would call ``iter`` on it once more)."""
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return


def define_preheat_step_axis(trainer: pl.Trainer, metrics: Sequence[str]) -> None:
    """Chart ``metrics`` against :data:`PREHEAT_STEP` in every W&B run instead of the trainer's global step."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger):
            continue
        define_metric = getattr(logger.experiment, "define_metric", None)  # absent on a disabled run
        if define_metric is None:
            continue
        prefixed = list(_add_prefix(dict.fromkeys([PREHEAT_STEP, *metrics], 0.0), logger._prefix, logger.LOGGER_JOIN_CHAR))  # private
        define_metric(prefixed[0])
        for name in prefixed[1:]:
            define_metric(name, step_metric=prefixed[0])


def log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Send ``metrics`` to every logger, from rank 0 only."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(dict(metrics), step=step)


def train_dataloader_at_setup(trainer: pl.Trainer) -> Any:
    """The train dataloader as the module or DataModule returns it, before the fit loop sets it up."""
    loader = trainer.fit_loop._data_source.dataloader()  # private
    if loader is None:
        raise HRPConfigurationError("A data-driven init needs a train dataloader; this fit has none.")
    return loader


def train_dataloader_sharded_at_setup(trainer: pl.Trainer) -> Any:
    """The train dataloader at setup, with the distributed sampler the fit loop will give it (each rank its share).

    What the main run's first epoch reads, on every rank, before the fit loop has set up its data.
    """
    loader = train_dataloader_at_setup(trainer)
    return trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)  # private


def configured_learning_rate(pl_module: pl.LightningModule) -> float:
    """The initial learning rate of the first optimizer ``configure_optimizers`` returns, built and dropped.

    For a setup-time init, before the strategy builds the optimizers: Lightning parses the hook's
    output as it will later (optimizer, dict or lists; schedulers too).
    """
    optimizers, _ = _init_optimizers_and_lr_schedulers(pl_module)  # private
    if not optimizers:
        raise HRPConfigurationError("configure_optimizers returned no optimizer to take the preheat learning rate from; give preheat_lr.")
    return initial_learning_rate(optimizers[0])
