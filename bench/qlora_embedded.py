"""QLoRA on the embedded model (CPU): model footprint, peak RSS and held-out loss of a LoRA run on
an NF4 base against the same run on the fp32 base (issue 28's goals; the figures are in
``bench/NOTES.md`` and ``docs/qlora.md``).

One run per process (peak RSS is per process)::

    python bench/qlora_embedded.py --quantize nf4 --steps 20 --out runs/q20      # footprint + RSS
    python bench/qlora_embedded.py --quantize none --steps 20 --out runs/f20
    python bench/qlora_embedded.py --quantize nf4 --heldout --out runs/qmain     # the main job's LoRA budget
    python bench/qlora_embedded.py --quantize none --heldout --out runs/fmain

``--steps`` defaults to the main job's CPU budget (``fastadapt/app/main_job.py``: settings, seed 42).
Prints one JSON line: footprint (parameters and buffers by kind, MiB), peak RSS of the whole
process and of the training phase alone (VmHWM reset after loading), seconds, the held-out loss.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastadapt.app.evaluation import run_heldout_loss
from fastadapt.app.main_job import main_job_settings, main_job_train_config
from fastadapt.app.train import train
from fastadapt.models import load_model
from fastadapt.modules.quantized import quantized_kind

MODEL = "smollm2-135m"


def footprint(model) -> dict[str, float]:
    """MiB of parameters and buffers: quantized linears (packed weight + their quantization state),
    the other tensors, and the total (what ``model.get_memory_footprint()`` counts)."""
    mib = 1 << 20
    quantized = other = 0
    seen: set[int] = set()
    for module in model.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        size = 0
        for t in own:
            if id(t) not in seen:
                seen.add(id(t))
                size += t.numel() * t.element_size()
        if quantized_kind(module) == "4bit":
            state = module.weight.quant_state
            size += sum(t.numel() * t.element_size() for t in (state.absmax, state.code))
            if state.nested:
                size += sum(t.numel() * t.element_size() for t in (state.state2.absmax, state.state2.code))
            quantized += size
        else:
            other += size
    embed = model.get_input_embeddings().weight
    return {"quantized_linears_mib": quantized / mib, "other_mib": other / mib, "total_mib": (quantized + other) / mib,
            "embedding_mib": embed.numel() * embed.element_size() / mib, "embedding_dtype": str(embed.dtype),
            "tied_head": model.get_output_embeddings().weight is embed}


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)


def heldout(args, cfg, model, tokenizer, name: str) -> dict:
    """The main job's held-out loss (its GSM8K slice) of the model as it is now: loss, n, ..."""
    return run_heldout_loss(output=Path(args.out) / name, loaded=(model, tokenizer), model=MODEL,
                            data="gsm8k", limit=cfg["heldout_limit"], batch_size=cfg["eval_batch_size"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quantize", choices=["none", "nf4", "fp4", "int8"], required=True)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the main job's CPU budget)")
    p.add_argument("--heldout", action="store_true", help="held-out loss after training (main job's slice)")
    p.add_argument("--heldout-before", action="store_true",
                   help="also the held-out loss of the untrained model (how far the base alone moved it)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = main_job_settings(max_steps=args.steps)
    quantize = None if args.quantize == "none" else args.quantize
    t = time.time()
    model, tokenizer = load_model(MODEL, quantize=quantize)
    load_s = time.time() - t
    result = {"quantize": args.quantize, "steps": cfg["max_steps"], "settings": cfg, "load_s": round(load_s, 1),
              "footprint": footprint(model), "peak_rss_after_load_mib": vm_hwm_mib()}
    if args.heldout_before:
        result["heldout_loss_before"] = heldout(args, cfg, model, tokenizer, "heldout-before")["loss"]
    reset_peak_rss()
    tcfg = main_job_train_config(cfg, model=MODEL, output=args.out, seed=42)
    t = time.time()
    trained = train(tcfg, overwrite=True, loaded=(model, tokenizer))
    result["train_s"] = round(time.time() - t, 1)
    result["peak_rss_training_mib"] = vm_hwm_mib()
    result["train_loss"] = trained.loss_means()
    if args.heldout:
        loss = heldout(args, cfg, model, tokenizer, "heldout")
        result["heldout_loss"] = loss["loss"]
        result["heldout_n"] = loss["n"]
    # VmHWM was reset after loading: the process's peak is the larger of the two phases'
    result["peak_rss_process_mib"] = max(result["peak_rss_after_load_mib"], vm_hwm_mib())
    print(json.dumps(result), flush=True)
    (Path(args.out) / "qlora_embedded.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
