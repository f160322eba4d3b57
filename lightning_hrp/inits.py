"""LoRA initialisations by name, for fair comparisons with HRP: a registry and the Lightning glue.

Every recipe takes ``init_method`` (an :class:`InitMethod`) and ``init_options`` (that method's
keyword options) and hands both to :class:`LoraInit`, which checks them at once and says how to
build the peft ``LoraConfig`` and which callbacks to attach. The methods:

==============  ====================================================================================
``lora``        peft's default: ``A`` Kaiming-uniform, ``B = 0``. Hu et al., "LoRA: Low-Rank
                Adaptation of Large Language Models", arXiv 2106.09685.
``gaussian``    ``A ~ N(0, 1/r)``, ``B = 0`` (peft's ``"gaussian"``; the paper's random Gaussian ``A``).
                arXiv 2106.09685.
``pissa``       ``A``, ``B`` from the top-r SVD of the pretrained weight, which keeps only the residual.
                Meng, Wang, Zhang, "PiSSA: Principal Singular Values and Singular Vectors Adaptation
                of Large Language Models", arXiv 2404.02948 (peft's ``"pissa"``).
``olora``       ``A``, ``B`` from a QR decomposition of the pretrained weight, which keeps the residual.
                Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models",
                arXiv 2406.01775 (peft's ``"olora"``).
``lora_ga``     SVD of the averaged full gradient of the loss w.r.t. each frozen weight; the weight
                keeps ``W - s B A``. Wang, Yu, Li, "LoRA-GA: Low-Rank Adaptation with Gradient
                Approximation", arXiv 2407.05000 (peft 0.21's ``LoraLayer.lora_ga_init`` on a
                gradient estimated here with the module's own ``training_step``).
``eva``         ``A`` = the top-r right singular vectors of each layer's *inputs* on training batches
                (incremental PCA), ``B = 0``. Paischer et al., "One Initialization to Rule them All:
                Fine-tuning via Explained Variance Adaptation", arXiv 2410.07170 (peft's
                ``initialize_lora_eva_weights``, with ``rho = 1`` so no rank moves between layers and
                no shape changes).
``lora_one``    One step of full-batch gradient descent, restricted to its best rank-r part, as the
                start: see :func:`lightning_hrp.engine.baselines.lora_one_init`. Zhang, Liu, Chen,
                "One-step full gradient suffices for low-rank fine-tuning, provably and
                efficiently", arXiv 2502.01235.
``hrp``         High-Rank Preheating (:class:`lightning_hrp.HRPPreheatCallback`, its options as
                ``init_options``). Chen et al., arXiv 2502.07739.
``full``        Full fine-tuning, no LoRA: the upper reference of what the adapters approximate.
``oracle``      The known target update's own top-r right singular vectors (``B = 0``): the best start
                HRP's direction rule can hope for. Only for tasks whose DataModule knows the true
                update (:class:`KnownTargetUpdates`), i.e. the matrix-regression recipe.
==============  ====================================================================================

The data-driven ones (``lora_ga``, ``eva``, ``lora_one``, ``oracle``) are callbacks that run once,
at ``setup("fit")``: after the DataModule is set up and before ``configure_model`` and the
strategy wrap the model, on the real training data through the module's own ``training_step``
(PiSSA, LoRA-GA and EVA need whole weights and may change shapes or base weights, which must not
happen to a wrapped model). None falls back to another init: a failure raises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from peft import PeftModel
from torch import Tensor, nn

from lightning_hrp._lightning import (
    batch_to_device,
    generators_restored,
    isolated_from_main_run,
    loss_of,
    train_dataloader_at_setup,
    training_step,
)
from lightning_hrp.callback import HRPPreheatCallback
from lightning_hrp.engine.baselines import lora_one_init, oracle_direction_init
from lightning_hrp.engine.distributed import all_reduce_mean_
from lightning_hrp.engine.init_rules import DirectionScale
from lightning_hrp.engine.lora import LoraTarget, find_lora_targets
from lightning_hrp.errors import HRPConfigurationError

log = logging.getLogger(__name__)


class InitMethod(str, Enum):
    """The LoRA initialisations a recipe can start from (see the module docstring for papers)."""

    lora = "lora"
    gaussian = "gaussian"
    pissa = "pissa"
    olora = "olora"
    lora_ga = "lora_ga"
    eva = "eva"
    lora_one = "lora_one"
    hrp = "hrp"
    full = "full"
    oracle = "oracle"


@dataclass(frozen=True)
class InitMethodInfo:
    """What one initialisation does, for docs, reports and the tests that hold it to its promises.

    Attributes:
        paper: Reference (authors, title, arXiv id).
        rule: One line on how the adapter starts.
        uses_lora: False only for full fine-tuning.
        keeps_output: The model's output right after the init equals the pretrained model's
            (up to float rounding where base weights are rewritten).
        changes_base_weights: The frozen weights are rewritten (PiSSA, OLoRA, LoRA-GA keep the residual).
        data_driven: Needs training batches (or, for the oracle, the task's ground truth).
    """

    paper: str
    rule: str
    uses_lora: bool = True
    keeps_output: bool = True
    changes_base_weights: bool = False
    data_driven: bool = False


INIT_METHODS: dict[InitMethod, InitMethodInfo] = {
    InitMethod.lora: InitMethodInfo(
        "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, arXiv 2106.09685",
        "A Kaiming-uniform (peft's default), B = 0",
    ),
    InitMethod.gaussian: InitMethodInfo(
        "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, arXiv 2106.09685",
        "A ~ N(0, 1/r), B = 0 (peft's 'gaussian')",
    ),
    InitMethod.pissa: InitMethodInfo(
        "Meng, Wang, Zhang, PiSSA: Principal Singular Values and Singular Vectors Adaptation of LLMs, arXiv 2404.02948",
        "B A = top-r SVD part of W0; W0 keeps the residual (peft's 'pissa')",
        changes_base_weights=True,
    ),
    InitMethod.olora: InitMethodInfo(
        "Büyükakyüz, OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models, arXiv 2406.01775",
        "B A from the QR decomposition of W0; W0 keeps the residual (peft's 'olora')",
        changes_base_weights=True,
    ),
    InitMethod.lora_ga: InitMethodInfo(
        "Wang, Yu, Li, LoRA-GA: Low-Rank Adaptation with Gradient Approximation, arXiv 2407.05000",
        "A, B from the SVD of the averaged full gradient; W0 keeps W0 - s B A (peft's lora_ga_init)",
        changes_base_weights=True,
        data_driven=True,
    ),
    InitMethod.eva: InitMethodInfo(
        "Paischer et al., One Initialization to Rule them All: Explained Variance Adaptation, arXiv 2410.07170",
        "A = top-r right singular vectors of the layer inputs, B = 0 (peft's EVA, rho = 1)",
        data_driven=True,
    ),
    InitMethod.lora_one: InitMethodInfo(
        "Zhang, Liu, Chen, One-step full gradient suffices for low-rank fine-tuning, arXiv 2502.01235",
        "s B A = one rank-r step of full-batch gradient descent (A from V_r, B from U_r of -G)",
        keeps_output=False,
        data_driven=True,
    ),
    InitMethod.hrp: InitMethodInfo(
        "Chen et al., HRP: High-Rank Preheating for Superior LoRA Initialization, arXiv 2502.07739",
        "A = c V_r^T of a preheated rank-R update, B = 0 (HRPPreheatCallback)",
        data_driven=True,
    ),
    InitMethod.full: InitMethodInfo(
        "full fine-tuning (no adapter), the reference LoRA approximates",
        "every weight trained, no LoRA",
        uses_lora=False,
    ),
    InitMethod.oracle: InitMethodInfo(
        "the known target update's top-r right singular vectors (HRP spec section 1), an upper reference",
        "A = c V_r(M)^T, B = 0, M the true update",
        data_driven=True,
    ),
}

# The value of LoraConfig(init_lora_weights=...) each LoRA method builds its adapters with. The
# callback-based methods start from peft's default and overwrite it (HRP's "match_init_norm" and
# the oracle's reuse its norm); EVA needs peft's "eva", which leaves B = 0 for its callback to fill A.
_PEFT_INIT: dict[InitMethod, bool | str] = {
    InitMethod.lora: True,
    InitMethod.gaussian: "gaussian",
    InitMethod.pissa: "pissa",
    InitMethod.olora: "olora",
    InitMethod.lora_ga: True,
    InitMethod.eva: "eva",
    InitMethod.lora_one: True,
    InitMethod.hrp: True,
    InitMethod.oracle: True,
}


class KnownTargetUpdates:
    """Mixin for a DataModule whose task has a known ground-truth weight update (synthetic tasks).

    The ``oracle`` initialisation reads it. Subclasses implement :meth:`target_updates`.
    """

    def target_updates(self) -> Mapping[str, Tensor]:
        """The true update ``M = W_target - W0`` ``(out, in)`` per LoRA target, keyed by module name.

        A key matches the LoRA layer whose name equals it or ends with ``"." + key`` (e.g. ``"proj"``).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement target_updates() to serve the oracle init.")


# --------------------------------------------------------------------------------------------
# Setup-time initialisation callbacks
# --------------------------------------------------------------------------------------------


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

    Subclasses implement :meth:`initialise`. The global RNG (torch, CUDA, numpy, Python) is forked,
    so the main run's data order and dropout draws are those it would have had without the init;
    what ``training_step`` logs during the init is dropped with the results Lightning resets after
    setup. In a run resumed with ``fit(ckpt_path=...)`` the checkpoint, restored after setup, then
    replaces every weight the init wrote (base weights included), so the resumed run is exact.

    Args:
        adapter_name: The peft adapter to initialise; needed only when the model has several.
    """

    method: ClassVar[InitMethod]

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

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._finished:
            return
        targets = find_lora_targets(pl_module, self.adapter_name)
        start = time.perf_counter()
        report = InitReport(method=self.method.value, layers=[t.name for t in targets])
        with _init_context(trainer, pl_module):
            self.initialise(trainer, pl_module, targets, report)
        report.seconds = time.perf_counter() - start
        self.report = report
        self._finished = True
        rank_zero_info(f"{self.method.value}: initialised {len(targets)} LoRA layers in {report.seconds:.2f} s.")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._finished:
            # setup() always runs first in fit; reaching here uninitialised means the hook was bypassed.
            raise HRPConfigurationError(
                f"The {self.method.value} init did not run before training; refusing to train from peft's default init."
            )

    def initialise(self, trainer: pl.Trainer, pl_module: pl.LightningModule, targets: list[LoraTarget], report: InitReport) -> None:
        """Write the initial adapter (and, where the method says so, base) weights in place."""
        raise NotImplementedError


class _GradientInit(SetupTimeInit):
    """Shared by LoRA-GA and LoRA-One: the mean gradient of the training loss w.r.t. each frozen base weight."""

    def __init__(self, gradient_batches: int = 8, adapter_name: str | None = None) -> None:
        super().__init__(adapter_name)
        if isinstance(gradient_batches, bool) or not isinstance(gradient_batches, int) or gradient_batches < 1:
            raise HRPConfigurationError(f"gradient_batches must be an integer >= 1, got {gradient_batches!r}.")
        self.gradient_batches = gradient_batches

    def base_weight_gradients(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, targets: list[LoraTarget], report: InitReport
    ) -> list[Tensor]:
        """``(out, in)`` gradients, averaged over ``gradient_batches`` training batches (and over ranks)."""
        weights = [t.layer.get_base_layer().weight for t in targets]
        for target, weight in zip(targets, weights):
            if getattr(target.layer, "fan_in_fan_out", False) or weight.shape != (target.out_features, target.in_features):
                raise HRPConfigurationError(
                    f"{self.method.value} supports LoRA on nn.Linear weights (out, in); {target.name} has "
                    f"{tuple(weight.shape)} (Conv1D or fan_in_fan_out). Leave it out of target_modules."
                )
        sums = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
        with _only_trainable(pl_module, weights), torch.enable_grad():
            count = 0
            for batch_idx, batch in enumerate(_training_batches(trainer, pl_module, self.gradient_batches)):
                loss = loss_of(training_step(trainer, batch, batch_idx), self.method.value)
                if loss is None:
                    continue
                loss.backward()
                for total, weight in zip(sums, weights):
                    if weight.grad is None:
                        raise HRPConfigurationError(
                            f"{self.method.value}: the loss has no gradient w.r.t. a LoRA target's base weight "
                            f"({targets[weights.index(weight)].name}); is the layer used in training_step?"
                        )
                    total += weight.grad.float()
                    weight.grad = None
                count += 1
        if count == 0:
            raise HRPConfigurationError(f"{self.method.value}: training_step skipped every batch; no gradient to start from.")
        report.batches = count
        gradients = [total / count for total in sums]
        all_reduce_mean_(gradients)
        return gradients


class LoraOneInit(_GradientInit):
    """LoRA-One (arXiv 2502.01235): start from one rank-r step of full-batch gradient descent.

    ``G`` is the gradient of the module's training loss w.r.t. each frozen base weight, averaged
    over ``gradient_batches`` training batches. Then, with ``-G = U S V^T``,
    ``A = diag(sqrt(S_r/S_1)) V_r^T / sqrt(gamma)`` and ``B = U_r diag(sqrt(S_r/S_1)) / sqrt(gamma)``
    (:func:`lightning_hrp.engine.baselines.lora_one_init`). The base weights are not changed, so the
    output moves by ``s B A`` from the start, as in LoRA-One.

    Args:
        gamma: LoRA-One's ``stable_gamma`` (the authors' default 128); the first step's top singular
            value is ``s / gamma``.
        gradient_batches: Training batches the gradient is averaged over (the authors use 8-64 examples).
        adapter_name: See :class:`SetupTimeInit`.
    """

    method = InitMethod.lora_one

    def __init__(self, gamma: float = 128.0, gradient_batches: int = 8, adapter_name: str | None = None) -> None:
        super().__init__(gradient_batches, adapter_name)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
            raise HRPConfigurationError(f"gamma must be a positive number, got {gamma!r}.")
        self.gamma = float(gamma)

    def initialise(self, trainer: pl.Trainer, pl_module: pl.LightningModule, targets: list[LoraTarget], report: InitReport) -> None:
        gradients = self.base_weight_gradients(trainer, pl_module, targets, report)
        with torch.no_grad():
            for target, gradient in zip(targets, gradients):
                A, B = lora_one_init(gradient, target.rank, gamma=self.gamma)
                target.lora_A.copy_(A)
                target.lora_B.copy_(B)
                report.singular_values[target.name] = torch.linalg.svdvals(gradient).tolist()


class LoraGAInit(_GradientInit):
    """LoRA-GA (arXiv 2407.05000) through peft's own ``LoraLayer.lora_ga_init``.

    peft's ``preprocess_loraga`` must run before ``get_peft_model``, when a Lightning recipe has no
    data yet; this callback does its two halves on the built model instead: it averages the gradient
    of the module's training loss w.r.t. each frozen base weight over ``gradient_batches`` batches
    (what peft's ``estimate_gradients`` does) and hands it to ``lora_ga_init``, which sets ``A``, ``B``
    from its SVD and rewrites the base weight to ``W - s B A`` (so the output is unchanged).

    Args:
        direction: peft ``LoraGAConfig.direction`` (``"ArB2r"``, the paper's choice, by default).
        scale: peft ``LoraGAConfig.scale`` (``"stable"``, ``"weight_svd"``, ``"gd_scale"``, ``"unit"``).
        stable_gamma: peft ``LoraGAConfig.stable_gamma``.
        gradient_batches: Training batches the gradient is averaged over.
        adapter_name: See :class:`SetupTimeInit`.
    """

    method = InitMethod.lora_ga

    def __init__(
        self,
        direction: str = "ArB2r",
        scale: str = "stable",
        stable_gamma: int = 16,
        gradient_batches: int = 8,
        adapter_name: str | None = None,
    ) -> None:
        super().__init__(gradient_batches, adapter_name)
        import peft
        from peft.tuners.lora import LoraLayer

        try:
            from peft import LoraGAConfig
        except ImportError:
            LoraGAConfig = None
        if LoraGAConfig is None or not callable(getattr(LoraLayer, "lora_ga_init", None)):
            raise HRPConfigurationError(
                f"lora_ga needs peft's LoRA-GA (LoraGAConfig and LoraLayer.lora_ga_init), which peft "
                f"{peft.__version__} does not have; install a peft release that has it (0.21.2 does)."
            )
        try:
            self.config = LoraGAConfig(direction=direction, scale=scale, stable_gamma=stable_gamma)
        except (TypeError, ValueError) as error:
            raise HRPConfigurationError(f"lora_ga options: {error}") from error
        if direction not in ("ArBr", "A2rBr", "ArB2r", "random") or scale not in ("stable", "weight_svd", "gd_scale", "unit"):
            raise HRPConfigurationError(
                f"lora_ga: direction must be one of ArBr, A2rBr, ArB2r, random and scale one of stable, weight_svd, "
                f"gd_scale, unit (peft's LoraGAConfig); got direction={direction!r}, scale={scale!r}."
            )

    def initialise(self, trainer: pl.Trainer, pl_module: pl.LightningModule, targets: list[LoraTarget], report: InitReport) -> None:
        gradients = self.base_weight_gradients(trainer, pl_module, targets, report)
        for target, gradient in zip(targets, gradients):
            if 2 * target.rank > min(target.in_features, target.out_features):
                raise HRPConfigurationError(
                    f"lora_ga needs 2r <= min(in, out) (it takes 2r gradient directions); {target.name} is "
                    f"{target.out_features}x{target.in_features} with r={target.rank}."
                )
            base = target.layer.get_base_layer()
            base._peft_loraga_grad = gradient.to(base.weight.dtype)
            target.layer.lora_ga_init(target.adapter_name, self.config)
            # lora_ga_init silently falls back to peft's default init when it finds no gradient; it
            # deletes the gradient when it used it, which is how we know it did.
            if hasattr(base, "_peft_loraga_grad"):
                del base._peft_loraga_grad
                raise HRPConfigurationError(f"peft's lora_ga_init did not use the gradient of {target.name}.")
            report.singular_values[target.name] = torch.linalg.svdvals(gradient).tolist()


class EvaInit(SetupTimeInit):
    """EVA (arXiv 2410.07170) through peft's ``initialize_lora_eva_weights``, with shapes kept fixed.

    peft runs the model on training batches (here: the module's own ``training_step``) and fits an
    incremental PCA of each LoRA layer's inputs until the top components stop moving (cosine
    similarity ``tau``); ``A`` becomes the top-r components, ``B`` stays 0. EVA can move rank between
    layers (``rho > 1``), which changes shapes; a Lightning run keeps ``rho = 1`` so every adapter
    keeps its rank (checked afterwards). Padding positions (``attention_mask == 0``) are left out.

    The model must be built with ``LoraConfig(init_lora_weights="eva", eva_config=EvaInit.eva_config(...))``;
    :class:`LoraInit` does that.

    Args:
        tau: Convergence threshold of the components' cosine similarity (peft's default 0.99).
        whiten: Divide the components by the square root of their singular values.
        max_batches: peft cycles through the training data until every layer converged; past this
            many batches the init fails (lower ``tau``) instead of running on forever.
        adapter_name: See :class:`SetupTimeInit`.
    """

    method = InitMethod.eva

    def __init__(self, tau: float = 0.99, whiten: bool = False, max_batches: int = 1000, adapter_name: str | None = None) -> None:
        super().__init__(adapter_name)
        try:
            from peft import EvaConfig  # noqa: F401
            from peft.tuners.lora.eva import get_eva_state_dict  # noqa: F401
        except ImportError as error:
            import peft

            raise HRPConfigurationError(
                f"eva needs peft's EVA (EvaConfig, peft.tuners.lora.eva), which peft {peft.__version__} does not "
                "have; install a peft release that has it (0.21.2 does)."
            ) from error
        if not 0.0 <= tau <= 1.0:
            raise HRPConfigurationError(f"eva: tau must lie in [0, 1], got {tau!r}.")
        if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
            raise HRPConfigurationError(f"eva: max_batches must be an integer >= 1, got {max_batches!r}.")
        self.tau = tau
        self.whiten = whiten
        self.max_batches = max_batches

    def eva_config(self) -> Any:
        """peft's ``EvaConfig`` with ``rho = 1`` (no rank redistribution)."""
        from peft import EvaConfig

        # peft's label mask assumes token-level labels; padding is masked here from the attention mask instead.
        return EvaConfig(rho=1.0, tau=self.tau, whiten=self.whiten, use_label_mask=False)

    def initialise(self, trainer: pl.Trainer, pl_module: pl.LightningModule, targets: list[LoraTarget], report: InitReport) -> None:
        from peft.tuners.lora.eva import get_eva_state_dict, initialize_lora_eva_weights

        peft_model = _the_peft_model(pl_module)
        adapter = targets[0].adapter_name
        config = peft_model.peft_config[adapter]
        if config.init_lora_weights != "eva" or config.eva_config is None or config.eva_config.rho != 1.0:
            raise HRPConfigurationError(
                "eva needs the adapter built with LoraConfig(init_lora_weights='eva', eva_config=EvaConfig(rho=1.0)) "
                "(rho = 1 keeps every adapter's shape); build it through lightning_hrp.inits.LoraInit."
            )
        loader = train_dataloader_at_setup(trainer)
        shapes = [(tuple(t.lora_A.shape), tuple(t.lora_B.shape)) for t in targets]
        batches_seen = [0]

        def forward(model: nn.Module, batch: Any) -> None:
            if batches_seen[0] == self.max_batches:
                raise HRPConfigurationError(
                    f"eva: the input components of some layers did not converge (cosine similarity >= tau="
                    f"{self.tau}) within max_batches={self.max_batches}; lower tau or raise max_batches."
                )
            batches_seen[0] += 1
            batch = batch_to_device(trainer, batch, device=pl_module.device)
            training_step(trainer, batch, batches_seen[0] - 1)

        try:
            with generators_restored([loader]):
                state = get_eva_state_dict(
                    peft_model,
                    dataloader=loader,
                    forward_fn=forward,
                    prepare_model_inputs_fn=_token_mask,
                    prepare_layer_inputs_fn=_layer_input_rows,
                    adapter_name=adapter,
                    show_progress_bar=False,
                )
        except BaseException:
            _remove_eva_hooks(peft_model)  # peft leaves its hooks on the layers when interrupted
            raise
        # peft quietly gives layers missing from the state dict its default init; refuse that instead.
        wanted = {name for name, module in peft_model.named_modules() if any(module is t.layer for t in targets)}
        missing = sorted(wanted - set(state))
        if missing:
            raise HRPConfigurationError(f"eva found no input statistics for {missing}; it cannot initialise them.")
        initialize_lora_eva_weights(peft_model, eva_state_dict=state, adapter_name=adapter, show_progress_bar=False)
        after = [(tuple(t.lora_A.shape), tuple(t.lora_B.shape)) for t in find_lora_targets(pl_module, self.adapter_name)]
        if after != shapes:
            raise HRPConfigurationError("eva changed adapter shapes although rho = 1; refusing to train a reshaped model.")
        report.batches = batches_seen[0]


class OracleInit(SetupTimeInit):
    """``A = c * V_r(M)^T``, ``B = 0`` from the task's true update ``M``: the best direction HRP can estimate.

    Args:
        direction_scale: ``c`` as in HRP (``"match_init_norm"`` keeps the norm of peft's default ``A``).
        adapter_name: See :class:`SetupTimeInit`.
    """

    method = InitMethod.oracle

    def __init__(self, direction_scale: DirectionScale = "match_init_norm", adapter_name: str | None = None) -> None:
        super().__init__(adapter_name)
        if direction_scale not in ("unit", "match_init_norm"):
            raise HRPConfigurationError(f"oracle: direction_scale must be 'unit' or 'match_init_norm', got {direction_scale!r}.")
        self.direction_scale = direction_scale

    def initialise(self, trainer: pl.Trainer, pl_module: pl.LightningModule, targets: list[LoraTarget], report: InitReport) -> None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, KnownTargetUpdates):
            raise HRPConfigurationError(
                f"The oracle init needs the true update of the task, which only a DataModule implementing "
                f"lightning_hrp.inits.KnownTargetUpdates knows (e.g. the matrix-regression recipe); got "
                f"{type(datamodule).__name__}."
            )
        updates = datamodule.target_updates()
        with torch.no_grad():
            for target in targets:
                keys = [k for k in updates if target.name == k or target.name.endswith("." + k)]
                if len(keys) != 1:
                    raise HRPConfigurationError(
                        f"oracle: LoRA layer {target.name} matches {len(keys)} of the task's target updates "
                        f"{sorted(updates)}; expected exactly one."
                    )
                M = updates[keys[0]].to(target.lora_A.device)
                A, B = oracle_direction_init(M, target.lora_A.detach(), scale=self.direction_scale)
                target.lora_A.copy_(A)
                target.lora_B.copy_(B)
                report.singular_values[target.name] = torch.linalg.svdvals(M.float()).tolist()


