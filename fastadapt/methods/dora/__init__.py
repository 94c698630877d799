"""DoRA (Liu et al., 2024): ``fa.patch(model, "dora", r=8, alpha=16, dropout=0.0, targets="auto", rslora=False)``;
PEFT's on-disk format both ways (``use_dora: true``, ``lora_magnitude_vector`` keys)."""

from ..registry import Method, register_method
from . import model
from .config import PRESETS, DoraConfig

METHOD = Method.from_hooks(model, name="dora", title="DoRA", config_class=DoraConfig, presets=PRESETS)
register_method(METHOD)

__all__ = ["METHOD", "DoraConfig"]
