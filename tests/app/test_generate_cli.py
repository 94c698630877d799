"""``fastadapt generate --adapter NAME=PATH ... --input prompts.jsonl --output out.jsonl``: each output
line is its input line plus the completion that the prompt gets alone, unpadded, on a model holding
only its adapter (or none for ``__base__``); progress is logged; bad inputs are refused by flag
before anything is written."""

from __future__ import annotations

import json
import logging

import pytest
from named_adapters import peft_folders
from test_train_eval_cli import make_tiny_checkpoint, tiny_tokenizer

import fastadapt as fa
from fastadapt.app.cli import main
from fastadapt.app.evaluation import generate

PROMPTS = [
    ("Tom has 3 apples . How many", "math"),
    ("The answer is", "code"),
    ("He has and gives 2", None),
    ("Write a response", "__base__"),
    ("How many apples does Tom have ? He has", "math"),
    ("Input , paired with input provides further context", "code"),
    ("apples", "chat"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    make_tiny_checkpoint(root / "base")
    adapters = peft_folders(root / "adapters")
    lines = [{"prompt": p, **({"adapter": a} if a else {}), "id": i} for i, (p, a) in enumerate(PROMPTS)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root, adapters


def _argv(root, adapters, out, *extra):
    argv = ["generate", "--model", str(root / "base"), "--input", str(root / "prompts.jsonl"), "--output", str(out),
            "--batch-size", "3", "--max-new-tokens", "5", *extra]
    for name, path in adapters.items():
        argv += ["--adapter", f"{name}={path}"]
    return argv


def test_generate_each_line_equals_the_prompt_alone_on_its_adapter(setup, tmp_path, caplog):
    root, adapters = setup
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.INFO, logger="fastadapt"):
        assert main(_argv(root, adapters, out)) == 0
    assert any("generate: 7/7" in r.getMessage() for r in caplog.records)  # progress, also without a terminal
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(PROMPTS)))
    tokenizer = tiny_tokenizer()
    changed = 0
    for row, (prompt, adapter) in zip(rows, PROMPTS):
        assert row["prompt"] == prompt and row.get("adapter") == adapter
        model, _ = fa.load_model(str(root / "base"))
        base = generate(model.eval(), tokenizer, [prompt], max_new_tokens=5, stop_strings=None)[0]
        if adapter not in (None, "__base__"):
            fa.load_adapter(model, adapters[adapter])
        want = generate(model.eval(), tokenizer, [prompt], max_new_tokens=5, stop_strings=None)[0]
        assert row["completion"] == want, (prompt, adapter)
        changed += want != base
    assert changed >= 2  # the adapters change the completions (else the test proves little)


def test_generate_refuses_bad_input_by_flag(setup, tmp_path, capsys):
    root, adapters = setup
    out = tmp_path / "out.jsonl"
    assert main(_argv(root, {"math": adapters["math"]}, out)) == 2  # the lines name code and chat
    assert "--input" in capsys.readouterr().err and not out.exists()
    assert main(_argv(root, {}, out, "--adapter", "math")) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(_argv(root, {}, out, "--adapter", f"__base__={adapters['math']}")) == 2
    assert "reserved" in capsys.readouterr().err
    assert main(_argv(root, {}, out, "--adapter", f"m={root / 'nowhere'}")) == 2
    assert "--adapter" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    argv = _argv(root, adapters, out)
    argv[argv.index("--input") + 1] = str(tmp_path / "bad.jsonl")
    assert main(argv) == 2
    assert "line 2" in capsys.readouterr().err and not out.exists()
    out.write_text("keep\n")
    assert main(_argv(root, adapters, out)) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "keep\n"
    assert main(_argv(root, adapters, out, "--overwrite", "--temperature", "0.5")) == 2
    assert "--do-sample" in capsys.readouterr().err and out.read_text() == "keep\n"
    assert main(_argv(root, adapters, out, "--overwrite", "--seed", "3")) == 2  # greedy: a seed would do nothing
    assert "--seed" in capsys.readouterr().err and out.read_text() == "keep\n"
