#!/usr/bin/env python3
"""The offline kernel report: every Triton launch the fused ops make, compiled for sm_90a on a
machine without a GPU, and a performance prediction of each op from what it launches.

    python .ci/check_triton.py --json report.json          # CI subset (~minutes on 2 cores)
    python .ci/check_triton.py --full --json report.json   # the whole sweep, every autotune config

How: each op's forward and backward implementation runs on ``meta`` tensors with Triton's launch
entry points (``JITFunction.run``, ``Autotuner.run``) swapped for recorders and a
``TorchDispatchMode`` counting the torch kernels (cuBLAS GEMMs, sums, casts) between them. Each
recorded Triton launch is bound with Triton's own launch-time binder (arguments equal to 1 become
constants, pointer alignment is read as at a real launch) and compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` (Triton's own ptxas);
``cuobjdump -res-usage`` of the cubin gives registers and the stack frame, where ptxas spills (counted as
spills when the SASS stores to it: STL/LDL). The launches also feed the model in
``bench/perf_model.py`` (bytes moved, FLOPs, launches) for ``predicted_over_frozen``.

Records (``--json``), a list of:
- per compiled launch: ``{"op", "scenario", "kernel", "config", "default", "ok", "registers",
  "spill_bytes", "shared_bytes"}`` — ``default``: on the path the op takes by default (the
  ``addmm`` variant; the other variants are measured alternatives);
- per op, scenario and variant: ``{"op", "scenario", "variant", "default", "temp_bytes",
  "launches_fwd", "launches_bwd", "bytes_moved", "predicted_over_frozen", ...}``; for the series
  adapter (``bottleneck_adapter``) instead of ``predicted_over_frozen``: ``plan``, ``programs``,
  ``eager_us``, ``eager_bytes_moved``, ``predicted_speedup_over_eager`` (eager LLM-Adapters time ÷
  fused time, same model), ``predicted_speedup_at_80pct_mma``, ``mma_efficiency_for_target``,
  ``fwd_bytes_moved`` / ``memory_floor_bytes``, ``weight_l2_reads_fwd/bwd`` and the CUDA backend's
  ``cuda_us`` / ``cuda_speedup_over_eager`` (from its hand-written launch list).

Exit status 1 on any compile failure, any spill on the default path, a compile over sm_90's shared
memory, a temporary over 64 MiB (DoRA: any weight-sized temporary — its activation-sized dZ / x_d are
inherent), a decode forward over 3 launches, a forward that saves more than 1 bit per element of x
besides S (DoRA: and z), or a bf16 series adapter at M ≥ 8192 predicted under 2.5× eager (H100 model).

DoRA (``dora_linear``): its row norms (one pass over W) are recorded apart and added to the training
forward (recomputed once per optimizer step), not to the decode forward (cached); the records add
PEFT's DoRA on the same shapes (``peft_dora_default`` / ``peft_dora_bf16``) and our LoRA's default
variant at the scenario (``over_lora``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, GPU block sizes: before triton is imported

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import perf_model  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TEMP_CAP = 64 << 20
DECODE_MAX_LAUNCHES = 3
#: Series adapter, fwd + bwd at training sizes (M ≥ 8192, bf16): predicted speedup over eager
#: LLM-Adapters on the H100 model (issue 18; on the H200 model the fused kernels turn MMA-bound, eager
#: does not; fp32 takes the split plan).
BOTTLENECK_TARGET = 2.5
#: Shared memory one block may use on sm_90 (227 KiB): a compile above it would not launch.
SMEM_LIMIT = 232448
VARIANTS = ("addmm", "epilogue", "fused")
DEFAULT_VARIANT = "addmm"

# ------------------------------------------------------------------------------------------------
# recording launches on meta tensors
# ------------------------------------------------------------------------------------------------


@dataclass
class TritonLaunch:
    fn: JITFunction
    args: tuple
    kwargs: dict
    configs: list | None = None  # an autotuned launch: every config it may take
    grid: tuple | None = None  # a fixed grid (None: computed per autotune config)

    @property
    def programs(self) -> int | None:
        if self.grid is None:
            return None
        n = 1
        for g in self.grid:
            n *= int(g)
        return n

    @property
    def name(self) -> str:
        return self.fn.fn.__name__


@dataclass
class TorchLaunch:
    name: str
    inputs: list
    outputs: list
    flops: float = 0.0


@dataclass
class Recording:
    launches: list = field(default_factory=list)  # TritonLaunch | TorchLaunch, in order
    allocations: list = field(default_factory=list)  # every new (non-view) meta tensor


_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh", "alias", "view",
    "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "as_strided", "unsqueeze",
    "squeeze", "split", "split_with_sizes", "unbind", "reshape", "_local_scalar_dense", "resize_", "set_",
}
_GEMMS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "linear"}
#: In-place ops that only write their output (a random fill, a memset): one pass, not two.
_WRITE_ONLY = {"zero_", "fill_", "zeros", "zeros_like", "bernoulli_", "normal_", "uniform_", "random_"}


def _op_name(func) -> str:
    return func._schema.name.split("::")[-1]


def _tensors(obj) -> list:
    out = []
    for x in (obj if isinstance(obj, (list, tuple)) else [obj]):
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            out += _tensors(x)
    return out


class _Recorder(TorchDispatchMode):
    def __init__(self, rec: Recording) -> None:
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = _op_name(func)
        ins = _tensors(list(args) + list((kwargs or {}).values()))
        outs = _tensors(out)
        meta = [t for t in ins + outs if t.device.type == "meta"]
        if not meta:
            return out  # a CPU op (the Philox seed): no device kernel
        if not func.is_view and name not in ("detach", "lift_fresh", "alias"):
            for t in outs:
                if not any(t is i for i in ins):
                    self.rec.allocations.append(t)
        if name in _NO_KERNEL or func.is_view or (name == "_to_copy" and all(i.dtype == outs[0].dtype for i in ins)):
            return out
        flops = 0.0
        if name in _GEMMS:
            a, b = [t for t in ins if t.dim() >= 2][-2:]
            flops = 2.0 * outs[0].numel() * a.shape[-1]
        self.rec.launches.append(TorchLaunch(name, ins, outs, flops))
        return out


@contextlib.contextmanager
def recording():
    rec = Recording()
    real_run, real_tuned = JITFunction.run, Autotuner.run

    def jit_run(self, *args, grid, warmup, **kwargs):
        fixed = tuple(grid) if isinstance(grid, tuple) else None  # a callable grid depends on the config
        rec.launches.append(TritonLaunch(self, args, dict(kwargs), grid=fixed))

    def tuned_run(self, *args, **kwargs):
        fn = self.fn
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        rec.launches.append(TritonLaunch(fn, args, kwargs, configs=list(self.configs)))

    JITFunction.run, Autotuner.run = jit_run, tuned_run
    try:
        with _Recorder(rec):
            yield rec
    finally:
        JITFunction.run, Autotuner.run = real_run, real_tuned


# ------------------------------------------------------------------------------------------------
# from a recording to the model
# ------------------------------------------------------------------------------------------------


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bound(launch: TritonLaunch) -> dict:
    names = launch.fn.arg_names
    bound = dict(zip(names, launch.args))
    bound.update({k: v for k, v in launch.kwargs.items() if k in names})
    return bound


def _triton_flops(name: str, b: dict) -> float:
    M, N, K, R = (b.get(k, 0) for k in ("M", "N", "K", "R"))
    return {
        "_lora_shrink_kernel": 2.0 * M * K * R,
        "_lora_rank_kernel": 2.0 * M * N * R,
        "_lora_gemm_kernel": 2.0 * M * N * (K + R),
        "_lora_dy_pass_kernel": 4.0 * M * N * R,
        "_dora_norm_kernel": 2.0 * N * K * R,
        "_lora_ds_kernel": 2.0 * M * N * R,
        "_weight_grad_kernel": 2.0 * M * (b.get("I1", 0) * b.get("J1", 0)
                                          + (b.get("I2", 0) * b.get("J2", 0) if b.get("PAIR") else 0)),
        "_bottleneck_fwd_kernel": 2.0 * M * R * (K + N),
        "_bottleneck_bwd_kernel": 2.0 * M * R * (N + K),
        "_bottleneck_hidden_kernel": 2.0 * M * K * R,
        "_bottleneck_dh_kernel": 2.0 * M * N * R,
        "_bottleneck_expand_kernel": 2.0 * M * N * R,
        "_lora_gemm_4bit_kernel": 2.0 * M * b.get("N_OUT", 0) * (b.get("RED", 0) + R),
    }.get(name, 0.0)


#: Triton kernels whose time may be MMA-bound: the model runs them at peak × an assumed efficiency
#: (1 in the headline figures; break-even efficiencies are recorded beside them).
TRITON_GEMMS = {"_lora_gemm_kernel", "_lora_gemm_4bit_kernel",
                "_weight_grad_kernel", "_bottleneck_fwd_kernel", "_bottleneck_bwd_kernel",
                "_bottleneck_hidden_kernel", "_bottleneck_dh_kernel", "_bottleneck_expand_kernel"}


def to_plan(rec: Recording) -> perf_model.Plan:
    plan = perf_model.Plan()
    for launch in rec.launches:
        if isinstance(launch, TritonLaunch):
            b = _bound(launch)
            seen, nbytes = set(), 0
            for arg in launch.args:
                if isinstance(arg, torch.Tensor) and id(arg) not in seen:
                    seen.add(id(arg))
                    nbytes += _nbytes(arg)
            if b.get("ACCUMULATE"):  # read-modify-write of the output: it is read as well
                nbytes += _nbytes(b["out_ptr"])
            if launch.name == "_masked_scale_kernel":  # in place: read and written
                nbytes += _nbytes(b["t_ptr"])
            plan.launches.append(perf_model.Launch(launch.name, _triton_flops(launch.name, b), nbytes,
                                                   triton_gemm=launch.name in TRITON_GEMMS,
                                                   programs=launch.programs))
        else:
            nbytes = sum(_nbytes(t) for t in launch.outputs)
            if launch.name not in _WRITE_ONLY:
                nbytes += sum(_nbytes(t) for t in launch.inputs if t.device.type == "meta")
            plan.launches.append(perf_model.Launch(f"aten.{launch.name}", launch.flops, nbytes))
    return plan


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the StorageImpl: shared by a tensor and its views


def temporaries(rec: Recording, results: list[torch.Tensor]) -> int:
    """The largest tensor the call allocated that it does not return (or return a view of)."""
    keep = {_storage(t) for t in results}
    return max((_nbytes(t) for t in rec.allocations if _storage(t) not in keep), default=0)


# ------------------------------------------------------------------------------------------------
# the ops at a scenario
# ------------------------------------------------------------------------------------------------

BF16 = torch.bfloat16


@dataclass(frozen=True)
class Scenario:
    op: str
    M: int
    K: int
    N: int | tuple
    r: int
    p: float
    dtype: torch.dtype = BF16

    @property
    def name(self) -> str:
        n = "x".join(map(str, self.N)) if isinstance(self.N, tuple) else self.N
        rank = "b" if self.op in ("parallel_adapter", "bottleneck_adapter") else "r"
        suffix = "" if self.dtype == BF16 else f"-{str(self.dtype).removeprefix('torch.')}"
        return f"K{self.K}xN{n}-M{self.M}-{rank}{self.r}-p{self.p:g}{suffix}"


def _meta(*shape, dtype=BF16):
    return torch.empty(*shape, device="meta", dtype=dtype)


@contextlib.contextmanager
def _variant(v: str):
    saved = os.environ.get("FASTADAPT_LORA_VARIANT")
    os.environ["FASTADAPT_LORA_VARIANT"] = v
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("FASTADAPT_LORA_VARIANT", None)
        else:
            os.environ["FASTADAPT_LORA_VARIANT"] = saved


def run_op(sc: Scenario, variant: str) -> dict:
    """Record the op's forward and backward: {fwd, bwd: (Recording, results), saved_extra_bytes}."""
    lora = importlib.import_module("fastadapt.ops.lora_linear")
    par = importlib.import_module("fastadapt.ops.parallel_adapter")
    bn = importlib.import_module("fastadapt.ops.bottleneck_adapter")
    M, K, r, p, dt = sc.M, sc.K, sc.r, sc.p, sc.dtype
    out: dict = {}
    with _variant(variant):
        if sc.op == "lora_linear":
            N = sc.N
            x, w, a, b = _meta(M, K, dtype=dt), _meta(N, K, dtype=dt), _meta(r, K, dtype=torch.float32), _meta(
                N, r, dtype=torch.float32)
            with recording() as fwd:
                y, s, bits = lora.lora_linear_fwd._init_fn(x, w, a, b, None, 2.0, p)
            dy = _meta(M, N, dtype=dt)
            with recording() as bwd:
                grads = lora.lora_linear_bwd._init_fn(dy, x, w, a, b, s, bits, 2.0, p, True)
            out.update(fwd=(fwd, [y, s, bits]), bwd=(bwd, list(grads)), saved=[s, bits])
        elif sc.op == "lora_group":
            Ns = sc.N
            x = _meta(M, K, dtype=dt)
            ws = [_meta(n, K, dtype=dt) for n in Ns]
            As = [_meta(r, K, dtype=torch.float32) for _ in Ns]
            Bs = [_meta(n, r, dtype=torch.float32) for n in Ns]
            biases = [x.new_empty(0) for _ in Ns]
            with recording() as fwd:
                ys, s_cat, bits = lora.lora_linear_group_fwd._init_fn(x, ws, As, Bs, biases, 2.0, p)
            dys = [_meta(M, n, dtype=dt) for n in Ns]
            with recording() as bwd:
                dx, das, dbs = lora.lora_linear_group_bwd._init_fn(dys, x, ws, As, Bs, s_cat, bits, 2.0, p, True)
            out.update(fwd=(fwd, [*ys, s_cat, bits]), bwd=(bwd, [dx, *das, *dbs]), saved=[s_cat, bits])
        elif sc.op == "parallel_adapter":
            N = sc.N
            x, w = _meta(M, K, dtype=dt), _meta(N, K, dtype=dt)
            wd, wu = _meta(r, K, dtype=torch.float32), _meta(N, r, dtype=torch.float32)
            s = _meta(1, dtype=torch.float32)
            with recording() as fwd:
                y, h, bits = par.parallel_adapter_fwd._init_fn(x, w, wd, wu, None, s, "tanh", p)
            dy = _meta(M, N, dtype=dt)
            with recording() as bwd:
                grads = par.parallel_adapter_bwd._init_fn(dy, x, w, wd, wu, h, s, bits, "tanh", p, True, False)
            out.update(fwd=(fwd, [y, h, bits]), bwd=(bwd, list(grads)), saved=[h, bits])
        elif sc.op == "dora_linear":
            dora = importlib.import_module("fastadapt.ops.dora_linear")
            N = sc.N
            x, w = _meta(M, K, dtype=dt), _meta(N, K, dtype=dt)
            a, b = _meta(r, K, dtype=torch.float32), _meta(N, r, dtype=torch.float32)
            mag = _meta(N, dtype=torch.float32)
            with recording() as norm_rec:
                norm = dora.dora_norm_triton._init_fn(w, a, b, 2.0)
            with recording() as fwd:
                y, z, s, bits = dora.dora_linear_fwd._init_fn(x, w, a, b, mag, norm, None, 2.0, p, True)
            dy = _meta(M, N, dtype=dt)
            with recording() as bwd:
                grads = dora.dora_linear_bwd._init_fn(dy, x, w, a, b, mag, norm, s, bits, z, 2.0, p, True, False)
            out.update(fwd=(fwd, [y, z, s, bits]), bwd=(bwd, list(grads)), saved=[s, bits], saved_more=[z],
                       norm=(norm_rec, [norm]))
        elif sc.op == "bottleneck_adapter":
            x = _meta(M, K, dtype=dt)
            wd, wu = _meta(r, K, dtype=torch.float32), _meta(K, r, dtype=torch.float32)  # fp32 master weights
            s = _meta(1, dtype=torch.float32)
            with recording() as fwd:
                o, h, bits, wd_lp, wu_lp = bn.bottleneck_adapter_fwd._init_fn(x, wd, wu, s, None, "tanh", p)
            dy = _meta(M, K, dtype=dt)
            wd_b, wu_b = (wd_lp, wu_lp) if wd_lp.numel() else (wd, wu)  # the copies, or the weights as they are
            with recording() as bwd:
                grads = bn.bottleneck_adapter_bwd._init_fn(dy, x, h, wd_b, wu_b, s, bits, "tanh", p, False, False)
            out.update(fwd=(fwd, [o, h, bits, wd_lp, wu_lp]), bwd=(bwd, list(grads)), saved=[h, bits])
        else:
            raise ValueError(sc.op)
    return out


