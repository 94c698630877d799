"""``fastadapt`` command line: ``train``, ``eval``, ``export`` and ``main-job`` (README command 1)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ..methods import get_method, method_names
from .evaluation import run_eval
from .exporting import merge_export_and_check
from .main_job import run_main_job
from .models import load_model
from .train import DEFAULT_PRESET, TrainConfig, default_lr, method_options, train

logger = logging.getLogger("fastadapt.app.cli")


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

    _add_train(sub)
    _add_eval(sub)
    _add_main_job(sub)
    return parser


def _bool_flag(p, name: str, default, help: str) -> None:
    p.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction,
                   default=default, help=help)


def _add_train(sub) -> None:
    methods = method_names()
    presets = "; ".join(f"{m}: {get_method(m).preset(DEFAULT_PRESET).description}" for m in methods)
    p = sub.add_parser(
        "train",
        help="fine-tune a model with an adapter on instruction data (LLM-Adapters recipe)",
        description=(
            "Patch the model with an adapter, train it on Alpaca-style instruction data with "
            "transformers.Trainer (AdamW, linear warmup/decay, gradient accumulation, bf16 on a GPU, "
            "seeded shuffle) and write the adapter (fa.save_adapter format), training_config.json, "
            "train_log.jsonl (loss per step) and checkpoints/ into --output. Method options start from "
            f"--preset; {DEFAULT_PRESET!r} (the default) is the paper's settings ({presets}); "
            "'none' starts from fa.patch's own defaults. Flags below override single options."
        ),
    )
    p.add_argument("--model", required=True,
                   help="base model: 'smollm2-135m' (embedded), a local checkpoint folder or a hub name")
    p.add_argument("--data", required=True,
                   help="'gsm8k' (GSM8K train, shipped) or a JSON/JSONL file of {instruction, input, output} "
                   "or {question, answer} records")
    p.add_argument("--method", default="lora", choices=methods, help="adapter method (default: lora)")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=[DEFAULT_PRESET, "none"],
                   help=f"settings the method options start from (default: {DEFAULT_PRESET})")
    p.add_argument("--output", required=True, help="output folder for the adapter, logs and checkpoints")
    g = p.add_argument_group("method options (unset: the --preset value, else fa.patch's default)")
    g.add_argument("--r", "--lora-r", dest="r", type=int, default=None,
                   help="LoRA rank; spell it --lora-r under torchrun, whose parser claims --r")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha; scaling = alpha / r")
    g.add_argument("--dropout", type=float, default=None, help="adapter dropout")
    g.add_argument("--targets", default=None,
                   help="comma-separated module names, 'auto', 'all-linear', a regex, or for series/parallel "
                   "'mlp', 'mlp-input', 'mlp-output'")
    g.add_argument("--bottleneck", type=int, default=None, help="series/parallel bottleneck size")
    g.add_argument("--activation", default=None, help="series/parallel non-linearity")
    g.add_argument("--scaling", type=float, default=None, help="series/parallel output scaling")
    g.add_argument("--num-virtual-tokens", type=int, default=None, help="prefix length")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=float, default=3.0, help="passes over the data (default 3; --max-steps wins)")
    t.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; -1 = use --epochs (default)")
    t.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step (default 16)")
    t.add_argument("--micro-batch-size", type=int, default=4,
                   help="examples per forward/backward; batch-size/micro-batch-size steps are accumulated (default 4)")
    lrs = ", ".join(f"{m} {default_lr(m):g}" for m in methods)
    t.add_argument("--lr", type=float, default=None, help=f"peak AdamW learning rate (default {lrs})")
    t.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps, then linear decay (default 100)")
    t.add_argument("--cutoff-len", type=int, default=256, help="truncate examples to this many tokens (default 256)")
    t.add_argument("--val-size", type=int, default=0, help="hold out this many examples for eval loss (default 0)")
    _bool_flag(t, "train-on-inputs", False, "also put the loss on the prompt tokens (default: response only)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    _bool_flag(t, "bf16", None, "bf16 autocast (default: on when a CUDA GPU supports it; needs CUDA)")
    t.add_argument("--seed", type=int, default=42, help="seed of adapter init, shuffle, dropout (default 42)")
    t.add_argument("--limit", type=int, default=None, help="use only the first N records of --data")
    t.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps (default 200)")
    t.add_argument("--eval-steps", type=int, default=200, help="eval loss every N steps with --val-size (default 200)")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the last checkpoint in --output (or the one given)")
    t.add_argument("--overwrite", action="store_true", help="start over in an --output that holds a run")
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="generate answers on a math/commonsense test set and score them",
        description=(
            "Batched generation (left padding + attention mask, KV cache, eval mode), answer "
            "extraction and scoring. Writes metrics.json and predictions.jsonl into --output."
        ),
    )
    p.add_argument("--model", required=True,
                   help="base model: 'smollm2-135m' (embedded), a local checkpoint folder or a hub name")
    p.add_argument("--adapter", default=None, help="adapter folder to apply (default: evaluate the base model)")
    p.add_argument("--data", required=True,
                   help="built-in set (gsm8k, AddSub, MultiArith, SingleEq, SVAMP, AQuA, mawps, mathqa) or a "
                   "path to a file in LLM-Adapters' test.json format (math or commonsense)")
    p.add_argument("--output", required=True, help="folder for metrics.json and predictions.jsonl")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation length limit (default 256)")
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy (default); >1 = beam search")
    p.set_defaults(func=cmd_eval)


def _add_main_job(sub) -> None:
    p = sub.add_parser(
        "main-job",
        help="the main job on the embedded model: eval base, LoRA fine-tune on GSM8K, eval, export",
        description=(
            "Evaluate the base model on a GSM8K test slice, fine-tune it with LoRA on GSM8K train, "
            "evaluate again, export the merged model and print a before/after table. Slices are small on "
            "CPU (under 15 minutes on 2 cores) and larger on a GPU; every size can be overridden."
        ),
    )
    p.add_argument("--model", default="smollm2-135m", help="base model (default: the embedded smollm2-135m)")
    p.add_argument("--output", default="runs/main-job", help="output folder (default: runs/main-job)")
    p.add_argument("--eval-limit", type=int, default=None, help="GSM8K test examples (default: CPU 20, GPU 200)")
    p.add_argument("--train-limit", type=int, default=None, help="GSM8K train examples (default: CPU 400, GPU all)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: CPU 30, GPU 300)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (default: CPU 4, GPU 16)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="examples per forward (default: CPU 4, GPU 16)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: CPU 1e-3, GPU 3e-4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation limit (default: CPU 128, GPU 256)")
    p.add_argument("--cutoff-len", type=int, default=None, help="training truncation (default: CPU 192, GPU 256)")
    p.add_argument("--seed", type=int, default=42, help="seed (default 42)")
    p.set_defaults(func=cmd_main_job)


def cmd_train(args) -> int:
    options = method_options(
        args.method, r=args.r, alpha=args.alpha, dropout=args.dropout, targets=args.targets,
        bottleneck=args.bottleneck, activation=args.activation, scaling=args.scaling,
        num_virtual_tokens=args.num_virtual_tokens,
    )
    config = TrainConfig(
        model=args.model, data=args.data, output=args.output, method=args.method, options=options,
        preset=None if args.preset == "none" else args.preset,
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        cutoff_len=args.cutoff_len, val_size=args.val_size, train_on_inputs=args.train_on_inputs,
        gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16, seed=args.seed, limit=args.limit,
        save_steps=args.save_steps, eval_steps=args.eval_steps,
    )
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    first, last = result.losses[:1], result.losses[-1:]
    print(f"trained {result.steps} steps in {result.seconds:.0f} s (loss {first[0] if first else float('nan'):.4f}"
          f" -> {last[0] if last else float('nan'):.4f}); adapter in {result.output}")
    return 0


def cmd_eval(args) -> int:
    m = run_eval(model=args.model, data=args.data, output=args.output, adapter=args.adapter, limit=args.limit,
                 batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    print(f"{m['data']}: accuracy {m['accuracy']:.4f} ({m['correct']}/{m['n']}) -> {args.output}/metrics.json")
    return 0


def cmd_main_job(args) -> int:
    overrides = {k: getattr(args, k) for k in ("eval_limit", "train_limit", "max_steps", "batch_size",
                                                "micro_batch_size", "lr", "max_new_tokens", "cutoff_len")}
    run_main_job(model=args.model, output=args.output, seed=args.seed,
                 **{k: v for k, v in overrides.items() if v is not None})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Under torchrun / accelerate launch only rank 0 logs below warnings and draws progress bars.
    rank0 = int(os.environ.get("RANK", "0")) == 0
    level = getattr(logging, args.log_level) if rank0 else max(logging.WARNING, getattr(logging, args.log_level))
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not rank0:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        logger.error("%s", e)
        return 2


# -- export ------------------------------------------------------------------------------------


def cmd_export(args) -> int:
    import fastadapt as fa

    model, tokenizer = load_model(args.model)
    fa.load_adapter(model, args.adapter)
    check = merge_export_and_check(model, tokenizer, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported merged model to {check.path} (merge check {check.merge_diff:.1e}, "
          f"reload check {check.reload_diff:.1e})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
