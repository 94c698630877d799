"""``fastadapt generate``: completions of a JSONL file of prompts, each with its own adapter, in
mixed batches (``model.generate(..., adapter_names=...)``: one base model, many named adapters).

Input lines: ``{"prompt": "...", "adapter": "NAME"}`` (``adapter`` absent or ``"__base__"``: the
base model); any other keys are kept. Output lines (same order): the input object plus
``"completion"``. Prompts are used as given (no template), batched longest first with left padding
and an attention mask, greedy unless sampling is asked for; the output file is written atomically
at the end, so an interrupted run leaves no half-written file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import _files
from .evaluation import _model_for_inference, eval_mode, generate, longest_first_batches

logger = logging.getLogger(__name__)

#: what a row names to run on the base model alone (as in PEFT's ``adapter_names``)
BASE = "__base__"


def parse_adapters(specs: Sequence[str]) -> dict[str, str]:
    """``["math=path/a", "code=path/b"]`` -> ``{"math": "path/a", "code": "path/b"}`` (names unique,
    not ``__base__``)."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{spec!r} is not NAME=PATH (e.g. math=adapters/math)")
        if name == BASE:
            raise ValueError(f"{spec!r}: the name {BASE!r} is reserved for the base model")
        if name in adapters:
            raise ValueError(f"{spec!r}: the name {name!r} is given twice")
        adapters[name] = path
    return adapters


def read_requests(path: str | os.PathLike, adapters: Sequence[str]) -> list[dict[str, Any]]:
    """The input file's objects, checked: each has a str ``prompt`` and an ``adapter`` that is one
    of ``adapters`` or ``__base__`` (or none). Errors name the line."""
    requests = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{str(path)!r} line {number}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{str(path)!r} line {number}: expected an object with a \"prompt\" string")
            adapter = row.get("adapter", BASE)
            if adapter is None:
                adapter = BASE
            if adapter != BASE and adapter not in adapters:
                known = ", ".join(repr(a) for a in [*adapters, BASE])
                raise ValueError(f"{str(path)!r} line {number}: adapter {adapter!r} is not given with --adapter "
                                 f"(known: {known})")
            requests.append(row)
    if not requests:
        raise ValueError(f"{str(path)!r} holds no prompts")
    return requests


def run_generate(
    *,
    model: str,
    adapters: dict[str, str],
    requests: list[dict[str, Any]],
    output: str | os.PathLike,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    sampling: dict[str, Any] | None = None,
    seed: int | None = None,
    progress: bool = True,
    loaded: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Load ``model`` and every adapter by name, generate each request's completion on its adapter
    in mixed batches, write ``output`` (JSONL, input order). Returns a summary."""
    import torch

    import fastadapt as fa

    net, tokenizer = _model_for_inference(model, None, loaded)
    for name, path in adapters.items():
        fa.load_adapter(net, path, adapter_name=name)
    if seed is not None:
        torch.manual_seed(seed)
    names = [r.get("adapter") or BASE for r in requests]
    lengths = [len(tokenizer(r["prompt"])["input_ids"]) for r in requests]
    completions: list[str | None] = [None] * len(requests)
    t0 = time.time()
    with eval_mode(net):
        for idx in longest_first_batches(lengths, batch_size, desc="generate", progress=progress):
            texts = generate(net, tokenizer, [requests[i]["prompt"] for i in idx], max_new_tokens=max_new_tokens,
                             stop_strings=None, sampling=sampling,
                             adapter_names=[names[i] for i in idx] if adapters else None)
            for i, text in zip(idx, texts):
                completions[i] = text
    seconds = time.time() - t0
    lines = "".join(json.dumps({**r, "completion": c}, ensure_ascii=False) + "\n"
                    for r, c in zip(requests, completions))
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    _files.atomic_write(out, lambda f: Path(f).write_text(lines, encoding="utf-8"))
    counts = {n: names.count(n) for n in dict.fromkeys(names)}
    logger.info("generated %d completions (%s) in %.0f s -> %s", len(requests), counts, seconds, out)
    return {"n": len(requests), "rows_per_adapter": counts, "seconds": seconds, "output": str(out)}


__all__ = ["BASE", "parse_adapters", "read_requests", "run_generate"]
