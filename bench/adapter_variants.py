"""The embedded smollm2-135m with each adapter the saved-memory and CPU end-to-end benchmarks compare
(issue 25): r=16, α=32 on the seven projections, batch 2 × 128 tokens, fp32 weights.

Variants (``build``):
- ``frozen``: no adapter; every parameter frozen, the embeddings' output requires grad (the floor);
- ``peft_lora`` / ``peft_dora``: PEFT as users run it (fp32 adapters, ``use_dora`` for DoRA);
- ``fastadapt_<method>``: ``fa.patch`` on the torch backend (what ``auto`` runs without a GPU
  record), ``reference_<method>``: the same on ``backend="reference"`` (plain autograd, the oracle);
  methods ``lora``, ``dora``, ``series``, ``parallel`` (bottleneck 256, the method defaults);
- ``fastadapt_dora_recompute``: DoRA with ``FASTADAPT_DORA_RECOMPUTE=1``.

Run as a script it does one measured training run in a fresh process and prints JSON (the peak
resident memory of N training steps, ``rss`` mode); ``test_bench_e2e.py`` calls it that way.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import resource
import sys
import time
import weakref
from pathlib import Path

import torch

MODEL = "smollm2-135m"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, ALPHA = 16, 32
BATCH, SEQ = 2, 128
METHODS = ("lora", "dora", "series", "parallel")
PEFT_METHODS = ("lora", "dora")

_BASE: dict[str, torch.nn.Module] = {}


def variants(method: str) -> list[str]:
    """The variants that run ``method`` (PEFT first: the ratios are taken against it)."""
    out = [f"peft_{method}"] if method in PEFT_METHODS else []
    out += [f"reference_{method}", f"fastadapt_{method}"]
    return out + (["fastadapt_dora_recompute"] if method == "dora" else [])


def method_of(variant: str) -> str | None:
    if variant == "frozen":
        return None
    if variant == "fastadapt_dora_recompute":
        return "dora"
    return variant.split("_", 1)[1]


def base_model(device: torch.device, model: str = MODEL) -> torch.nn.Module:
    """The frozen base, loaded once per process (fp32); ``build`` works on deep copies."""
    key = f"{model}@{device}"
    if key not in _BASE:
        import fastadapt as fa

        _BASE[key] = fa.load_model(model, device=str(device))[0]
    return _BASE[key]


def env(variant: str) -> dict[str, str]:
    """The environment switches the variant runs under (set around every forward and backward)."""
    if variant.startswith("reference_"):
        return {"FASTADAPT_BACKEND": "reference"}
    if variant.startswith("fastadapt_"):
        recompute = "1" if variant == "fastadapt_dora_recompute" else "0"
        return {"FASTADAPT_BACKEND": "torch", "FASTADAPT_DORA_RECOMPUTE": recompute}
    return {}


@contextlib.contextmanager
def variant_env(variant: str):
    saved = {k: os.environ.get(k) for k in ("FASTADAPT_BACKEND", "FASTADAPT_DORA_RECOMPUTE")}
    try:
        for k in saved:
            os.environ.pop(k, None)
        os.environ.update(env(variant))
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build(variant: str, dropout: float, device: torch.device, *, base: torch.nn.Module | None = None,
          in_place: bool = False, bottleneck: int | None = None, seed: int = 1) -> torch.nn.Module:
    """A training-mode copy of the base (``in_place``: the base itself) with ``variant`` applied;
    LoRA B (and the bottleneck up projection) drawn non-zero, so no gradient is trivially zero."""
    import fastadapt as fa

    base = base if base is not None else base_model(device)
    model = base if in_place else copy.deepcopy(base)
    method = method_of(variant)
    if variant == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif variant.startswith("peft_"):
        import peft

        cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=list(PROJECTIONS),
                              use_dora=method == "dora")
        model = peft.get_peft_model(model, cfg)
    elif method in ("lora", "dora"):
        fa.patch(model, method, r=R, alpha=ALPHA, dropout=dropout, targets=list(PROJECTIONS))
    else:
        fa.patch(model, method, dropout=dropout, **({} if bottleneck is None else {"bottleneck": bottleneck}))
    model.train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "adapter_up" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 1e-2)
    return model


def batch(model: torch.nn.Module, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=g).to(device)


def adapter_input_elements(model: torch.nn.Module, rows: int) -> int:
    """Σ over the bottleneck adapters of rows × the adapter's input width: the elements a dropout
    mask covers in one forward (the "one bit per dropped element" budget)."""
    from fastadapt.modules import BottleneckLinear

    total = 0
    for m in model.modules():
        if isinstance(m, BottleneckLinear):
            total += rows * m.adapter_down.weight.shape[1]
    return total


class _Box:
    """What autograd keeps for a saved tensor: alive exactly as long as the graph that saved it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor, *, autocast: torch.dtype | None = None) -> dict:
    """Bytes of the tensors autograd saves in one training forward, each storage counted once (by its
    data pointer), parameters excluded — two ways:

    - ``saved``: every tensor saved during the forward. References are held until the count, so no
      storage is freed and its address reused (counting live pointers as they come instead
      undercounts by whatever the allocator reused: PEFT's DoRA frees a graph per layer);
    - ``held``: those still held for backward when the forward returns (the graphs alive then).

    Then runs the backward, so the step is a real one. Returns bytes and the forward+backward time."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    boxes: list[weakref.ref] = []
    tensors: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> _Box:
        box = _Box(t)
        boxes.append(weakref.ref(box))
        tensors.append(t)
        return box

    device = ids.device
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor), \
            torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = model(input_ids=ids, labels=ids).loss
    saved = _by_storage(tensors, params)
    tensors.clear()
    gc.collect()
    held = _by_storage([b.tensor for b in (r() for r in boxes) if b is not None], params)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"saved_bytes": saved, "held_bytes": held, "fwd_bwd_ms": (time.perf_counter() - t0) * 1e3,
            "loss": float(loss)}


def _by_storage(tensors: list[torch.Tensor], exclude: set[int]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in exclude:
            seen[ptr] = storage.nbytes()
    return sum(seen.values())


# -- a training run in a fresh process (peak resident memory) --------------------------------------


def _rss_bytes(field: str) -> int | None:
    """VmHWM (peak) or VmRSS (now) of this process from /proc, in bytes (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def train_run(variant: str, dropout: float, steps: int) -> dict:
    """``steps`` training steps (forward, loss, backward, AdamW, zero_grad) of ``variant`` on CPU:
    the peak resident memory over the steps (the load's own peak reset first) and after loading."""
    device = torch.device("cpu")
    import fastadapt as fa

    with variant_env(variant):
        model = build(variant, dropout, device, base=fa.load_model(MODEL)[0], in_place=True)
        gc.collect()
        ids = batch(model, device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        before = _rss_bytes("VmRSS")
        reset = _reset_peak_rss()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    peak = _rss_bytes("VmHWM") if reset else None
    if peak is None:  # ru_maxrss: KiB on Linux, the whole process's peak (loading included)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "dropout": dropout, "steps": steps, "rss_after_load_bytes": before,
            "peak_rss_bytes": peak, "peak_is_training_only": reset, "step_s": times}


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "rss":
        sys.exit("usage: python bench/adapter_variants.py rss VARIANT DROPOUT STEPS")
    torch.manual_seed(0)
    print(json.dumps(train_run(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))))
