"""Shared test utilities."""

from __future__ import annotations

import torch

from fastadapt.methods import adapter_modules


def randomize_adapters(model, *, seed: int = 0, scale: float = 0.2) -> None:
    """Non-zero A and B so that merge/save/load tests are not trivially right; a DoRA magnitude is
    moved off its initial value (the weight's row norms) by a factor 1 ± ~scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in adapter_modules(model):
            for w in (m.lora_A.weight, m.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g) * scale)
            magnitude = getattr(m, "lora_magnitude_vector", None)
            if magnitude is not None:
                magnitude.mul_(1 + scale * torch.randn(magnitude.shape, generator=g))


def logits_and_grads(model, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's forward and backward: the logits and the trainable parameters' gradients."""
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def norm_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (the usual relative error of a whole tensor)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def enable_activation_checkpointing(model, *, use_reentrant: bool) -> None:
    """transformers ≥ 5.2x calls it ``activation_checkpointing_enable`` (the old name warns);
    older 5.x releases (the GPU image's 5.17) know only ``gradient_checkpointing_enable``."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


def cache_kwarg(model) -> str:
    """The name ``forward`` takes a KV cache under: ``cache`` in newer transformers, where
    ``past_key_values`` warns, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