_INIT_CALLBACKS: dict[InitMethod, type[Callback]] = {
    InitMethod.lora_ga: LoraGAInit,
    InitMethod.eva: EvaInit,
    InitMethod.lora_one: LoraOneInit,
    InitMethod.oracle: OracleInit,
    InitMethod.hrp: HRPPreheatCallback,
}


# --------------------------------------------------------------------------------------------
# What a recipe uses
# --------------------------------------------------------------------------------------------


class LoraInit:
    """A recipe's initialisation: the method and its options, checked on construction.

    Args:
        method: An :class:`InitMethod` (or its value, e.g. ``"pissa"``).
        options: Keyword options of the method's callback: :class:`lightning_hrp.HRPPreheatCallback`'s
            for ``hrp`` (``preheat_rank`` and ``preheat_steps`` required), :class:`LoraOneInit`'s,
            :class:`LoraGAInit`'s, :class:`EvaInit`'s or :class:`OracleInit`'s; none for the others.

    Raises:
        HRPConfigurationError: An unknown method, or options the method does not take.
    """

    def __init__(self, method: InitMethod | str, options: Mapping[str, Any] | None = None) -> None:
        try:
            self.method = InitMethod(method)
        except ValueError:
            raise HRPConfigurationError(
                f"init_method must be one of {[m.value for m in InitMethod]}, got {method!r}."
            ) from None
        self.options = dict(options or {})
        self.info = INIT_METHODS[self.method]
        callback_class = _INIT_CALLBACKS.get(self.method)
        self.callback: Callback | None = None
        if callback_class is None:
            if self.options:
                raise HRPConfigurationError(
                    f"init_method={self.method.value!r} takes no init_options, got {sorted(self.options)}."
                )
            return
        try:
            self.callback = callback_class(**self.options)
        except TypeError as error:
            raise HRPConfigurationError(
                f"init_options for init_method={self.method.value!r} do not fit {callback_class.__name__}: {error}."
            ) from error

    @property
    def uses_lora(self) -> bool:
        return self.info.uses_lora

    def lora_config_kwargs(self) -> dict[str, Any]:
        """The ``LoraConfig`` arguments this init needs (``init_lora_weights`` and, for EVA, ``eva_config``)."""
        if not self.uses_lora:
            raise HRPConfigurationError("init_method='full' trains without LoRA; there is no LoraConfig to build.")
        kwargs: dict[str, Any] = {"init_lora_weights": _PEFT_INIT[self.method]}
        if isinstance(self.callback, EvaInit):
            kwargs["eva_config"] = self.callback.eva_config()
        return kwargs

    def callbacks(self, trainer_callbacks: Sequence[Callback] = ()) -> list[Callback]:
        """The callbacks to return from ``LightningModule.configure_callbacks``.

        Args:
            trainer_callbacks: The Trainer's own callbacks, checked for a second initialisation.

        Raises:
            HRPConfigurationError: The Trainer already holds an init callback that would overwrite
                or be overwritten by this one (an ``HRPPreheatCallback`` combines with ``lora`` only,
                as HRP on top of peft's default init).
        """
        initialisers = [
            c for c in trainer_callbacks if isinstance(c, tuple(_INIT_CALLBACKS.values())) and c is not self.callback
        ]
        if initialisers:
            names = sorted(type(c).__name__ for c in initialisers)
            hrp_on_default = self.method is InitMethod.lora and all(isinstance(c, HRPPreheatCallback) for c in initialisers)
            if not hrp_on_default or len(initialisers) > 1:
                raise HRPConfigurationError(
                    f"init_method={self.method.value!r} and the Trainer's {names} would both initialise the "
                    "adapters. Choose one: remove the callback from trainer.callbacks, or set init_method to the "
                    "method it implements (with its options in init_options)."
                )
        return [self.callback] if self.callback is not None else []


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _the_peft_model(pl_module: pl.LightningModule) -> PeftModel:
    models = [m for m in pl_module.modules() if isinstance(m, PeftModel)]
    if len(models) != 1:
        raise HRPConfigurationError(
            f"eva needs exactly one peft PeftModel inside {type(pl_module).__name__} (peft's EVA works on it), found {len(models)}."
        )
    return models[0]


