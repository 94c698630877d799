"""Every way a user can change a patched model's parameters, and the model variants they run on: the
fixture of the freshness matrix (``test_update_paths.py``). A value derived from parameters (a cast,
DoRA's row norms, anything a later change caches) must never be read stale after any of these.

To add an update path (named adapters, hot-swap, 4-bit reloads, ...): write a function
``path(model, variant, ctx) -> model`` that changes the model's parameters the way a user would —
after a training forward and backward, whose gradients it may use — decorate it with
``@update_path("name")``, and the matrix runs it on every variant in both orders. The model it
returns is compared with :func:`fresh_copy` of itself: the same tensors in a model whose caches were
never filled. To add a variant: append to ``VARIANTS``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from helpers import enable_activation_checkpointing, randomize_adapters
from tiny_models import tiny_model, tokens

import fastadapt as fa

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = tokens(2, 9, seed=4)


@dataclass(frozen=True)
class Variant:
    name: str
    method: str  # "lora" | "dora"
    dtype: torch.dtype  # the base model's; adapters are fp32 as fa.patch makes them
    autocast: bool  # forward passes under torch.autocast(bf16), as Trainer(bf16=True) runs them

    def context(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()


VARIANTS = [
    Variant("lora-fp32", "lora", torch.float32, False),
    Variant("lora-bf16", "lora", torch.bfloat16, False),
    Variant("lora-fp32-autocast", "lora", torch.float32, True),
    Variant("dora-fp32", "dora", torch.float32, False),
    Variant("dora-bf16", "dora", torch.bfloat16, False),
]


def build(variant: Variant, *, seed: int = 0) -> torch.nn.Module:
    """A patched tiny LLaMA (dropout 0: forwards are deterministic) with non-zero adapters, so that
    DoRA's norms depend on B."""
    model = tiny_model("llama", dtype=variant.dtype)
    fa.patch(model, variant.method, r=4, alpha=8, dropout=0.0, targets=TARGETS)
    randomize_adapters(model, seed=seed, scale=0.2)
    return model


def fresh_copy(model: torch.nn.Module, variant: Variant) -> torch.nn.Module:
    """The same tensors (values, dtypes) in a newly built model that has never run a forward."""
    fresh = build(variant)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fresh.load_state_dict(state, assign=True)
    for name, buf in model.named_buffers():  # non-persistent ones too (rotary inv_freq: .half() rounds it)
        fresh.get_buffer(name).data = buf.detach().clone()
    return fresh


def eval_logits(model, variant: Variant) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), variant.context():
        return model(IDS).logits.float()


def train_forward(model, variant: Variant) -> torch.Tensor:
    """A training forward and backward (gradients kept on the parameters); returns the logits."""
    model.train()
    with variant.context():
        out = model(IDS, labels=IDS)
    out.loss.backward()
    return out.logits.detach().float()


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@dataclass
class Context:
    tmp: Path  # a scratch folder for paths that write files
    step: int = 0  # which update of this case (a new value each time)

    def new_values(self, p: torch.Tensor) -> torch.Tensor:
        """New values for ``p``: clearly different from the old ones, reproducible."""
        g = torch.Generator().manual_seed(1000 + self.step)
        return (p.detach().float() + 0.3 * torch.randn(p.shape, generator=g)).to(p.dtype)


UpdatePath = Callable[[torch.nn.Module, Variant, Context], torch.nn.Module]
UPDATE_PATHS: dict[str, UpdatePath] = {}


def update_path(name: str) -> Callable[[UpdatePath], UpdatePath]:
    def register(fn: UpdatePath) -> UpdatePath:
        assert name not in UPDATE_PATHS, name
        UPDATE_PATHS[name] = fn
        return fn

    return register


# -- optimizer steps (on the gradients of the training forward) --------------------------------------


def _optimizer_path(name: str, make: Callable[[list], torch.optim.Optimizer]) -> None:
    @update_path(name)
    def step(model, variant, ctx):
        opt = make(trainable(model))
        for _ in range(2):  # the state of the second step differs from the first's
            opt.step()
        opt.zero_grad(set_to_none=True)
        return model


# Fused optimizers (transformers.Trainer's default, adamw_torch_fused) move no version counter.
_optimizer_path("adamw-fused", lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True))
_optimizer_path("adamw-foreach", lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=True))
_optimizer_path("adamw-for-loop", lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=False))
_optimizer_path("sgd-fused", lambda ps: torch.optim.SGD(ps, lr=5.0, fused=True))
_optimizer_path("sgd-foreach", lambda ps: torch.optim.SGD(ps, lr=5.0, foreach=True))
_optimizer_path("sgd-for-loop", lambda ps: torch.optim.SGD(ps, lr=5.0, foreach=False))


# -- direct writes ----------------------------------------------------------------------------------


@update_path("p.data.copy_")
def data_copy(model, variant, ctx):
    for p in trainable(model):  # EMA, weight averaging, a manual load: no version counter moves
        p.data.copy_(ctx.new_values(p))
    return model


@update_path("no_grad-copy_")
def no_grad_copy(model, variant, ctx):
    with torch.no_grad():
        for p in trainable(model):
            p.copy_(ctx.new_values(p))
    return model


@update_path("load_state_dict")
def load_state_dict(model, variant, ctx):
    state = {k: ctx.new_values(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # base weights too: the frozen W changes
    return model


@update_path("fa.load_adapter")
def load_adapter(model, variant, ctx):
    other = build(variant, seed=ctx.step + 50)  # another adapter of the same shape
    folder = ctx.tmp / f"adapter-{ctx.step}"
    fa.save_adapter(other, folder)
    fa.load_adapter(model, folder)  # into the already patched model
    return model


@update_path(".half()-then-.to(dtype)")
def half_and_back(model, variant, ctx):
    model.half()  # every parameter rounded to fp16: new storage, new values, same version counters
    model.to(variant.dtype)
    return model


@update_path("merge-unmerge")
def merge_unmerge(model, variant, ctx):
    fa.merge(model)  # without keep_original: W comes back within a rounding, not bit for bit
    with torch.no_grad(), variant.context():
        model.eval()
        model(IDS)
    fa.unmerge(model)
    return model


@update_path("checkpointed-step")
def checkpointed_step(model, variant, ctx):
    """A training step with gradient checkpointing (the forward recomputed inside backward), its
    gradients compared with an uncheckpointed fresh model's, then a fused AdamW step."""
    for p in trainable(model):
        p.grad = None
    fresh = fresh_copy(model, variant)
    want = train_forward(fresh, variant)
    enable_activation_checkpointing(model, use_reentrant=False)
    got = train_forward(model, variant)
    assert torch.equal(got, want)
    grads = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, grads[name].grad), name
    opt = torch.optim.AdamW(trainable(model), lr=0.05, fused=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model  # still checkpointing: the matrix's next training forward recomputes too
