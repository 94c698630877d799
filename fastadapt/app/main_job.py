"""The main job (README command 1): on the embedded model, evaluate the base on a GSM8K test slice,
fine-tune it with LoRA on GSM8K train, evaluate again, export the merged model and print a
before/after table.

Sizes: on CPU the slices are small so the whole job finishes in under 15 minutes on 2 cores
(:data:`CPU_DEFAULTS`); with CUDA they are larger (:data:`GPU_DEFAULTS`). Everything lands in
``<output>/``: ``eval-base/`` and ``eval-lora/`` (metrics.json, predictions.jsonl), ``adapter/``
(adapter, training_config.json, train_log.jsonl), ``merged/`` (plain transformers checkpoint) and
``summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from .evaluation import run_eval
from .exporting import merge_export_and_check
from .models import load_model
from .train import DEFAULT_PRESET, TrainConfig, train

logger = logging.getLogger(__name__)

#: 2 CPU cores, < 15 minutes in all (measured 285 s without setup: see docs/paper_table.md).
CPU_DEFAULTS: dict[str, Any] = {
    "eval_limit": 20, "train_limit": 400, "max_steps": 30, "batch_size": 4, "micro_batch_size": 4,
    "lr": 1e-3, "max_new_tokens": 128, "cutoff_len": 192, "eval_batch_size": 10,
}
GPU_DEFAULTS: dict[str, Any] = {
    "eval_limit": 200, "train_limit": None, "max_steps": 300, "batch_size": 16, "micro_batch_size": 16,
    "lr": 3e-4, "max_new_tokens": 256, "cutoff_len": 256, "eval_batch_size": 50,
}


def run_main_job(*, model: str = "smollm2-135m", output: str | Path = "runs/main-job", seed: int = 42,
                 **overrides: Any) -> dict[str, Any]:
    """Run the main job; ``overrides`` replace entries of :data:`CPU_DEFAULTS`/:data:`GPU_DEFAULTS`.
    Returns (and writes to ``summary.json``) the before/after metrics and timings."""
    cuda = torch.cuda.is_available()
    cfg = dict(GPU_DEFAULTS if cuda else CPU_DEFAULTS)
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise TypeError(f"unknown main-job setting(s) {unknown}; expected some of {sorted(cfg)}")
    cfg.update(overrides)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.time()

    t = time.time()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    net, tokenizer = load_model(model, dtype=torch.bfloat16 if bf16 else None, device="cuda" if cuda else None)
    timings["load"] = time.time() - t
    print(f"[main-job] {model} on {'CUDA' if cuda else 'CPU'}; settings {json.dumps(cfg)}", flush=True)

    eval_kw = dict(model=model, data="gsm8k", limit=cfg["eval_limit"], batch_size=cfg["eval_batch_size"],
                   max_new_tokens=cfg["max_new_tokens"])
    t = time.time()
    print(f"[main-job] 1/4 evaluating the base model on {cfg['eval_limit']} GSM8K test problems", flush=True)
    before = run_eval(output=out / "eval-base", loaded=(net, tokenizer), **eval_kw)
    timings["eval_base"] = time.time() - t

    t = time.time()
    steps = cfg["max_steps"]
    print(f"[main-job] 2/4 LoRA fine-tuning on GSM8K train: {steps} steps x {cfg['batch_size']} examples",
          flush=True)
    tcfg = TrainConfig(
        model=model, data="gsm8k", output=str(out / "adapter"), method="lora", preset=DEFAULT_PRESET,
        max_steps=steps, batch_size=cfg["batch_size"], micro_batch_size=cfg["micro_batch_size"], lr=cfg["lr"],
        warmup_steps=max(1, steps // 10), cutoff_len=cfg["cutoff_len"], seed=seed, limit=cfg["train_limit"],
        save_steps=steps, save_total_limit=1,
    )
    result = train(tcfg, overwrite=True, loaded=(net, tokenizer))
    timings["train"] = time.time() - t

    t = time.time()
    print("[main-job] 3/4 evaluating the fine-tuned model", flush=True)
    after = run_eval(output=out / "eval-lora", loaded=(net, tokenizer), **eval_kw)
    after["adapter"] = str(out / "adapter")
    (out / "eval-lora" / "metrics.json").write_text(json.dumps(after, indent=2) + "\n")
    timings["eval_lora"] = time.time() - t

    t = time.time()
    print("[main-job] 4/4 merging and exporting; reloading the export with plain transformers", flush=True)
    check = merge_export_and_check(net, tokenizer, out / "merged", overwrite=True)
    timings["export"] = time.time() - t
    timings["total"] = time.time() - t_all

    summary = {
        "model": model, "device": "cuda" if cuda else "cpu", "settings": cfg, "seed": seed,
        "before": {k: before[k] for k in ("accuracy", "correct", "n")},
        "after": {k: after[k] for k in ("accuracy", "correct", "n")},
        "loss_first": result.losses[0] if result.losses else None,
        "loss_last": result.losses[-1] if result.losses else None,
        "adapter": net.fastadapt_state.config.to_dict(), "train_steps": result.steps, "export": str(check.path),
        "merge_check_max_rel_diff": check.merge_diff, "reload_check_max_rel_diff": check.reload_diff,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(summary), flush=True)
    return summary


def format_table(s: dict[str, Any]) -> str:
    n = s["before"]["n"]
    lines = [
        "",
        f"GSM8K test, first {n} problems, greedy, {s['settings']['max_new_tokens']} new tokens ({s['device']})",
        "| model | accuracy | correct |",
        "|---|---|---|",
        f"| {s['model']} (base) | {s['before']['accuracy']:.1%} | {s['before']['correct']}/{n} |",
        f"| + LoRA r={s['adapter']['r']}, {s['train_steps']} steps | {s['after']['accuracy']:.1%} "
        f"| {s['after']['correct']}/{n} |",
        "",
        f"training loss {s['loss_first']:.3f} -> {s['loss_last']:.3f}; merged export in {s['export']} "
        f"(merge check {s['merge_check_max_rel_diff']:.1e}, reload check {s['reload_check_max_rel_diff']:.1e})",
        "time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()),
    ]
    return "\n".join(lines)
