"""``fastadapt train`` / ``eval`` / ``export`` end to end on a tiny random LLaMA with a tiny
word-level tokenizer, both saved to a tmp folder (no hub), plus resume equality."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import VOCAB, tiny_config, tiny_model

from fastadapt.app.cli import main

pytest.importorskip("accelerate")

WORDS = (
    "Below is an instruction that describes a task . Write a response appropriately completes the request "
    "### Instruction : Response Input , paired with input provides further context The answer how many "
    "apples does Tom have ? He has and gives 2 3 4 5 6 7 8 9 0 1 is"
).split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def make_tiny_checkpoint(path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("llama")
    cfg.max_position_embeddings = 256
    cfg.pad_token_id = 3
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = 3
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_train_data(path, n=12):
    rows = [{"question": f"Tom has {i} apples and gives {i % 3} . How many apples does Tom have ?",
             "answer": f"He has {i} - {i % 3} = {i - i % 3} apples .\n#### {i - i % 3}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_eval_data(path):
    rows = [{"instruction": f"Tom has {i} apples . How many apples does Tom have ?", "input": "",
             "output": "", "answer": f"{i}.0"} for i in (3, 5, 7)]
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint(root / "base")
    write_train_data(root / "train.jsonl")
    write_eval_data(root / "test.json")
    return root


def train_argv(root, out, *extra):
    return ["train", "--model", str(root / "base"), "--data", str(root / "train.jsonl"), "--output", str(out),
            "--batch-size", "4", "--micro-batch-size", "2", "--cutoff-len", "64", "--warmup-steps", "1",
            "--lr", "1e-2", "--seed", "0", *extra]


def read_log(out):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


METHOD_ARGS = {
    "lora": ["--targets", "q_proj,v_proj", "--r", "4", "--alpha", "8"],
    "dora": ["--targets", "q_proj,v_proj", "--r", "4", "--alpha", "8"],
    "prefix": ["--num-virtual-tokens", "3"],
    "series": ["--bottleneck", "8"],
    "parallel": ["--bottleneck", "8"],
}


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_train_eval_export(tiny, tmp_path, method):
    from fastadapt.methods import method_names as methods

    if method not in methods():
        pytest.skip(f"method {method!r} has not landed")
    out = tmp_path / "run"
    extra = METHOD_ARGS[method]
    assert main(train_argv(tiny, out, "--method", method, "--max-steps", "2", *extra)) == 0
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)
    cfg = json.loads((out / "training_config.json").read_text())
    assert cfg["method"] == method and cfg["grad_accum"] == 2 and cfg["max_steps"] == 2
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()

    ev = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny / "base"), "--adapter", str(out), "--data", str(tiny / "test.json"),
                 "--output", str(ev), "--batch-size", "2", "--max-new-tokens", "4"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["n"] == 3 and 0.0 <= metrics["accuracy"] <= 1.0 and metrics["adapter"] == str(out)
    assert metrics["decoding"]["max_new_tokens"] == 4 and metrics["decoding"]["num_beams"] == 1
    preds = [json.loads(x) for x in (ev / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3
    for row in preds:
        assert {"instruction", "generation", "prediction", "answer", "correct"} <= set(row)

    code = main(["export", "--model", str(tiny / "base"), "--adapter", str(out), "--out", str(tmp_path / "merged")])
    if method in ("lora", "dora"):
        assert code == 0 and (tmp_path / "merged" / "config.json").is_file()
    else:  # prefix / bottleneck adapters cannot be merged: a clear error, nothing written
        assert code == 2 and not (tmp_path / "merged").exists()


def test_eval_base_model_batched_equals_unbatched(tiny, tmp_path):
    """Left padding + attention mask: a batch gives the same generations as one prompt at a time."""
    for bs in (1, 3):
        assert main(["eval", "--model", str(tiny / "base"), "--data", str(tiny / "test.json"), "--output",
                     str(tmp_path / f"bs{bs}"), "--batch-size", str(bs), "--max-new-tokens", "5"]) == 0
    rows = {bs: [json.loads(x)["generation"] for x in (tmp_path / f"bs{bs}" / "predictions.jsonl").read_text().splitlines()]
            for bs in (1, 3)}
    assert rows[1] == rows[3]
    assert json.loads((tmp_path / "bs1" / "metrics.json").read_text())["adapter"] is None


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_resume_gives_the_same_losses(tiny, tmp_path, method):
    import shutil

    from safetensors.torch import load_file

    common = ["--method", method, "--max-steps", "4", "--save-steps", "2",
              *(["--targets", "q_proj,v_proj", "--r", "4"] if method == "lora" else ["--num-virtual-tokens", "2"])]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(train_argv(tiny, full, *common)) == 0
    # an interrupted run: the same job, but only its step-2 checkpoint survived ...
    assert main(train_argv(tiny, part, *common)) == 0
    shutil.rmtree(part / "checkpoints" / "checkpoint-4")
    (part / "adapter_model.safetensors").unlink()
    # ... continued with --resume
    assert main(train_argv(tiny, part, *common, "--resume")) == 0
    a, b = read_log(full), read_log(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a[-1]["loss"] != a[1]["loss"]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), (a, b)
    wa, wb = load_file(full / "adapter_model.safetensors"), load_file(part / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_train_refuses_existing_output_and_bad_options(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(tiny, out, "--max-steps", "1", "--targets", "q_proj", "--r", "2")) == 0
    assert main(train_argv(tiny, out, "--max-steps", "1")) == 2  # holds a run: needs --resume/--overwrite
    assert main(train_argv(tiny, tmp_path / "x", "--method", "prefix", "--r", "4")) == 2  # option of another method
    assert main(train_argv(tiny, tmp_path / "y", "--batch-size", "5", "--micro-batch-size", "2")) == 2
    assert main(train_argv(tiny, tmp_path / "z", "--resume")) == 2  # nothing to resume


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, "-m", "fastadapt", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--model", "--data", "--method", "--r", "--alpha", "--dropout", "--targets", "--bottleneck",
                 "--activation", "--scaling", "--num-virtual-tokens", "--output", "--epochs", "--max-steps",
                 "--batch-size", "--micro-batch-size", "--lr", "--warmup-steps", "--cutoff-len", "--val-size",
                 "--train-on-inputs", "--no-train-on-inputs", "--gradient-checkpointing", "--bf16", "--seed",
                 "--limit", "--resume"):
        assert flag in out.stdout, flag
    out = subprocess.run([sys.executable, "-m", "fastadapt", "eval", "--help"], capture_output=True, text=True)
    for flag in ("--model", "--adapter", "--data", "--output", "--limit", "--batch-size", "--max-new-tokens",
                 "--num-beams"):
        assert flag in out.stdout, flag


def test_targets_keywords_pass_through_as_keywords():
    from fastadapt.app.train import DEFAULT_PRESET, method_options
    from fastadapt.methods import get_method

    paper = get_method("series").preset(DEFAULT_PRESET).options(tiny_model("llama"))
    assert paper == {"bottleneck": 256, "targets": "mlp-output"}  # the paper's placement
    assert method_options("series") == {}  # no flag given: the preset decides
    for keyword in ("mlp", "mlp-input", "mlp-output", "all-linear", "auto"):
        assert method_options("series", targets=keyword)["targets"] == keyword
    assert method_options("lora", targets="q_proj,v_proj")["targets"] == ["q_proj", "v_proj"]
