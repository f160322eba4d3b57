"""LoRA initialisations by name, for fair comparisons with HRP.

:mod:`~lightning_hrp.inits.registry` lists every method, one row each (:data:`INIT_METHODS`), and
:class:`LoraInit` turns ``init_method`` / ``init_options`` into a peft ``LoraConfig`` and the
callbacks of the run. The data-driven methods are callbacks that run once at ``setup("fit")``
(:mod:`~lightning_hrp.inits.setup_time`), by kind: HRP where it allocates ranks
(:mod:`~lightning_hrp.inits.hrp`), gradient-based (LoRA-One, LoRA-GA,
:mod:`~lightning_hrp.inits.gradient_inits`), input-based (EVA, :mod:`~lightning_hrp.inits.eva`) and
the ground-truth oracle (:mod:`~lightning_hrp.inits.oracle`).
"""

from lightning_hrp.inits.eva import EvaInit
from lightning_hrp.inits.gradient_inits import GradientInit, LoraGAInit, LoraOneInit
from lightning_hrp.inits.hrp import HRPInit
from lightning_hrp.inits.oracle import KnownTargetUpdates, OracleInit
from lightning_hrp.inits.registry import INIT_METHODS, InitMethod, InitMethodInfo, LoraInit
from lightning_hrp.inits.setup_time import InitReport, SetupTimeInit

__all__ = [
    "INIT_METHODS",
    "EvaInit",
    "GradientInit",
    "HRPInit",
    "InitMethod",
    "InitMethodInfo",
    "InitReport",
    "KnownTargetUpdates",
    "LoraGAInit",
    "LoraInit",
    "LoraOneInit",
    "OracleInit",
    "SetupTimeInit",
]
