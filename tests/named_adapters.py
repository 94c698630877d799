"""Adapter folders for the named-adapter and mixed-batch tests: PEFT's LoRA/DoRA folders with other
ranks, alphas and targets, and fastadapt's series/parallel folders, all with non-zero weights."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import tiny_model

import fastadapt as fa

#: name -> (rank, alpha, targets, use_rslora): three LoRA adapters that differ in every way
LORA_SPECS = {
    "math": (4, 8, ["q_proj", "v_proj"], False),
    "code": (8, 4, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], False),
    "chat": (3, 16, ["o_proj", "gate_proj"], True),
}
#: name -> (bottleneck, targets): series adapters on the MLP sides, parallel beside projections
SERIES_SPECS = {"s1": (4, "mlp-output"), "s2": (7, "mlp"), "s3": (2, "mlp-input")}
PARALLEL_SPECS = {"p1": (4, ["up_proj"]), "p2": (6, ["up_proj", "down_proj", "q_proj"]), "p3": (3, ["o_proj"])}


def _randomize(model, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                if "magnitude" in name:
                    p.mul_(1 + scale * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


def peft_folders(tmp: Path, *, dora: bool = False, arch: str = "llama", dtype=torch.float32) -> dict[str, Path]:
    """PEFT-saved LoRA (or DoRA) folders of :data:`LORA_SPECS` for the tiny ``arch`` model."""
    import peft

    out = {}
    for i, (name, (r, alpha, targets, rslora)) in enumerate(LORA_SPECS.items()):
        model = peft.get_peft_model(tiny_model(arch), peft.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora, use_dora=dora))
        _randomize(model, seed=10 + i, scale=0.2)
        if dtype != torch.float32:
            model.to(dtype)
        model.save_pretrained(tmp / name)
        out[name] = tmp / name
    return out


def fastadapt_folders(tmp: Path, method: str, *, arch: str = "llama") -> dict[str, Path]:
    """fastadapt-saved series or parallel folders (:data:`SERIES_SPECS` / :data:`PARALLEL_SPECS`)."""
    specs = SERIES_SPECS if method == "series" else PARALLEL_SPECS
    out = {}
    for i, (name, (size, targets)) in enumerate(specs.items()):
        model = tiny_model(arch)
        fa.patch(model, method, bottleneck=size, targets=targets, activation="tanh")
        _randomize(model, seed=20 + i, scale=0.3)
        out[name] = fa.save_adapter(model, tmp / name)
    return out


def folders(tmp: Path, method: str) -> dict[str, Path]:
    if method in ("lora", "dora"):
        return peft_folders(tmp, dora=method == "dora")
    return fastadapt_folders(tmp, method)


def loaded(paths: dict[str, Path], *, arch: str = "llama"):
    """A tiny model holding every adapter of ``paths`` by name (the first active)."""
    model = tiny_model(arch)
    for name, path in paths.items():
        fa.load_adapter(model, path, adapter_name=name)
    return model.eval()


def alone(path: Path, *, arch: str = "llama"):
    """A fresh tiny model with only the adapter at ``path`` (the single-adapter path, no names)."""
    model = tiny_model(arch)
    fa.load_adapter(model, path)
    return model.eval()
