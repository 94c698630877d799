"""LoRA (Hu et al., 2021): ``fa.patch(model, "lora", r=8, alpha=16, dropout=0.05, targets="auto", rslora=False)``;
PEFT's on-disk format both ways."""

from ..registry import Method, register_method
from . import model
from .config import PRESETS, LoraConfig

METHOD = Method.from_hooks(model, name="lora", title="LoRA", config_class=LoraConfig, presets=PRESETS)
register_method(METHOD)

__all__ = ["METHOD", "LoraConfig"]
