"""What one training forward keeps for backward (issue 25): bytes of the tensors autograd saves,
each storage counted once by its data pointer, parameters excluded, on the embedded smollm2-135m
(r=16, α=32, the seven projections, batch 2 × 128 tokens; series/parallel: the method defaults),
fp32 and fp32 under bf16 autocast. Saved bytes do not depend on the device: the CPU figures hold on
a GPU, and the same code runs on both.

Two counts per variant (``adapter_variants.saved_bytes``): ``saved`` (every tensor saved during the
forward; the issue's count, made deterministic) and ``held`` (those the graph still holds when the
forward returns: what occupies memory when backward starts). Each is reported as the extra over the
frozen model of the same precision, and as a ratio to PEFT's extra (LoRA, DoRA).

Goals (fastadapt's torch backend, each count): LoRA p = 0.1 ≤ 0.35 × PEFT, p = 0 ≤ PEFT; DoRA
p = 0.1 ≤ 0.45 × PEFT, p = 0 ≤ 0.40 × PEFT; series/parallel at p = 0.1 ≤ their own p = 0 extra plus
one bit per element of the adapters' inputs. Recorded as ``goal_*`` (the benchmark does not fail on
a miss; the summary and bench/report.py print it).

    python -m pytest bench/test_bench_saved_memory.py -m memory -p no:cacheprovider \\
        --benchmark-json bench/results/<machine>/saved_memory.json     # ~15 min on 2 CPU cores

Without ``-m memory`` only the smoke version runs (a tiny random LLaMA: proves the code runs).
"""

from __future__ import annotations

import adapter_variants as av
import benchlib
import pytest
import torch

PRECISIONS = {"fp32": None, "bf16-autocast": torch.bfloat16}
DROPOUTS = (0.0, 0.1)
#: extra over frozen ≤ factor × PEFT's extra, per (method, dropout > 0)
PEFT_GOALS = {("lora", False): 1.0, ("lora", True): 0.35, ("dora", False): 0.40, ("dora", True): 0.45}
MiB = 2**20

#: (model, precision, variant, dropout) -> the measured figures, for the extras and ratios
_MEASURED: dict[tuple, dict] = {}


def _cases(precisions):
    out = []
    for precision in precisions:
        out.append((precision, None, 0.0, "frozen"))
        for method in av.METHODS:
            for p in DROPOUTS:
                out += [(precision, method, p, v) for v in av.variants(method)]
    return out


def _id(case):
    precision, method, p, variant = case
    return f"{precision}-frozen" if method is None else f"{precision}-{method}-p{p:g}-{variant}"


def _measure(model_name, base, precision, variant, p, device):
    key = (model_name, precision, variant, p)
    if key not in _MEASURED:
        with av.variant_env(variant):
            model = av.build(variant, p, device, base=base, bottleneck=8 if model_name == "tiny-llama" else None)
            ids = av.batch(model, device)
            fig = av.saved_bytes(model, ids, autocast=PRECISIONS[precision])
            if variant.endswith(("_series", "_parallel")):
                fig["mask_budget_bytes"] = av.adapter_input_elements(model, ids.numel()) / 8
        _MEASURED[key] = fig
        del model
    return _MEASURED[key]


def _run(benchmark, model_name, base, precision, method, p, variant, device):
    frozen = _measure(model_name, base, precision, "frozen", 0.0, device)
    fig = benchmark.pedantic(lambda: _measure(model_name, base, precision, variant, p, device), rounds=1,
                             iterations=1)
    info = {
        "suite": "saved_memory",
        "case": f"{model_name}-b{av.BATCH}x{av.SEQ}-{precision}" + ("" if method is None else f"-{method}-p{p:g}"),
        "mode": "fwd_bwd",
        "variant": variant,
        "median_ms": fig["fwd_bwd_ms"],
        "timer": "one forward + backward with the counting hooks (not a speed figure)",
        "model": model_name, "precision": precision, "method": method, "dropout": p,
        "batch": av.BATCH, "seq": av.SEQ, "r": av.R, "alpha": av.ALPHA, "targets": list(av.PROJECTIONS),
        "backend": av.env(variant).get("FASTADAPT_BACKEND"),
        "loss": fig["loss"],
    }
    for count in ("saved", "held"):
        total = fig[f"{count}_bytes"]
        extra = total - frozen[f"{count}_bytes"]
        info[f"{count}_mib"] = total / MiB
        info[f"{count}_extra_mib"] = extra / MiB
        peft = _MEASURED.get((model_name, precision, f"peft_{method}", p))
        if peft is not None and variant != "frozen":
            peft_extra = peft[f"{count}_bytes"] - frozen[f"{count}_bytes"]
            info[f"{count}_ratio_to_peft"] = extra / peft_extra if peft_extra > 0 else None
        if not variant.startswith("fastadapt_"):
            continue
        if (method, p > 0) in PEFT_GOALS and info.get(f"{count}_ratio_to_peft") is not None:
            limit = PEFT_GOALS[(method, p > 0)]
            info[f"goal_{count}"] = f"≤ {limit:g} × PEFT"
            info[f"goal_{count}_met"] = info[f"{count}_ratio_to_peft"] <= limit
        own_p0 = _MEASURED.get((model_name, precision, variant, 0.0))
        if method in ("series", "parallel") and p > 0 and own_p0 is not None:
            budget = own_p0[f"{count}_bytes"] - frozen[f"{count}_bytes"] + fig["mask_budget_bytes"]
            info[f"goal_{count}"] = f"≤ p=0 extra + 1 bit/element ({budget / MiB:.1f} MiB)"
            info[f"goal_{count}_met"] = extra <= budget
    benchlib.record(benchmark, info)


@pytest.mark.memory
@pytest.mark.full
@pytest.mark.parametrize("case", _cases(PRECISIONS), ids=_id)
def test_saved_memory(benchmark, case):
    precision, method, p, variant = case
    device = benchlib.bench_device()
    _run(benchmark, av.MODEL, av.base_model(device), precision, method, p, variant, device)


# -- smoke: a tiny random LLaMA ---------------------------------------------------------------------

_TINY: dict[str, torch.nn.Module] = {}


def _tiny(device):
    if "model" not in _TINY:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                          num_hidden_layers=1, vocab_size=64, max_position_embeddings=256, use_cache=False)
        _TINY["model"] = AutoModelForCausalLM.from_config(cfg).to(device)
    return _TINY["model"]


@pytest.mark.memory
@pytest.mark.smoke
@pytest.mark.parametrize("case", _cases(["fp32"]), ids=_id)
def test_smoke_saved_memory(benchmark, case):
    precision, method, p, variant = case
    device = benchlib.bench_device()
    _run(benchmark, "tiny-llama", _tiny(device), precision, method, p, variant, device)
