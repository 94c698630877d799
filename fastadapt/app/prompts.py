"""The Alpaca prompt of LLM-Adapters, tokenization with response-only labels, and padding.

The template is LLM-Adapters' ``generate_prompt`` (``finetune.py``/``evaluate.py``) word for
word, without the indentation its triple-quoted f-strings put inside the prompt (and without
the ``  # noqa: E501`` that ended up inside its first line)::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Response:
    {output}

With a non-empty ``input`` the first sentence gains ", paired with an input that provides
further context" and an ``### Input:`` section follows the instruction.

Tokenization (:func:`tokenize_example`) encodes the prompt exactly as generation will see it
(``tokenizer(prompt)``, so BOS if the tokenizer adds one) and the response separately without
special tokens, then concatenates them. Training therefore conditions on the same prompt ids
as evaluation, and the label mask boundary is exact for any tokenizer (LLM-Adapters tokenized
the full text and masked ``len(tokenizer(prompt))`` tokens, which is off by one wherever a
merge crosses the prompt/response boundary).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_NO_INPUT",
    "PROMPT_WITH_INPUT",
    "build_prompt",
    "collate",
    "make_collator",
    "resolve_pad_token_id",
    "tokenize_example",
]

#: Label value ignored by the loss (``torch.nn.CrossEntropyLoss``'s default ``ignore_index``).
IGNORE_INDEX = -100

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}"
)


def build_prompt(instruction: str, input: str | None = "", output: str | None = None) -> str:
    """The Alpaca prompt; with ``output=None`` it ends at ``"### Response:\\n"`` (for generation).

    ``input`` that is empty or ``None`` selects the no-input template, as in LLM-Adapters.
    """
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
    if input is not None and not isinstance(input, str):
        raise TypeError(f"input must be a str or None, got {type(input).__name__}")
    if output is not None and not isinstance(output, str):
        raise TypeError(f"output must be a str or None, got {type(output).__name__}")
    out = "" if output is None else output
    # str.format parses only the template, so braces inside the fields are safe.
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input, output=out)
    return PROMPT_NO_INPUT.format(instruction=instruction, output=out)


def _ids(encoded: Any) -> list[int]:
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) or hasattr(encoded, "keys") else encoded
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


def tokenize_example(
    tokenizer: Any,
    record: Mapping[str, Any],
    *,
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """``{"input_ids", "attention_mask", "labels"}`` (Python lists) for one training record.

    ``record`` has ``instruction``, optional ``input`` and ``output``. The ids are
    ``tokenizer(prompt)`` (BOS included if the tokenizer adds one; a trailing EOS the
    tokenizer appends is dropped) followed by ``tokenizer(output, add_special_tokens=False)``,
    cut to ``cutoff_len`` tokens; then EOS is appended if there is room and the last id is not
    already EOS (as LLM-Adapters does). ``labels`` equals ``input_ids`` with the prompt
    positions set to ``-100`` unless ``train_on_inputs``; the appended EOS is always a label.
    When the prompt alone fills ``cutoff_len`` every label is -100: such an example adds no
    loss, so filter it out (``any(l != -100 for l in labels)``) before training.
    """
    if isinstance(cutoff_len, bool) or not isinstance(cutoff_len, int) or cutoff_len <= 0:
        raise ValueError(f"cutoff_len must be a positive int, got {cutoff_len!r}")
    for key in ("instruction", "output"):
        if key not in record:
            raise KeyError(f"record must have an {key!r} field, got fields {sorted(record)}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is None:
        raise ValueError("tokenizer has no eos_token_id; set one or pass add_eos=False")

    prompt = build_prompt(record["instruction"], record.get("input") or "")
    prompt_ids = _ids(tokenizer(prompt))
    eos_text = getattr(tokenizer, "eos_token", None)
    if eos is not None and prompt_ids and prompt_ids[-1] == eos and not (eos_text and prompt.endswith(eos_text)):
        prompt_ids = prompt_ids[:-1]  # tokenizers configured with add_eos_token=True
    output = record["output"]
    if not isinstance(output, str):
        raise TypeError(f"record['output'] must be a str, got {type(output).__name__}")
    response_ids = _ids(tokenizer(output, add_special_tokens=False)) if output else []

    input_ids = (prompt_ids + response_ids)[:cutoff_len]
    n_prompt = min(len(prompt_ids), len(input_ids))
    if add_eos and len(input_ids) < cutoff_len and (not input_ids or input_ids[-1] != eos):
        input_ids.append(eos)
    labels = list(input_ids)
    if not train_on_inputs:
        labels[:n_prompt] = [IGNORE_INDEX] * n_prompt
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def resolve_pad_token_id(tokenizer: Any) -> int:
    """``tokenizer.pad_token_id``, else its ``eos_token_id`` (padding is masked out anyway)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("tokenizer has neither pad_token_id nor eos_token_id; set tokenizer.pad_token")


def collate(
    features: Sequence[Mapping[str, Any]],
    *,
    pad_token_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
    label_pad_id: int = IGNORE_INDEX,
) -> dict[str, torch.Tensor]:
    """Pad a batch of :func:`tokenize_example` outputs into int64 tensors of shape (B, T).

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 and ``labels``
    (when every feature has them) with ``label_pad_id``. ``T`` is the longest sequence,
    rounded up to ``pad_to_multiple_of``. Right padding for training; ``"left"`` for batched
    generation. Other keys are dropped.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of <= 0):
        raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
    if not features:
        raise ValueError("features must hold at least one example, got an empty batch")
    for i, f in enumerate(features):
        if "input_ids" not in f:
            raise KeyError(f"features[{i}] has no 'input_ids' (keys: {sorted(f)})")
    has_labels = all("labels" in f for f in features)
    if not has_labels and any("labels" in f for f in features):
        raise ValueError("either every feature or none must have 'labels'")
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        n_mask = len(f["attention_mask"]) if f.get("attention_mask") is not None else n
        n_labels = len(f["labels"]) if has_labels else n
        if n_mask != n or n_labels != n:
            raise ValueError(
                f"features[{i}]: input_ids, attention_mask and labels must have equal lengths, "
                f"got {n}, {n_mask}, {n_labels}"
            )
    longest = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of

    def pad(seq: Sequence[int], value: int) -> list[int]:
        fill = [value] * (longest - len(seq))
        return list(seq) + fill if padding_side == "right" else fill + list(seq)

    batch = {
        "input_ids": [pad(f["input_ids"], pad_token_id) for f in features],
        "attention_mask": [
            pad(f["attention_mask"] if f.get("attention_mask") is not None else [1] * len(f["input_ids"]), 0)
            for f in features
        ],
    }
    if has_labels:
        batch["labels"] = [pad(f["labels"], label_pad_id) for f in features]
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def make_collator(
    tokenizer: Any,
    *,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, torch.Tensor]]:
    """A ``data_collator`` for ``transformers.Trainer``/``DataLoader``: :func:`collate` with the
    tokenizer's pad id (falling back to EOS)."""
    pad_id = resolve_pad_token_id(tokenizer)
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")

    def collator(features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return collate(features, pad_token_id=pad_id, padding_side=padding_side, pad_to_multiple_of=pad_to_multiple_of)

    return collator
