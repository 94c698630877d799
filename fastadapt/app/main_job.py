"""The main job (README command 1): on the embedded model, measure the base, fine-tune it with
LoRA on GSM8K train, measure again, export the merged model (a transformers checkpoint and a q8_0
GGUF file for llama.cpp / Ollama) and print a before/after table.

What it measures, before and after: the **held-out loss** (the teacher-forced mean per-token loss
of the reference solutions of GSM8K *test* problems, which training never sees: the signal that
moves on a short run) and GSM8K test **accuracy** (greedy; on CPU only 20 problems, where one
problem is 5 points and 30 steps are not expected to move it). Training loss is reported as the
means of the first and last tenth of the steps (one step's loss is one small batch's).

Sizes: on CPU the slices are small so the whole job finishes in under 15 minutes on 2 cores
(:data:`CPU_DEFAULTS`); with CUDA they are larger (:data:`GPU_DEFAULTS`). Everything lands in
``<output>/``: ``eval-base/`` and ``eval-lora/`` (metrics.json, predictions.jsonl, loss.json),
``adapter/`` (adapter, training_config.json, train_log.jsonl), ``merged/`` (plain transformers
checkpoint), ``model-q8_0.gguf`` with ``eval-gguf/`` (the held-out loss of that file as transformers'
GGUF loader reads it) and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..export import check_gguf
from ..models import load_model
from .evaluation import run_eval, run_heldout_loss
from .exporting import export_gguf_and_check, merge_export_and_check
from .train import DEFAULT_PRESET, TrainConfig, loss_means, train

logger = logging.getLogger(__name__)

#: The GGUF file the main job writes: 8-bit, close to lossless, what llama.cpp users run by default.
GGUF_QUANT = "q8_0"
#: 2 CPU cores, < 15 minutes in all (the measured run is in the README).
CPU_DEFAULTS: dict[str, Any] = {
    "eval_limit": 20, "heldout_limit": 50, "train_limit": 400, "max_steps": 30, "batch_size": 4,
    "micro_batch_size": 4, "lr": 1e-3, "max_new_tokens": 128, "cutoff_len": 192, "eval_batch_size": 10,
}
GPU_DEFAULTS: dict[str, Any] = {
    "eval_limit": 200, "heldout_limit": 500, "train_limit": None, "max_steps": 300, "batch_size": 16,
    "micro_batch_size": 16, "lr": 3e-4, "max_new_tokens": 256, "cutoff_len": 256, "eval_batch_size": 50,
}


def main_job_settings(**overrides: Any) -> dict[str, Any]:
    """:data:`CPU_DEFAULTS` (or :data:`GPU_DEFAULTS` with CUDA) with ``overrides`` (None: keep)."""
    cfg = dict(GPU_DEFAULTS if torch.cuda.is_available() else CPU_DEFAULTS)
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise TypeError(f"unknown main-job setting(s) {unknown}; expected some of {sorted(cfg)}")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def main_job_train_config(cfg: dict[str, Any], *, model: str, output: str | Path, seed: int) -> TrainConfig:
    """The LoRA run of the main job (validated: a bad setting fails before the model loads)."""
    return TrainConfig(
        model=model, data="gsm8k", output=str(Path(output) / "adapter"), method="lora", preset=DEFAULT_PRESET,
        max_steps=cfg["max_steps"], batch_size=cfg["batch_size"], micro_batch_size=cfg["micro_batch_size"],
        lr=cfg["lr"], cutoff_len=cfg["cutoff_len"], seed=seed, limit=cfg["train_limit"],
        save_steps=cfg["max_steps"], save_total_limit=1,
    )


def run_main_job(*, model: str = "smollm2-135m", output: str | Path = "runs/main-job", seed: int = 42,
                 **overrides: Any) -> dict[str, Any]:
    """Run the main job; ``overrides`` replace entries of :data:`CPU_DEFAULTS`/:data:`GPU_DEFAULTS`.
    Returns (and writes to ``summary.json``) the before/after metrics and timings."""
    cuda = torch.cuda.is_available()
    cfg = main_job_settings(**overrides)
    tcfg = main_job_train_config(cfg, model=model, output=output, seed=seed)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.time()

    t = time.time()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    net, tokenizer = load_model(model, dtype=torch.bfloat16 if bf16 else None, device="cuda" if cuda else None)
    timings["load"] = time.time() - t
    say(f"{model} on {'CUDA' if cuda else 'CPU'}; settings {json.dumps(cfg)}")

    eval_kw = dict(model=model, data="gsm8k", limit=cfg["eval_limit"], batch_size=cfg["eval_batch_size"],
                   max_new_tokens=cfg["max_new_tokens"])
    loss_kw = dict(model=model, data="gsm8k", limit=cfg["heldout_limit"], batch_size=cfg["eval_batch_size"])
    t = time.time()
    say(f"1/5 base model: held-out loss on {cfg['heldout_limit']} GSM8K test solutions, accuracy on "
        f"{cfg['eval_limit']} GSM8K test problems")
    loss_before = run_heldout_loss(output=out / "eval-base", loaded=(net, tokenizer), **loss_kw)
    before = run_eval(output=out / "eval-base", loaded=(net, tokenizer), **eval_kw)
    timings["eval_base"] = time.time() - t

    t = time.time()
    steps = cfg["max_steps"]
    say(f"2/5 LoRA fine-tuning on GSM8K train: {steps} steps x {cfg['batch_size']} examples")
    result = train(tcfg, overwrite=True, loaded=(net, tokenizer))
    timings["train"] = time.time() - t

    t = time.time()
    say("3/5 the fine-tuned model: held-out loss and accuracy")
    adapter = str(out / "adapter")
    loss_after = run_heldout_loss(output=out / "eval-lora", loaded=(net, tokenizer), **loss_kw)
    after = run_eval(output=out / "eval-lora", loaded=(net, tokenizer), **eval_kw)
    for name, record in (("metrics.json", after), ("loss.json", loss_after)):
        record["adapter"] = adapter
        (out / "eval-lora" / name).write_text(json.dumps(record, indent=2) + "\n")
    timings["eval_lora"] = time.time() - t

    t = time.time()
    say("4/5 merging and exporting; reloading the export with plain transformers")
    check = merge_export_and_check(net, tokenizer, out / "merged", overwrite=True)
    timings["export"] = time.time() - t

    t = time.time()
    gguf = gguf_step(net, tokenizer, out, loss_kw)
    timings["gguf"] = time.time() - t
    timings["total"] = time.time() - t_all

    summary = {
        "model": model, "device": "cuda" if cuda else "cpu", "settings": cfg, "seed": seed,
        "heldout_loss": {"base": loss_before["loss"], "adapted": loss_after["loss"], "n": loss_after["n"],
                         "tokens": loss_after["tokens"], "data": "GSM8K test reference solutions"},
        "train_loss": loss_means(result.losses),
        "before": {k: before[k] for k in ("accuracy", "correct", "n")},
        "after": {k: after[k] for k in ("accuracy", "correct", "n")},
        "adapter": net.fastadapt_state.config.to_dict(), "train_steps": result.steps,
        "warmup_steps": json.loads((Path(adapter) / "training_config.json").read_text())["warmup_steps"],
        "export": str(check.path),
        "merge_check_max_rel_diff": check.merge_diff, "reload_check_max_rel_diff": check.reload_diff,
        "gguf": gguf,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(summary), flush=True)
    return summary


def gguf_step(net: Any, tokenizer: Any, out: Path, loss_kw: dict[str, Any]) -> dict[str, Any]:
    """Step 5: the merged model as a q8_0 GGUF file, read back by transformers' GGUF loader, its logits
    compared with the fine-tuned model's and its held-out loss measured. A model or tokenizer that
    GGUF cannot carry skips the step, saying why."""
    try:
        check_gguf(net, tokenizer)
    except (ValueError, TypeError) as e:
        say(f"5/5 GGUF export skipped: {e}")
        return {"skipped": str(e)}
    say(f"5/5 GGUF ({GGUF_QUANT}) export, read back with transformers' GGUF loader: logits and held-out loss")
    check = export_gguf_and_check(net, tokenizer, out / f"model-{GGUF_QUANT}.gguf", quant=GGUF_QUANT, overwrite=True)
    loss = run_heldout_loss(output=out / "eval-gguf", loaded=(check.loaded, tokenizer), **loss_kw)
    e = check.export
    return {"path": str(e.path), "quant": e.quant, "bytes": e.path.stat().st_size,
            "export_seconds": round(e.seconds, 1), "heldout_loss": loss["loss"],
            "quantization_error": {"mean_abs_logit_diff": e.error.mean_abs_logit_diff,
                                   "max_abs_logit_diff": e.error.max_abs_logit_diff,
                                   "argmax_agreement": e.error.argmax_agreement, "tokens": e.error.tokens},
            "read_back": {"mean_abs_logit_diff": check.mean_abs_logit_diff, "max_abs_logit_diff":
                          check.max_abs_logit_diff, "argmax_agreement": check.argmax_agreement}}


def say(message: str) -> None:
    print(f"[main-job] {message}", flush=True)


def format_table(s: dict[str, Any]) -> str:
    n, held, tl = s["before"]["n"], s["heldout_loss"], s["train_loss"]
    cfg = s["settings"]
    accuracy_note = f"one problem is {100 / n:.0f} points"
    if s["device"] == "cpu":
        accuracy_note += f"; a {s['train_steps']}-step CPU run is not expected to move it"
    lines = [
        "",
        f"{s['model']} + LoRA r={s['adapter']['r']}, {s['train_steps']} steps x {cfg['batch_size']} GSM8K train "
        f"examples, lr {cfg['lr']:g}, warmup {s['warmup_steps']} ({s['device']})",
        f"| model | held-out loss ({held['n']} GSM8K test solutions) | GSM8K test accuracy ({n} problems) |",
        "|---|---|---|",
        f"| {s['model']} (base) | {held['base']:.4f} | {s['before']['accuracy']:.1%} ({s['before']['correct']}/{n}) |",
        f"| + LoRA, {s['train_steps']} steps | {held['adapted']:.4f} | {s['after']['accuracy']:.1%} "
        f"({s['after']['correct']}/{n}) |",
        *_gguf_row(s.get("gguf")),
        "",
        f"held-out loss: mean per-token loss of the reference solutions of the first {held['n']} GSM8K test "
        "problems, teacher-forced, never trained on (lower is better)",
        f"accuracy: greedy, {cfg['max_new_tokens']} new tokens; {accuracy_note}",
        f"training loss: {tl['first']:.3f} (mean of the first {tl['steps_each']} steps) -> {tl['last']:.3f} "
        f"(mean of the last {tl['steps_each']})",
        f"merged export in {s['export']} (merge check {s['merge_check_max_rel_diff']:.1e}, "
        f"reload check {s['reload_check_max_rel_diff']:.1e})",
        *_gguf_lines(s.get("gguf")),
        "time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()),
    ]
    return "\n".join(lines)


def _gguf_row(g: dict[str, Any] | None) -> list[str]:
    if not g or "skipped" in g:
        return []
    return [f"| + LoRA, merged, GGUF {g['quant']} (transformers' GGUF loader) | {g['heldout_loss']:.4f} | — |"]


def _gguf_lines(g: dict[str, Any] | None) -> list[str]:
    if not g:
        return []
    if "skipped" in g:
        return [f"GGUF export skipped: {g['skipped']}"]
    q, r = g["quantization_error"], g["read_back"]
    return [f"GGUF {g['quant']} export in {g['path']} ({g['bytes'] / 2**20:.0f} MiB, {g['export_seconds']:.0f} s): "
            f"quantization error mean |Δlogit| {q['mean_abs_logit_diff']:.3f} (argmax agreement "
            f"{q['argmax_agreement']:.0%}); read back by transformers' GGUF loader: mean |Δlogit| "
            f"{r['mean_abs_logit_diff']:.3f} vs the fine-tuned model; run it: llama-cli -m {g['path']}"]
