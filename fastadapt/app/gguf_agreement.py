"""How closely a GGUF export runs like the model it came from, measured by real clients: llama.cpp
(through llama-cpp-python, an optional dependency: ``pip install llama-cpp-python``) and transformers
(the adapted model itself, or transformers' GGUF loader reading the file).

For each prompt (token ids) a client gives its greedy continuation (``new_tokens`` tokens, never
stopping at EOS) and its logits on a common sequence (the prompt followed by the reference's
continuation, teacher-forced), so that |Δlogit| compares the same positions even where two
continuations part. :func:`agreement` then counts identical continuations and averages |Δlogit| over
the positions that predict the continuation.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


@dataclass
class Run:
    """One client on a list of prompts: per prompt, its greedy continuation and, when a teacher
    sequence was given, its logits at the positions that predict the teacher's continuation
    (``new_tokens`` × vocab)."""

    tokens: list[list[int]]
    logits: list[np.ndarray] | None = None


@dataclass(frozen=True)
class Agreement:
    """A run against a reference run on the same prompts."""

    identical: int  # prompts whose continuations are token for token the same
    prompts: int
    mean_abs_logit_diff: float  # over the positions predicting the reference's continuation, all vocab
    max_abs_logit_diff: float
    argmax_agreement: float  # fraction of those positions where both pick the same token

    def as_dict(self) -> dict[str, Any]:
        return {"identical": self.identical, "prompts": self.prompts, "mean_abs_logit_diff": self.mean_abs_logit_diff,
                "max_abs_logit_diff": self.max_abs_logit_diff, "argmax_agreement": self.argmax_agreement}


def _continuation_logits(all_logits: np.ndarray, prompt_len: int, new_tokens: int) -> np.ndarray:
    # position p predicts token p + 1: the continuation's tokens are predicted from prompt_len - 1 on
    return np.asarray(all_logits[prompt_len - 1: prompt_len - 1 + new_tokens], dtype=np.float32)


@torch.no_grad()
def run_transformers(model: Any, prompts: list[list[int]], *, new_tokens: int,
                     teacher: list[list[int]] | None = None) -> Run:
    """Greedy continuations of ``model`` (a transformers causal LM, fastadapt-patched or not), with a
    KV cache; and its logits on the ``teacher`` continuations (prompt + teacher tokens)."""
    from transformers import DynamicCache

    model.eval()
    device = next(model.parameters()).device
    # transformers >= 5.2x names the cache argument ``cache``; earlier releases ``past_key_values``
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens, logits = [], []
    for i, prompt in enumerate(prompts):
        cache = DynamicCache(config=model.config)
        out = model(torch.tensor([prompt], device=device), use_cache=True, **{cache_arg: cache})
        continuation = []
        for _ in range(new_tokens):
            nxt = int(out.logits[0, -1].argmax())
            continuation.append(nxt)
            out = model(torch.tensor([[nxt]], device=device), use_cache=True, **{cache_arg: cache})
        tokens.append(continuation)
        if teacher is not None:
            seq = torch.tensor([prompt + teacher[i]], device=device)
            logits.append(_continuation_logits(model(seq).logits[0].float().cpu().numpy(), len(prompt), new_tokens))
    return Run(tokens=tokens, logits=logits if teacher is not None else None)


def open_llamacpp(path: str | os.PathLike, *, lora: str | os.PathLike | None = None, n_ctx: int = 512,
                  f32_cache: bool = False, threads: int = 1) -> Any:
    """A ``llama_cpp.Llama`` on the GGUF file ``path`` (and the LoRA adapter file ``lora``) that keeps the
    logits of every position; ``f32_cache``: an F32 KV cache (llama.cpp's default is F16). One thread by
    default: llama.cpp's threads spin while they wait, which on a shared 2-core machine costs far more
    than a second thread gains."""
    import llama_cpp

    options: dict[str, Any] = {}
    if f32_cache:
        options.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    return llama_cpp.Llama(str(path), lora_path=None if lora is None else str(lora), n_ctx=n_ctx, logits_all=True,
                           n_threads=threads, n_threads_batch=threads, verbose=False, seed=0, **options)


def run_llamacpp(llm: Any, prompts: list[list[int]], *, new_tokens: int,
                 teacher: list[list[int]] | None = None) -> Run:
    """Greedy continuations (argmax of llama.cpp's logits, fed back one token at a time) and the logits
    on the ``teacher`` continuations, from an :func:`open_llamacpp` model."""
    tokens, logits = [], []
    for i, prompt in enumerate(prompts):
        llm.reset()
        llm.eval(prompt)
        continuation = []
        for _ in range(new_tokens):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            continuation.append(nxt)
            llm.eval([nxt])
        tokens.append(continuation)
        if teacher is not None:
            llm.reset()
            seq = prompt + teacher[i]
            llm.eval(seq)
            logits.append(_continuation_logits(np.array(llm.scores[:len(seq)]), len(prompt), new_tokens))
    return Run(tokens=tokens, logits=logits if teacher is not None else None)


def llamacpp_tokens(llm: Any, texts: list[str]) -> list[list[int]]:
    """llama.cpp's own tokenization of ``texts`` (BOS as the file says; special tokens parsed)."""
    add_bos = bool(llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true")
    return [llm.tokenize(t.encode(), add_bos=add_bos, special=True) for t in texts]


def agreement(run: Run, reference: Run) -> Agreement:
    """``run`` against ``reference``: identical continuations, and |Δlogit| on the reference's
    continuation (both runs need teacher-forced logits on the same teacher sequences)."""
    identical = sum(a == b for a, b in zip(run.tokens, reference.tokens))
    if run.logits is None or reference.logits is None:
        raise ValueError("agreement needs both runs' teacher-forced logits")
    diffs = [np.abs(a - b) for a, b in zip(run.logits, reference.logits)]
    same = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(run.logits, reference.logits)])
    return Agreement(identical=identical, prompts=len(run.tokens),
                     mean_abs_logit_diff=float(np.mean([d.mean() for d in diffs])),
                     max_abs_logit_diff=float(max(d.max() for d in diffs)), argmax_agreement=float(same.mean()))


def gguf_transformers(path: str | os.PathLike) -> Any:
    """The model transformers' GGUF loader builds from the file (fp32)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
