"""The init registry: every LoRA initialisation by name, one row each, and what a recipe builds from it.

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
                ``init_options``). Chen et al., arXiv 2502.07739. With ``rank_budget`` in ``init_options``,
                :class:`lightning_hrp.inits.HRPInit` instead: the same HRP at ``setup("fit")``, before the
                strategy wraps the model, so that the allocated ranks can change the adapters' shapes.
``full``        Full fine-tuning, no LoRA: the upper reference of what the adapters approximate.
``oracle``      The known target update's own top-r right singular vectors (``B = 0``): the best start
                HRP's direction rule can hope for. Only for tasks whose DataModule knows the true
                update (:class:`KnownTargetUpdates`), i.e. the matrix-regression recipe.
==============  ====================================================================================

The data-driven ones (``lora_ga``, ``eva``, ``lora_one``, ``oracle``) are callbacks that run once,
at ``setup("fit")`` (:mod:`lightning_hrp.inits.setup_time`), on the real training data through the
module's own ``training_step``; ``hrp`` is :class:`lightning_hrp.HRPPreheatCallback`. None falls back
to another init: a failure raises.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_hrp.callback import HRPPreheatCallback
from lightning_hrp.engine.quantized import quantized_weights
from lightning_hrp.errors import HRPConfigurationError
from lightning_hrp.inits.eva import EvaInit
from lightning_hrp.inits.gradient_inits import LoraGAInit, LoraOneInit
from lightning_hrp.inits.hrp import HRPInit
from lightning_hrp.inits.oracle import OracleInit
from lightning_hrp.inits.setup_time import SetupTimeInit


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
    """One initialisation: what it is, and how a recipe builds it (the tests hold it to these promises).

    Attributes:
        paper: Reference (authors, title, arXiv id).
        rule: One line on how the adapter starts.
        peft_init: ``LoraConfig(init_lora_weights=...)`` the adapters are built with; None without LoRA.
            A callback-based method builds from peft's default (``True``) and overwrites it (HRP's
            ``"match_init_norm"`` and the oracle reuse its norm); EVA needs peft's ``"eva"``.
        callback: The callback that initialises the adapters during ``fit`` (options: ``init_options``).
        rank_budget_callback: The callback used instead when ``init_options`` gives a ``rank_budget``
            (adapters that change shape need a setup-time init, before the strategy wraps the model).
        uses_lora: False only for full fine-tuning.
        keeps_output: The model's output right after the init equals the pretrained model's
            (up to float rounding where base weights are rewritten).
        changes_base_weights: The frozen weights are rewritten (PiSSA, OLoRA, LoRA-GA keep the residual); the
            recipes' checkpoints keep those weights.
        data_driven: Needs training batches (or, for the oracle, the task's ground truth); a comparison
            that matches compute counts these batches.
        quantized_base: Why the method cannot start from a bitsandbytes 4-bit or 8-bit base; None when it
            can (it never reads the base weights).
    """

    paper: str
    rule: str
    peft_init: bool | str | None = True
    callback: type[Callback] | None = None
    rank_budget_callback: type[Callback] | None = None
    uses_lora: bool = True
    keeps_output: bool = True
    changes_base_weights: bool = False
    data_driven: bool = False
    quantized_base: str | None = None


_LORA_PAPER = "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, arXiv 2106.09685"
# What peft 0.21.2 does with a quantized base weight, for the inits that read it.
_NO_GRADIENT_OF_QUANTIZED = (
    "it needs the gradient of the loss with respect to each base weight, and a quantized weight has none "
    "(peft 0.21.2's preprocess_loraga refuses quantized models for the same reason)"
)

INIT_METHODS: dict[InitMethod, InitMethodInfo] = {
    InitMethod.lora: InitMethodInfo(_LORA_PAPER, "A Kaiming-uniform (peft's default), B = 0"),
    InitMethod.gaussian: InitMethodInfo(_LORA_PAPER, "A ~ N(0, 1/r), B = 0 (peft's 'gaussian')", peft_init="gaussian"),
    InitMethod.pissa: InitMethodInfo(
        "Meng, Wang, Zhang, PiSSA: Principal Singular Values and Singular Vectors Adaptation of LLMs, arXiv 2404.02948",
        "B A = top-r SVD part of W0; W0 keeps the residual (peft's 'pissa')",
        peft_init="pissa",
        changes_base_weights=True,
        quantized_base=(
            "peft 0.21.2's pissa_init refuses a 4-bit or 8-bit weight, and with a float bnb_4bit_quant_storage it "
            "decomposes the packed storage as if it were the weight; peft's route is PiSSA on the unquantized "
            "model, then quantizing the residual it leaves"
        ),
    ),
    InitMethod.olora: InitMethodInfo(
        "Büyükakyüz, OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models, arXiv 2406.01775",
        "B A from the QR decomposition of W0; W0 keeps the residual (peft's 'olora')",
        peft_init="olora",
        changes_base_weights=True,
        quantized_base=(
            "peft 0.21.2's olora_init dequantises the weight, decomposes it and quantizes the residual again, so "
            "the model no longer starts from the quantized base (its output moves by the residual's quantization "
            "error), and a checkpoint of the trained weights could not restore that requantized residual"
        ),
    ),
    InitMethod.lora_ga: InitMethodInfo(
        "Wang, Yu, Li, LoRA-GA: Low-Rank Adaptation with Gradient Approximation, arXiv 2407.05000",
        "A, B from the SVD of the averaged full gradient; W0 keeps W0 - s B A (peft's lora_ga_init)",
        callback=LoraGAInit,
        changes_base_weights=True,
        data_driven=True,
        quantized_base=_NO_GRADIENT_OF_QUANTIZED,
    ),
    InitMethod.eva: InitMethodInfo(
        "Paischer et al., One Initialization to Rule them All: Explained Variance Adaptation, arXiv 2410.07170",
        "A = top-r right singular vectors of the layer inputs, B = 0 (peft's EVA, rho = 1)",
        peft_init="eva",
        callback=EvaInit,
        data_driven=True,
    ),
    InitMethod.lora_one: InitMethodInfo(
        "Zhang, Liu, Chen, One-step full gradient suffices for low-rank fine-tuning, arXiv 2502.01235",
        "s B A = one rank-r step of full-batch gradient descent (A from V_r, B from U_r of -G)",
        callback=LoraOneInit,
        keeps_output=False,
        data_driven=True,
        quantized_base=_NO_GRADIENT_OF_QUANTIZED,
    ),
    InitMethod.hrp: InitMethodInfo(
        "Chen et al., HRP: High-Rank Preheating for Superior LoRA Initialization, arXiv 2502.07739",
        "A = c V_r^T of a preheated rank-R update, B = 0 (HRPPreheatCallback; HRPInit with rank_budget)",
        callback=HRPPreheatCallback,
        rank_budget_callback=HRPInit,
        data_driven=True,
    ),
    InitMethod.full: InitMethodInfo(
        "full fine-tuning (no adapter), the reference LoRA approximates",
        "every weight trained, no LoRA",
        peft_init=None,
        uses_lora=False,
        quantized_base="it trains every weight, and quantized weights cannot be trained",
    ),
    InitMethod.oracle: InitMethodInfo(
        "the known target update's top-r right singular vectors (HRP spec section 1), an upper reference",
        "A = c V_r(M)^T, B = 0, M the true update",
        callback=OracleInit,
        data_driven=True,
    ),
}

# Every class that initialises adapters during fit: two of them in one run would overwrite each other.
_INITIALISERS = tuple(
    {c for info in INIT_METHODS.values() for c in (info.callback, info.rank_budget_callback) if c is not None}
)


class LoraInit:
    """A recipe's initialisation: the method and its options, checked on construction.

    Args:
        method: An :class:`InitMethod` (or its value, e.g. ``"pissa"``).
        options: Keyword options of the method's callback: :class:`lightning_hrp.HRPPreheatCallback`'s
            for ``hrp`` (``preheat_rank`` and ``preheat_steps`` required; with ``rank_budget``,
            :class:`HRPInit`'s, the same options at setup time), :class:`LoraOneInit`'s,
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
        callback_class = self.info.callback
        if self.options.get("rank_budget") is not None and self.info.rank_budget_callback is not None:
            callback_class = self.info.rank_budget_callback
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

    def check_base(self, base: nn.Module) -> None:
        """Refuse a base this init cannot start from: a bitsandbytes-quantized one, for the inits that read its weights.

        Call it before ``get_peft_model``, which runs peft's own inits (PiSSA, OLoRA) on the base.

        Raises:
            HRPConfigurationError: ``base`` holds 4-bit or 8-bit weights and the method needs the weights
                themselves (:attr:`InitMethodInfo.quantized_base` says why).
        """
        quantized = quantized_weights(base)
        reason = self.info.quantized_base
        if quantized and reason is not None:
            raise HRPConfigurationError(
                f"init_method={self.method.value!r} cannot start from a quantized base ({len(quantized)} bitsandbytes "
                f"weights, e.g. {quantized[0]}): {reason}. Use init_method 'lora', 'gaussian', 'eva' or 'hrp', which "
                "never read the base weights, or load the base unquantized."
            )

    def lora_config_kwargs(self) -> dict[str, Any]:
        """The ``LoraConfig`` arguments this init needs (``init_lora_weights`` and, for EVA, ``eva_config``)."""
        if not self.uses_lora:
            raise HRPConfigurationError("init_method='full' trains without LoRA; there is no LoraConfig to build.")
        kwargs: dict[str, Any] = {"init_lora_weights": self.info.peft_init}
        if isinstance(self.callback, SetupTimeInit):
            kwargs.update(self.callback.lora_config_kwargs())
        return kwargs

    def callbacks(self, trainer_callbacks: Sequence[Callback] = ()) -> list[Callback]:
        """The callbacks to return from ``LightningModule.configure_callbacks``.

        Args:
            trainer_callbacks: The Trainer's own callbacks, checked for a second initialisation.

        Raises:
            HRPConfigurationError: The Trainer already holds an init callback that would overwrite
                or be overwritten by this one (an ``HRPPreheatCallback`` or ``HRPInit`` combines with ``lora`` only,
                as HRP on top of peft's default init).
        """
        initialisers = [c for c in trainer_callbacks if isinstance(c, _INITIALISERS) and c is not self.callback]
        if initialisers:
            names = sorted(type(c).__name__ for c in initialisers)
            hrp_on_default = self.method is InitMethod.lora and all(isinstance(c, (HRPPreheatCallback, HRPInit)) for c in initialisers)
            if not hrp_on_default or len(initialisers) > 1:
                raise HRPConfigurationError(
                    f"init_method={self.method.value!r} and the Trainer's {names} would both initialise the "
                    "adapters. Choose one: remove the callback from trainer.callbacks, or set init_method to the "
                    "method it implements (with its options in init_options)."
                )
        return [self.callback] if self.callback is not None else []
