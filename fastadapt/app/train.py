"""``fastadapt train``: fine-tune a causal LM with an adapter on instruction data (the LLM-Adapters
recipe) on ``transformers.Trainer``.

What one run does: load the base model, ``fa.patch`` it with the method's options (by default on
top of the paper's settings, ``preset="llm-adapters"``: see ``fa.patch``), read the records
(built-in ``gsm8k`` = GSM8K train, or an Alpaca/GSM8K JSON/JSONL file), build Alpaca prompts,
tokenize with response-only labels (:func:`fastadapt.app.prompts.tokenize_example`), drop examples
left with no label, hold out ``val_size`` examples, and train with AdamW, linear warmup/decay,
gradient accumulation (``batch_size / micro_batch_size``), bf16 autocast on a GPU, a seeded shuffle.
Warmup is the paper's 100 steps, or a tenth of the run when that is shorter (a 30-step run with
100 warmup steps would never reach its peak learning rate). Everything that can be checked without
the model (options, data, output folder) is checked before it loads.
The output folder gets:

- ``adapter_config.json`` + ``adapter_model.safetensors``: the adapter (``fa.save_adapter``
  format; ``fa.load_adapter(model, output)`` and ``fastadapt eval --adapter output`` read it);
- ``training_config.json``: every setting of the run, resolved;
- ``train_log.jsonl``: one row per optimizer step ``{"step", "loss", "learning_rate", "epoch"}``
  (and ``{"step", "eval_loss"}`` rows with a validation set);
- ``checkpoints/checkpoint-N``: Trainer checkpoints (the adapter — which ``model.safetensors``
  holds under the model's own names, what resuming loads for any method — optimizer, scheduler and
  RNG states).

``resume=True`` continues from the last checkpoint: same data order, RNG and optimizer state, so
the losses after the checkpoint equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..methods import get_method
from ..models import QUANTIZE, load_model
from .data import load_train_records
from .progress import LineProgress, progress, stderr_is_terminal
from .progress import logger as progress_logger
from .prompts import IGNORE_INDEX, make_collator, tokenize_example

logger = logging.getLogger(__name__)

#: The preset a training run starts from unless told otherwise: the LLM-Adapters paper's settings.
DEFAULT_PRESET = "llm-adapters"
#: Linear warmup: the paper's 100 steps, capped at this fraction of a shorter run.
DEFAULT_WARMUP_STEPS = 100
WARMUP_FRACTION = 0.1
LOG_NAME = "train_log.jsonl"
CONFIG_NAME = "training_config.json"
CHECKPOINT_DIR = "checkpoints"


def launch_rank() -> int:
    """This process's rank as torchrun/accelerate set it (readable before any process group exists)."""
    return int(os.environ.get("RANK", "0"))


def launch_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


TARGET_KEYWORDS = ("auto", "all-linear", "mlp", "mlp-input", "mlp-output")


def default_lr(method: str) -> float:
    """The learning rate of the paper's command for ``method`` (3e-4; prefix tuning 3e-2)."""
    return get_method(method).preset(DEFAULT_PRESET).learning_rate


def parse_targets(targets: str | Sequence[str] | None) -> str | list[str] | None:
    """``"q_proj,v_proj"`` -> ``["q_proj", "v_proj"]``; the keywords (``auto``, ``all-linear``, and the
    bottleneck presets ``mlp``, ``mlp-input``, ``mlp-output``) and regexes stay strings."""
    if targets is None or not isinstance(targets, str):
        return None if targets is None else list(targets)
    if targets in TARGET_KEYWORDS or any(c in targets for c in "^$()[]*+?\\|"):
        return targets
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise ValueError(f"targets must name at least one module, got {targets!r}")
    return names


def method_options(method: str, **given: Any) -> dict[str, Any]:
    """The explicit options ``fa.patch(model, method, preset=..., **options)`` gets: the non-``None``
    values in ``given`` (command-line flags). An option the method does not take is an error."""
    impl = get_method(method)
    options = {}
    for key, value in given.items():
        if value is None:
            continue
        if key not in impl.options:
            raise ValueError(f"option {key!r} does not apply to method {impl.name!r}; it takes {impl.options}")
        options[key] = parse_targets(value) if key == "targets" else value
    return options


