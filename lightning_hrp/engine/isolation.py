"""Leaving the main run exactly as it was: no gradients, no synchronisation, RNGs and buffers restored,
and restores that complete even under a second Ctrl-C. Plain torch, shared by every entry point."""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn

from lightning_hrp.engine.distributed import forget_abandoned_fsdp1_forwards, gradient_sync_disabled, write_lora_weights
from lightning_hrp.engine.lora import LoraTarget


class RestoreFailedError(RuntimeError):
    """Writing the original adapters back after a failure failed: the model may hold preheated values.

    Never a reason to train on: no ``on_failure`` setting swallows it.
    """


@contextmanager
def main_run_untouched(model: nn.Module, trained: Sequence[Tensor] = ()) -> Iterator[None]:
    """No gradient for ``model``'s parameters, no gradient synchronisation, buffers restored afterwards.

    Every parameter's ``requires_grad`` is switched off (except for ``trained``, the module's other
    parameters that preheating trains with ``other_params``; their values are the caller's to keep
    or restore) and restored exactly on exit (under FSDP1 the registered parameters are the ones
    FSDP reads its flags from; FSDP2 copies the sharded parameter's flag to the unsharded one at
    every all-gather), then every gradient is dropped. The restore completes even under a second Ctrl-C.
    """
    params = list(dict.fromkeys(model.parameters()))
    flags = [p.requires_grad for p in params]
    buffers = [(b, b.detach().clone()) for b in dict.fromkeys(model.buffers())]
    keep = {id(p) for p in trained}
    try:
        for p in params:
            p.requires_grad_(id(p) in keep)
        with gradient_sync_disabled(model):
            yield
    finally:
        with interrupts_deferred(), torch.no_grad():
            forget_abandoned_fsdp1_forwards(model)
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
            for buffer, saved in buffers:
                if buffer.shape == saved.shape:
                    buffer.copy_(saved)
            model.zero_grad(set_to_none=True)


@torch.no_grad()
def restore_values(saved: Sequence[tuple[Tensor, Tensor]]) -> None:
    """Copy each saved value back into its (plain, unsharded) tensor, bit for bit."""
    for tensor, value in saved:
        tensor.copy_(value)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) until the block finishes, then deliver it to the handler it had.

    Restores must complete: a second Ctrl-C during one would otherwise leave it half done. Signal
    handlers can only be set from the main thread (and only replaced where Python installed the
    current one); elsewhere the block runs unprotected.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)


@contextmanager
def isolated_rng(cuda_devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Leave every RNG the main run draws from as it was: torch (CPU and ``cuda_devices``), NumPy, Python."""
    torch_state = torch.get_rng_state()
    cuda_states = [(device, torch.cuda.get_rng_state(device)) for device in cuda_devices]
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        with interrupts_deferred():
            torch.set_rng_state(torch_state)
            for device, state in cuda_states:
                torch.cuda.set_rng_state(state, device)
            np.random.set_state(numpy_state)
            random.setstate(python_state)


@contextmanager
def restored_on_failure(
    root: nn.Module,
    targets: Sequence[LoraTarget],
    originals: Sequence[tuple[Tensor, Tensor]],
    others: Sequence[tuple[Tensor, Tensor]] = (),
) -> Iterator[list[Callable[[], None]]]:
    """On any exception (interrupts included), write ``originals`` back into the targets before it propagates.

    Also ``others``: ``(parameter, saved value)`` pairs of plain (unsharded) parameters that
    preheating trained, copied back. A collective under FSDP1, like the write it undoes. The
    restore completes even under a second Ctrl-C.

    Yields:
        A list the block appends undo steps to (e.g. putting back adapters it resized); on failure they
        run last first, before ``originals`` are written (which need the adapters' old shapes).
    """
    undo_steps: list[Callable[[], None]] = []
    try:
        yield undo_steps
    except BaseException as error:
        with interrupts_deferred():
            try:
                for undo in reversed(undo_steps):
                    undo()
                restore_values(others)
                write_lora_weights(root, targets, originals)
            except Exception as restore_error:
                raise RestoreFailedError(
                    f"restoring the LoRA adapters after {type(error).__name__} ({error}) failed: {restore_error}"
                ) from error
        raise
