"""``fastadapt export`` end to end on a tiny model saved to disk."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
from helpers import randomize_adapters, rel_err
from tiny_models import tiny_model, tokens
from transformers import AutoModelForCausalLM

import fastadapt as fa
from fastadapt.app.cli import main


@pytest.fixture
def base_and_adapter(tmp_path):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    fa.patch(base, "lora", r=4, targets="all-linear")
    randomize_adapters(base, scale=0.05)
    fa.save_adapter(base, tmp_path / "adapter")
    with torch.no_grad():
        expected = base(tokens()).logits
    return tmp_path, expected


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_export_command(base_and_adapter, dtype):
    tmp, expected = base_and_adapter
    argv = ["export", "--model", str(tmp / "base"), "--adapter", str(tmp / "adapter"), "--out", str(tmp / "out")]
    assert main(argv + (["--dtype", dtype] if dtype else [])) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp / "out", dtype=torch.float32)
    with torch.no_grad():
        got = model(tokens()).logits
    assert rel_err(got, expected) < (1e-5 if dtype is None else 3e-2)
    # a second export into the same folder is refused, and leaves it intact
    assert main(argv) == 2
    assert (tmp / "out" / "config.json").exists()


def test_export_command_of_a_folder_without_tokenizer_files(tmp_path, caplog):
    """transformers builds an empty-vocabulary tokenizer for some architectures (GPT-2's among them)
    from a folder without tokenizer files; the export goes on without one and says so (it used to
    fail reshaping a batch of 0 tokens)."""
    base = tiny_model("gpt2")
    base.save_pretrained(tmp_path / "base")
    fa.patch(base, "lora", r=2)
    randomize_adapters(base, scale=0.05)
    fa.save_adapter(base, tmp_path / "adapter")
    argv = ["export", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out",
            str(tmp_path / "out")]
    with caplog.at_level("WARNING", logger="fastadapt.models"):
        assert main(argv) == 0
    assert "has no tokenizer files: loaded without a tokenizer" in caplog.text
    with torch.no_grad():
        want = base.eval()(tokens()).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(tokens()).logits
    assert rel_err(got, want) < 1e-5


def test_export_command_missing_adapter(base_and_adapter):
    tmp, _ = base_and_adapter
    code = main(["export", "--model", str(tmp / "base"), "--adapter", str(tmp / "nope"), "--out", str(tmp / "o")])
    assert code == 2 and not (tmp / "o").exists()


def test_console_entry_points():
    out = subprocess.run([sys.executable, "-m", "fastadapt", "export", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--adapter" in out.stdout and "--dtype" in out.stdout and "--quant" in out.stdout


def test_export_takes_output_and_out(base_and_adapter):
    tmp, expected = base_and_adapter
    assert main(["export", "--model", str(tmp / "base"), "--adapter", str(tmp / "adapter"),
                 "--output", str(tmp / "o1")]) == 0
    assert (tmp / "o1" / "config.json").is_file()


def test_export_checks_the_output_folder_before_loading(base_and_adapter, monkeypatch, capsys):
    tmp, _ = base_and_adapter
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("x")
    monkeypatch.setattr("fastadapt.app.cli.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["export", "--model", str(tmp / "base"), "--adapter", str(tmp / "adapter"),
                 "--output", str(tmp / "full")]) == 2
    err = capsys.readouterr().err
    assert err == f"fastadapt: error: --output: folder {str(tmp / 'full')!r} is not empty; pass --overwrite to replace it\n"


def test_train_checks_data_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("fastadapt.app.cli.run_train", lambda *a, **k: pytest.fail("started training"))
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    capsys.readouterr()
    for data, says in [("AQuA", "--data: 'AQuA' is the built-in TEST set"),
                       (str(tmp_path / "missing.json"), "--data: data file not found"),
                       ("alpaca", "--data: no built-in training set or file named 'alpaca'")]:
        assert main(["train", "--model", str(base), "--data", data, "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fastadapt: error: {says}") and err.count("\n") == 1, err


def test_errors_name_flags_and_debug_shows_the_traceback(tmp_path, capsys):
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    capsys.readouterr()
    argv = ["train", "--model", str(base), "--data", "gsm8k", "--output", str(tmp_path / "o"),
            "--batch-size", "6", "--micro-batch-size", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastadapt: error: --batch-size (6) must be a multiple of --micro-batch-size (4)")
    assert "Traceback" not in err and err.count("\n") == 1
    assert main(argv + ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith("fastadapt: error: ")


def test_unknown_model_fails_fast_in_one_line(tmp_path):
    """A mistyped name neither loads nor retries the hub (offline here, as in CI): one line naming
    the embedded models."""
    import os
    import time

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "fastadapt", "eval", "--model", "smollm2-135M", "--data", "gsm8k",
                          "--output", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and time.time() - t0 < 60
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("fastadapt: error: --model: unknown model 'smollm2-135M': not an embedded model "
                                 "(smollm2-135m)")
    assert "did you mean 'smollm2-135m'?" in out.stderr
    assert not (tmp_path / "o").exists()


def test_in_cli_terms():
    from fastadapt.app.cli import build_parser, in_cli_terms

    parser = build_parser()
    assert in_cli_terms("lr must be positive, got 0", parser) == "--lr must be positive, got 0"
    assert in_cli_terms("pass overwrite=True to replace it", parser) == "pass --overwrite to replace it"
    assert in_cli_terms("option 'r' does not apply", parser) == "option --r does not apply"
    assert in_cli_terms("the lr of max_steps", parser) == "the lr of --max-steps"


def test_backends_explains_every_op(capsys):
    from fastadapt.ops import dispatch

    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "verification records:" in out and "kernel hashes: triton " in out
    for op in dispatch.OPS:
        for cls in ("decode", "batch"):
            line = next(line for line in out.splitlines() if line.split()[:2] == [op, cls])
            assert line.split()[2] == "torch" and len(line.split()) > 3  # a choice and its reason


def test_backends_bad_device(capsys):
    assert main(["backends", "--device", "gpu0"]) == 2
    assert "--device gpu0: not a torch device" in capsys.readouterr().err


@pytest.fixture
def gguf_base_and_adapter(tmp_path):
    from tiny_tokenizers import gguf_model, tiny_tokenizer

    tok = tiny_tokenizer("gpt-2")
    base = gguf_model("qwen2", vocab_size=len(tok))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    fa.patch(base, "lora", r=4, targets="all-linear")
    randomize_adapters(base, scale=0.05)
    fa.save_adapter(base, tmp_path / "adapter")
    batch = tok(["Natalia sold 48 clips in April."], return_tensors="pt")
    with torch.no_grad():
        expected = base(**batch).logits
    return tmp_path, batch, expected


def test_export_command_gguf(gguf_base_and_adapter, capsys):
    tmp, batch, expected = gguf_base_and_adapter
    out = tmp / "out" / "model-q4_0.gguf"
    argv = ["export", "--model", str(tmp / "base"), "--adapter", str(tmp / "adapter"), "--format", "gguf",
            "--quant", "q4_0", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"exported a q4_0 GGUF to {out}" in printed and "quantization error" in printed
    assert f"llama-cli -m {out}" in printed
    model = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    with torch.no_grad():
        got = model(**batch).logits
    assert 0 < (got - expected).abs().mean() < 0.3  # q4_0's own error (tests/test_gguf_export.py)
    before = out.read_bytes()
    assert main(argv) == 2 and out.read_bytes() == before  # an existing file needs --overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("flags,says", [
    (["--format", "gguf", "--dtype", "bf16"], "--dtype: is for --format transformers"),
    (["--quant", "q8_0"], "--quant: is for --format gguf"),
    (["--format", "gguf", "--quant", "q3_k"], "invalid choice"),
])
def test_export_command_gguf_flags(gguf_base_and_adapter, monkeypatch, capsys, flags, says):
    tmp, _, _ = gguf_base_and_adapter
    monkeypatch.setattr("fastadapt.app.cli.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit) if "invalid" in says else contextlib.nullcontext():
        assert main(["export", "--model", str(tmp / "base"), "--adapter", str(tmp / "adapter"),
                     "--out", str(tmp / "m.gguf"), *flags]) == 2
    assert says in capsys.readouterr().err


def test_export_command_gguf_output_is_a_file(gguf_base_and_adapter, monkeypatch, capsys):
    tmp, _, _ = gguf_base_and_adapter
    monkeypatch.setattr("fastadapt.app.cli.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["export", "--model", str(tmp / "base"), "--adapter", str(tmp / "adapter"), "--format", "gguf",
                 "--out", str(tmp)]) == 2
    assert "a GGUF export is one file" in capsys.readouterr().err
