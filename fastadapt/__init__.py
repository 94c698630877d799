"""fastadapt: parameter-efficient fine-tuning of Hugging Face causal LMs on fused kernels.

    import fastadapt as fa
    fa.patch(model, "lora", r=8)      # swap adapter modules in, freeze the base
    fa.save_adapter(model, "out/")    # PEFT on-disk format
    fa.merge(model); fa.export(model, "merged/")
"""

import logging

from . import bottleneck as _bottleneck  # noqa: F401  (registers "series" and "parallel")
from . import distributed, ops
from . import prefix as _prefix  # noqa: F401  (registers the "prefix" method)
from .config import LoraConfig
from .export import export
from .io import load_adapter, save_adapter
from .merge import merge, summary, unmerge
from .modules import LoraLinear
from .patch import patch, unpatch

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "LoraConfig",
    "distributed",
    "LoraLinear",
    "export",
    "load_adapter",
    "merge",
    "ops",
    "patch",
    "save_adapter",
    "summary",
    "unmerge",
    "unpatch",
]