def _training_batches(trainer: pl.Trainer, pl_module: pl.LightningModule, count: int) -> Iterator[Any]:
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
def _only_trainable(module: nn.Module, params: Sequence[Tensor]) -> Iterator[None]:
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


def _remove_eva_hooks(model: nn.Module) -> None:
    from peft.tuners.lora.eva import _Hook

    for module in model.modules():
        for key in [k for k, hook in module._forward_hooks.items() if isinstance(hook, _Hook)]:
            del module._forward_hooks[key]


def _token_mask(batch: Any, peft_config: Any) -> Tensor | None:
    """EVA's model-input hook: the non-padding positions of a token batch (None: use every row)."""
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), Tensor):
        return batch["attention_mask"].bool()
    return None


def _layer_input_rows(layer_input: Any, mask: Tensor | None, layer_name: str) -> Tensor:
    """EVA's layer-input hook: a 2-D ``(rows, in_features)`` matrix of the layer's inputs."""
    inputs = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if not isinstance(inputs, Tensor):
        raise HRPConfigurationError(f"eva: layer {layer_name} received {type(inputs).__name__}, expected a tensor.")
    if mask is not None and inputs.dim() == mask.dim() + 1 and inputs.shape[:-1] == mask.shape:
        return inputs[mask]
    return inputs.reshape(-1, inputs.shape[-1])
