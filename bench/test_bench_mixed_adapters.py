"""Many adapters, one batch (issue 27): greedy generation on the embedded model (smollm2-135m) with a
batch whose rows use different adapters, against the base model alone and PEFT's ``adapter_names``.

The case (the issue's): batch 16 — 14 rows on 8 adapters (2, 2, 2, 2, 2, 2, 1, 1 rows), 2 rows on
``"__base__"`` — prompts of 48 to 64 tokens left-padded to 64 (attention mask), 64 new tokens
(``min_new_tokens`` keeps every row going), greedy. Adapters: ranks (bottleneck sizes) 8, 16, 32, 64
on two target sets each — PEFT's LLaMA default (q_proj, v_proj) and LLM-Adapters' (q, k, v, up,
down) for LoRA and DoRA; the MLP output projection (AdapterP) and all MLP projections (AdapterH) for
series adapters. Weights are random and non-zero (never time zeros).

Variants, timed round-robin in one process (each round runs every variant once, so a noisy moment
hits all of them): ``base`` (the unpatched model, no adapter), ``fastadapt`` (``model.generate(...,
adapter_names=...)`` on the patched model), ``peft`` (``PeftModel.generate(..., adapter_names=...)``,
LoRA only: PEFT refuses DoRA in mixed batches and has no series adapters; the refusal is recorded).
tokens/s = 16 × 64 / time. On the CPU the time is the process's CPU time with one intra-op thread
(``time.process_time``: other processes on a shared machine do not inflate it) and the wall time
beside it; on CUDA, wall time with a device sync. fastadapt's LoRA tokens must equal PEFT's.

    python -m pytest bench/test_bench_mixed_adapters.py -m mixed -q -p no:cacheprovider \\
        --benchmark-json bench/results/cpu/mixed_adapters.json

Marked ``full`` (about 20 minutes of CPU time): ``pytest bench/`` leaves it out; ``-m mixed`` runs it.
The smoke case (a tiny LLaMA, one round) proves the code runs.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import benchlib
import pytest
import torch

import fastadapt as fa
from fastadapt.ops.lora_mixed import selected_backend

BATCH, PROMPT, NEW = 16, 64, 64
RANKS = (8, 16, 32, 64)
TARGETS = {
    "lora": (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
    "dora": (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
    "series": ("mlp-output", "mlp"),
}
#: which adapter each row uses (None: the base model)
ROWS = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, None, None]


def _adapters(model, method: str, folder: Path, *, ranks=RANKS, scale: float = 0.02) -> list[Path]:
    """8 adapter folders of ``method`` on ``model`` (patched and unpatched again), random weights."""
    paths = []
    g = torch.Generator().manual_seed(0)
    for i, targets in enumerate(t for t in TARGETS[method] for _ in ranks):
        size = ranks[i % len(ranks)]
        options = {"bottleneck": size} if method == "series" else {"r": size, "alpha": 2 * size, "dropout": 0.0}
        fa.patch(model, method, targets=targets, **options)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and "magnitude" not in name:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
        paths.append(fa.save_adapter(model, folder / f"{method}{i}"))
        fa.unpatch(model)
    return paths


def _prompts(vocab: int, device, *, batch=BATCH, prompt=PROMPT, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = [prompt - (i * 5) % min(17, prompt) for i in range(batch)]  # 48 .. 64
    ids = torch.zeros(batch, prompt, dtype=torch.long)
    mask = torch.zeros(batch, prompt, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, prompt - n:] = torch.randint(min(100, vocab // 4), vocab - min(100, vocab // 4), (n,), generator=g)
        mask[i, prompt - n:] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _timed(fn, device) -> tuple[float, float, object]:
    """(CPU seconds of this process, wall seconds, result)."""
    benchlib.sync(device)
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    benchlib.sync(device)
    return time.process_time() - c0, time.perf_counter() - w0, out


def _measure(variants: dict, device, rounds: int) -> dict:
    """Round-robin timing: every round runs every variant once (after one warm-up each)."""
    for fn in variants.values():
        fn(4)  # warm-up: a short generation
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    outs = {}
    for _ in range(rounds):
        for name, fn in variants.items():
            c, w, outs[name] = _timed(lambda fn=fn: fn(None), device)
            cpu[name].append(c)
            wall[name].append(w)
    return {"cpu": cpu, "wall": wall, "outputs": outs}


def _case(benchmark, method: str, *, model_name: str, rounds: int, batch=BATCH, prompt=PROMPT, new=NEW,
          ranks=RANKS, loader=None):
    device = benchlib.bench_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU time of one thread: stable on a shared machine
    try:
        base, _ = loader() if loader else fa.load_model(model_name, dtype=dtype, device=device)
        base.eval()
        tmp = Path(tempfile.mkdtemp(prefix="fa-mixed-bench-"))
        paths = _adapters(base, method, tmp, ranks=ranks)
        ours = copy.deepcopy(base)
        for i, path in enumerate(paths):
            fa.load_adapter(ours, path, adapter_name=f"a{i}")
        ours.eval()
        names = [f"a{r}" if r is not None else "__base__" for r in ROWS[:batch]]
        inputs = _prompts(base.config.vocab_size, device, batch=batch, prompt=prompt)

        def gen(model, **extra):
            def run(n):
                with torch.no_grad():
                    return model.generate(**inputs, max_new_tokens=n or new, min_new_tokens=n or new, do_sample=False,
                                          pad_token_id=0, **extra)
            return run

        variants = {"base": gen(base), "fastadapt": gen(ours, adapter_names=names)}
        peft_note = None
        if method == "lora":
            peft = pytest.importorskip("peft")
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name="a0")
            for i, path in enumerate(paths[1:], 1):
                theirs.load_adapter(path, adapter_name=f"a{i}")
            theirs.eval()
            variants["peft"] = gen(theirs, adapter_names=names)
        elif method == "dora":
            peft_note = "PEFT refuses DoRA in mixed batches: 'Cannot pass `adapter_names` when DoRA is enabled.'"
        else:
            peft_note = "PEFT has no series (bottleneck) adapters"
        res = _measure(variants, device, rounds)
        if "peft" in variants:  # the same greedy tokens as PEFT
            assert torch.equal(res["outputs"]["fastadapt"], res["outputs"]["peft"])
        benchmark.group = f"mixed batch generation ({method})"
        benchmark.pedantic(lambda: variants["fastadapt"](8), rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    tokens = batch * new
    cpu = {k: statistics.median(v) for k, v in res["cpu"].items()}
    wall = {k: statistics.median(v) for k, v in res["wall"].items()}
    clock = wall if device.type == "cuda" else cpu
    tps = {k: tokens / v for k, v in clock.items()}
    info = {
        "suite": "mixed_generation", "case": f"{model_name}-b{batch}-p{prompt}-new{new}-8x{method}",
        "mode": "generate", "variant": "fastadapt", "method": method, "model": model_name, "dtype": dtype,
        "batch": batch, "prompt_tokens": prompt, "new_tokens": new, "rows": names, "ranks": list(ranks),
        "targets": [list(t) if not isinstance(t, str) else t for t in TARGETS[method]],
        "median_ms": clock["fastadapt"] * 1e3, "ref_variant": "base", "ref_ms": clock["base"] * 1e3,
        "tokens_per_s": tps, "ratio_to_base": tps["fastadapt"] / tps["base"],
        "ratio_to_peft": tps["fastadapt"] / tps["peft"] if "peft" in tps else None, "peft": peft_note,
        "cpu_s": res["cpu"], "wall_s": res["wall"],
        "wall_ratio_to_base": wall["base"] / wall["fastadapt"],
        "wall_ratio_to_peft": wall["peft"] / wall["fastadapt"] if "peft" in wall else None,
        "timer": ("process_time (CPU seconds of this process), 1 intra-op thread, median of rounds; wall beside it"
                  if device.type == "cpu" else "perf_counter + cuda sync, median of rounds"),
        "rounds": rounds, "threads": 1 if device.type == "cpu" else None,
        "backend": selected_backend(device, rows=batch),
    }
    return benchlib.record(benchmark, info)


@pytest.mark.mixed
@pytest.mark.full
@pytest.mark.parametrize("method", ["lora", "dora", "series"])
def test_mixed_batch_generation(benchmark, method):
    rounds = benchlib.env_int("FASTADAPT_BENCH_MIXED_ROUNDS", 3)
    info = _case(benchmark, method, model_name="smollm2-135m", rounds=rounds)
    print(f"\n{method}: tokens/s {info['tokens_per_s']} -> x{info['ratio_to_base']:.3f} of base"
          + (f", x{info['ratio_to_peft']:.2f} of PEFT" if info["ratio_to_peft"] else f" ({info['peft']})"))


@pytest.mark.smoke
@pytest.mark.parametrize("method", ["lora", "series"])
def test_smoke_mixed_batch_generation(benchmark, method):
    import sys

    sys.path.insert(0, str(benchlib.REPO / "tests"))
    from tiny_models import tiny_model

    def loader():
        return tiny_model("llama"), None

    _case(benchmark, method, model_name="tiny-llama", rounds=1, batch=16, prompt=8, new=3, ranks=(2, 3, 4, 8),
          loader=loader)
