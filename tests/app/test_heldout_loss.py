"""The held-out loss: the teacher-forced mean per-token loss of reference solutions, on data that
training refuses; the shipped GSM8K test solutions; warmup and training-loss summaries."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from test_train_eval_cli import make_tiny_checkpoint, tiny_tokenizer
from tiny_models import tiny_model

from fastadapt.app.data import SOLUTION_FILES, data_file, load_eval_set, load_solution_records, load_train_records
from fastadapt.app.evaluation import heldout_loss
from fastadapt.app.prompts import make_collator, tokenize_example
from fastadapt.app.train import TrainConfig, loss_means

RECORDS = [
    {"instruction": "Tom has 3 apples . How many apples does Tom have ?", "input": "", "output": "He has 3 apples ."},
    {"instruction": "Tom has 4 apples and gives 2 . How many ?", "input": "",
     "output": "He has 4 - 2 = 2 apples . The answer is 2 ."},
    {"instruction": "How many ?", "input": "", "output": "5"},
]


def test_equals_the_models_own_loss_token_weighted():
    torch.manual_seed(0)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    got = heldout_loss(model, tok, RECORDS, batch_size=2, progress=False)
    # reference: one record at a time through the model's own loss (mean over its labelled tokens),
    # weighted by its number of labelled tokens
    total = count = 0
    for rec in RECORDS:
        batch = make_collator(tok)([tokenize_example(tok, rec, cutoff_len=512)])
        with torch.no_grad():
            loss = model(**batch).loss.item()
        n = int((batch["labels"][:, 1:] != -100).sum())
        total, count = total + loss * n, count + n
    assert got["n"] == 3 and got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert heldout_loss(model, tok, RECORDS, batch_size=3, progress=False)["loss"] == pytest.approx(got["loss"], rel=1e-5)


def test_restores_training_mode_and_logs_progress_without_a_terminal(caplog):
    model, tok = tiny_model("llama").train(), tiny_tokenizer()
    with caplog.at_level("INFO", logger="fastadapt.progress"):
        heldout_loss(model, tok, RECORDS, batch_size=2)
    assert model.training
    assert any("held-out loss: 3/3 examples" in r.getMessage() for r in caplog.records)


def test_shipped_gsm8k_test_solutions():
    with data_file(SOLUTION_FILES["gsm8k"]).open("rb") as fh:
        first = json.loads(gzip.decompress(fh.read()).splitlines()[0])
    records = load_solution_records("gsm8k")
    assert len(records) == 1319
    assert records[0]["instruction"] == first["question"]
    assert records[0]["output"].endswith("The answer is 18.") and "<<" not in records[0]["output"]
    # the same questions as the accuracy set (another order), and never training data
    questions = {r["instruction"] for r in load_eval_set("gsm8k")}
    assert sum(r["instruction"] in questions for r in records) > 1300
    with pytest.raises(ValueError, match="built-in TEST sets"):
        load_train_records(str(data_file(SOLUTION_FILES["gsm8k"])))


def test_warmup_scales_with_short_runs():
    cfg = TrainConfig(model="m", data="gsm8k", output="o", max_steps=30)
    assert cfg.resolved_warmup_steps(cfg.total_steps(1000)) == 3
    long = TrainConfig(model="m", data="gsm8k", output="o", epochs=3, batch_size=16, micro_batch_size=4)
    assert long.total_steps(7473) == 1404 and long.resolved_warmup_steps(1404) == 100
    explicit = TrainConfig(model="m", data="gsm8k", output="o", max_steps=30, warmup_steps=0)
    assert explicit.resolved_warmup_steps(30) == 0


def test_loss_means_over_first_and_last_tenth():
    losses = [2.0, 1.0] + [0.5] * 16 + [0.2, 0.4]
    assert loss_means(losses) == {"first": 1.5, "last": pytest.approx(0.3), "steps_each": 2}
    assert loss_means([1.0, 3.0]) == {"first": 1.0, "last": 3.0, "steps_each": 1}
    assert loss_means([])["first"] is None


@pytest.mark.filterwarnings("ignore:r=32 > min")  # the paper's rank on a 48-wide tiny model
def test_main_job_reports_heldout_loss(tmp_path, capsys):
    pytest.importorskip("accelerate")
    from fastadapt.app.main_job import run_main_job

    base = make_tiny_checkpoint(tmp_path / "base")
    summary = run_main_job(model=str(base), output=tmp_path / "job", eval_limit=2, heldout_limit=3, train_limit=8,
                           max_steps=2, batch_size=2, micro_batch_size=2, max_new_tokens=3, cutoff_len=256,
                           eval_batch_size=2)
    held = summary["heldout_loss"]
    assert held["n"] == 3 and held["base"] > 0 and held["adapted"] > 0 and held["base"] != held["adapted"]
    assert summary["train_loss"]["steps_each"] == 1 and summary["warmup_steps"] == 1
    written = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert written["heldout_loss"] == held
    table = capsys.readouterr().out
    assert "| model | held-out loss (3 GSM8K test solutions) | GSM8K test accuracy (2 problems) |" in table
    assert f"| {held['base']:.4f} |" in table and "one problem is 50 points" in table
    # a word-level tokenizer has no GGUF form: the GGUF step says so and the job goes on
    assert "byte-level BPE" in summary["gguf"]["skipped"] and "GGUF export skipped: " in table


@pytest.mark.filterwarnings("ignore:r=32 > min")
def test_main_job_exports_gguf(tmp_path, capsys):
    """With a tokenizer GGUF can carry, the last step writes model-q8_0.gguf, reads it back with
    transformers' GGUF loader and reports that model's held-out loss next to the fine-tuned one's."""
    pytest.importorskip("accelerate")
    from tiny_tokenizers import gguf_model, tiny_tokenizer

    from fastadapt.app.main_job import run_main_job

    tok = tiny_tokenizer("gpt-2")
    base = tmp_path / "base"
    gguf_model("llama", vocab_size=len(tok), max_position_embeddings=512, pad_token_id=tok.pad_token_id,
               seed=1).save_pretrained(base)
    tok.save_pretrained(base)
    summary = run_main_job(model=str(base), output=tmp_path / "job", eval_limit=1, heldout_limit=3, train_limit=8,
                           max_steps=2, batch_size=2, micro_batch_size=2, max_new_tokens=2, cutoff_len=256,
                           eval_batch_size=2)
    gguf = summary["gguf"]
    assert gguf["path"] == str(tmp_path / "job" / "model-q8_0.gguf") and (tmp_path / "job" / "model-q8_0.gguf").is_file()
    # q8_0 on a random tiny model: the file's held-out loss within a percent of the fine-tuned model's
    assert gguf["heldout_loss"] == pytest.approx(summary["heldout_loss"]["adapted"], rel=1e-2)
    assert gguf["read_back"]["mean_abs_logit_diff"] <= 1.1 * gguf["quantization_error"]["mean_abs_logit_diff"] + 1e-4
    table = capsys.readouterr().out
    assert f"| + LoRA, merged, GGUF q8_0 (transformers' GGUF loader) | {gguf['heldout_loss']:.4f} | — |" in table
