"""fastadapt: parameter-efficient fine-tuning of Hugging Face causal LMs on fused kernels.

    import fastadapt as fa
    model, tokenizer = fa.load_model("smollm2-135m")   # embedded; or any transformers causal LM
    fa.patch(model, "lora", r=8)      # swap adapter modules in, freeze the base ("dora" too)
    fa.save_adapter(model, "out/")    # PEFT on-disk format
    fa.merge(model); fa.export(model, "merged/")

Layers (docs/architecture.md): kernels → ops → modules → methods → io, patch → merge, export → app.
"""

import logging

from . import distributed, ops
from .export import export
from .io import save_adapter
from .merge import dequantize_bases, merge, summary, unmerge
from .methods.dora import DoraConfig
from .methods.lora import LoraConfig
from .models import load_model
from .modules import DoraLinear, LoraLinear
from .named import active_adapter, delete_adapter, hotswap_adapter, list_adapters, load_adapter, set_adapter
from .patch import patch, unpatch

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "DoraConfig",
    "DoraLinear",
    "LoraConfig",
    "LoraLinear",
    "active_adapter",
    "delete_adapter",
    "dequantize_bases",
    "distributed",
    "export",
    "hotswap_adapter",
    "list_adapters",
    "load_adapter",
    "load_model",
    "merge",
    "ops",
    "patch",
    "save_adapter",
    "set_adapter",
    "summary",
    "unmerge",
    "unpatch",
]
