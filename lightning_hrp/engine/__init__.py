"""The HRP engine: plain torch and peft, no Lightning.

Finding LoRA layers (:mod:`.lora`), rank-R preheat adapters outside the model (:mod:`.preheat`),
the exact batched decomposition (:mod:`.decompose`), the init rules (:mod:`.init_rules`), per-layer
ranks from the preheated spectra under a rank budget (:mod:`.allocation`) and resizing peft adapters
to them (:mod:`.resize`), the
collectives for multi-process runs (:mod:`.distributed`), the preheat loop every entry point
shares (:mod:`.preheat_loop`), reading batches without disturbing the main run (:mod:`.batches`)
and what quantized bases need (:mod:`.quantized`).
"""

from lightning_hrp.engine.decompose import ProductSVD, svd_of_product, svd_of_products
from lightning_hrp.engine.init_rules import DirectionScale, InitRule, new_adapter_weights
from lightning_hrp.engine.lora import LoraTarget, find_lora_targets
from lightning_hrp.engine.preheat import PreheatAdapters, PreheatMode

__all__ = [
    "DirectionScale",
    "InitRule",
    "LoraTarget",
    "PreheatAdapters",
    "PreheatMode",
    "ProductSVD",
    "find_lora_targets",
    "new_adapter_weights",
    "svd_of_product",
    "svd_of_products",
]
