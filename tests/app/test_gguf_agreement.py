"""The agreement harness (fastadapt/app/gguf_agreement.py) without llama.cpp: its transformers runs are
greedy (checked against a loop without a KV cache), its logits are the teacher-forced ones, and
agreement counts and measures what it says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_tokenizers import gguf_model

from fastadapt.app.gguf_agreement import Run, agreement, run_transformers


def greedy_without_cache(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_run_transformers_is_greedy_and_teacher_forced():
    model = gguf_model("llama", vocab_size=97)
    prompts = [[5, 6, 7], [10, 20, 30, 40, 50]]
    run = run_transformers(model, prompts, new_tokens=6)
    assert run.logits is None
    assert run.tokens == [greedy_without_cache(model, p, 6) for p in prompts]
    teacher = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    forced = run_transformers(model, prompts, new_tokens=6, teacher=teacher)
    for p, t, logits in zip(prompts, teacher, forced.logits):
        with torch.no_grad():
            full = model(torch.tensor([p + t])).logits[0].numpy()
        assert logits.shape == (6, 97)
        np.testing.assert_array_equal(logits, full[len(p) - 1: len(p) + 5])


def test_agreement():
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(4, 10)).astype(np.float32) for _ in range(3)]
    ref = Run(tokens=[[1, 2], [3, 4], [5, 6]], logits=logits)
    same = agreement(ref, ref)
    assert same.identical == 3 and same.mean_abs_logit_diff == 0 and same.argmax_agreement == 1
    moved = [x.copy() for x in logits]
    moved[1] += 0.5
    other = agreement(Run(tokens=[[1, 2], [3, 9], [5, 6]], logits=moved), ref)
    assert other.identical == 2 and other.mean_abs_logit_diff == pytest.approx(0.5 / 3)
    assert other.max_abs_logit_diff == pytest.approx(0.5) and other.argmax_agreement == 1
    with pytest.raises(ValueError, match="teacher-forced"):
        agreement(Run(tokens=[[1]]), ref)
