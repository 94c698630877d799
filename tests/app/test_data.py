"""Built-in and file-based evaluation/training data (no model needed)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from fastadapt.app.answers import extract_number, numbers_equal
from fastadapt.app.data import (
    BUILTIN_EVAL_SETS,
    EVAL_FILES,
    data_file,
    gsm8k_solution_to_output,
    load_eval_set,
    load_train_records,
    resolve_eval_name,
    to_hf_dataset,
)

SHARED = Path("/work/shared/data")

EXPECTED = {
    "AddSub": (395, "number"),
    "MultiArith": (600, "number"),
    "SingleEq": (508, "number"),
    "gsm8k": (1319, "number"),
    "SVAMP": (1000, "number"),
    "mawps": (238, "number"),
    "AQuA": (254, "choice"),
    "mathqa": (2985, "choice"),
}


def _write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, indent=4), encoding="utf-8")
    return path


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# built-in evaluation sets
# --------------------------------------------------------------------------------------------


def test_builtin_names():
    assert set(BUILTIN_EVAL_SETS) == set(EXPECTED)
    assert resolve_eval_name("GSM8K") == "gsm8k"
    assert resolve_eval_name("aqua") == "AQuA"
    assert resolve_eval_name("svamp") == "SVAMP"
    assert resolve_eval_name("boolq") is None


@pytest.mark.parametrize("name", list(EXPECTED))
def test_builtin_eval_sets(name):
    n, kind = EXPECTED[name]
    records = load_eval_set(name.upper())  # case-insensitive
    assert len(records) == n
    assert [r["index"] for r in records] == list(range(n))
    for r in records:
        assert r["kind"] == kind
        assert isinstance(r["instruction"], str) and r["instruction"]
        assert r["input"] == ""
        assert isinstance(r["answer"], str)
        if kind == "number":
            float(r["answer"])
        else:
            assert r["answer"] in "ABCDE" and r["options"] == "ABCDE"


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs the source data in /work/shared/data")
@pytest.mark.parametrize("name", list(EXPECTED))
def test_shipped_files_match_sources(name):
    source = json.loads((SHARED / "llm-adapters" / "dataset" / name / "test.json").read_text("utf-8"))
    with data_file(EVAL_FILES[name]).open("rb") as fh:
        shipped = [json.loads(line) for line in gzip.decompress(fh.read()).decode("utf-8").splitlines()]
    assert shipped == source  # every field, as it is upstream


def test_limit_and_bad_limit():
    assert len(load_eval_set("AddSub", limit=3)) == 3
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="limit must be a positive int"):
            load_eval_set("AddSub", limit=bad)


def test_unknown_name_lists_builtins():
    with pytest.raises(FileNotFoundError, match="built-in eval sets: .*AQuA"):
        load_eval_set("aqua-rat")


# --------------------------------------------------------------------------------------------
# evaluation files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answers", "kind"),
    [
        (["true", "false", "true"], "commonsense"),  # BoolQ
        (["solution1", "solution2", "solution1"], "commonsense"),  # PIQA
        (["answer1", "answer5", "answer3"], "commonsense"),  # SIQA/ARC/OBQA
        (["ending4", "ending1", "ending2"], "commonsense"),  # HellaSwag
        (["option2", "option1", "option2"], "commonsense"),  # WinoGrande
        (["12", "0.5", "-3"], "number"),
        (["A", "c", "D"], "choice"),
    ],
)
def test_llm_adapters_test_json(tmp_path, answers, kind):
    rows = [{"instruction": f"q{i}", "input": "", "output": "", "answer": a} for i, a in enumerate(answers)]
    records = load_eval_set(_write_json(tmp_path / "test.json", rows))
    assert [r["kind"] for r in records] == [kind] * 3
    assert [r["instruction"] for r in records] == ["q0", "q1", "q2"]
    if kind == "choice":
        assert [r["answer"] for r in records] == ["A", "C", "D"]
    else:
        assert [r["answer"] for r in records] == answers


def test_folder_gzip_and_jsonl(tmp_path):
    rows = [{"instruction": "q", "input": "ctx", "output": "o", "answer": "7"}]
    folder = tmp_path / "MyTask"
    folder.mkdir()
    _write_json(folder / "test.json", rows)
    assert load_eval_set(folder)[0]["input"] == "ctx"
    gz = tmp_path / "x.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"instruction": "q", "answer": "B"}\n\n'))
    assert load_eval_set(gz) == [
        {"index": 0, "instruction": "q", "input": "", "answer": "B", "kind": "choice", "options": "ABCDE"}
    ]


def test_gsm8k_jsonl_eval(tmp_path):
    rows = [
        {"question": "How much?", "answer": "It costs 2*500=<<2*500=1000>>1000 + 80.\n#### 1,080"},
        {"question": "How cold?", "answer": "It drops.\n#### -10"},
    ]
    records = load_eval_set(_write_jsonl(tmp_path / "gsm.jsonl", rows))
    assert [r["answer"] for r in records] == ["1080", "-10"]
    assert [r["instruction"] for r in records] == ["How much?", "How cold?"]
    assert {r["kind"] for r in records} == {"number"}


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs the source data in /work/shared/data")
def test_gsm8k_jsonl_matches_llm_adapters_labels():
    ours = {r["instruction"].strip(): r["answer"] for r in load_eval_set(SHARED / "gsm8k" / "test.jsonl")}
    theirs = load_eval_set("gsm8k")  # same questions, another order
    assert len(ours) == len(theirs) == 1319
    assert all(numbers_equal(ours[r["instruction"].strip()], r["answer"]) for r in theirs)


def test_eval_errors(tmp_path):
    missing = tmp_path / "nope" / "test.json"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_eval_set(missing)
    bad = _write_json(tmp_path / "a.json", [{"instruction": "q", "input": ""}])
    with pytest.raises(ValueError, match=r"a\.json, record 0: missing field 'answer'"):
        load_eval_set(bad)
    bad = _write_json(tmp_path / "b.json", [{"prompt": "q", "label": 1}])
    with pytest.raises(ValueError, match=r"record 0: expected LLM-Adapters fields.*got fields \['label', 'prompt'\]"):
        load_eval_set(bad)
    bad = _write_json(tmp_path / "c.json", [{"instruction": 3, "answer": "1"}])
    with pytest.raises(ValueError, match="field 'instruction' must be a string"):
        load_eval_set(bad)
    bad = _write_json(tmp_path / "d.json", [{"instruction": "q", "answer": "1"}, {"instruction": "q", "answer": "B"}])
    with pytest.raises(ValueError, match="record 1: answer 'B' is a choice label but .*record 0 has a number"):
        load_eval_set(bad)
    bad = _write_json(tmp_path / "e.json", [{"instruction": "q", "answer": "maybe"}])
    with pytest.raises(ValueError, match="answer 'maybe' is neither"):
        load_eval_set(bad)
    bad = _write_jsonl(tmp_path / "f.jsonl", [{"question": "q", "answer": "no final line"}])
    with pytest.raises(ValueError, match=r"line 1: GSM8K field 'answer' must end in '#### <number>'"):
        load_eval_set(bad)
    bad = tmp_path / "g.jsonl"
    bad.write_text('{"instruction": "q", "answer": "1"}\n{"instruction": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"g\.jsonl, line 2: not valid JSON"):
        load_eval_set(bad)
    empty = tmp_path / "h.json"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="the file is empty"):
        load_eval_set(empty)


# --------------------------------------------------------------------------------------------
# training data
# --------------------------------------------------------------------------------------------


def test_gsm8k_solution_to_output():
    output, final = gsm8k_solution_to_output(
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 in all.\n#### 72"
    )
    assert output == "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 in all.\nThe answer is 72."
    assert final == "72"
    assert gsm8k_solution_to_output("#### 1,080") == ("The answer is 1,080.", "1,080")


def test_builtin_train_gsm8k():
    records = load_train_records("GSM8K")
    assert len(records) == 7473
    assert set(records[0]) == {"instruction", "input", "output", "answer"}
    assert records[0]["instruction"].startswith("Natalia sold clips to 48 of her friends")
    for r in records:
        assert "<<" not in r["output"] and "####" not in r["output"]
        assert r["output"].endswith(f"The answer is {r['answer']}.")
        # the final answer survives and is what the number extractor reads
        assert numbers_equal(extract_number(r["output"]), r["answer"])
    assert load_train_records("gsm8k", limit=5) == records[:5]


def test_train_disjoint_from_gsm8k_test():
    train = {r["instruction"] for r in load_train_records("gsm8k")}
    test = {r["instruction"] for r in load_eval_set("gsm8k")}
    assert not train & test


def test_alpaca_train_file(tmp_path):
    rows = [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "output": "hi"},  # input optional
        {"instruction": "Say hi.", "input": None, "output": "hi"},
    ]
    records = load_train_records(_write_json(tmp_path / "alpaca.json", rows))
    assert records == [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    assert load_train_records(_write_jsonl(tmp_path / "alpaca.jsonl", rows), limit=1) == records[:1]


def test_train_errors(tmp_path):
    bad = _write_json(tmp_path / "t.json", [{"instruction": "q", "input": ""}])
    with pytest.raises(ValueError, match=r"t\.json, record 0: missing field 'output'"):
        load_train_records(bad)
    bad = _write_jsonl(tmp_path / "u.jsonl", [{"instruction": "q", "output": "o"}, {"text": "x"}])
    with pytest.raises(ValueError, match=r"u\.jsonl, line 2: expected Alpaca fields .*got fields \['text'\]"):
        load_train_records(bad)
    with pytest.raises(FileNotFoundError, match="built-in training set"):
        load_train_records("alpaca")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_train_records(tmp_path / "missing.json")


@pytest.mark.parametrize("name", ["AQuA", "svamp", "MultiArith", "mathqa", "mawps"])
def test_refuses_test_sets_as_training_data(name):
    with pytest.raises(ValueError, match="built-in TEST set .*contaminate"):
        load_train_records(name)


def test_refuses_shipped_test_file_by_path():
    path = Path(str(data_file(EVAL_FILES["gsm8k"])))
    with pytest.raises(ValueError, match="built-in TEST sets"):
        load_train_records(path)


def test_warns_on_test_named_file(tmp_path):
    path = _write_json(tmp_path / "test.json", [{"instruction": "q", "input": "", "output": "o", "answer": "1"}])
    with pytest.warns(UserWarning, match="test split"):
        load_train_records(path)


def test_to_hf_dataset():
    ds = to_hf_dataset(load_train_records("gsm8k", limit=4))
    assert len(ds) == 4 and set(ds.column_names) == {"instruction", "input", "output", "answer"}
