"""End-to-end fine-tuning step benchmark (issue 9): tokens/s, step-time ratio to the frozen model,
peak memory, on LLaMA-architecture models with random weights (no hub).

Models (bf16, sdpa attention, sequence 2048, use_cache off):
- ``llama7b``: LLaMA-7B widths (hidden 4096, intermediate 11008, 32 heads, vocab 32000) with as
  many layers as fit (batch 8 = 16k tokens per step);
- ``smollm2``: SmolLM2-1.7B widths (hidden 2048, intermediate 8192, 32 heads, 24 layers, vocab
  49152, tied embeddings) at full depth, with the batch that fits.
"Fits" is measured, not guessed: a probe runs PEFT default (the variant with the most
activation memory) at two sizes, fits peak = a + b·n and takes the largest n under
FASTADAPT_BENCH_MEM_FRACTION (0.85) of the GPU memory. Every variant then runs at that size.
Gradient checkpointing off and on (non-reentrant, for every variant).

Variants, in one run:
- ``frozen``: the floor, forward + input-grad backward only (no parameter needs a gradient,
  the embeddings' output does), no optimizer;
- ``fastadapt_lora``: ``fa.patch(model, "lora", r=16, alpha=32, dropout=0.05, targets="all-linear")``
  with ``FASTADAPT_BACKEND=triton``;
- ``peft_default``: PEFT LoRA with the same r/alpha/dropout/targets, as users run it (fp32 adapters);
- ``peft_bf16``: the same with ``autocast_adapter_dtype=False``;
- ``fastadapt_series`` / ``eager_series`` / ``fastadapt_parallel`` / ``eager_parallel``:
  ``fa.patch(model, "series"|"parallel", bottleneck=256)`` with FASTADAPT_BACKEND=triton vs
  torch — skipped while fastadapt has no such method.
A step is forward + loss + backward + ``AdamW.step()`` + ``zero_grad`` (no optimizer for ``frozen``).
Every LoRA B is drawn non-zero before timing.

On the CPU (issue 25), ``test_e2e_embedded_interleaved``: the embedded smollm2-135m, r=16, α=32 on
the seven projections, batch 2 × 128 (``adapter_variants.py``), fastadapt (torch backend) against
PEFT (series/parallel: against the reference backend, plain autograd — PEFT has no bottleneck
adapters) and against a second, identical reference model (the A/A run: its ratio to the first is
the noise of this machine at this moment). They step in interleaved rounds (the order rotates
each round); the figure is the ratio of medians, with the A/A ratio beside it.
``test_peak_rss_embedded``: 20-step training runs, each in a fresh process, give the peak resident
memory of fastadapt and of the variant it is compared with (dropout 0.1)::

    python -m pytest bench/test_bench_e2e.py -m "e2e and full" -k embedded -p no:cacheprovider \
        --benchmark-json bench/results/<machine>/e2e_cpu.json

(``FASTADAPT_BENCH_CPU_ROUNDS`` rounds, default 9; ``FASTADAPT_BENCH_RSS_STEPS`` steps, default 20.)
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import adapter_variants as av
import benchlib
import pytest
import torch

LLAMA7B = dict(
    hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
)
SMOLLM2 = dict(
    hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
)
SMOKE = dict(
    hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2,
    vocab_size=64, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
)
#: checkpointing on is smoke-tested for these only (the Triton interpreter is slow on 2 CPU cores)
SMOKE_CKPT_VARIANTS = ("frozen", "fastadapt_lora")

#: name -> (widths, layers or None = fit, batch or None = fit, what the fit varies)
MODELS = {
    "llama7b": (LLAMA7B, None, 8, "layers"),
    "smollm2": (SMOLLM2, 24, None, "batch"),
}
MAX_LAYERS = {"llama7b": 32, "smollm2": 24}
SEQ = 2048
LORA = dict(r=16, alpha=32, dropout=0.05)
BOTTLENECK = 256

VARIANTS = (
    "frozen", "fastadapt_lora", "peft_default", "peft_bf16",
    "fastadapt_series", "eager_series", "fastadapt_parallel", "eager_parallel",
)
_BACKEND = {"fastadapt_lora": "triton", "fastadapt_series": "triton", "fastadapt_parallel": "triton",
            "eager_series": "torch", "eager_parallel": "torch"}

DTYPE = torch.bfloat16


def _fa_methods() -> tuple[str, ...]:
    return importlib.import_module("fastadapt.methods").method_names()


# -- model, variant, step ---------------------------------------------------------------------------


def _build(widths: dict, layers: int, device: torch.device, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(**widths, num_hidden_layers=layers, use_cache=False)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPE, attn_implementation="sdpa")
    return model


def _apply(model, variant: str, ckpt: bool, *, bottleneck: int):
    """Turn the freshly built model into ``variant``; return (model, trainable parameters)."""
    if ckpt:  # renamed in transformers 5.2x (the old name warns); the GPU image's 5.17 has only the old one
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if variant == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # the floor still back-propagates dX through every layer
    elif variant == "fastadapt_lora":
        import fastadapt as fa

        fa.patch(model, "lora", r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], targets="all-linear")
    elif variant in ("peft_default", "peft_bf16"):
        import peft

        cfg = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                              target_modules="all-linear", task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, cfg, autocast_adapter_dtype=(variant == "peft_default"))
    elif variant.endswith(("_series", "_parallel")):
        import fastadapt as fa

        fa.patch(model, variant.split("_", 1)[1], bottleneck=bottleneck)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    model.train()
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT and fastadapt start B at zero: never time zeros
                p.copy_(torch.randn(p.shape, generator=g, device=device) * 1e-2)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def _make_step(model, params, ids):
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return None

    return step, opt


def _cleanup():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _backend_env(variant: str, monkeypatch):
    with monkeypatch.context() as mp:
        if variant in _BACKEND:
            mp.setenv("FASTADAPT_BACKEND", _BACKEND[variant])
        else:
            mp.delenv("FASTADAPT_BACKEND", raising=False)
        yield


def _peak_of(widths, layers, batch, seq, variant, ckpt, device, monkeypatch, bottleneck) -> int:
    """Peak bytes of two steps of ``variant`` at this size (the fit probe)."""
    with _backend_env(variant, monkeypatch):
        model = _build(widths, layers, device)
        model, params = _apply(model, variant, ckpt, bottleneck=bottleneck)
        ids = torch.randint(0, widths["vocab_size"], (batch, seq), device=device)
        step, opt = _make_step(model, params, ids)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del model, params, ids, step, opt
    _cleanup()
    return int(peak)


_FIT: dict[tuple[str, bool], tuple[int, int, dict]] = {}


def _sizes(name: str, ckpt: bool, device, monkeypatch) -> tuple[int, int, dict]:
    """(layers, batch, how they were chosen) for this model and checkpointing setting."""
    key = (name, ckpt)
    if key in _FIT:
        return _FIT[key]
    widths, layers, batch, varies = MODELS[name]
    forced_layers = benchlib.env_int("FASTADAPT_BENCH_E2E_LAYERS", 0) if name == "llama7b" else 0
    forced_batch = benchlib.env_int("FASTADAPT_BENCH_E2E_BATCH", 0)
    layers = forced_layers or layers
    batch = forced_batch or batch
    how: dict = {"varies": varies, "forced": {"layers": forced_layers or None, "batch": forced_batch or None}}
    if layers is None or batch is None:
        total = torch.cuda.get_device_properties(device).total_memory
        budget = benchlib.env_float("FASTADAPT_BENCH_MEM_FRACTION", 0.85) * total
        probe = "peft_default"
        if varies == "layers":
            p1 = _peak_of(widths, 1, batch, SEQ, probe, ckpt, device, monkeypatch, BOTTLENECK)
            p2 = _peak_of(widths, 2, batch, SEQ, probe, ckpt, device, monkeypatch, BOTTLENECK)
            per = max(p2 - p1, 1)
            layers = int(min(MAX_LAYERS[name], (budget - (p1 - per)) // per))
        else:
            p1 = _peak_of(widths, layers, 1, SEQ, probe, ckpt, device, monkeypatch, BOTTLENECK)
            p2 = _peak_of(widths, layers, 2, SEQ, probe, ckpt, device, monkeypatch, BOTTLENECK)
            per = max(p2 - p1, 1)
            batch = int(min(benchlib.env_int("FASTADAPT_BENCH_E2E_MAX_BATCH", 16), (budget - (p1 - per)) // per))
        how.update(probe_variant=probe, probe_peaks=[p1, p2], per_unit_bytes=per, budget_bytes=int(budget))
    _FIT[key] = (layers, batch, how)
    return _FIT[key]


def _time_variant(variant, widths, layers, batch, seq, ckpt, device, monkeypatch, *, bottleneck, warmup, steps,
                  benchmark=None):
    """Build, warm up, time ``steps`` steps. Returns a dict of figures (step times in ms)."""
    with _backend_env(variant, monkeypatch):
        model = _build(widths, layers, device)
        model, params = _apply(model, variant, ckpt, bottleneck=bottleneck)
        ids = torch.randint(0, widths["vocab_size"], (batch, seq), device=device)
        step, opt = _make_step(model, params, ids)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            static = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            step()
        benchlib.sync(device)
        times: list[float] = []
        live = {"step": step}  # cleared below: nothing that pytest-benchmark keeps may hold the model

        def timed():
            t0 = time.perf_counter()
            live["step"]()
            benchlib.sync(device)
            times.append((time.perf_counter() - t0) * 1e3)

        if benchmark is not None:
            benchmark.pedantic(timed, rounds=steps, warmup_rounds=0, iterations=1)
        else:
            for _ in range(steps):
                timed()
        live.clear()
        out = {
            "step_times_ms": times,
            "median_ms": statistics.median(times),
            "peak_mem_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
            "static_mem_bytes": int(static) if cuda else None,
            "trainable_params": int(sum(p.numel() for p in params)),
            "adapter_dtype": str(params[0].dtype).replace("torch.", "") if params else None,
        }
        del model, params, ids, step, opt
    _cleanup()
    return out


def _run(benchmark, monkeypatch, *, name, widths, layers, batch, seq, ckpt, variant, device, bottleneck, warmup,
         steps, how=None):
    if variant.endswith(("_series", "_parallel")) and variant.split("_", 1)[1] not in _fa_methods():
        pytest.skip(f"fa.patch(model, {variant.split('_', 1)[1]!r}) is not implemented yet")
    case = f"{name}-L{layers}-b{batch}-s{seq}-ckpt{'on' if ckpt else 'off'}"
    benchmark.group = f"e2e {case}"
    try:
        fig = _time_variant(variant, widths, layers, batch, seq, ckpt, device, monkeypatch, bottleneck=bottleneck,
                            warmup=warmup, steps=steps, benchmark=benchmark)
    except torch.cuda.OutOfMemoryError:
        _cleanup()
        pytest.fail(f"{variant} ran out of memory at {case}: lower FASTADAPT_BENCH_MEM_FRACTION or set "
                    "FASTADAPT_BENCH_E2E_LAYERS / FASTADAPT_BENCH_E2E_BATCH")
    key = ("e2e", case, "step")
    inline = False
    if variant == "frozen":
        benchlib.REF_MS[key] = fig["median_ms"]
        ref = None
    else:
        if key not in benchlib.REF_MS:  # frozen deselected: measure the floor now, same size
            ref_fig = _time_variant("frozen", widths, layers, batch, seq, ckpt, device, monkeypatch,
                                    bottleneck=bottleneck, warmup=warmup, steps=steps)
            benchlib.REF_MS[key] = ref_fig["median_ms"]
            inline = True
        ref = benchlib.REF_MS[key]
    tokens = batch * seq
    benchlib.record(benchmark, {
        "suite": "e2e",
        "case": case,
        "mode": "step",
        "variant": variant,
        "ref_variant": "frozen",
        "ref_key": case,
        "ref_ms": ref,
        "ref_measured_inline": inline,
        "median_ms": fig["median_ms"],
        "timer": "perf_counter around step + device sync",
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / (fig["median_ms"] / 1e3),
        "step_times_ms": fig["step_times_ms"],
        "peak_mem_bytes": fig["peak_mem_bytes"],
        "static_mem_bytes": fig["static_mem_bytes"],
        "trainable_params": fig["trainable_params"],
        "adapter_dtype": fig["adapter_dtype"],
        "group": f"{name} ckpt {'on' if ckpt else 'off'}",
        "model": name,
        "hidden_size": widths["hidden_size"],
        "intermediate_size": widths["intermediate_size"],
        "vocab_size": widths["vocab_size"],
        "layers": layers,
        "batch": batch,
        "seq": seq,
        "grad_ckpt": ckpt,
        "dtype": DTYPE,
        "lora": dict(LORA, targets="all-linear") if "lora" in variant or variant.startswith("peft") else None,
        "bottleneck": bottleneck if variant.endswith(("_series", "_parallel")) else None,
        "backend": _BACKEND.get(variant),
        "warmup_steps": warmup,
        "timed_steps": steps,
        "fit": how,
        "optimizer": "torch.optim.AdamW(lr=1e-4), default (foreach) implementation" if variant != "frozen" else None,
    })


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    _cleanup()


def _gpu_cases():
    return [
        pytest.param(name, ckpt, variant, id=f"{name}-ckpt{'on' if ckpt else 'off'}-{variant}")
        for name in MODELS
        for ckpt in (False, True)
        for variant in VARIANTS
    ]


@pytest.mark.e2e
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU benchmark)")
@pytest.mark.parametrize("name,ckpt,variant", _gpu_cases())
def test_e2e(benchmark, monkeypatch, name, ckpt, variant):
    device = torch.device("cuda")
    widths, seq = MODELS[name][0], SEQ
    if benchlib.tiny():  # the CPU rehearsal: the smoke model under the real case id
        widths, seq, (layers, batch, how) = SMOKE, 16, (1, 1, {"tiny": True})
    else:
        layers, batch, how = _sizes(name, ckpt, device, monkeypatch)
    if layers < 1 or batch < 1:
        pytest.skip(f"{name}: not even one {how['varies'][:-1]} fits ({how})")
    _run(benchmark, monkeypatch, name=name, widths=widths, layers=layers, batch=batch, seq=seq, ckpt=ckpt,
         variant=variant, device=device, bottleneck=BOTTLENECK,
         warmup=benchlib.env_int("FASTADAPT_BENCH_E2E_WARMUP", 3),
         steps=benchlib.env_int("FASTADAPT_BENCH_E2E_STEPS", 10), how=how)


def _smoke_cases():
    cases = [pytest.param(v, False, id=f"ckptoff-{v}") for v in VARIANTS]
    return cases + [pytest.param(v, True, id=f"ckpton-{v}") for v in SMOKE_CKPT_VARIANTS]


@pytest.mark.e2e
@pytest.mark.smoke
@pytest.mark.parametrize("variant,ckpt", _smoke_cases())
def test_smoke_e2e(benchmark, monkeypatch, variant, ckpt):
    _run(benchmark, monkeypatch, name="smoke", widths=SMOKE, layers=1, batch=1, seq=16, ckpt=ckpt, variant=variant,
         device=benchlib.bench_device(), bottleneck=8, warmup=0, steps=2)


# -- CPU: the embedded model, interleaved rounds against PEFT and an A/A run (issue 25) -------------


def _train_step(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _interleaved(steps: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each entry, over ``rounds`` rounds that each run every entry once, the
    order rotated each round (no entry always runs first or after the same neighbour)."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            with av.variant_env(name.split(":")[0]):
                t0 = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t0)
    return times


def _rss_run(variant: str, dropout: float, steps: int) -> dict:
    script = Path(__file__).with_name("adapter_variants.py")
    proc = subprocess.run([sys.executable, str(script), "rss", variant, str(dropout), str(steps)],
                          capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} training run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
@pytest.mark.full
@pytest.mark.parametrize("method,dropout", [("lora", 0.1), ("lora", 0.0), ("dora", 0.1), ("series", 0.1),
                                            ("parallel", 0.1)])
def test_e2e_embedded_interleaved(benchmark, method, dropout):
    device = torch.device("cpu")
    rounds = benchlib.env_int("FASTADAPT_BENCH_CPU_ROUNDS", 9)
    ours, ref_v = _compared(method)
    # DoRA: the recompute option in the same rounds (its time cost against the default)
    names = [ours, ref_v, f"{ref_v}:aa"] + (["fastadapt_dora_recompute"] if method == "dora" else [])
    steps = {}
    for name in names:
        with av.variant_env(name.split(":")[0]):
            model = av.build(name.split(":")[0], dropout, device)
            steps[name] = _train_step(model, av.batch(model, device))
            steps[name]()  # warm-up: first-call allocations, the optimizer's state
    times = benchmark.pedantic(lambda: _interleaved(steps, rounds), rounds=1, iterations=1)
    steps.clear()
    _cleanup()
    med = {n: statistics.median(t) for n, t in times.items()}
    paired = [a / b for a, b in zip(times[ours], times[ref_v])]
    paired_aa = [a / b for a, b in zip(times[f"{ref_v}:aa"], times[ref_v])]
    ratio, aa = med[ours] / med[ref_v], med[f"{ref_v}:aa"] / med[ref_v]
    spread = abs(aa - 1.0)
    tokens = av.BATCH * av.SEQ
    benchlib.record(benchmark, {
        "suite": "e2e",
        "case": f"{av.MODEL}-cpu-b{av.BATCH}x{av.SEQ}-{method}-p{dropout:g}",
        "mode": "step",
        "variant": ours,
        "ref_variant": ref_v,
        "ref_ms": med[ref_v] * 1e3,
        "median_ms": med[ours] * 1e3,
        "tokens_per_s": tokens / med[ours],
        "tokens_per_step": tokens,
        "timer": "perf_counter around one step (forward, loss, backward, AdamW, zero_grad), interleaved rounds",
        "rounds": rounds,
        "step_times_s": times,
        "median_s": med,
        "ratio_to_ref": ratio,
        "aa_ratio": aa,
        "aa_spread": spread,
        "paired_ratio_median": statistics.median(paired),
        "paired_aa_ratio_median": statistics.median(paired_aa),
        "goal": "ratio to the reference variant ≤ 1 + A/A spread",
        "goal_met": ratio <= 1.0 + spread,
        "recompute_ratio_to_default": (med["fastadapt_dora_recompute"] / med[ours]) if method == "dora" else None,
        "peak_mem_bytes": None,
        **_embedded_info(method, dropout),
    })


def _compared(method: str) -> tuple[str, str]:
    """(fastadapt's variant, the one it is compared with): PEFT has no bottleneck adapters, so those
    compare with the reference backend (plain autograd)."""
    return f"fastadapt_{method}", (f"peft_{method}" if method in av.PEFT_METHODS else f"reference_{method}")


def _embedded_info(method: str, dropout: float) -> dict:
    return {"model": av.MODEL, "method": method, "dropout": dropout, "r": av.R, "alpha": av.ALPHA,
            "targets": list(av.PROJECTIONS), "batch": av.BATCH, "seq": av.SEQ, "dtype": torch.float32,
            "threads": torch.get_num_threads(),
            "optimizer": "torch.optim.AdamW(lr=1e-4), default (foreach) implementation"}


@pytest.mark.e2e
@pytest.mark.full
@pytest.mark.parametrize("method", av.METHODS)
def test_peak_rss_embedded(benchmark, method):
    """Peak resident memory of a training run (``FASTADAPT_BENCH_RSS_STEPS`` steps, default 20) of
    fastadapt and of the variant it is compared with, dropout 0.1, each in a fresh process (the
    load's own peak reset first: Linux's clear_refs)."""
    dropout, steps = 0.1, benchlib.env_int("FASTADAPT_BENCH_RSS_STEPS", 20)
    ours, ref_v = _compared(method)
    rss = benchmark.pedantic(lambda: {v: _rss_run(v, dropout, steps) for v in (ours, ref_v)}, rounds=1, iterations=1)
    peak = {v: r["peak_rss_bytes"] for v, r in rss.items()}
    benchlib.record(benchmark, {
        "suite": "peak_rss",
        "case": f"{av.MODEL}-cpu-b{av.BATCH}x{av.SEQ}-{method}-p{dropout:g}",
        "mode": "train",
        "variant": ours,
        "ref_variant": ref_v,
        "median_ms": statistics.median(rss[ours]["step_s"]) * 1e3,
        "timer": "step time of the RSS run (loaded machine: not a speed figure)",
        "peak_rss_bytes": peak,
        "peak_rss_delta_mib": (peak[ours] - peak[ref_v]) / 2**20,
        "rss_after_load_bytes": {v: r["rss_after_load_bytes"] for v, r in rss.items()},
        "rss_peak_is_training_only": {v: r["peak_is_training_only"] for v, r in rss.items()},
        "rss_steps": steps,
        "rss_step_s": {v: r["step_s"] for v, r in rss.items()},
        **_embedded_info(method, dropout),
    })
