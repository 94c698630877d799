"""LoRA (Hu et al., 2021): ``fa.patch(model, "lora", r=8, alpha=16, dropout=0.05, targets="auto", rslora=False)``;
PEFT's on-disk format both ways."""

from ..registry import Method, register_method
from . import model
from .config import PRESETS, LoraConfig

METHOD = Method(
    name="lora",
    title="LoRA",
    config_class=LoraConfig,
    apply=model.apply,
    peft_type=model.PEFT_TYPE,
    adapter_config=model.adapter_config,
    read_config=model.read_config,
    check_loaded=model.check_loaded,
    presets=PRESETS,
)
register_method(METHOD)

__all__ = ["METHOD", "LoraConfig"]
