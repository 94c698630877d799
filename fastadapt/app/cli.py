"""``fastadapt`` command line: ``train``, ``eval``, ``loss``, ``export``, ``generate`` and ``main-job`` (README
command 1).

Every command checks what it can before loading a model (the model name, the data, the adapter,
the output folder), and an error is one line on stderr, ``fastadapt: error: ...``, naming the flag;
``--debug`` prints the traceback too.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..export import DEFAULT_GGUF_QUANT
from ..export import FORMATS as EXPORT_FORMATS
from ..gguf_io import QUANTS
from ..io import BIN_WEIGHTS_NAME, SAFE_WEIGHTS_NAME, read_adapter_config
from ..methods import get_method, method_for_peft_type, method_names
from ..models import EMBEDDED_MODELS, QUANTIZE, load_model, locate_model, require_bitsandbytes
from .data import (
    BUILTIN_EVAL_SETS,
    BUILTIN_SOLUTION_SETS,
    load_eval_set,
    load_solution_records,
    load_train_records,
)
from .evaluation import run_eval, run_heldout_loss
from .exporting import describe_gguf_check, export_gguf_and_check, merge_export_and_check
from .generation import parse_adapters, read_requests, run_generate
from .main_job import CPU_DEFAULTS, GPU_DEFAULTS, main_job_settings, main_job_train_config, run_main_job
from .train import DEFAULT_PRESET, DEFAULT_WARMUP_STEPS, TrainConfig, check_run_folder, default_lr, method_options
from .train import train as run_train

logger = logging.getLogger("fastadapt.app.cli")

#: Errors a user can cause (bad flags, files, names): exit status 2 and no traceback.
USER_ERRORS = (ValueError, TypeError, KeyError, OSError, FloatingPointError)


class CliError(Exception):
    """An error already worded for the command line (it names the flag)."""


# -- the parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastadapt",
        description="Parameter-efficient fine-tuning on fused kernels. Run `fastadapt <command> --help`.",
    )
    _add_common(parser, None)
    # The same options after the command (`fastadapt train --debug ...`); SUPPRESS keeps the values
    # given before the command when they are not repeated.
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    _add_train(sub, common)
    _add_eval(sub, common)
    _add_loss(sub, common)
    _add_export(sub, common)
    _add_generate(sub, common)
    _add_main_job(sub, common)
    _add_backends(sub, common)
    return parser


def _add_common(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   default="INFO" if default is None else default, help="logging verbosity (default: INFO)")
    p.add_argument("--debug", action="store_true", default=False if default is None else default,
                   help="on an error, print the full traceback too")


def _add_model(p, *, required: bool = True, help_extra: str = "") -> None:
    embedded = ", ".join(EMBEDDED_MODELS)
    p.add_argument("--model", required=required, default=None if required else "smollm2-135m",
                   help=f"base model: an embedded name ({embedded}), a local checkpoint folder or a hub name"
                   + help_extra)


def _add_output(p, help: str, *, required: bool = True, default: str | None = None) -> None:
    p.add_argument("--output", "--out", dest="output", required=required, default=default, help=help)


def _add_adapter(p, *, required: bool) -> None:
    p.add_argument("--adapter", required=required, default=None,
                   help="adapter folder (fastadapt or PEFT format: adapter_config.json + weights)"
                   + ("" if required else "; default: the base model alone"))


def _add_measured(p, *, data_default: str | None, data_help: str, output: str, limit_help: str,
                  batch_help: str, limit_default: int | None = None) -> None:
    """The flags of a command that measures a model (+ adapter) on a data set: eval, loss."""
    _add_model(p)
    _add_adapter(p, required=False)
    p.add_argument("--data", required=data_default is None, default=data_default, help=data_help)
    _add_output(p, f"folder for {output}")
    default = "all" if limit_default is None else limit_default
    p.add_argument("--limit", type=_positive_int, default=limit_default, help=f"{limit_help} (default {default})")
    p.add_argument("--batch-size", type=_positive_int, default=8, help=f"{batch_help} (default 8)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _bool_flag(p, name: str, default, help: str) -> None:
    p.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction,
                   default=default, help=help)


def _add_train(sub, common) -> None:
    methods = method_names()
    presets = "; ".join(f"{m}: {get_method(m).preset(DEFAULT_PRESET).description}" for m in methods)
    p = sub.add_parser(
        "train", parents=[common],
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
    _add_model(p)
    p.add_argument("--data", required=True,
                   help="'gsm8k' (GSM8K train, shipped) or a JSON/JSONL file of {instruction, input, output} "
                   "or {question, answer} records")
    p.add_argument("--method", default="lora", choices=methods, help="adapter method (default: lora)")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=[DEFAULT_PRESET, "none"],
                   help=f"settings the method options start from (default: {DEFAULT_PRESET})")
    _add_output(p, "output folder for the adapter, logs and checkpoints")
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
    t.add_argument("--batch-size", type=_positive_int, default=16, help="examples per optimizer step (default 16)")
    t.add_argument("--micro-batch-size", type=_positive_int, default=4,
                   help="examples per forward/backward; batch-size/micro-batch-size steps are accumulated (default 4)")
    lrs = ", ".join(f"{m} {default_lr(m):g}" for m in methods)
    t.add_argument("--lr", type=float, default=None, help=f"peak AdamW learning rate (default {lrs})")
    t.add_argument("--warmup-steps", type=_non_negative_int, default=None,
                   help=f"linear warmup steps, then linear decay (default {DEFAULT_WARMUP_STEPS}, or a tenth of "
                   "the run when that is shorter)")
    t.add_argument("--cutoff-len", type=_positive_int, default=256,
                   help="truncate examples to this many tokens (default 256)")
    t.add_argument("--val-size", type=_non_negative_int, default=0,
                   help="hold out this many examples for eval loss (default 0)")
    _bool_flag(t, "train-on-inputs", False, "also put the loss on the prompt tokens (default: response only)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    t.add_argument("--quantize", choices=list(QUANTIZE), default=None,
                   help="QLoRA: load the base's decoder linears in 4-bit (nf4/fp4, double-quantized) or int8 with "
                        "bitsandbytes (pip install 'fastadapt[quant]'); adapters stay fp32")
    _bool_flag(t, "bf16", None, "bf16 autocast (default: on when a CUDA GPU supports it; needs CUDA)")
    t.add_argument("--seed", type=int, default=42, help="seed of adapter init, shuffle, dropout (default 42)")
    t.add_argument("--limit", type=_positive_int, default=None, help="use only the first N records of --data")
    t.add_argument("--save-steps", type=_positive_int, default=200, help="checkpoint every N steps (default 200)")
    t.add_argument("--eval-steps", type=_positive_int, default=200,
                   help="eval loss every N steps with --val-size (default 200)")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the last checkpoint in --output (or the one given)")
    t.add_argument("--overwrite", action="store_true", help="start over in an --output that holds a run")
    p.set_defaults(func=cmd_train)


def _add_eval(sub, common) -> None:
    p = sub.add_parser(
        "eval", parents=[common],
        help="generate answers on a math/commonsense test set and score them",
        description=(
            "Batched generation (left padding + attention mask, KV cache, eval mode), answer "
            "extraction and scoring. Writes metrics.json and predictions.jsonl into --output."
        ),
    )
    _add_measured(
        p, data_default=None, output="metrics.json and predictions.jsonl",
        data_help=f"built-in set ({', '.join(BUILTIN_EVAL_SETS)}) or a path to a file in LLM-Adapters' "
        "test.json format (math or commonsense)",
        limit_help="evaluate only the first N examples", batch_help="prompts per generate call",
    )
    p.add_argument("--max-new-tokens", type=_positive_int, default=256, help="generation length limit (default 256)")
    p.add_argument("--num-beams", type=_positive_int, default=1, help="1 = greedy (default); >1 = beam search")
    p.set_defaults(func=cmd_eval)


def _add_loss(sub, common) -> None:
    p = sub.add_parser(
        "loss", parents=[common],
        help="held-out loss: the teacher-forced loss of reference solutions (GSM8K test by default)",
        description=(
            "The mean per-token loss of reference solutions given their Alpaca prompts (teacher-forced, "
            "response tokens only, token-weighted), with the same prompt and labels as training. On "
            "problems the adapter never trained on (GSM8K test) it shows learning long before greedy "
            "accuracy on a few problems can. Writes loss.json into --output."
        ),
    )
    _add_measured(
        p, data_default="gsm8k", output="loss.json", limit_default=100,
        data_help=f"built-in test set with reference solutions ({', '.join(BUILTIN_SOLUTION_SETS)}: GSM8K "
        "test, the default) or a JSON/JSONL file of {instruction, input, output} or {question, answer} records",
        limit_help="the first N problems", batch_help="sequences per forward pass",
    )
    p.set_defaults(func=cmd_loss)


def _add_export(sub, common) -> None:
    p = sub.add_parser(
        "export", parents=[common],
        help="merge an adapter into its base model: a plain transformers checkpoint, or one GGUF file for "
        "llama.cpp / Ollama",
        description=(
            "Load the base model, apply the adapter, merge it and write the merged model: with --format "
            "transformers (default) a checkpoint folder that loads with transformers alone, reloaded and checked "
            "against the adapted model's logits on a probe batch; with --format gguf one GGUF file (weights in "
            "--quant, the tokenizer included) that llama.cpp and Ollama run with no other file, its quantization "
            "error measured and recorded in the file, then read back with transformers' GGUF loader and checked. "
            "Exits non-zero on any mismatch."
        ),
    )
    _add_model(p)
    _add_adapter(p, required=True)
    _add_output(p, "output folder (transformers; must be empty or absent unless --overwrite) or file (gguf, e.g. "
                "model-q8_0.gguf; must not exist unless --overwrite); --out is the same flag")
    p.add_argument("--format", choices=list(EXPORT_FORMATS), default="transformers",
                   help="transformers (a checkpoint folder, default) or gguf (one file for llama.cpp / Ollama)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="--format transformers: dtype of the written weights (default: the base model's)")
    p.add_argument("--quant", choices=list(QUANTS), default=None,
                   help=f"--format gguf: weight type of the file (default {DEFAULT_GGUF_QUANT})")
    p.add_argument("--quantize", choices=list(QUANTIZE), default=None,
                   help="the adapter was trained on this quantized base (train --quantize): load the base so, "
                        "merge into its dequantized weights (the export is full precision, or --quant for gguf)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=cmd_export)


def _add_generate(sub, common) -> None:
    p = sub.add_parser(
        "generate", parents=[common],
        help="complete a JSONL file of prompts, each on its own adapter, in mixed batches",
        description=(
            "Load --model and every --adapter NAME=PATH by name, then complete each line of --input, "
            '{"prompt": ..., "adapter": NAME} (adapter absent or "__base__": the base model), in batches whose '
            "rows use different adapters (left padding + attention mask, KV cache; greedy unless --do-sample). "
            'Writes --output: each input line plus "completion", in input order, atomically at the end.'
        ),
    )
    _add_model(p)
    p.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="NAME=PATH",
                   help="a named adapter folder (fastadapt or PEFT format); repeat for more; all share a method")
    p.add_argument("--input", required=True, help='JSONL file of {"prompt": ..., "adapter": NAME} objects')
    p.add_argument("--output", "--out", dest="output", required=True, help="JSONL file to write")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128, help="new tokens per prompt (default 128)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --do-sample)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (with --do-sample)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (with --do-sample)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.set_defaults(func=cmd_generate)


def _add_backends(sub, common) -> None:
    p = sub.add_parser(
        "backends", parents=[common],
        help="which kernel backend `auto` picks for each op on this machine, and why",
        description=(
            "For every fused op and shape class (decode: at most 64 rows, batch: more), the backend "
            "backend='auto' would run on the device and the reason: a GPU verification record that "
            "matches this GPU and the current kernel sources, or why none does. FASTADAPT_BACKEND and "
            "FASTADAPT_VERIFIED are honoured."
        ),
    )
    p.add_argument("--device", default=None,
                   help="torch device to report for, e.g. cuda:1 (default: the current CUDA device, else cpu)")
    p.set_defaults(func=cmd_backends)


def _add_main_job(sub, common) -> None:
    p = sub.add_parser(
        "main-job", parents=[common],
        help="the main job on the embedded model: measure the base, LoRA fine-tune on GSM8K, measure, export",
        description=(
            "Measure the base model (held-out loss on GSM8K test reference solutions, accuracy on GSM8K "
            "test problems), fine-tune it with LoRA on GSM8K train, measure again, export the merged model "
            "and print a before/after table. Slices are small on CPU (under 15 minutes on 2 cores) and "
            "larger on a GPU; every size can be overridden."
        ),
    )
    _add_model(p, required=False, help_extra=" (default: the embedded smollm2-135m)")
    _add_output(p, "output folder (default: runs/main-job)", required=False, default="runs/main-job")

    def sized(flag: str, key: str, kind, what: str) -> None:
        p.add_argument(flag, type=kind, default=None,
                       help=f"{what} (default: CPU {CPU_DEFAULTS[key]}, GPU {GPU_DEFAULTS[key] or 'all'})")

    sized("--eval-limit", "eval_limit", _positive_int, "GSM8K test problems for accuracy")
    sized("--heldout-limit", "heldout_limit", _positive_int, "GSM8K test solutions for the held-out loss")
    sized("--train-limit", "train_limit", _positive_int, "GSM8K train examples")
    sized("--max-steps", "max_steps", _positive_int, "optimizer steps")
    sized("--batch-size", "batch_size", _positive_int, "examples per step")
    sized("--micro-batch-size", "micro_batch_size", _positive_int, "examples per forward")
    sized("--lr", "lr", float, "learning rate")
    sized("--max-new-tokens", "max_new_tokens", _positive_int, "generation limit")
    sized("--cutoff-len", "cutoff_len", _positive_int, "training truncation")
    p.add_argument("--seed", type=int, default=42, help="seed (default 42)")
    p.set_defaults(func=cmd_main_job)


MAIN_JOB_SETTINGS = ("eval_limit", "heldout_limit", "train_limit", "max_steps", "batch_size", "micro_batch_size",
                     "lr", "max_new_tokens", "cutoff_len")


# -- checks before anything loads ---------------------------------------------------------------


@contextlib.contextmanager
def about(flag: str) -> Iterator[None]:
    """Word a user error raised inside as ``<flag>: <message>``."""
    try:
        yield
    except USER_ERRORS as e:
        raise CliError(f"{flag}: {one_line(e)}") from e


def in_cli_terms(message: str, parser: argparse.ArgumentParser) -> str:
    """A Python-worded message with the flags in place of the option names: ``batch_size (5) must
    be a multiple of micro_batch_size (2)`` -> ``--batch-size (5) must be a multiple of
    --micro-batch-size (2)``, ``overwrite=True`` -> ``--overwrite``. Underscored names are replaced
    wherever they occur; a one-word name only where it starts the message or is quoted."""
    flags = _flag_table(parser)
    message = re.sub(r"\b(\w+)=True\b", lambda m: flags.get(m.group(1), m.group(0)), message)
    message = re.sub(r"\b\w+_\w+\b", lambda m: flags.get(m.group(0), m.group(0)), message)
    message = re.sub(r"'(\w+)'", lambda m: flags.get(m.group(1), m.group(0)), message)
    return re.sub(r"^(\w+)\b", lambda m: flags.get(m.group(1), m.group(0)), message)


def _flag_table(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> its first long option, over every command (argparse is the one home of the names)."""
    table: dict[str, str] = {}
    for action in _all_actions(parser):
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest not in ("help",):
            table.setdefault(action.dest, longs[0])
    return table