def frozen_plans(sc: Scenario) -> tuple[perf_model.Plan, perf_model.Plan]:
    """The frozen linear(s) of the scenario: forward y = x Wᵀ and backward dX = dY W (no dW)."""
    Ns = sc.N if isinstance(sc.N, tuple) else (sc.K if sc.op == "bottleneck_adapter" else sc.N,)
    x = _meta(sc.M, sc.K, dtype=sc.dtype)
    with recording() as fwd:
        for n in Ns:
            torch.nn.functional.linear(x, _meta(n, sc.K, dtype=sc.dtype))
    with recording() as bwd:
        for n in Ns:
            _meta(sc.M, n, dtype=sc.dtype) @ _meta(n, sc.K, dtype=sc.dtype)
    return to_plan(fwd), to_plan(bwd)


def peft_plans(sc: Scenario, *, fp32_adapters: bool, dora: bool = False) -> tuple | None:
    """PEFT's LoRA layer (``dora``: with ``use_dora=True``) on the same shapes, as users run it
    (``autocast_adapter_dtype=True``: fp32 adapters, x upcast) or with bf16 adapters: (forward plan,
    backward plan, largest temporary, largest weight-sized temporary) in bytes; None without peft."""
    try:
        import peft
    except ImportError:
        return None
    from torch import nn

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = nn.Linear(sc.K, sc.N, bias=False, device="meta", dtype=sc.dtype)

        def forward(self, x):
            return self.base(x)

    cfg = peft.LoraConfig(r=sc.r, lora_alpha=2 * sc.r, lora_dropout=sc.p, target_modules=["base"], use_dora=dora)
    model = peft.get_peft_model(Frozen(), cfg, autocast_adapter_dtype=fp32_adapters).train()
    x = _meta(sc.M, sc.K, dtype=sc.dtype).requires_grad_()
    params = [p for p in model.parameters() if p.requires_grad]
    with recording() as fwd:
        y = model(x)
    dy = torch.empty_like(y)
    with recording() as bwd:
        grads = torch.autograd.grad(y, [x, *params], dy)
    temp = max(temporaries(fwd, [y]), temporaries(bwd, list(grads)))
    weight_temp = max(weight_sized_temporaries(fwd, [y], sc), weight_sized_temporaries(bwd, list(grads), sc))
    return to_plan(fwd), to_plan(bwd), temp, weight_temp


