"""The freshness matrix: every update path (``update_paths.UPDATE_PATHS``) × every variant (LoRA fp32,
bf16, fp32 under bf16 autocast; DoRA fp32, bf16) × two orders — a training step then evaluation,
and evaluation, a training step, evaluation — each compared with a model whose caches were never
filled (the same tensors, ``update_paths.fresh_copy``): evaluation logits and the next training
forward must be bit-for-bit equal. Plus transformers.Trainer with its default optimizer
(``adamw_torch_fused``), bf16 and periodic evaluation, and a DoRA Trainer run resumed from a
checkpoint against an uninterrupted one. (FSDP2 and DDP: tests/distributed.)"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, tokens
from update_paths import (
    UPDATE_PATHS,
    VARIANTS,
    Context,
    build,
    eval_logits,
    fresh_copy,
    train_forward,
)

import fastadapt as fa

ORDERS = ("train-then-eval", "eval-train-eval")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: a second intra-op thread only adds spin-waits (10x slower on a loaded 2-core box)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_fresh(model, variant, what: str) -> None:
    fresh = fresh_copy(model, variant)
    got, want = eval_logits(model, variant), eval_logits(fresh, variant)
    assert torch.equal(got, want), f"{what}: eval logits differ from a fresh model's by {(got - want).abs().max():.3g}"
    got, want = train_forward(model, variant), train_forward(fresh, variant)
    assert torch.equal(got, want), f"{what}: training logits differ from a fresh model's by {(got - want).abs().max():.3g}"


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("path", sorted(UPDATE_PATHS))
def test_no_stale_value_after_update(path, variant, order, tmp_path):
    model = build(variant)
    ctx = Context(tmp=tmp_path)
    if order == "eval-train-eval":
        before = eval_logits(model, variant)  # fills every inference cache
        assert torch.equal(before, eval_logits(fresh_copy(model, variant), variant))
    train_forward(model, variant)  # fills anything the training path might keep
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = UPDATE_PATHS[path](model, variant, ctx)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, f"{path} changed no parameter: the comparison would be vacuous"
    _check_fresh(model, variant, f"{path}, {variant.name}, {order}")
    ctx.step += 1  # and once more: the caches the first update refilled must go stale too
    train_forward(model, variant)
    model = UPDATE_PATHS[path](model, variant, ctx)
    got, want = eval_logits(model, variant), eval_logits(fresh_copy(model, variant), variant)
    assert torch.equal(got, want), f"{path} (second), {variant.name}, {order}: off by {(got - want).abs().max():.3g}"


# -- transformers.Trainer: its default optimizer is fused AdamW ------------------------------------------


def _dataset(n: int, seq: int = 10, seed: int = 3):
    return [{"input_ids": row, "labels": row} for row in tokens(n, seq, seed=seed)]


def _trainer(model, out, *, callbacks=(), eval_dataset=None, **args):
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, per_device_eval_batch_size=8, learning_rate=2e-2,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
        disable_tqdm=True, **args)
    assert targs.optim == "adamw_torch_fused"  # the default, never overridden here
    return Trainer(model=model, args=targs, train_dataset=_dataset(12), eval_dataset=eval_dataset,
                   callbacks=list(callbacks))


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.name in ("lora-fp32-autocast", "dora-fp32")],
                         ids=lambda v: v.name)
def test_trainer_default_optimizer_bf16_periodic_eval_matches_a_fresh_model(variant, tmp_path):
    """Trainer(bf16=True) with its default optimizer, evaluating every 2 steps: each eval_loss is the
    loss a fresh model with the same weights gives (under the same bf16 autocast), and it moves."""
    pytest.importorskip("accelerate")
    from transformers import TrainerCallback

    eval_set = _dataset(4, seed=9)
    batch = torch.stack([row["input_ids"] for row in eval_set])
    seen: list[tuple[float, float]] = []

    class FreshLoss(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
            fresh = fresh_copy(model, variant)
            fresh.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                want = fresh(batch, labels=batch).loss.item()
            seen.append((metrics["eval_loss"], want))

    model = build(variant).train()
    _trainer(model, tmp_path, callbacks=[FreshLoss()], eval_dataset=eval_set, bf16=True, max_steps=6,
             eval_strategy="steps", eval_steps=2, save_strategy="no").train()
    assert len(seen) == 3, seen
    for got, want in seen:
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6), seen
    assert len({round(got, 6) for got, _ in seen}) == 3, f"eval_loss did not move: {seen}"


def test_trainer_resume_with_dora_equals_an_uninterrupted_run(tmp_path):
    """DoRA with Trainer's default optimizer: a run resumed from its step-2 checkpoint ends with the
    adapter of an uninterrupted 4-step run."""
    pytest.importorskip("accelerate")
    variant = next(v for v in VARIANTS if v.name == "dora-fp32")
    full = build(variant).train()
    _trainer(full, tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2).train()
    resumed = build(variant).train()
    _trainer(resumed, tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    want = dict(full.named_parameters())
    start = dict(build(variant).named_parameters())
    for name, p in resumed.named_parameters():
        if p.requires_grad:
            assert not torch.equal(want[name], start[name]), f"{name} did not train: the comparison would be vacuous"
            torch.testing.assert_close(p, want[name], rtol=1e-6, atol=1e-7, msg=name)


def test_dora_trained_with_fused_adamw_follows_peft(tmp_path):
    """The issue's repro: DoRA on the tiny LLaMA (r 4, q/v/down), 5 fused-AdamW steps from PEFT's own
    initial adapter — the losses are PEFT's, and the trained model evaluates like a fresh one."""
    peft = pytest.importorskip("peft")
    ids = tokens(4, 16)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]))
    theirs.save_pretrained(tmp_path)
    ours = fa.load_adapter(tiny_model("llama"), tmp_path)

    def train(model):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
        losses = []
        for _ in range(5):
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    want, got = train(theirs), train(ours)
    assert len(set(want)) == 5
    torch.testing.assert_close(got, want, rtol=2e-5, atol=0)
    variant = next(v for v in VARIANTS if v.name == "dora-fp32")
    assert torch.equal(eval_logits(ours, variant), eval_logits(fresh_copy(ours, variant), variant))