def _all_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_actions(sub)


def check_model(name: str) -> None:
    with about("--model"):
        locate_model(name)


def check_adapter(path: str, *, mergeable: bool = False) -> None:
    """The adapter folder holds a config of a known kind and weights; ``mergeable``: its method can be
    merged into the weights (``export``)."""
    with about("--adapter"):
        saved = read_adapter_config(path)
        reader = method_for_peft_type(str(saved.get("peft_type", "")))
        if reader is None:
            raise ValueError(f"{path!r} holds an adapter of peft_type {saved.get('peft_type')!r}, which fastadapt "
                             "does not read")
        method, _ = reader.read_config(saved, str(path))
        if not any((Path(path) / name).is_file() for name in (SAFE_WEIGHTS_NAME, BIN_WEIGHTS_NAME)):
            raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {BIN_WEIGHTS_NAME} in {path!r}")
        reason = get_method(method).merge_error
        if mergeable and reason is not None:
            raise ValueError(f"a {method!r} adapter cannot be merged into a plain checkpoint: {reason}")


def check_empty_output(path: str, overwrite: bool) -> None:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CliError(f"--output: {path!r} is a file; expected a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CliError(f"--output: folder {path!r} is not empty; pass --overwrite to replace it")


# -- commands -----------------------------------------------------------------------------------


def cmd_train(args, parser) -> int:
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
        save_steps=args.save_steps, eval_steps=args.eval_steps, quantize=args.quantize,
    )
    check_model(args.model)
    if args.quantize is not None:
        try:
            require_bitsandbytes(f"--quantize {args.quantize}")
        except ImportError as e:
            raise CliError(f"--quantize: {e}") from e
    with about("--data"):
        load_train_records(args.data, limit=args.limit)
    check_run_folder(args.output, resume=args.resume, overwrite=args.overwrite)
    result = run_train(config, resume=args.resume, overwrite=args.overwrite)
    means = result.loss_means()
    loss = "no loss logged" if means["first"] is None else (
        f"loss {means['first']:.4f} -> {means['last']:.4f}, means of the first and last {means['steps_each']} steps")
    print(f"trained {result.steps} steps in {result.seconds:.0f} s ({loss}); adapter in {result.output}")
    return 0


