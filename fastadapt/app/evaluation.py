"""``fastadapt eval``: batched greedy (or beam) generation on an evaluation set, then scoring.

Unlike LLM-Adapters' ``evaluate.py``, batches are LEFT-padded and carry an attention mask (it passed
none, so padded batches attended to padding and gave different answers than unbatched runs), the
model is in eval mode (it left dropout on), and the KV cache is on. Prompts are sorted by length
so that a batch holds similar lengths (less padding); results come back in the set's order.

Outputs (``run_eval``): ``metrics.json`` ``{"accuracy", "n", "correct", "data", "model",
"adapter", "decoding": {...}, ...}`` and ``predictions.jsonl``, one row per example:
``{"index", "instruction", "input", "answer", "generation", "prediction", "correct"}``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .answers import score
from .data import load_eval_set
from .models import load_model
from .prompts import build_prompt, resolve_pad_token_id

logger = logging.getLogger(__name__)

#: Generation stops early at these (a model starting a new Alpaca example); scoring cuts there anyway.
STOP_STRINGS = ("### Instruction:", "### Input:", "Below is an instruction that describes")


def _eos_ids(model, tokenizer) -> list[int] | None:
    ids: list[int] = []
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
        for i in src if isinstance(src, (list, tuple)) else [src]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids or None


def _stop_on_strings(tokenizer, stops: Sequence[str], prompt_len: int):
    """A stopping criterion that ends a row once its new text contains one of ``stops``. (Our own:
    transformers' ``stop_strings`` needs a tokenizer whose vocabulary it can parse, which fails on
    some tokenizers.) Only the last 16 tokens are decoded per step: the stop strings are short."""
    from transformers import StoppingCriteria

    class StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            tails = input_ids[:, max(prompt_len, input_ids.shape[1] - 16):]
            texts = tokenizer.batch_decode(tails, skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stops) for t in texts], dtype=torch.bool,
                                device=input_ids.device)

    return StopOnStrings()


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    num_beams: int = 1,
    stop_strings: Sequence[str] | None = STOP_STRINGS,
) -> list[str]:
    """Completions of ``prompts`` (one batch): left padding + attention mask, greedy when
    ``num_beams == 1``, KV cache on. Returns the decoded new tokens without special tokens."""
    from transformers import GenerationConfig


    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = old_side
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams, use_cache=True,
        pad_token_id=resolve_pad_token_id(tokenizer), eos_token_id=_eos_ids(model, tokenizer),
    )
    kwargs = {}
    if stop_strings:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList(
            [_stop_on_strings(tokenizer, list(stop_strings), enc["input_ids"].shape[1])])
    out = model.generate(**enc, generation_config=gen_cfg, **kwargs)
    new = out[:, enc["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def evaluate(
    model,
    tokenizer,
    records: Sequence[dict[str, Any]],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    num_beams: int = 1,
    progress: bool = True,
    stop_strings: Sequence[str] | None = STOP_STRINGS,
) -> list[dict[str, Any]]:
    """Generate for every record of :func:`fastadapt.app.data.load_eval_set` and score it.

    Returns prediction rows in ``records``' order (see the module docstring). The model is put in
    eval mode for the run and its mode restored afterwards."""
    from tqdm.auto import tqdm


    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams <= 0:
        raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
    if tokenizer is None:
        raise ValueError("evaluation needs a tokenizer; the model folder has none")
    prompts = [build_prompt(r["instruction"], r.get("input") or "") for r in records]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    generations: list[str | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(prompts), desc="eval", unit="ex", disable=not progress or None)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            texts = generate(model, tokenizer, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                             num_beams=num_beams, stop_strings=stop_strings)
            for i, text in zip(idx, texts):
                generations[i] = text
            bar.update(len(idx))
        bar.close()
    finally:
        model.train(was_training)
    rows = []
    for rec, gen in zip(records, generations):
        pred, correct = score(rec, gen)
        rows.append({
            "index": rec.get("index"), "instruction": rec["instruction"], "input": rec.get("input", ""),
            "answer": rec["answer"], "generation": gen, "prediction": pred, "correct": bool(correct),
        })
    return rows


def run_eval(
    *,
    model: str,
    data: str,
    output: str | os.PathLike | None,
    adapter: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    num_beams: int = 1,
    progress: bool = True,
    loaded: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Load ``model`` (+ ``adapter`` via ``fa.load_adapter``), evaluate on ``data`` (a built-in set
    name or a ``test.json``-format path; first ``limit`` records), write ``metrics.json`` and
    ``predictions.jsonl`` into ``output`` (unless ``None``) and return the metrics.

    ``loaded``: an already loaded ``(model, tokenizer)`` to use instead of loading ``model`` (it is
    used as is: pass ``adapter=None`` if it is already patched)."""
    import fastadapt as fa


    records = load_eval_set(data, limit=limit)
    if loaded is None:
        dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
        net, tokenizer = load_model(model, dtype=dtype, device="cuda" if torch.cuda.is_available() else None)
    else:
        net, tokenizer = loaded
    if adapter is not None:
        fa.load_adapter(net, adapter)
    t0 = time.time()
    rows = evaluate(net, tokenizer, records, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    num_beams=num_beams, progress=progress)
    seconds = time.time() - t0
    correct = sum(r["correct"] for r in rows)
    metrics = {
        "accuracy": correct / len(rows),
        "n": len(rows),
        "correct": correct,
        "data": str(data),
        "kind": records[0]["kind"],
        "limit": limit,
        "model": str(model),
        "adapter": None if adapter is None else str(adapter),
        "decoding": {
            "do_sample": False, "num_beams": num_beams, "max_new_tokens": max_new_tokens,
            "batch_size": batch_size, "padding_side": "left", "attention_mask": True, "use_cache": True,
            "stop_strings": list(STOP_STRINGS),
        },
        "dtype": str(next(net.parameters()).dtype).removeprefix("torch."),
        "device": str(next(net.parameters()).device),
        "seconds": round(seconds, 2),
    }
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        with (out / "predictions.jsonl").open("w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    logger.info("%s: accuracy %.4f (%d/%d) in %.0f s", data, metrics["accuracy"], correct, len(rows), seconds)
    return metrics
