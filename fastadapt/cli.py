"""``fastadapt`` command line: ``fastadapt export`` (and more subcommands as they land)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

logger = logging.getLogger("fastadapt.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastadapt",
        description="Parameter-efficient fine-tuning on fused kernels. Run `fastadapt <command> --help`.",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging verbosity (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    exp = sub.add_parser(
        "export",
        help="merge an adapter into its base model and write a plain transformers checkpoint",
        description=(
            "Load the base model, apply the adapter, merge it, write a merged checkpoint that loads "
            "with transformers alone, then reload the export and check its logits against the "
            "adapted model on a probe batch. Exits non-zero on any mismatch."
        ),
    )
    exp.add_argument("--model", required=True,
                     help="base model: 'smollm2-135m' (embedded), a local checkpoint folder or a hub name")
    exp.add_argument("--adapter", required=True,
                     help="adapter folder (fastadapt or PEFT format: adapter_config.json + weights)")
    exp.add_argument("--out", required=True, help="output folder (must be empty or absent unless --overwrite)")
    exp.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                     help="dtype of the written weights (default: the base model's)")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    exp.set_defaults(func=cmd_export)

    demo = sub.add_parser(
        "demo",
        help="quick demo on the embedded model: LoRA fine-tune on a GSM8K slice, export, generate",
        description="Patch the embedded model with LoRA, fine-tune it for a few dozen steps on a GSM8K "
        "train slice (loss printed), export it merged, reload the export and generate.",
    )
    demo.add_argument("--model", default="smollm2-135m", help="base model (default: the embedded smollm2-135m)")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=40, help="optimizer steps (default: 40)")
    demo.add_argument("--batch-size", type=int, default=4, help="examples per step (default: 4)")
    demo.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: 2e-3)")
    demo.set_defaults(func=cmd_demo)
    return parser


def cmd_demo(args) -> int:
    from fastadapt.demo import run_demo

    result = run_demo(model_name=args.model, out_dir=args.out, steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr)
    losses = result["losses"]
    return 0 if sum(losses[-5:]) < sum(losses[:5]) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        logger.error("%s", e)
        return 2


# -- export ------------------------------------------------------------------------------------


def _probe_batch(tokenizer, vocab_size: int) -> dict[str, torch.Tensor]:
    texts = ["The quick brown fox jumps over the lazy dog.", "Natalia sold 48 clips in April."]
    if tokenizer is not None:
        return dict(tokenizer(texts, return_tensors="pt", padding=True))
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab_size, (2, 12), generator=g)}


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model(**batch).logits.float()


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def cmd_export(args) -> int:
    from transformers import AutoModelForCausalLM

    import fastadapt as fa
    from fastadapt.export import parse_dtype
    from fastadapt.models import load_model

    model, tokenizer = load_model(args.model)
    model.eval()
    fa.load_adapter(model, args.adapter)
    batch = _probe_batch(tokenizer, model.config.vocab_size)
    adapted = _logits(model, batch)

    fa.merge(model)
    merged = _logits(model, batch)
    merge_diff = _max_rel_diff(merged, adapted)
    logger.info("merged vs adapted logits: max relative difference %.2e", merge_diff)
    tol = 1e-4 if model.dtype == torch.float32 else 2e-2
    if merge_diff > tol:
        logger.error("merged model differs from the adapted model (%.2e > %.0e)", merge_diff, tol)
        return 1

    out = fa.export(model, args.out, tokenizer=tokenizer, dtype=args.dtype, overwrite=args.overwrite)

    # The files must reproduce the in-memory merged model with its weights rounded to the written
    # dtype: both are run in the model's compute dtype, so any difference is a wrong file.
    dtype = parse_dtype(args.dtype) or model.dtype
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=model.dtype).eval()
    file_diff = _max_rel_diff(_logits(reloaded, batch), _logits(model, batch))
    logger.info("reloaded export vs merged model (%s weights): max relative difference %.2e", dtype, file_diff)
    if file_diff > 1e-6:
        logger.error("the exported checkpoint does not reproduce the merged model (%.2e)", file_diff)
        return 1
    print(f"exported merged model to {out} (merge check {merge_diff:.1e}, reload check {file_diff:.1e})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