def cmd_eval(args, parser) -> int:
    check_model(args.model)
    if args.adapter is not None:
        check_adapter(args.adapter)
    with about("--data"):
        load_eval_set(args.data, limit=args.limit)
    m = run_eval(model=args.model, data=args.data, output=args.output, adapter=args.adapter, limit=args.limit,
                 batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    print(f"{m['data']}: accuracy {m['accuracy']:.4f} ({m['correct']}/{m['n']}) -> {args.output}/metrics.json")
    return 0


def cmd_loss(args, parser) -> int:
    check_model(args.model)
    if args.adapter is not None:
        check_adapter(args.adapter)
    with about("--data"):
        load_solution_records(args.data, limit=args.limit)
    r = run_heldout_loss(model=args.model, data=args.data, output=args.output, adapter=args.adapter,
                         limit=args.limit, batch_size=args.batch_size)
    print(f"{r['data']}: held-out loss {r['loss']:.4f} ({r['n']} problems, {r['tokens']} tokens) -> "
          f"{args.output}/loss.json")
    return 0


def check_output_file(path: str, overwrite: bool) -> None:
    out = Path(path)
    if out.is_dir():
        raise CliError(f"--output: {path!r} is a folder; a GGUF export is one file, e.g. {str(out / 'model.gguf')!r}")
    if out.exists() and not overwrite:
        raise CliError(f"--output: {path!r} exists; pass --overwrite to replace it")


def cmd_export(args, parser) -> int:
    import fastadapt as fa

    gguf = args.format == "gguf"
    if gguf and args.dtype is not None:
        raise CliError("--dtype: is for --format transformers; a GGUF file's weight type is --quant")
    if not gguf and args.quant is not None:
        raise CliError("--quant: is for --format gguf; a transformers checkpoint's weight type is --dtype")
    check_model(args.model)
    check_adapter(args.adapter, mergeable=True)
    (check_output_file if gguf else check_empty_output)(args.output, args.overwrite)
    if args.quantize is not None:
        try:
            require_bitsandbytes(f"--quantize {args.quantize}")
        except ImportError as e:
            raise CliError(f"--quantize: {e}") from e
    model, tokenizer = load_model(args.model, quantize=args.quantize)
    fa.load_adapter(model, args.adapter)
    if gguf:
        if tokenizer is None:
            raise CliError(f"--model: {args.model!r} has no tokenizer, and a GGUF file must carry one")
        checked = export_gguf_and_check(model, tokenizer, args.output, quant=args.quant or DEFAULT_GGUF_QUANT,
                                        overwrite=args.overwrite)
        print(describe_gguf_check(checked))
        return 0
    check = merge_export_and_check(model, tokenizer, args.output, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported merged model to {check.path} (merge check {check.merge_diff:.1e}, "
          f"reload check {check.reload_diff:.1e})")
    return 0


def cmd_generate(args, parser) -> int:
    with about("--adapter"):
        adapters = parse_adapters(args.adapters)
    check_model(args.model)
    for path in adapters.values():
        check_adapter(path)
    with about("--input"):
        requests = read_requests(args.input, list(adapters))
    out = Path(args.output)
    if out.is_dir():
        raise CliError(f"--output: {args.output!r} is a folder; expected a .jsonl file")
    if out.exists() and not args.overwrite:
        raise CliError(f"--output: {args.output!r} exists; pass --overwrite to replace it")
    if not args.do_sample and (args.temperature is not None or args.top_p is not None or args.seed is not None):
        raise CliError("--temperature/--top-p/--seed: they need --do-sample (decoding is greedy without it)")
    sampling = None
    if args.do_sample:
        sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None}
        sampling = sampling or {"temperature": 1.0}
    r = run_generate(model=args.model, adapters=adapters, requests=requests, output=args.output,
                     batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)
    print(f"generated {r['n']} completions ({r['rows_per_adapter']}) in {r['seconds']:.0f} s -> {r['output']}")
    return 0


def cmd_main_job(args, parser) -> int:
    overrides = {k: getattr(args, k) for k in MAIN_JOB_SETTINGS}
    cfg = main_job_settings(**overrides)
    main_job_train_config(cfg, model=args.model, output=args.output, seed=args.seed)  # fails before loading
    check_model(args.model)
    run_main_job(model=args.model, output=args.output, seed=args.seed, **overrides)
    return 0


def cmd_backends(args, parser) -> int:
    import torch

    from .backends import default_device, report

    try:
        device = torch.device(args.device) if args.device else default_device()
    except RuntimeError as exc:
        raise CliError(f"--device {args.device}: not a torch device; expected e.g. cpu, cuda, cuda:1") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {args.device}: no CUDA device is available here")
    print(report(device))
    return 0


# -- entry point --------------------------------------------------------------------------------


def one_line(error: BaseException) -> str:
    """The error's message on one line (a KeyError's without its quotes)."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(text).split()) or type(error).__name__


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
        return int(args.func(args, parser) or 0)
    except KeyboardInterrupt:
        print("fastadapt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        if isinstance(e, CliError):
            message, status = str(e), 2
        elif isinstance(e, USER_ERRORS):
            message, status = in_cli_terms(one_line(e), parser), 2
        else:  # a bug rather than a bad input: say where to look
            message, status = f"{type(e).__name__}: {one_line(e)}", 1
        hint = "" if args.debug else " (--debug shows the traceback)" if status == 1 else ""
        print(f"fastadapt: error: {message}{hint}", file=sys.stderr)
        return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