def llm_adapters_series(x, w_down, w_up, *, scaling: float, dropout_p: float):
    """LLM-Adapters' series adapter as eager PyTorch runs it on a GPU (peft/tuners/bottleneck.py:
    ``adapter_up(act_fn(adapter_down(adapter_dropout(x)))) * adapter_scaling``, then the residual
    add), with the adapter weights in x's dtype — cheaper than LLM-Adapters' own fp32 adapters
    (which upcast x), so the comparison is conservative. Dropout is written as what ``F.dropout``
    dispatches to on a CUDA tensor, the fused ``native_dropout`` (one pass writing the output and
    a bool mask; backward ``native_dropout_backward``): on ``meta`` tensors ``F.dropout`` would
    decompose into bernoulli_ + div_ + mul instead, three passes that a GPU never runs."""
    z = torch.native_dropout(x, dropout_p, True)[0] if dropout_p > 0 else x
    a = torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(z, w_down)), w_up)
    return x + a * scaling


def eager_bottleneck_plans(sc: Scenario) -> tuple[perf_model.Plan, perf_model.Plan]:
    """The eager LLM-Adapters-style series adapter (``llm_adapters_series``, scaling 1.0 as in
    its default) on the same shapes, forward and backward (x and both weights get gradients)."""
    x = _meta(sc.M, sc.K, dtype=sc.dtype).requires_grad_()
    wd = _meta(sc.r, sc.K, dtype=sc.dtype).requires_grad_()
    wu = _meta(sc.K, sc.r, dtype=sc.dtype).requires_grad_()
    with recording() as fwd:
        y = llm_adapters_series(x, wd, wu, scaling=1.0, dropout_p=sc.p)
    with recording() as bwd:
        torch.autograd.grad(y, (x, wd, wu), torch.empty_like(y))
    return to_plan(fwd), to_plan(bwd)


