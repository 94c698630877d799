"""Evaluation and training data for the LLM-Adapters workflow.

Evaluation: :func:`load_eval_set` reads a built-in math test set (:data:`BUILTIN_EVAL_SETS`,
shipped in ``fastadapt/app/data``) or any file in LLM-Adapters' ``test.json`` format (a JSON array
of ``{"instruction", "input", "output", "answer"}``; also JSONL, ``.gz``, or a folder holding
``test.json``), including the commonsense sets, and GSM8K's own JSONL
(``{"question", "answer": "...#### 72"}``). Every record comes back as::

    {"index": 0, "instruction": str, "input": str, "answer": str,
     "kind": "number" | "choice" | "commonsense", ["options": "ABCDE" for choice]}

Training: :func:`load_train_records` reads Alpaca/LLM-Adapters records (``instruction``,
``input``, ``output``) or GSM8K records (``question``, ``answer``), or the built-in ``gsm8k``
(GSM8K train). A GSM8K solution becomes the response with its calculator annotations
removed and its ``#### 72`` line rewritten as ``The answer is 72.`` (the ending LLM-Adapters'
math training data uses, and one :func:`fastadapt.app.answers.extract_number` reads);
the record keeps the final answer in ``answer``.

Held-out loss: :func:`load_solution_records` reads test problems *with* reference solutions
(built-in ``gsm8k``: GSM8K test as GSM8K ships it) in the training record shape, so that a model's
loss on them can be measured exactly as training measures it. Training refuses those files.

Files are read with the standard ``json`` module rather than ``datasets.load_dataset``: it
reads ``.gz`` directly, needs no cache folder, never touches the Hub, and lets errors name
the file, the record and the field. :func:`to_hf_dataset` wraps records in a
``datasets.Dataset`` for ``map``/``shuffle``.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..answers import COMMONSENSE_LABELS, commonsense_family
from .files import EVAL_FILES, SOLUTION_FILES, TEST_FILES, TRAIN_FILES, data_file

__all__ = [
    "BUILTIN_EVAL_SETS",
    "BUILTIN_SOLUTION_SETS",
    "BUILTIN_TRAIN_SETS",
    "gsm8k_solution_to_output",
    "load_eval_set",
    "load_solution_records",
    "load_train_records",
    "resolve_eval_name",
    "to_hf_dataset",
]

#: Built-in evaluation sets (names match case-insensitively).
BUILTIN_EVAL_SETS: tuple[str, ...] = tuple(EVAL_FILES)
#: Built-in training sets: ``gsm8k`` is GSM8K train (7,473 problems).
BUILTIN_TRAIN_SETS: tuple[str, ...] = tuple(TRAIN_FILES)
#: Built-in test sets with reference solutions (for the held-out loss): ``gsm8k`` is GSM8K test.
BUILTIN_SOLUTION_SETS: tuple[str, ...] = tuple(SOLUTION_FILES)

_COMMONSENSE = {label for labels in COMMONSENSE_LABELS.values() for label in labels}
_NUMERIC = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


# --------------------------------------------------------------------------------------------
# file reading
# --------------------------------------------------------------------------------------------


def _is_name(name_or_path: str | os.PathLike[str]) -> bool:
    """A bare name ("gsm8k"), not a path ("./gsm8k", "gsm8k.json", "data/gsm8k")."""
    if not isinstance(name_or_path, str):
        return False
    return bool(name_or_path) and "/" not in name_or_path and os.sep not in name_or_path and ("." not in name_or_path)


def resolve_eval_name(name: str) -> str | None:
    """The canonical built-in eval set name for ``name`` (case-insensitive), else ``None``."""
    if not isinstance(name, str):
        return None
    lowered = name.strip().lower()
    for canonical in BUILTIN_EVAL_SETS:
        if canonical.lower() == lowered:
            return canonical
    return None


def _read_text(source: Any, label: str) -> str:
    """Text of a path or shipped ``Traversable``, gunzipped when it is gzip."""
    try:
        with source.open("rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {label}") from None
    except IsADirectoryError:
        raise ValueError(f"expected a JSON/JSONL file, got a folder: {label}") from None
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{label}: not UTF-8 text ({e})") from None


def _read_records(source: Any, label: str) -> list[tuple[str, Any]]:
    """``[(where, record), ...]`` from a JSON array or JSON Lines; ``where`` names the record."""
    text = _read_text(source, label)
    stripped = text.lstrip()
    if not stripped:
        raise ValueError(f"{label}: the file is empty (expected a JSON array or JSON Lines)")
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{label}: not valid JSON ({e})") from None
        return [(f"{label}, record {i}", rec) for i, rec in enumerate(data)]
    if stripped[0] == "{":
        # A single object holding a list is not a format we know; JSON Lines is one per line.
        out: list[tuple[str, Any]] = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append((f"{label}, line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{label}, line {lineno}: not valid JSON ({e}); expected a JSON array of objects "
                    "or JSON Lines (one object per line)"
                ) from None
        return out
    raise ValueError(f"{label}: expected a JSON array of objects or JSON Lines, got text starting {stripped[:20]!r}")


def _as_path(name_or_path: str | os.PathLike[str]) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        for candidate in ("test.json", "test.jsonl", "train.json", "train.jsonl"):
            if (path / candidate).is_file():
                return path / candidate
        raise FileNotFoundError(f"folder {str(path)!r} holds no test.json/test.jsonl/train.json/train.jsonl")
    return path


def _text_field(rec: dict[str, Any], field: str, where: str, *, required: bool = True) -> str:
    if field not in rec or rec[field] is None:
        if required:
            raise ValueError(f"{where}: missing field {field!r} (fields present: {sorted(rec)})")
        return ""
    value = rec[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__} {value!r}")
    return value


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")


# --------------------------------------------------------------------------------------------
# evaluation sets
# --------------------------------------------------------------------------------------------


def _answer_str(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError(f"{where}: field 'answer' must be a non-empty string or number, got {value!r}")


def _kind_of(answer: str) -> str | None:
    if answer.lower() in _COMMONSENSE:
        return "commonsense"
    if len(answer) == 1 and answer.isascii() and answer.isalpha():
        return "choice"
    if _NUMERIC.fullmatch(answer.replace(",", "")):
        return "number"
    return None


def _gsm8k_final(answer: str, where: str) -> str:
    if "####" not in answer:
        raise ValueError(f"{where}: GSM8K field 'answer' must end in '#### <number>', got {answer[-60:]!r}")
    return answer.rsplit("####", 1)[1].strip()


def load_eval_set(name_or_path: str | os.PathLike[str], *, limit: int | None = None) -> list[dict[str, Any]]:
    """Records of an evaluation set: a built-in name or a path.

    Args:
        name_or_path: one of :data:`BUILTIN_EVAL_SETS` (any case), or a path to an
            LLM-Adapters ``test.json`` (math or commonsense), a JSONL file with the same fields,
            a GSM8K-style JSONL (``question``, ``answer`` ending ``#### N``), either gzipped,
            or a folder holding ``test.json``. A bare built-in name wins over a folder of the
            same name; write ``./AQuA`` for the folder.
        limit: keep the first ``limit`` records (in file order).

    Returns:
        ``[{"index", "instruction", "input", "answer", "kind"[, "options"]}, ...]`` where
        ``answer`` is a string (``"576.0"``, ``"B"``, ``"solution2"``; GSM8K's number with
        commas removed), ``kind`` is ``"number"``, ``"choice"`` (answer upper-cased, plus the
        ``options`` letters) or ``"commonsense"`` (answer lower-cased), the same for every
        record of a file.

    Raises:
        FileNotFoundError: no such built-in set or file.
        ValueError: a record lacks a field, has a non-string field, or its answer is of no
            known kind or of a different kind than the first record's.
    """
    _check_limit(limit)
    builtin = resolve_eval_name(name_or_path) if _is_name(name_or_path) else None
    if builtin is not None:
        label = f"built-in eval set {builtin!r}"
        rows = _read_records(data_file(EVAL_FILES[builtin]), label)
    else:
        if _is_name(name_or_path) and not Path(name_or_path).exists():
            raise FileNotFoundError(
                f"no built-in eval set or file named {str(name_or_path)!r}; built-in eval sets: "
                f"{', '.join(BUILTIN_EVAL_SETS)}"
            )
        path = _as_path(name_or_path)
        label = str(path)
        rows = _read_records(path, label)
    if not rows:
        raise ValueError(f"{label}: no records")

    records: list[dict[str, Any]] = []
    first_kind: tuple[str, str] | None = None  # (kind, where) of the first record
    family = None
    for i, (where, rec) in enumerate(rows):
        if limit is not None and i >= limit:
            break
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if "instruction" in rec:
            instruction = _text_field(rec, "instruction", where)
            inp = _text_field(rec, "input", where, required=False)
            if "answer" not in rec:
                raise ValueError(
                    f"{where}: missing field 'answer' (fields present: {sorted(rec)}); an eval record "
                    "needs 'instruction' and 'answer' ('input' optional)"
                )
            answer = _answer_str(rec["answer"], where)
        elif "question" in rec and "answer" in rec:
            instruction = _text_field(rec, "question", where)
            inp = ""
            answer = _gsm8k_final(_text_field(rec, "answer", where), where).replace(",", "")
        else:
            raise ValueError(
                f"{where}: expected LLM-Adapters fields 'instruction', 'input', 'answer' or GSM8K fields "
                f"'question', 'answer'; got fields {sorted(rec)}"
            )
        kind = _kind_of(answer)
        if kind is None:
            raise ValueError(
                f"{where}: answer {answer!r} is neither a number, an option letter, nor a commonsense "
                f"label ({', '.join(sorted(_COMMONSENSE))})"
            )
        if first_kind is None:
            first_kind = (kind, where)
        elif kind != first_kind[0]:
            raise ValueError(
                f"{where}: answer {answer!r} is a {kind} label but {first_kind[1]} has a {first_kind[0]} "
                "label; one file must hold one kind of label"
            )
        out: dict[str, Any] = {
            "index": i,
            "instruction": instruction,
            "input": inp,
            "answer": answer,
            "kind": kind,
        }
        if kind == "choice":
            out["answer"] = answer.upper()
        elif kind == "commonsense":
            out["answer"] = answer.lower()
            fam = commonsense_family(out["answer"])
            if family is None:
                family = fam
            elif fam != family:
                raise ValueError(
                    f"{where}: answer {answer!r} is a {fam!r} label but earlier records use {family!r} labels"
                )
        records.append(out)

    if first_kind is not None and first_kind[0] == "choice":
        # Options A..max(answer letter), at least A-E (AQuA and MathQA have five).
        top = max(ord(r["answer"]) for r in records)
        options = "".join(chr(c) for c in range(ord("A"), max(top, ord("E")) + 1))
        for r in records:
            r["options"] = options
    return records


# --------------------------------------------------------------------------------------------
# training sets
# --------------------------------------------------------------------------------------------


def gsm8k_solution_to_output(answer: str) -> tuple[str, str]:
    """``(response, final_answer)`` from a GSM8K ``answer`` field.

    The ``<<48/2=24>>`` calculator annotations are removed and the ``#### 72`` line becomes
    ``The answer is 72.``; ``final_answer`` is the text after ``####`` as written ("1,080").

    >>> gsm8k_solution_to_output("She sold 48/2 = <<48/2=24>>24 clips.\\n#### 72")
    ('She sold 48/2 = 24 clips.\\nThe answer is 72.', '72')
    """
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    final = _gsm8k_final(answer, "GSM8K answer")
    steps = _CALCULATOR.sub("", answer.rsplit("####", 1)[0]).strip()
    ending = f"The answer is {final}."
    return (f"{steps}\n{ending}" if steps else ending), final


def _builtin_test_files() -> set[Path]:
    out = set()
    for filename in TEST_FILES:
        try:
            out.add(Path(str(data_file(filename))).resolve())
        except (OSError, ValueError):  # pragma: no cover - zipped installs have no real path
            pass
    return out


def _training_shaped(rows: list[tuple[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """``{"instruction", "input", "output"[, "answer"]}`` from Alpaca or GSM8K records."""
    records: list[dict[str, Any]] = []
    for where, rec in rows[:limit] if limit is not None else rows:
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if "instruction" in rec:
            records.append(
                {
                    "instruction": _text_field(rec, "instruction", where),
                    "input": _text_field(rec, "input", where, required=False),
                    "output": _text_field(rec, "output", where),
                }
            )
        elif "question" in rec and "answer" in rec:
            question = _text_field(rec, "question", where)
            solution = _text_field(rec, "answer", where)
            _gsm8k_final(solution, where)  # names the record when '####' is missing
            output, final = gsm8k_solution_to_output(solution)
            records.append({"instruction": question, "input": "", "output": output, "answer": final})
        else:
            raise ValueError(
                f"{where}: expected Alpaca fields 'instruction', 'input', 'output' or GSM8K fields "
                f"'question', 'answer'; got fields {sorted(rec)}"
            )
    return records


def _read_path(name_or_path: str | os.PathLike[str], what: str, builtin: tuple[str, ...]) -> tuple[Path, str]:
    if _is_name(name_or_path) and not Path(name_or_path).exists():
        raise FileNotFoundError(
            f"no built-in {what} or file named {str(name_or_path)!r}; built-in {what}s: {', '.join(builtin)}"
        )
    path = _as_path(name_or_path)
    return path, str(path)


def load_train_records(name_or_path: str | os.PathLike[str], *, limit: int | None = None) -> list[dict[str, Any]]:
    """Training records ``{"instruction", "input", "output"[, "answer"]}`` in file order.

    Args:
        name_or_path: ``"gsm8k"`` (any case; GSM8K train, shipped), or a path to a JSON array /
            JSONL file (optionally gzipped) of Alpaca/LLM-Adapters records (``instruction``,
            optional ``input``, ``output``) or GSM8K records (``question``, ``answer``). A
            GSM8K record's ``output`` is its solution without the ``<<...>>`` annotations,
            ending ``The answer is N.``; ``answer`` keeps N (see
            :func:`gsm8k_solution_to_output`).
        limit: keep the first ``limit`` records (shuffling is the trainer's job).

    Raises:
        ValueError: ``name_or_path`` names a built-in TEST set (or is one of the shipped test
            files): training on test questions makes any accuracy reported on them
            meaningless. Also for records with missing or non-string fields.
        FileNotFoundError: no such built-in set or file.
    """
    _check_limit(limit)
    if _is_name(name_or_path) and str(name_or_path).strip().lower() in TRAIN_FILES:
        key = str(name_or_path).strip().lower()
        label = f"built-in train set {key!r}"
        rows = _read_records(data_file(TRAIN_FILES[key]), label)
    else:
        test_name = resolve_eval_name(name_or_path) if _is_name(name_or_path) else None
        if test_name is not None:
            raise ValueError(
                f"{str(name_or_path)!r} is the built-in TEST set {test_name!r}; training on it would contaminate "
                f"every accuracy reported on it. Built-in training sets: {', '.join(BUILTIN_TRAIN_SETS)} "
                "('gsm8k' is GSM8K train), or a path to your own file"
            )
        path, label = _read_path(name_or_path, "training set", BUILTIN_TRAIN_SETS)
        if path.exists() and path.resolve() in _builtin_test_files():
            raise ValueError(
                f"{str(path)!r} is one of fastadapt's built-in TEST sets; training on it would contaminate "
                "every accuracy reported on it"
            )
        if "test" in path.name.lower():
            warnings.warn(
                f"training on {str(path)!r}, whose name says it is a test split: do not report accuracy "
                "on the same questions",
                UserWarning,
                stacklevel=2,
            )
        rows = _read_records(path, label)
    if not rows:
        raise ValueError(f"{label}: no records")
    return _training_shaped(rows, limit)


def load_solution_records(name_or_path: str | os.PathLike[str], *, limit: int | None = None) -> list[dict[str, Any]]:
    """Problems with reference solutions, to measure a model's loss on them (the held-out loss):
    ``"gsm8k"`` (GSM8K *test* with its reference solutions, shipped; in GSM8K's order) or a file in
    a training format (see :func:`load_train_records`). Same record shape as training records;
    a GSM8K solution is rewritten the same way (annotations removed, ``The answer is N.``), so the
    loss measures the format training teaches."""
    _check_limit(limit)
    key = str(name_or_path).strip().lower() if _is_name(name_or_path) else None
    if key in SOLUTION_FILES:
        label = f"built-in {key!r} test solutions"
        rows = _read_records(data_file(SOLUTION_FILES[key]), label)
    else:
        path, label = _read_path(name_or_path, "set with solutions", BUILTIN_SOLUTION_SETS)
        rows = _read_records(path, label)
    if not rows:
        raise ValueError(f"{label}: no records")
    return _training_shaped(rows, limit)


def to_hf_dataset(records: Iterable[dict[str, Any]]):  # -> datasets.Dataset
    """``datasets.Dataset.from_list(list(records))`` (imports ``datasets`` lazily)."""
    import datasets  # the Hugging Face library, not this module

    return datasets.Dataset.from_list(list(records))
