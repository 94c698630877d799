"""The quick demo: patch the embedded model with LoRA, fine-tune a few dozen steps on a GSM8K
train slice (loss printed), export it merged, reload the export with plain transformers and
generate an answer."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def run_demo(
    *,
    model_name: str = "smollm2-135m",
    out_dir: str | Path = "runs/demo",
    steps: int = 40,
    batch_size: int = 4,
    examples: int = 160,
    lr: float = 2e-3,
    seed: int = 0,
) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fastadapt as fa
    from fastadapt.datasets import load_train_records
    from fastadapt.models import load_model
    from fastadapt.prompts import build_prompt, make_collator, tokenize_example

    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    model, tokenizer = load_model(model_name)
    fa.patch(model, "lora", r=8, alpha=16, dropout=0.05, targets=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    print(fa.summary(model).__str__().splitlines()[-1])

    records = load_train_records("gsm8k", limit=examples)
    features = [tokenize_example(tokenizer, r, cutoff_len=256) for r in records]
    collate = make_collator(tokenizer)
    rng = random.Random(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="fine-tuning", unit="step")
    for step in bar:
        batch = collate(rng.sample(features, batch_size))
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 10 == 0 or step == steps - 1:
            tqdm.write(f"step {step:3d}  loss {loss.item():.4f}")
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"mean loss, first 5 steps {first:.4f} -> last 5 steps {last:.4f}")

    model.eval()
    fa.save_adapter(model, out_dir / "adapter")
    fa.merge(model)
    export_dir = fa.export(model, out_dir / "merged", tokenizer=tokenizer, overwrite=True)
    reloaded = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    tok = AutoTokenizer.from_pretrained(export_dir)
    question = "Tom has 3 boxes with 4 apples each. He eats 2 apples. How many apples are left?"
    prompt = build_prompt(question)
    inputs = tok(prompt, return_tensors="pt")
    t0 = time.time()
    with torch.no_grad():
        out = reloaded.generate(**inputs, max_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"\nexported to {export_dir}; generation from the reloaded export ({time.time() - t0:.1f}s):")
    print(f"Q: {question}\nA: {answer.strip()}")
    return {"losses": losses, "export": str(export_dir), "answer": answer}