def cuda_bottleneck_plans(sc: Scenario) -> tuple[perf_model.Plan, perf_model.Plan]:
    """The CUDA backend's launches (csrc/bottleneck_adapter) at a scenario, written out by hand from
    its host code — it cannot run on meta tensors, so keep this in step with it: fp32 master weights
    cast with ``Tensor.to`` in the forward (the copies go to the backward), tile_gemm_kernel for each
    product (64-row tiles: 64 wide over b, 128 over d), weight_grad_kernel (split over M, workspace
    summed by torch, only while its tiles are under a wave), and the sum of the dscaling partials.
    Its GEMMs are ``triton_gemm`` launches in the model's sense: their MMA rate is an assumption
    (legacy WMMA/mma.sync, not wgmma)."""
    M, d, b, e = sc.M, sc.K, sc.r, sc.dtype.itemsize
    act, w = M * d * e, b * d * e  # an activation (M × d) and a weight (b × d), in bytes
    cast = perf_model.Launch("aten._to_copy", 0.0, w * 3)  # fp32 read, 16-bit write

    def tiles(n: int, bn: int) -> int:
        return -(-M // 64) * -(-n // bn)

    def tile(name: str, nbytes: float, n: int, bn: int) -> perf_model.Launch:
        return perf_model.Launch(name, 2.0 * M * b * d, nbytes, triton_gemm=True, programs=tiles(n, bn))

    hidden = M * b * e
    fwd = perf_model.Plan([cast, cast, tile("tile_gemm hidden", act + w + hidden, b, 64),
                           tile("tile_gemm out", hidden + w + 2 * act, d, 128)])
    bwd = [tile("tile_gemm dh", act + w + 2 * hidden, b, 64),
           tile("tile_gemm dx", hidden + w + 2 * act, d, 128)]
    for na, nb in ((d, b), (b, d)):  # dw_up = s·doutᵀ act(hidden), dw_down = dhᵀ x
        n_tiles = -(-nb // 128) * -(-na // 64)
        splits = 1 if n_tiles * 16 >= 15 * 132 else max(1, min(-(-2 * 132 // n_tiles), -(-M // 256)))
        work = splits * na * nb * 4
        bwd.append(perf_model.Launch("weight_grad_kernel", 2.0 * M * na * nb, act + hidden + work, triton_gemm=True,
                                     programs=n_tiles * splits))
        if splits > 1:
            bwd.append(perf_model.Launch("aten.sum", 0.0, work + na * nb * 4))
    bwd.append(perf_model.Launch("aten.sum", 0.0, 4 * tiles(b, 64) + 4))  # the dscaling partials
    return fwd, perf_model.Plan(bwd)


def _weight_reads(launch: TritonLaunch) -> int:
    """Bytes of adapter weights one bottleneck row-kernel launch reads from L2 (each program reads
    its slice of the weights once; HBM sees them once per launch)."""
    b = _bound(launch)
    per_program = {
        "_bottleneck_fwd_kernel": lambda: _nbytes(b["wd_ptr"]) + _nbytes(b["wu_ptr"]),
        "_bottleneck_bwd_kernel": lambda: _nbytes(b["wd_ptr"]) + _nbytes(b["wu_ptr"]),
        "_bottleneck_hidden_kernel": lambda: b["BLOCK_R"] * b["K"] * b["wd_ptr"].element_size(),
        "_bottleneck_dh_kernel": lambda: b["BLOCK_R"] * b["N"] * b["wu_ptr"].element_size(),
        "_bottleneck_expand_kernel": lambda: b["R"] * b["BLOCK_N"] * b["w_ptr"].element_size(),
    }.get(launch.name)
    return per_program() * (launch.programs or 1) if per_program else 0


def bottleneck_fields(sc: Scenario, fwd: perf_model.Plan, bwd: perf_model.Plan, fwd_rec: Recording,
                      bwd_rec: Recording, device: perf_model.Device) -> dict:
    """The series adapter's record: the plan, bytes against the eager baseline and the memory
    floor, the weights' L2 traffic, and the predicted speedup (eager time ÷ fused time)."""
    kernels = importlib.import_module("fastadapt.kernels.bottleneck_adapter")
    eager_fwd, eager_bwd = eager_bottleneck_plans(sc)
    eager = eager_fwd.seconds(device) + eager_bwd.seconds(device)
    fused = fwd.seconds(device) + bwd.seconds(device)
    floor = 2 * sc.M * sc.K * sc.dtype.itemsize  # the forward must read h and write out, once each
    weights = sc.r * (sc.K + sc.K) * sc.dtype.itemsize
    l2 = [sum(_weight_reads(x) for x in r.launches if isinstance(x, TritonLaunch)) for r in (fwd_rec, bwd_rec)]

    def speedup(eff: float) -> float:
        return eager / sum(plan.seconds(device, triton_gemm_efficiency=eff) for plan in (fwd, bwd))

    lo, hi = 0.2, 1.0  # the Triton MMA efficiency at which the speedup falls to the target (bisection)
    if speedup(hi) < BOTTLENECK_TARGET:
        needs = None
    else:
        for _ in range(30):
            lo, hi = (lo, (lo + hi) / 2) if speedup((lo + hi) / 2) >= BOTTLENECK_TARGET else ((lo + hi) / 2, hi)
        needs = round(hi, 3)
    cuda_fwd, cuda_bwd = cuda_bottleneck_plans(sc)

    def cuda_speedup(eff: float) -> float:
        return eager / sum(plan.seconds(device, triton_gemm_efficiency=eff) for plan in (cuda_fwd, cuda_bwd))

    return {
        "plan": kernels.plan(sc.M, sc.r, sc.dtype),
        "programs": {x.name: x.programs for r in (fwd_rec, bwd_rec) for x in r.launches
                     if isinstance(x, TritonLaunch)},
        "eager_us": round(eager * 1e6, 1), "eager_bytes_moved": eager_fwd.bytes + eager_bwd.bytes,
        "eager_launches": len(eager_fwd) + len(eager_bwd),
        "predicted_speedup_over_eager": round(eager / fused, 3),
        "predicted_speedup_at_80pct_mma": round(speedup(0.8), 3),
        "mma_efficiency_for_target": needs,  # None: the target is missed even at peak
        "predicted_fwd_speedup_over_eager": round(eager_fwd.seconds(device) / fwd.seconds(device), 3),
        "fwd_bytes_moved": fwd.bytes, "memory_floor_bytes": floor,
        "fwd_bytes_over_floor": round(fwd.bytes / floor, 3),
        "weight_l2_reads_fwd": round(l2[0] / weights, 1), "weight_l2_reads_bwd": round(l2[1] / weights, 1),
        # the CUDA backend (no dropout: it serves p = 0 only), from its hand-written launch list
        "cuda_us": round(sum(plan.seconds(device) for plan in (cuda_fwd, cuda_bwd)) * 1e6, 1),
        "cuda_launches": len(cuda_fwd) + len(cuda_bwd), "cuda_bytes_moved": cuda_fwd.bytes + cuda_bwd.bytes,
        "cuda_speedup_over_eager": round(cuda_speedup(1.0), 3),
        "cuda_speedup_at_60pct_mma": round(cuda_speedup(0.6), 3),
    }


# ------------------------------------------------------------------------------------------------
# compiling for sm_90a
# ------------------------------------------------------------------------------------------------

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_specs(launch: TritonLaunch, all_configs: bool) -> list[dict]:
    """Picklable compile jobs for one recorded launch (one per autotune config, or the first)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    configs = launch.configs if launch.configs is not None else [None]
    if not all_configs:
        configs = configs[:1]
    specs = []
    for cfg in configs:
        kwargs = dict(launch.kwargs)
        if cfg is not None:
            kwargs.update(cfg.all_kwargs())
        bound_args, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = launch.fn._pack_args(backend, kwargs, bound_args, specialization,
                                                                     options)
        meta = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
        scalar = (int, float, str, bool, type(None))
        scalar_options = {k: v for k, v in options.__dict__.items() if isinstance(v, scalar)}
        specs.append({
            "module": launch.fn.fn.__module__, "kernel": launch.name, "signature": signature,
            "constexprs": [[list(k), v] for k, v in constexprs.items()],
            "attrs": [[list(k), v] for k, v in attrs.items()],
            "options": scalar_options,
            "config": ", ".join(f"{k}={v}" for k, v in sorted(meta.items()) if not isinstance(v, torch.dtype)),
        })
    return specs


def _spec_key(spec: dict) -> str:
    return json.dumps([spec["kernel"], spec["signature"], spec["constexprs"], spec["attrs"], spec["options"]],
                      sort_keys=True, default=str)


def compile_one(spec: dict, sass_dir: Path | None = None) -> dict:
    """Compile one spec for sm_90a (in a worker process); registers and spills (the stack frame the
    SASS stores to) of the cubin from ``cuobjdump``, shared memory from the compiled metadata."""
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    started = time.time()
    try:
        fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        constexprs = {tuple(k): v for k, v in spec["constexprs"]}
        attrs = {tuple(k): v for k, v in spec["attrs"]}
        src = ASTSource(fn, spec["signature"], constexprs, attrs)
        kernel = compile(src, target=GPUTarget("cuda", 90, 32), options=spec["options"])
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(kernel.asm["cubin"])
            usage = subprocess.run([str(CUOBJDUMP), "-res-usage", str(cubin)], capture_output=True, text=True,
                                   check=True).stdout
            sass = subprocess.run([str(CUOBJDUMP), "-sass", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout
        if sass_dir is not None:
            (sass_dir / f"{spec['kernel']}-{hashlib.sha1(_spec_key(spec).encode()).hexdigest()[:10]}.sass").write_text(
                f"// {spec['config']}\n{sass}")
        fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
        # static SASS size: a proxy for per-tile integer work (e.g. Philox) next to the MMAs
        n_sass = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", sass, flags=re.M))
        # ptxas spills into the stack frame (cuobjdump's LOCAL stays 0 for them): a frame that the
        # code stores to and loads from with STL/LDL is spill traffic, counted here as spill bytes
        local_traffic = re.search(r"\b(?:STL|LDL)(?:\.\w+)*\b", sass) is not None
        spill = max(int(fields["LOCAL"]), int(fields["STACK"]) if local_traffic else 0)
        return {"ok": True, "registers": int(fields["REG"]), "spill_bytes": spill,
                "stack_bytes": int(fields["STACK"]), "shared_bytes": int(kernel.metadata.shared),
                "sass_instructions": n_sass,
                "seconds": round(time.time() - started, 1)}
    except Exception as exc:  # a failed compile is a record (and a red exit), not a crash
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[-2000:]}",
                "seconds": round(time.time() - started, 1)}


# ------------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------------

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
#: DoRA's dropout form in the CI subset: only the kernels it adds. Its epilogue and dY pass are the
#: p = 0 ones with one more FMA per element (DORA=2: spill-free, 220 and 255 registers); --full
#: compiles them too. Keeps the CI report within ~10 s of its time without DoRA.
DORA_DROPOUT_CI = {"_lora_shrink_kernel", "_masked_scale_kernel"}
TARGET = Scenario("lora_linear", 8192, 4096, 4096, 16, 0.1)


def scenarios(full: bool) -> list[Scenario]:
    out = []
    ms = (1, 16, 512, 4096, 8192, 16384) if full else (1, 16, 8192)
    for K, N in SHAPES:
        for M in ms:
            for r in ((8, 16, 64) if full else (16,)):
                for p in (0.0, 0.1):
                    out.append(Scenario("lora_linear", M, K, N, r, p))
    for Ns in ((4096, 4096, 4096), (11008, 11008)):
        for M in (16, 8192) if not full else (16, 4096, 8192, 16384):
            out.append(Scenario("lora_group", M, 4096, Ns, 16, 0.1))
    for N in (4096, 11008):
        for M in (16, 8192):
            for p in (0.0, 0.1):
                out.append(Scenario("parallel_adapter", M, 4096, N, 256, p))
    for M in (16, 2048, 8192):
        for p in (0.0, 0.1):
            if full or M > 16 or p == 0:  # decode is inference (no dropout): its mask path in --full only
                out.append(Scenario("bottleneck_adapter", M, 4096, 4096, 256, p))
    for K, N in (SHAPES if full else SHAPES[:1]):
        for M in (16, 4096, 8192) if full else (16, 8192):
            for r in ((8, 16, 64) if full else (16,)):
                for p in (0.0, 0.1):
                    out.append(Scenario("dora_linear", M, K, N, r, p))
    if full:
        out.append(Scenario("lora_linear", 8192, 4096, 4096, 16, 0.1, torch.float32))
        for M in (2048, 8192):  # the fp32 tiles of both plans
            out.append(Scenario("bottleneck_adapter", M, 4096, 4096, 256, 0.1, torch.float32))
    return out


def has_variants(op: str) -> bool:
    return op in ("lora_linear", "lora_group", "parallel_adapter", "dora_linear")


def weight_sized_temporaries(rec: Recording, results: list[torch.Tensor], sc: Scenario) -> int:
    """Bytes of the largest temporary at least as large as the weight whose shape has no token
    dimension (M): what scales with the weight, as PEFT's W + s·B A and its K×K identity do."""
    keep = {_storage(t) for t in results}
    return max((_nbytes(t) for t in rec.allocations if _storage(t) not in keep and t.numel() >= sc.N * sc.K
                and sc.M not in t.shape), default=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the records here")
    ap.add_argument("--full", action="store_true", help="the whole sweep and every autotune config")
    ap.add_argument("--device", choices=sorted(perf_model.DEVICES), default="h100", help="model ceilings")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    ap.add_argument("--no-compile", action="store_true", help="the model only (no sm_90a compiles)")
    ap.add_argument("--sass-dir", type=Path, help="also write each compile's SASS here (to read the inner loop)")
    ap.add_argument("--only", action="append", metavar="OP", help="only this op's scenarios (repeatable)")
    args = ap.parse_args(argv)
    device = perf_model.DEVICES[args.device]
    started = time.time()

    records, problems = [], []
    lora_plans: dict[tuple, tuple[perf_model.Plan, perf_model.Plan]] = {}  # LoRA's default, for DoRA's over_lora
    jobs: dict[str, dict] = {}  # spec key -> spec
    uses: list[tuple[dict, str, bool]] = []  # (context record, spec key, default path)
    sweep = [sc for sc in scenarios(args.full) if not args.only or sc.op in args.only]
    for sc in sweep:
        frozen_fwd, frozen_bwd = frozen_plans(sc)
        plans = {}
        if sc.op in ("lora_linear", "dora_linear") and sc.M >= 512:
            dora_peft = sc.op == "dora_linear"
            for name, fp32 in (("peft_default", True), ("peft_bf16", False)):
                peft = peft_plans(sc, fp32_adapters=fp32, dora=dora_peft)
                name = name.replace("peft", "peft_dora") if dora_peft else name
                if peft is not None:
                    records.append({"op": sc.op, "scenario": sc.name, "variant": name, "default": False,
                                    "device_model": device.name, "M": sc.M, "K": sc.K, "N": sc.N, "r": sc.r,
                                    "dropout": sc.p, "launches_fwd": len(peft[0]), "launches_bwd": len(peft[1]),
                                    "bytes_moved": peft[0].bytes + peft[1].bytes, "temp_bytes": peft[2],
                                    "weight_sized_temp_bytes": peft[3],
                                    "predicted_over_frozen": round(perf_model.over_frozen(
                                        *peft[:2], frozen_fwd, frozen_bwd, device), 4)})
        for variant in VARIANTS if has_variants(sc.op) else (DEFAULT_VARIANT,):
            default = variant == DEFAULT_VARIANT
            run = run_op(sc, variant)
            (fwd_rec, fwd_res), (bwd_rec, bwd_res) = run["fwd"], run["bwd"]
            fwd, bwd = to_plan(fwd_rec), to_plan(bwd_rec)
            norm_plan = None
            if "norm" in run:  # DoRA's row norms: once per training step; cached when decoding
                norm_plan = to_plan(run["norm"][0])
                if sc.M > 16:
                    fwd = perf_model.Plan(norm_plan.launches + fwd.launches)
            plans[variant] = (fwd, bwd)
            temp = max(temporaries(fwd_rec, fwd_res), temporaries(bwd_rec, bwd_res))
            s_saved, bits = run["saved"]
            mask_bits_per_elem = bits.numel() * 32 / (sc.M * sc.K) if bits.numel() else 0.0
            mask_bits_allowed = -(-sc.K // 32) * 32 / sc.K  # 1 bit per element, rows padded to 32
            rec = {
                "op": sc.op, "scenario": sc.name, "variant": variant, "default": default, "device_model": device.name,
                "M": sc.M, "K": sc.K, "N": sc.N, "r": sc.r, "dropout": sc.p, "dtype": str(sc.dtype),
                "temp_bytes": temp, "launches_fwd": len(fwd), "launches_bwd": len(bwd),
                "kernels_fwd": [k.name for k in fwd.launches], "kernels_bwd": [k.name for k in bwd.launches],
                "bytes_moved": fwd.bytes + bwd.bytes, "flops": fwd.flops + bwd.flops,
                "saved_extra_bytes": sum(_nbytes(t) for t in (s_saved, bits, *run.get("saved_more", []))),
                "mask_bits_per_element": mask_bits_per_elem,
                "predicted_us": round((fwd.seconds(device) + bwd.seconds(device)) * 1e6, 1),
            }
            if sc.op == "bottleneck_adapter":
                rec.update(bottleneck_fields(sc, fwd, bwd, fwd_rec, bwd_rec, device))
                if (default and sc.M >= 8192 and sc.dtype == BF16 and device.name == "H100"
                        and rec["predicted_speedup_over_eager"] < BOTTLENECK_TARGET):
                    problems.append(f"{sc.op} {sc.name}: predicted {rec['predicted_speedup_over_eager']}x eager "
                                    f"(target {BOTTLENECK_TARGET}x)")
            else:
                rec["frozen_us"] = round((frozen_fwd.seconds(device) + frozen_bwd.seconds(device)) * 1e6, 1)
                rec["predicted_over_frozen"] = round(
                    perf_model.over_frozen(fwd, bwd, frozen_fwd, frozen_bwd, device), 4)
                rec["predicted_fwd_over_frozen"] = round(fwd.seconds(device) / frozen_fwd.seconds(device), 4)
                if variant == "fused":
                    rec["fused_needs_triton_gemm_efficiency"] = perf_model.break_even_efficiency(
                        (fwd, bwd), plans[DEFAULT_VARIANT], device)
            if norm_plan is not None:
                rec["norm_us"] = round(norm_plan.seconds(device) * 1e6, 1)
                rec["norm_bytes"] = norm_plan.bytes
                rec["weight_sized_temp_bytes"] = max(
                    weight_sized_temporaries(fwd_rec, fwd_res, sc), weight_sized_temporaries(bwd_rec, bwd_res, sc),
                    weight_sized_temporaries(run["norm"][0], run["norm"][1], sc))
                lora_ref = lora_plans.get((sc.M, sc.K, sc.N, sc.r, sc.p))
                if lora_ref is not None:
                    rec["over_lora"] = round((fwd.seconds(device) + bwd.seconds(device))
                                             / (lora_ref[0].seconds(device) + lora_ref[1].seconds(device)), 4)
                for peft_rec in (x for x in records if x["scenario"] == sc.name and x["op"] == sc.op
                                 and x["variant"].startswith("peft_dora")):
                    rec[f"speedup_vs_{peft_rec['variant']}"] = round(
                        peft_rec["predicted_over_frozen"] / rec["predicted_over_frozen"], 3)
            elif sc.op == "lora_linear" and default:
                lora_plans[(sc.M, sc.K, sc.N, sc.r, sc.p)] = (fwd, bwd)
            records.append(rec)
            if norm_plan is not None:
                if default and rec["weight_sized_temp_bytes"]:
                    problems.append(f"{sc.op} {sc.name}: a weight-sized temporary of "
                                    f"{rec['weight_sized_temp_bytes'] / 2**20:.0f} MiB")
            elif default and temp > TEMP_CAP:
                problems.append(f"{sc.op} {sc.name}: a {temp / 2**20:.0f} MiB temporary (cap 64 MiB)")
            decode = sc.op == "lora_linear" or (sc.op == "dora_linear" and sc.p == 0)  # decoding runs no dropout
            if default and decode and sc.M <= 16 and len(fwd) > DECODE_MAX_LAUNCHES:
                problems.append(f"{sc.op} {sc.name}: decode forward takes {len(fwd)} launches (max 3)")
            if default and mask_bits_per_elem > mask_bits_allowed + 1e-12:
                problems.append(f"{sc.op} {sc.name}: the saved mask holds {mask_bits_per_elem:.2f} bits per element")
            compile_here = args.full or default or (sc == TARGET and variant != DEFAULT_VARIANT)
            if args.no_compile or not compile_here:
                continue
            parts = [("fwd", fwd_rec), ("bwd", bwd_rec)] + ([("norm", run["norm"][0])] if "norm" in run else [])
            for part, recd in parts:
                for launch in (x for x in recd.launches if isinstance(x, TritonLaunch)):
                    if not args.full and sc.op == "dora_linear" and sc.p > 0 and launch.name not in DORA_DROPOUT_CI:
                        continue
                    for spec in compile_specs(launch, args.full):
                        key = _spec_key(spec)
                        jobs.setdefault(key, spec)
                        uses.append(({"op": sc.op, "scenario": sc.name, "variant": variant, "pass": part}, key,
                                     default))
    print(f"[check_triton] {len(records)} op records from {len(sweep)} scenarios; "
          f"{len(jobs)} distinct compiles", flush=True)

    results: dict[str, dict] = {}
    if jobs:
        with futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            if args.sass_dir:
                args.sass_dir.mkdir(parents=True, exist_ok=True)
            pending = {pool.submit(compile_one, spec, args.sass_dir): key for key, spec in jobs.items()}
            for n, done in enumerate(futures.as_completed(pending), 1):
                key = pending[done]
                results[key] = done.result()
                spec, res = jobs[key], results[key]
                state = (f"{res['registers']} regs, {res['spill_bytes']} B spill, {res['stack_bytes']} B stack, "
                         f"{res['shared_bytes']} B smem, "
                         f"{res['sass_instructions']} SASS"
                         if res["ok"] else "FAILED")
                print(f"[check_triton] {n}/{len(jobs)} {spec['kernel']} [{spec['config']}]: {state} "
                      f"({res['seconds']} s)", flush=True)
    for ctx, key, default in uses:
        spec, res = jobs[key], results[key]
        records.append({**ctx, "kernel": spec["kernel"], "config": spec["config"], "default": default,
                        "ok": res["ok"], "registers": res.get("registers"), "spill_bytes": res.get("spill_bytes"),
                        "stack_bytes": res.get("stack_bytes"), "shared_bytes": res.get("shared_bytes"),
                        "sass_instructions": res.get("sass_instructions"),
                        **({"error": res["error"]} if not res["ok"] else {})})
        if not res["ok"]:
            problems.append(f"{spec['kernel']} [{spec['config']}] failed to compile: {res['error'][-300:]}")
        elif default and res["spill_bytes"]:
            problems.append(f"{spec['kernel']} [{spec['config']}] spills {res['spill_bytes']} B on the default path")
        elif res["shared_bytes"] > SMEM_LIMIT:
            problems.append(f"{spec['kernel']} [{spec['config']}] needs {res['shared_bytes']} B of shared memory "
                            f"(sm_90 allows {SMEM_LIMIT})")

    if not args.only or "lora_linear_4bit" in args.only:
        qlora_report(records, problems, device, compile_kernels=not args.no_compile, full=args.full)
    if not args.only or "lora_mixed" in args.only:
        mixed_report(records, problems, device, compile_kernels=not args.no_compile)
    _summary(records, device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1, default=str) + "\n")
        print(f"[check_triton] wrote {len(records)} records to {args.json}")
    for p in sorted(set(problems)):
        print(f"[check_triton] PROBLEM: {p}")
    print(f"[check_triton] {'FAIL' if problems else 'ok'} in {time.time() - started:.0f} s")
    return 1 if problems else 0


# ------------------------------------------------------------------------------------------------
# QLoRA: the 4-bit dequantizing GEMM (fastadapt/ops/lora_linear_4bit.py) vs bitsandbytes
# ------------------------------------------------------------------------------------------------

#: The SM clock the issue-rate term uses (H100 SXM boost) and the dequantize kernel's tile, whose
#: SASS per element stands for the per-element dequantization work of the GEMM's inner loop.
SM_CLOCK_HZ = 1.755e9
QLORA_RANKS = 16


def _weight4bit_meta(n: int, k: int):
    w4 = importlib.import_module("fastadapt.ops.lora_linear_4bit")
    blocks = n * k // 64
    return w4.Weight4bit(torch.empty(n * k // 2, device="meta", dtype=torch.uint8),
                         torch.empty(16, device="meta"), torch.empty(blocks, device="meta", dtype=torch.uint8),
                         (n, k), 64, BF16, torch.empty(-(-blocks // 256), device="meta"),
                         torch.empty(256, device="meta"), torch.empty((), device="meta"))


def _qlora_record(M: int, K: int, N: int, variant: str):
    """Record the op's forward and backward on meta tensors with ``variant`` forced."""
    w4 = importlib.import_module("fastadapt.ops.lora_linear_4bit")
    weight = _weight4bit_meta(N, K)
    x, a, b = _meta(M, K), _meta(QLORA_RANKS, K, dtype=torch.float32), _meta(N, QLORA_RANKS, dtype=torch.float32)
    saved = w4.selected_variant
    w4.selected_variant = lambda m, device: variant
    try:
        t = weight.tensors()
        with recording() as fwd:
            _, s, bits = w4.lora_linear_4bit_fwd._init_fn(x, *t, a, b, None, [N, K], 64, 256, 2.0, 0.0)
        with recording() as bwd:
            w4.lora_linear_4bit_bwd._init_fn(_meta(M, N), x, *t, a, b, s, bits, [N, K], 64, 256, 2.0, 0.0, True)
    finally:
        w4.selected_variant = saved
    return fwd, bwd


def _bnb_plan(M: int, K: int, N: int, *, backward: bool) -> perf_model.Plan:
    """bitsandbytes' dequantize-then-matmul (``MatMul4Bit``): its dequantize kernel (reads the packed
    weight and the double-quantized scales, writes a bf16 weight) and cuBLAS on it; the same again
    for dX."""
    dequant = perf_model.Launch("bnb.dequantize_4bit", 0.0, N * K / 2 + N * K / 64 + N * K * 2)
    with recording() as rec:
        if backward:
            _meta(M, N) @ _meta(N, K)
        else:
            torch.nn.functional.linear(_meta(M, K), _meta(N, K))
    return perf_model.Plan([dequant, *to_plan(rec).launches])


def _dequant_issue_s(plan: perf_model.Plan, rec: Recording, n: int, k: int, instr_per_elem: float,
                     device: perf_model.Device) -> None:
    """Add the dequantization's instruction issue time to each fused GEMM launch: every weight element
    is dequantized once per M-block, at ``instr_per_elem`` thread-instructions (from the SASS of
    the dequantize kernel), issued at 4 warp-instructions per clock per SM. The launch takes the
    larger of that, its MMA time and its memory time (overlap assumed: a prediction)."""
    for launch, modelled in zip(rec.launches, plan.launches):
        if not isinstance(launch, TritonLaunch) or launch.name != "_lora_gemm_4bit_kernel":
            continue
        bm = launch.kwargs["BLOCK_M"]
        m = _bound(launch)["M"]
        issue = n * k * -(-m // bm) * instr_per_elem / (device.sms * 4 * 32 * SM_CLOCK_HZ)
        modelled.min_seconds = issue


def qlora_report(records: list, problems: list, device: perf_model.Device, *, compile_kernels: bool,
                 full: bool) -> None:
    """Entries for ``lora_linear_4bit`` at the LLaMA-7B shapes: per variant the launches, bytes and
    predicted time (forward; forward + backward) against bitsandbytes' dequantize-then-matmul and a
    bf16 base; the default path's kernels compiled for sm_90a (spills, registers) — predictions."""
    w4 = importlib.import_module("fastadapt.ops.lora_linear_4bit")
    per_elem = 12.0  # thread-instructions per dequantized element, replaced by the SASS figure below
    compiled: dict[str, dict] = {}
    if compile_kernels:
        rec_d, _ = _qlora_record(8192, 4096, 4096, "dequantize")
        deq = next(x for x in rec_d.launches if isinstance(x, TritonLaunch) and x.name == "_dequantize_4bit_kernel")
        res = compile_one(compile_specs(deq, False)[0])
        if res["ok"]:
            kw = deq.kwargs
            per_elem = res["sass_instructions"] * kw["num_warps"] * 32 / (kw["BLOCK_N"] * kw["BLOCK_K"])
    for K, N in SHAPES:
        for M in ((1, 16, 512, 8192) if full else (1, 16, 8192)):
            default = "fused" if M <= w4.FUSED_MAX_ROWS else "dequantize"
            sc = Scenario("lora_linear", M, K, N, QLORA_RANKS, 0.0)
            bf16_fwd, bf16_bwd = frozen_plans(sc)
            bnb_fwd, bnb_bwd = _bnb_plan(M, K, N, backward=False), _bnb_plan(M, K, N, backward=True)
            for variant in w4.VARIANTS:
                fwd_rec, bwd_rec = _qlora_record(M, K, N, variant)
                fwd, bwd = to_plan(fwd_rec), to_plan(bwd_rec)
                _dequant_issue_s(fwd, fwd_rec, N, K, per_elem, device)
                _dequant_issue_s(bwd, bwd_rec, N, K, per_elem, device)
                t = {name: p.seconds(device) for name, p in
                     (("fwd", fwd), ("bwd", bwd), ("bnb_fwd", bnb_fwd), ("bnb_bwd", bnb_bwd),
                      ("bf16_fwd", bf16_fwd), ("bf16_bwd", bf16_bwd))}
                rec = {"op": "lora_linear_4bit", "scenario": f"K{K}xN{N}-M{M}-r{QLORA_RANKS}-nf4dq", "variant": variant,
                       "default": variant == default, "device_model": device.name, "M": M, "K": K, "N": N,
                       "r": QLORA_RANKS, "dropout": 0.0, "prediction": True,
                       "launches_fwd": len(fwd), "launches_bwd": len(bwd),
                       "kernels_fwd": [x.name for x in fwd.launches], "kernels_bwd": [x.name for x in bwd.launches],
                       "bytes_fwd": fwd.bytes, "bytes_bnb_fwd": bnb_fwd.bytes, "bytes_bf16_fwd": bf16_fwd.bytes,
                       "dequant_instr_per_element": round(per_elem, 2),
                       "predicted_fwd_us": round(t["fwd"] * 1e6, 1), "bnb_fwd_us": round(t["bnb_fwd"] * 1e6, 1),
                       "bf16_fwd_us": round(t["bf16_fwd"] * 1e6, 1),
                       "predicted_fwd_over_bnb": round(t["fwd"] / t["bnb_fwd"], 3),
                       "predicted_fwd_bwd_over_bnb": round((t["fwd"] + t["bwd"]) / (t["bnb_fwd"] + t["bnb_bwd"]), 3),
                       "predicted_fwd_over_bf16_base": round(t["fwd"] / t["bf16_fwd"], 3),
                       "predicted_fwd_bwd_over_bf16_base": round(
                           (t["fwd"] + t["bwd"]) / (t["bf16_fwd"] + t["bf16_bwd"]), 3)}
                records.append(rec)
                if not (compile_kernels and variant == default and M in (1, 8192)):
                    continue
                for part, recd in (("fwd", fwd_rec), ("bwd", bwd_rec)):
                    for launch in (x for x in recd.launches if isinstance(x, TritonLaunch)):
                        for spec in compile_specs(launch, False):
                            key = _spec_key(spec)
                            res = compiled[key] = compiled.get(key) or compile_one(spec)  # each distinct once
                            records.append({"op": "lora_linear_4bit", "scenario": rec["scenario"], "variant": variant,
                                            "pass": part, "kernel": spec["kernel"], "config": spec["config"],
                                            "default": True, **{k: v for k, v in res.items() if k != "seconds"}})
                            if not res["ok"]:
                                problems.append(f"{spec['kernel']} [{spec['config']}] failed to compile")
                            elif res["spill_bytes"]:
                                problems.append(f"{spec['kernel']} [{spec['config']}] spills {res['spill_bytes']} B")
    q = [r for r in records if r["op"] == "lora_linear_4bit" and "predicted_fwd_us" in r]
    print(f"\nQLoRA, NF4 double-quantized base, r={QLORA_RANKS} (PREDICTIONS, {device.name} model; "
          f"{per_elem:.1f} thread-instructions per dequantized element from the SASS):")
    print(f"{'scenario':30s} {'variant':10s} {'fwd us':>8s} {'bnb us':>8s} {'bf16 us':>8s} {'fwd/bnb':>8s} "
          f"{'f+b/bnb':>8s} {'fwd/bf16':>8s}")
    for r in q:
        mark = "*" if r["default"] else " "
        print(f"{r['scenario'][:30]:30s} {r['variant']:9s}{mark} {r['predicted_fwd_us']:8.1f} {r['bnb_fwd_us']:8.1f} "
              f"{r['bf16_fwd_us']:8.1f} {r['predicted_fwd_over_bnb']:8.3f} {r['predicted_fwd_bwd_over_bnb']:8.3f} "
              f"{r['predicted_fwd_over_bf16_base']:8.3f}")


# ------------------------------------------------------------------------------------------------
# Mixed batches (issue 27): fa.ops.lora_mixed's segmented/decode Triton term vs the base projection
# ------------------------------------------------------------------------------------------------

#: ranks of the adapters, cycled (the mixed-batch benchmark's: r 8-64)
MIXED_RANKS = (8, 16, 32, 64)


def _mixed_record(M: int, adapters: int, K: int, N: int):
    """``lora_mixed`` (Triton backend) on meta tensors: M decode rows spread round-robin over
    ``adapters`` adapters (ranks :data:`MIXED_RANKS` cycled) in one bank. Returns the recording and
    the per-launch (FLOPs, bytes) the kernels really do: each token only its own slot's rank, each
    used slot's rows read once (``to_plan`` would count the whole bank)."""
    mixed = importlib.import_module("fastadapt.ops.lora_mixed")
    ranks = [MIXED_RANKS[i % len(MIXED_RANKS)] if adapters > 1 else 16 for i in range(adapters)]
    offsets = [sum(ranks[:i]) for i in range(adapters)]
    total = sum(ranks)
    bank = mixed.SlotBank(down=_meta(total, K), up=_meta(total, N), scalings=_meta(adapters, dtype=torch.float32),
                          offsets=tuple(offsets), capacities=tuple(ranks), ranks=tuple(ranks),
                          scalings_host=(2.0,) * adapters)
    slots = mixed.SlotRows(tuple(i % adapters for i in range(M)), torch.device("meta"))
    decode = M <= mixed.verification.DECODE_MAX_ROWS
    index, table = mixed._launch_plan(slots, 1, decode)  # once per forward, shared by the layers
    offsets_t, ranks_t = mixed._layout_tensors(slots, bank)
    plan = {"token_slot": index} if decode else {"order": index, "blocks": table}
    kernels = mixed._kernels()
    x = _meta(M, K)
    with recording() as rec:  # what lora_mixed's Triton backend launches (mixed_shrink_op / mixed_expand_op)
        y = torch.nn.functional.linear(x, _meta(N, K))
        s = kernels.mixed_shrink(x, bank.down, offsets_t, ranks_t, max_rank=max(ranks[u] for u in set(slots.slot)),
                                 **plan)
        kernels.mixed_expand(s, bank.up, y.clone(), offsets_t, ranks_t, bank.scalings, **plan)
    used = sorted(set(slots.slot))
    per_token = sum(ranks[s] for s in slots.slot)
    weights = sum(ranks[u] for u in used) * 2  # bf16 rows of the used slots
    s_bytes = M * max(ranks[u] for u in used) * 2
    real = {"_shrink_decode_kernel": (2.0 * K * per_token, M * K * 2 + weights * K + s_bytes),
            "_shrink_segmented_kernel": (2.0 * K * per_token, M * K * 2 + weights * K + s_bytes),
            "_expand_decode_kernel": (2.0 * N * per_token, s_bytes + weights * N + 2 * M * N * 2),
            "_expand_segmented_kernel": (2.0 * N * per_token, s_bytes + weights * N + 2 * M * N * 2)}
    return rec, real, ranks


def mixed_report(records: list, problems: list, device: perf_model.Device, *, compile_kernels: bool) -> None:
    """Entries for ``lora_mixed`` at decode (one token per row, M 1-256) with 1, 8 and 64 adapters on
    a 4096×4096 projection: launches, bytes and the predicted time of the base projection plus the
    segmented LoRA term, against the base projection alone and a single-adapter LoRA batch of the same
    size (``lora_linear``'s default path, r 16); the kernels compiled for sm_90a (spills) — predictions."""
    K = N = 4096
    compiled: dict[str, dict] = {}
    for M in (1, 16, 64, 256):
        base, _ = frozen_plans(Scenario("lora_linear", M, K, N, 16, 0.0))
        single = to_plan(run_op(Scenario("lora_linear", M, K, N, 16, 0.0), DEFAULT_VARIANT)["fwd"][0])
        for adapters in (1, 8, 64):
            rec, real, ranks = _mixed_record(M, adapters, K, N)
            plan = to_plan(rec)
            for launch in plan.launches:
                if launch.name in real:
                    launch.flops, launch.bytes = real[launch.name]
            t = {"mixed": plan.seconds(device), "base": base.seconds(device), "single": single.seconds(device)}
            # the same without the fixed launch cost (what CUDA graphs or a fused epilogue would leave)
            busy = {k: p.seconds(device) - len(p) * device.launch_s for k, p in (("mixed", plan), ("base", base))}
            records.append({
                "op": "lora_mixed", "scenario": f"K{K}xN{N}-M{M}-decode-{adapters}adapters", "variant": "triton",
                "default": False, "device_model": device.name, "M": M, "K": K, "N": N, "adapters": adapters,
                "ranks": sorted(set(ranks)), "prediction": True, "launches_fwd": len(plan),
                "kernels_fwd": [x.name for x in plan.launches], "bytes_fwd": plan.bytes,
                "predicted_fwd_us": round(t["mixed"] * 1e6, 2), "base_fwd_us": round(t["base"] * 1e6, 2),
                "single_adapter_fwd_us": round(t["single"] * 1e6, 2),
                "predicted_term_over_base": round(t["mixed"] / t["base"] - 1, 3),
                "predicted_term_over_base_without_launch_cost": round(busy["mixed"] / busy["base"] - 1, 3),
                "predicted_over_single_adapter": round(t["mixed"] / t["single"], 3)})
            if not compile_kernels or adapters != 8 or M not in (16, 256):
                continue
            for launch in (x for x in rec.launches if isinstance(x, TritonLaunch)):
                for spec in compile_specs(launch, False):
                    key = _spec_key(spec)
                    res = compiled[key] = compiled.get(key) or compile_one(spec)
                    records.append({"op": "lora_mixed", "scenario": records[-1]["scenario"], "variant": "triton",
                                    "pass": "fwd", "kernel": spec["kernel"], "config": spec["config"],
                                    "default": False, **{k: v for k, v in res.items() if k != "seconds"}})
                    if not res["ok"]:
                        problems.append(f"{spec['kernel']} [{spec['config']}] failed to compile")
                    elif res["spill_bytes"]:
                        problems.append(f"{spec['kernel']} [{spec['config']}] spills {res['spill_bytes']} B")
    q = [r for r in records if r["op"] == "lora_mixed" and "predicted_fwd_us" in r]
    print(f"\nmixed batches, lora_mixed (Triton), decode, 4096x4096, bf16 (PREDICTIONS, {device.name} model):")
    print(f"{'scenario':34s} {'launch':>6s} {'us':>7s} {'base us':>8s} {'1-ad us':>8s} {'term/base':>9s} "
          f"{'(no launch)':>11s} {'vs 1-ad':>8s}")
    for r in q:
        print(f"{r['scenario']:34s} {r['launches_fwd']:6d} {r['predicted_fwd_us']:7.2f} {r['base_fwd_us']:8.2f} "
              f"{r['single_adapter_fwd_us']:8.2f} {r['predicted_term_over_base']:9.3f} "
              f"{r['predicted_term_over_base_without_launch_cost']:11.3f} {r['predicted_over_single_adapter']:8.3f}")


def _summary(records: list[dict], device: perf_model.Device) -> None:
    ops = [r for r in records if ("predicted_us" in r or r.get("variant", "").startswith("peft"))
           and r["M"] in (1, 16, 8192)]
    print(f"\npredictions ({device.name} model; per op call, forward + backward):")
    print(f"{'op':18s} {'scenario':28s} {'variant':12s} {'x frozen':>9s} {'fwd only':>9s} {'vs eager':>9s} "
          f"{'fwd':>4s} {'bwd':>4s} {'temp MiB':>9s} {'fused≥eff':>9s}")
    for r in ops:
        over = r.get("predicted_over_frozen")
        eager = r.get("predicted_speedup_over_eager")
        eff = r.get("fused_needs_triton_gemm_efficiency")
        fwd_only = r.get("predicted_fwd_over_frozen")
        print(f"{r['op'][:18]:18s} {r['scenario'][:28]:28s} {r['variant'][:12]:12s} "
              f"{(f'{over:.3f}' if over else '-'):>9s} {(f'{fwd_only:.3f}' if fwd_only else '-'):>9s} "
              f"{(f'{eager:.2f}x' if eager else '-'):>9s} "
              f"{r['launches_fwd']:4d} {r['launches_bwd']:4d} {r.get('temp_bytes', 0) / 2**20:9.1f} "
              f"{(f'{eff:.2f}' if eff else '-'):>9s}")
    series = [r for r in records if r["op"] == "bottleneck_adapter" and "predicted_us" in r]
    if series:
        print(f"\nseries adapter vs eager LLM-Adapters ({device.name} model; fwd + bwd):")
        print(f"{'scenario':28s} {'plan':6s} {'fused us':>9s} {'eager us':>9s} {'speedup':>8s} {'@80%mma':>8s} "
              f"{'MiB':>6s} {'eager MiB':>9s} {'fwd/floor':>9s} {'w L2 reads f/b':>15s} {'cuda':>6s} {'@60%':>6s}")
        for r in series:
            cuda = (f"{r['cuda_speedup_over_eager']:5.2f}x {r['cuda_speedup_at_60pct_mma']:5.2f}x" if r["dropout"] == 0
                    else f"{'-':>6s} {'-':>6s}")
            print(f"{r['scenario'][:28]:28s} {r['plan']:6s} {r['predicted_us']:9.1f} {r['eager_us']:9.1f} "
                  f"{r['predicted_speedup_over_eager']:7.2f}x {r['predicted_speedup_at_80pct_mma']:7.2f}x "
                  f"{r['bytes_moved'] / 2**20:6.0f} {r['eager_bytes_moved'] / 2**20:9.0f} "
                  f"{r['fwd_bytes_over_floor']:9.2f} {r['weight_l2_reads_fwd']:7.0f}/{r['weight_l2_reads_bwd']:<7.0f} "
                  f"{cuda}")


if __name__ == "__main__":
    sys.exit(main())