@dataclass
class TrainConfig:
    """Every setting of a training run (written to ``training_config.json``)."""

    model: str
    data: str
    output: str
    method: str = "lora"
    options: dict[str, Any] = field(default_factory=dict)
    preset: str | None = DEFAULT_PRESET
    epochs: float = 3.0
    max_steps: int = -1
    batch_size: int = 16
    micro_batch_size: int = 4
    lr: float | None = None
    warmup_steps: int | None = None  # None: DEFAULT_WARMUP_STEPS, at most WARMUP_FRACTION of the run
    cutoff_len: int = 256
    val_size: int = 0
    train_on_inputs: bool = False
    gradient_checkpointing: bool = False
    bf16: bool | None = None
    seed: int = 42
    limit: int | None = None
    save_steps: int = 200
    eval_steps: int = 200
    save_total_limit: int | None = 2
    progress: bool = True
    quantize: str | None = None  # QLoRA: "nf4" | "fp4" | "int8" base (fa.load_model(quantize=...))

    def __post_init__(self) -> None:
        method = get_method(self.method)
        self.method = method.name
        if self.preset is not None:
            method.preset(self.preset)  # an unknown preset is an error now, not after loading
        for name in ("batch_size", "micro_batch_size", "cutoff_len", "save_steps", "eval_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        world = launch_world_size()
        if self.batch_size % (self.micro_batch_size * world):
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size}) "
                f"x processes ({world}): each optimizer step accumulates "
                "batch_size / (micro_batch_size x processes) micro-batches per process"
            )
        if not (isinstance(self.max_steps, int) and (self.max_steps > 0 or self.max_steps == -1)):
            raise ValueError(f"max_steps must be a positive int or -1 (use epochs), got {self.max_steps!r}")
        if self.max_steps == -1 and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs must be positive, got {self.epochs!r}")
        if self.lr is None:
            self.lr = default_lr(self.method)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        for name in ("warmup_steps", "val_size"):
            v = getattr(self, name)
            if v is None and name == "warmup_steps":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.bf16 and not torch.cuda.is_available():
            raise ValueError("bf16 needs a CUDA GPU (bf16 autocast on CPU is slower than fp32 here); drop it")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {list(QUANTIZE)} or None, got {self.quantize!r}")
        lim = self.limit
        if lim is not None and (isinstance(lim, bool) or not isinstance(lim, int) or lim <= 0):
            raise ValueError(f"limit must be a positive int or None, got {self.limit!r}")

    @property
    def grad_accum(self) -> int:
        # --batch-size is the global batch: under torchrun each process takes its share.
        return self.batch_size // (self.micro_batch_size * launch_world_size())

    def total_steps(self, n_examples: int) -> int:
        """Optimizer steps of the run over ``n_examples`` (what the Trainer will count)."""
        if self.max_steps > 0:
            return self.max_steps
        micro_batches = math.ceil(n_examples / (self.micro_batch_size * launch_world_size()))
        return max(1, math.ceil(math.ceil(micro_batches / self.grad_accum) * self.epochs))

    def resolved_warmup_steps(self, total_steps: int) -> int:
        """``warmup_steps`` when given, else :data:`DEFAULT_WARMUP_STEPS` capped at
        :data:`WARMUP_FRACTION` of ``total_steps`` (at least 1)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return max(1, min(DEFAULT_WARMUP_STEPS, math.ceil(WARMUP_FRACTION * total_steps)))


@dataclass
class TrainResult:
    model: Any
    tokenizer: Any
    output: Path
    losses: list[float]
    steps: int
    seconds: float
    n_train: int
    n_val: int

    def loss_means(self) -> dict[str, Any]:
        """See :func:`loss_means`."""
        return loss_means(self.losses)


def loss_means(losses: Sequence[float]) -> dict[str, Any]:
    """``{"first", "last", "steps_each"}``: the mean training loss over the first and the last tenth
    of the logged steps (at least one step each). One step's loss is one batch's: it scatters by
    ±20% from batch to batch on small runs, so a single first/last step says little."""
    if not losses:
        return {"first": None, "last": None, "steps_each": 0}
    k = max(1, len(losses) // 10)
    return {"first": sum(losses[:k]) / k, "last": sum(losses[-k:]) / k, "steps_each": k}


# -- data --------------------------------------------------------------------------------------


def build_features(tokenizer, records: list[dict[str, Any]], *, cutoff_len: int, train_on_inputs: bool,
                   progress_on: bool = False) -> list[dict[str, list[int]]]:
    """Tokenized examples, without those whose labels are all ``-100`` (prompt filled ``cutoff_len``)."""
    features = []
    dropped = 0
    bar = progress(len(records), desc="tokenize", unit="examples", enabled=progress_on and stderr_is_terminal())
    for rec in records:
        f = tokenize_example(tokenizer, rec, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs)
        if any(label != IGNORE_INDEX for label in f["labels"]):
            features.append(f)
        else:
            dropped += 1
        bar.update(1)
    bar.close()
    if dropped:
        logger.warning("dropped %d of %d examples whose prompt alone fills cutoff_len=%d (no label left)",
                       dropped, len(records), cutoff_len)
    if not features:
        raise ValueError(f"no training example has a label left after truncation at cutoff_len={cutoff_len}")
    return features


def split_val(features: list, val_size: int, seed: int) -> tuple[list, list]:
    """A seeded random holdout of ``val_size`` examples (the rest keep their order)."""
    if val_size == 0:
        return features, []
    if val_size >= len(features):
        raise ValueError(f"val_size ({val_size}) must be smaller than the number of examples ({len(features)})")
    held = set(random.Random(seed).sample(range(len(features)), val_size))
    return [f for i, f in enumerate(features) if i not in held], [f for i, f in enumerate(features) if i in held]


# -- callbacks ---------------------------------------------------------------------------------


def _callbacks(log_path: Path, *, step_lines: bool):
    """The Trainer callback that appends ``train_log.jsonl`` rows and keeps the losses in memory;
    with ``step_lines`` (no terminal: the Trainer's bar is off) it also logs progress lines."""
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.lines: LineProgress | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            if step_lines and state.is_world_process_zero:
                self.lines = LineProgress(state.max_steps, "train", "steps", initial=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            row: dict[str, Any] = {"step": state.global_step}
            if "loss" in logs:
                row.update(loss=float(logs["loss"]), learning_rate=logs.get("learning_rate"),
                           epoch=round(float(state.epoch or 0), 4))
                self.losses.append(float(logs["loss"]))
                if self.lines is not None:
                    self.lines.update(state.global_step - self.lines.done, note=f"loss {row['loss']:.4f}")
            elif "eval_loss" in logs:
                row.update(eval_loss=float(logs["eval_loss"]))
                if self.lines is not None:
                    progress_logger.info("step %d: eval loss %.4f", state.global_step, row["eval_loss"])
            else:
                return
            with log_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    return LossLog()


def _checkpointing_args(enabled: bool) -> dict[str, Any]:
    """Gradient checkpointing options under the name this transformers version uses (5.2x renamed
    ``gradient_checkpointing`` to ``activation_checkpointing``)."""
    if not enabled:
        return {}
    import inspect

    from transformers import TrainingArguments

    params = inspect.signature(TrainingArguments).parameters
    name = "activation_checkpointing" if "activation_checkpointing" in params else "gradient_checkpointing"
    out: dict[str, Any] = {name: True}
    if f"{name}_kwargs" in params:
        out[f"{name}_kwargs"] = {"use_reentrant": False}
    return out


def last_checkpoint(output: str | os.PathLike) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(output) / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = get_last_checkpoint(str(folder))
    return Path(found) if found else None


def _truncate_log(log_path: Path, step: int) -> None:
    if not log_path.is_file():
        return
    keep = [ln for ln in log_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    log_path.write_text("".join(ln + "\n" for ln in keep))


# -- training ----------------------------------------------------------------------------------


def check_run_folder(output: str | os.PathLike, *, resume: bool | str = False, overwrite: bool = False) -> Path | None:
    """The checkpoint to resume from (None: start afresh), or an error when ``output`` already holds
    a run and neither ``resume`` nor ``overwrite`` is given, or ``resume`` finds no checkpoint."""
    out = Path(output)
    if resume:
        ckpt = Path(resume) if isinstance(resume, (str, os.PathLike)) else last_checkpoint(out)
        if ckpt is None or not ckpt.is_dir():
            raise FileNotFoundError(f"--resume: no checkpoint found in {str(out / CHECKPOINT_DIR)!r}")
        return ckpt
    # rank 0 alone checks: it writes the config below, which another rank could then see
    if launch_rank() == 0 and (out / CONFIG_NAME).exists() and not overwrite:
        raise FileExistsError(
            f"output {str(out)!r} already holds a training run; pass --resume to continue it or "
            "--overwrite to start over"
        )
    return None



def train(config: TrainConfig, *, resume: bool | str = False, overwrite: bool = False,
          loaded: tuple[Any, Any] | None = None) -> TrainResult:
    """Run one training job as described in the module docstring and return the trained model.

    Args:
        config: the settings (see :class:`TrainConfig`; ``config.options`` go to ``fa.patch``).
        resume: ``True`` continues from the last checkpoint in ``<output>/checkpoints``; a path
            names the checkpoint.
        overwrite: allow an output folder that already holds a training run (without ``resume``).
        loaded: an already loaded ``(model, tokenizer)`` for ``config.model`` (unpatched).
    """
    from transformers import Trainer, TrainingArguments, set_seed

    import fastadapt as fa

    t0 = time.time()
    out = Path(config.output)
    log_path = out / LOG_NAME
    ckpt = check_run_folder(out, resume=resume, overwrite=overwrite)
    records = load_train_records(config.data, limit=config.limit)  # bad data fails before the model loads
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported() if config.bf16 is None else config.bf16

    set_seed(config.seed)
    if loaded is None:
        model, tokenizer = load_model(config.model, dtype=torch.bfloat16 if bf16 else None, quantize=config.quantize,
                                      device="cuda" if cuda and config.quantize else None)
    else:
        model, tokenizer = loaded
    if tokenizer is None:
        raise ValueError(f"model {config.model!r} has no tokenizer; training needs one to build prompts")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    fa.patch(model, config.method, preset=config.preset, **config.options)
    s = fa.summary(model)
    logger.info("%s: trainable %s of %s parameters (%.4f%%)", config.method, f"{s.trainable:,}", f"{s.total:,}",
                s.trainable_percent)

    features = build_features(tokenizer, records, cutoff_len=config.cutoff_len,
                              train_on_inputs=config.train_on_inputs, progress_on=config.progress)
    train_set, val_set = split_val(features, config.val_size, config.seed)
    warmup_steps = config.resolved_warmup_steps(config.total_steps(len(train_set)))

    out.mkdir(parents=True, exist_ok=True)
    resolved = asdict(config) | {"adapter": model.fastadapt_state.config.to_dict(), "bf16": bf16,
                                 "warmup_steps": warmup_steps, "grad_accum": config.grad_accum,
                                 "n_train": len(train_set), "n_val": len(val_set),
                                 "trainable_params": s.trainable, "total_params": s.total}
    if launch_rank() == 0:
        (out / CONFIG_NAME).write_text(json.dumps(resolved, indent=2, default=str) + "\n")
    if ckpt is not None:  # the Trainer loads the adapter from the checkpoint's model.safetensors
        step = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
        if launch_rank() == 0:
            _truncate_log(log_path, step)
        logger.info("resuming from %s (step %d)", ckpt, step)
    elif launch_rank() == 0:
        log_path.unlink(missing_ok=True)

    args = TrainingArguments(
        output_dir=str(out / CHECKPOINT_DIR),
        per_device_train_batch_size=config.micro_batch_size,
        per_device_eval_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.lr,
        warmup_steps=warmup_steps,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if val_set else "no",
        eval_steps=config.eval_steps if val_set else None,
        bf16=bf16,
        use_cpu=not cuda,
        seed=config.seed,
        data_seed=config.seed,
        **_checkpointing_args(config.gradient_checkpointing),
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every adapter parameter takes part in every step
        remove_unused_columns=False,
        report_to=[],
        disable_tqdm=not (config.progress and stderr_is_terminal()),  # else LossLog logs progress lines
    )
    step_lines = config.progress and not stderr_is_terminal()
    loss_log = _callbacks(log_path, step_lines=step_lines)
    trainer = Trainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=val_set or None,
        data_collator=make_collator(tokenizer), callbacks=[loss_log],
    )
    if step_lines:  # LossLog's lines replace the raw log dicts the Trainer prints without its bar
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt is not None else None)

    model.eval()
    model.config.use_cache = True
    fa.save_adapter(model, out)
    losses = [json.loads(ln)["loss"] for ln in log_path.read_text().splitlines() if '"loss"' in ln]
    result = TrainResult(model=model, tokenizer=tokenizer, output=out, losses=losses,
                         steps=trainer.state.global_step, seconds=time.time() - t0, n_train=len(train_set),
                         n_val=len(val_set))
    logger.info("trained %d steps in %.0f s; adapter written to %s", result.steps, result.seconds, out)
    return result
