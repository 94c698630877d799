"""``fastadapt eval``: batched greedy (or beam) generation on an evaluation set, then scoring; and
``fastadapt loss``: the held-out loss (:func:`heldout_loss`), the teacher-forced loss of reference
solutions the model was never trained on.

Unlike LLM-Adapters' ``evaluate.py``, batches are LEFT-padded and carry an attention mask (it passed
none, so padded batches attended to padding and gave different answers than unbatched runs), the
model is in eval mode (it left dropout on), and the KV cache is on. Prompts are sorted by length
so that a batch holds similar lengths (less padding); results come back in the set's order.

Outputs (``run_eval``): ``metrics.json`` ``{"accuracy", "n", "correct", "data", "model",
"adapter", "decoding": {...}, ...}`` and ``predictions.jsonl``, one row per example:
``{"index", "instruction", "input", "answer", "generation", "prediction", "correct"}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..models import load_model
from .answers import score
from .data import load_eval_set, load_solution_records
from .progress import progress as progress_bar
from .prompts import IGNORE_INDEX, build_prompt, make_collator, resolve_pad_token_id, tokenize_example

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
    adapter_names: Sequence[str] | None = None,
    sampling: dict[str, Any] | None = None,
) -> list[str]:
    """Completions of ``prompts`` (one batch): left padding + attention mask, greedy when
    ``num_beams == 1`` (unless ``sampling`` gives ``temperature``/``top_p``), KV cache on.
    ``adapter_names``: one named adapter (or ``"__base__"``) per prompt, a mixed batch. Returns the
    decoded new tokens without special tokens."""
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
        max_new_tokens=max_new_tokens, do_sample=bool(sampling), num_beams=num_beams, use_cache=True,
        pad_token_id=resolve_pad_token_id(tokenizer), eos_token_id=_eos_ids(model, tokenizer), **(sampling or {}),
    )
    kwargs = {} if adapter_names is None else {"adapter_names": list(adapter_names)}
    if stop_strings:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList(
            [_stop_on_strings(tokenizer, list(stop_strings), enc["input_ids"].shape[1])])
    out = model.generate(**enc, generation_config=gen_cfg, **kwargs)
    new = out[:, enc["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """``model.eval()`` inside, its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def longest_first_batches(lengths: Sequence[int], batch_size: int, *, desc: str, progress: bool) -> Iterator[list]:
    """Indices in batches of ``batch_size``, longest first (similar lengths share a batch: less
    padding), with progress shown as the batches are consumed."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bar = progress_bar(len(order), desc=desc, unit="examples", enabled=progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx
        bar.update(len(idx))
    bar.close()


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
    generations: list[str | None] = [None] * len(prompts)
    with eval_mode(model):
        for idx in longest_first_batches(lengths, batch_size, desc="eval", progress=progress):
            texts = generate(model, tokenizer, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                             num_beams=num_beams, stop_strings=stop_strings)
            for i, text in zip(idx, texts):
                generations[i] = text
    rows = []
    for rec, gen in zip(records, generations):
        pred, correct = score(rec, gen)
        rows.append({
            "index": rec.get("index"), "instruction": rec["instruction"], "input": rec.get("input", ""),
            "answer": rec["answer"], "generation": gen, "prediction": pred, "correct": bool(correct),
        })
    return rows


def _model_for_inference(model: str, adapter: str | os.PathLike | None, loaded: tuple[Any, Any] | None):
    """``loaded`` as is, or ``model`` loaded (bf16 on a GPU that has it, else fp32), then ``adapter``."""
    import fastadapt as fa

    if loaded is None:
        cuda = torch.cuda.is_available()
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
        net, tokenizer = load_model(model, dtype=dtype, device="cuda" if cuda else None)
    else:
        net, tokenizer = loaded
    if adapter is not None:
        fa.load_adapter(net, adapter)
    return net, tokenizer


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
    records = load_eval_set(data, limit=limit)
    net, tokenizer = _model_for_inference(model, adapter, loaded)
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


# -- held-out loss -----------------------------------------------------------------------------

#: Long enough for every GSM8K test problem with its solution (the longest is ~400 tokens).
HELDOUT_CUTOFF_LEN = 512


@torch.no_grad()
def heldout_loss(
    model,
    tokenizer,
    records: Sequence[dict[str, Any]],
    *,
    batch_size: int = 8,
    cutoff_len: int = HELDOUT_CUTOFF_LEN,
    progress: bool = True,
) -> dict[str, Any]:
    """The teacher-forced mean per-token loss of each record's ``output`` given its Alpaca prompt:
    the same prompt, response-only labels and appended EOS as training
    (:func:`~fastadapt.app.prompts.tokenize_example`), summed over every response token of every
    record and divided by their number (token-weighted, like the training loss). On records the
    model never trained on it is a held-out loss: it falls as fine-tuning teaches the task, long
    before greedy accuracy on a few problems can move.

    Returns ``{"loss", "n" (records), "tokens"}``. The model runs in eval mode (no dropout); its mode
    is restored afterwards."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if tokenizer is None:
        raise ValueError("the held-out loss needs a tokenizer; the model folder has none")
    if not records:
        raise ValueError("the held-out loss needs at least one record")
    features = [tokenize_example(tokenizer, r, cutoff_len=cutoff_len) for r in records]
    lengths = [len(f["input_ids"]) for f in features]
    collate = make_collator(tokenizer)
    device = next(model.parameters()).device
    total, count = torch.zeros((), dtype=torch.float64), 0
    with eval_mode(model):
        for idx in longest_first_batches(lengths, batch_size, desc="held-out loss", progress=progress):
            batch = {k: v.to(device) for k, v in collate([features[i] for i in idx]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total += losses.double().cpu()
            count += int((labels != IGNORE_INDEX).sum())
    return {"loss": float(total) / count, "n": len(features), "tokens": count}


def run_heldout_loss(
    *,
    model: str,
    data: str = "gsm8k",
    output: str | os.PathLike | None,
    adapter: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    loaded: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """:func:`heldout_loss` of ``model`` (+ ``adapter``) on ``data``'s reference solutions (``gsm8k``:
    GSM8K test; see :func:`~fastadapt.app.data.load_solution_records`), first ``limit`` records;
    writes ``loss.json`` into ``output`` (unless ``None``) and returns it. ``loaded``: as in
    :func:`run_eval`."""
    records = load_solution_records(data, limit=limit)
    net, tokenizer = _model_for_inference(model, adapter, loaded)
    t0 = time.time()
    result = heldout_loss(net, tokenizer, records, batch_size=batch_size, progress=progress)
    result.update(data=str(data), limit=limit, model=str(model), adapter=None if adapter is None else str(adapter),
                  seconds=round(time.time() - t0, 2))
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "loss.json").write_text(json.dumps(result, indent=2) + "\n")
    logger.info("%s: held-out loss %.4f (%d records, %d tokens) in %.0f s", data, result["loss"], result["n"],
                result["tokens"], result["seconds"])
    return result
