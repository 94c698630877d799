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
    spec_keys: list = field(default_factory=list)  # its compile specs (the first: the untuned config)

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
        configs = list(self.configs)
        if self.early_config_prune:  # what the autotuner would time for these arguments
            configs = self.early_config_prune(configs, dict(zip(self.arg_names, args)), **kwargs)
        rec.launches.append(TritonLaunch(fn, args, kwargs, configs=configs))

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
        "_lora_gemm_kernel": 2.0 * M * N * (K + R) + (4.0 * M * N * R if b.get("GRAD_A") else 0.0),
        "_lora_gemm_tma_kernel": 2.0 * M * N * (K + R) + (4.0 * M * N * R if b.get("GRAD_A") else 0.0),
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
TRITON_GEMMS = {"_lora_gemm_kernel", "_lora_gemm_tma_kernel", "_lora_gemm_4bit_kernel",
                "_weight_grad_kernel", "_bottleneck_fwd_kernel", "_bottleneck_bwd_kernel",
                "_bottleneck_hidden_kernel", "_bottleneck_dh_kernel", "_bottleneck_expand_kernel"}


def _launch_kwargs(launch: TritonLaunch) -> dict:
    """The launch's bound arguments with its config (an autotuned launch: the first config, the one
    the untuned path runs)."""
    b = _bound(launch)
    b.update({k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs})  # launch options
    if launch.configs:
        b.update(launch.configs[0].all_kwargs())
    return b


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _programs(launch: TritonLaunch, b: dict) -> int | None:
    """Grid size: recorded for a fixed grid; for an autotuned GEMM, from its (first) config."""
    if launch.programs is not None:
        return launch.programs
    if "BLOCK_M" in b and "BLOCK_N" in b and "M" in b and "N" in b:
        tiles = _cdiv(b["M"], b["BLOCK_M"]) * _cdiv(b["N"], b["BLOCK_N"])
        return min(tiles, b["NUM_SMS"]) if b.get("NUM_SMS") else tiles
    return None


def _trips(name: str, b: dict) -> int:
    """How many times the kernel's main loop (the largest loop in its SASS) runs per program."""
    rows = b.get("rows_per_split")
    trips = {
        "_lora_shrink_kernel": lambda: _cdiv(b["K"], b["BLOCK_K"]),
        "_lora_norm_shrink_kernel": lambda: _cdiv(b["K"], b["BLOCK_K"]),
        "_lora_rank_kernel": lambda: _cdiv(b["R"], b["BLOCK_R"]),
        "_lora_gemm_kernel": lambda: _cdiv(b["K"], b["BLOCK_K"]),
        "_lora_gemm_tma_kernel": lambda: _cdiv(b["K"], b["BLOCK_K"]),
        "_lora_dy_pass_kernel": lambda: _cdiv(rows, b["BLOCK_M"]),
        "_lora_ds_kernel": lambda: _cdiv(b["N"], b["BLOCK_N"]),
        "_weight_grad_kernel": lambda: _cdiv(rows, b["BLOCK_M"]),
        "_dora_norm_kernel": lambda: _cdiv(b["K"], b["BLOCK_K"]),
        "_sum_partials_kernel": lambda: max(b.get("parts_a", 1), b.get("parts_b", 1)),
    }.get(name)
    try:
        return max(1, trips()) if trips else 1
    except (KeyError, TypeError):
        return 1


def _l2_rereads(name: str, b: dict, programs: int | None) -> float:
    """Bytes a launch reads from L2 beyond one read of each tensor: operands every program (or every
    row / column block) reads again. A GEMM's own tile re-reads are left out (cuBLAS pays them
    too; perf_model's docstring); the rank operands it adds are counted."""
    def size(key):
        t = b.get(key)
        return _nbytes(t) if isinstance(t, torch.Tensor) else 0

    def blocks(n_key, blk_key):
        return _cdiv(b[n_key], b[blk_key]) if b.get(n_key) and b.get(blk_key) else 1

    if name in ("_lora_shrink_kernel", "_lora_norm_shrink_kernel"):
        # every row block reads its rank tile of A over all of K (A is often an fp32 master copy)
        m_blocks = blocks("M", "BLOCK_M")
        return (m_blocks - 1) * size("a_ptr")
    if name in ("_lora_rank_kernel", "_lora_gemm_kernel", "_lora_gemm_tma_kernel"):
        return (blocks("N", "BLOCK_N") - 1) * size("s_ptr") + (blocks("M", "BLOCK_M") - 1) * size("b_ptr")
    if name == "_lora_dy_pass_kernel":
        return (b.get("n_blocks", blocks("N", "BLOCK_N")) - 1) * size("s_ptr")
    if name == "_lora_ds_kernel":
        return (blocks("M", "BLOCK_M") - 1) * size("b_ptr")
    if name == "_weight_grad_kernel":
        j1 = blocks("J1", "BLOCK_J1")
        return (j1 - 1) * size("a1_ptr") + (blocks("I1", "BLOCK_I1") - 1) * size("b1_ptr")
    return 0.0


def _launch_bytes(launch: TritonLaunch, b: dict) -> int:
    seen, nbytes = set(), 0
    for arg in launch.args:
        t = getattr(arg, "base", arg)  # a TMA descriptor moves its tensor's bytes
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            nbytes += _nbytes(t)
    if b.get("ACCUMULATE"):  # read-modify-write of the output: it is read as well
        nbytes += _nbytes(b["out_ptr"])
    if launch.name == "_masked_scale_kernel":  # in place: read and written
        nbytes += _nbytes(b["t_ptr"])
    return nbytes


def to_plan(rec: Recording, compiled: dict | None = None,
            device: perf_model.Device | None = None) -> perf_model.Plan:
    """The model's launches for a recording. ``compiled`` (spec key -> compile result) gives the
    Triton launches their instruction-issue time from the SASS (on ``device``); without it that
    term is 0 (``--no-compile``)."""
    plan = perf_model.Plan()
    for launch in rec.launches:
        if isinstance(launch, TritonLaunch):
            b = _launch_kwargs(launch)
            programs = _programs(launch, b)
            nbytes = _launch_bytes(launch, b)
            issue = 0.0
            res = (compiled or {}).get(launch.spec_keys[0]) if launch.spec_keys else None
            if res and res.get("ok") and res.get("mix") and device is not None:
                mix = perf_model.InstructionMix.from_json(res["mix"])
                warps = b.get("num_warps", 4)
                issue = perf_model.issue_seconds(mix.per_warp(_trips(launch.name, b)), warps * (programs or 1),
                                                 device, programs=programs)
            plan.launches.append(perf_model.Launch(launch.name, _triton_flops(launch.name, b), nbytes,
                                                   triton_gemm=launch.name in TRITON_GEMMS,
                                                   programs=launch.programs,
                                                   l2_bytes=nbytes + _l2_rereads(launch.name, b, programs)
                                                   + _weight_rereads(launch),
                                                   issue_s=issue))
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


def _weight_rereads(launch: TritonLaunch) -> int:
    """A bottleneck row kernel's adapter-weight reads beyond the first (from L2)."""
    total = _weight_reads(launch)
    if not total:
        return 0
    b = _bound(launch)
    once = sum(_nbytes(b[k]) for k in ("wd_ptr", "wu_ptr", "w_ptr") if isinstance(b.get(k), torch.Tensor))
    return max(0, total - once)


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
            if cfg.pre_hook is not None:  # e.g. TMA descriptors taking the config's block shapes
                cfg.pre_hook({**dict(zip(launch.fn.arg_names, launch.args)), **kwargs})
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
                "sass_instructions": n_sass, "mix": perf_model.sass_mix(sass).to_json(),
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
#: The gates' ragged cases (every variant, every config they may select): M ≡ 1 mod 16 at a batch
#: and a decode size, with K = 4100 (rows not 16-byte aligned: the plain GEMM path, not TMA); M = 65
#: on both paths (its bucket, 128, may select every tile of 16 to 128 rows; dA inside dX at 128);
#: and a q/k/v group of rank 12 whose S slices start off 16-byte boundaries.
RAGGED = (Scenario("lora_linear", 8193, 4100, 4096, 16, 0.1), Scenario("lora_linear", 17, 4100, 4096, 16, 0.1),
          Scenario("lora_linear", 65, 4100, 4096, 16, 0.1), Scenario("lora_linear", 65, 4096, 4096, 16, 0.1),
          Scenario("lora_group", 8193, 4096, (4096, 4096, 4096), 12, 0.1))


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
    out += RAGGED
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


def peft_records(sc: Scenario, frozen_fwd: perf_model.Plan, frozen_bwd: perf_model.Plan,
                 device: perf_model.Device) -> list[dict]:
    """PEFT's LoRA (or DoRA) layer on the scenario, fp32 and bf16 adapters: the baselines' records."""
    out = []
    dora_peft = sc.op == "dora_linear"
    for name, fp32 in (("peft_default", True), ("peft_bf16", False)):
        peft = peft_plans(sc, fp32_adapters=fp32, dora=dora_peft)
        name = name.replace("peft", "peft_dora") if dora_peft else name
        if peft is not None:
            out.append({"op": sc.op, "scenario": sc.name, "variant": name, "default": False,
                        "device_model": device.name, "M": sc.M, "K": sc.K, "N": sc.N, "r": sc.r,
                        "dropout": sc.p, "launches_fwd": len(peft[0]), "launches_bwd": len(peft[1]),
                        "bytes_moved": peft[0].bytes + peft[1].bytes, "temp_bytes": peft[2],
                        "weight_sized_temp_bytes": peft[3],
                        "predicted_over_frozen": round(perf_model.over_frozen(
                            *peft[:2], frozen_fwd, frozen_bwd, device), 4),
                        "dominant": perf_model.dominant_terms(list(peft[:2]), [frozen_fwd, frozen_bwd], device)})
    return out


def curve_fields(plans: list[perf_model.Plan], frozen: list[perf_model.Plan], device: perf_model.Device) -> dict:
    """× frozen at cuBLAS parity and along the Triton-GEMM fraction curve, and what dominates."""
    def over(eff):
        return sum(p.seconds(device, triton_gemm_efficiency=eff) for p in plans) / sum(
            p.seconds(device, triton_gemm_efficiency=eff) for p in frozen)

    mid = perf_model.CUBLAS_FRACTIONS[1]
    return {"predicted_over_frozen": round(over(1.0), 4),
            "over_frozen_at": {f"{e:.2f}": round(over(e), 4) for e in perf_model.CUBLAS_FRACTIONS},
            "dominant": perf_model.dominant_terms(plans, frozen, device, triton_gemm_efficiency=mid),
            "top_launches": perf_model.top_launches(plans, device, triton_gemm_efficiency=mid)}


def _triton_launches(run: dict):
    """(pass name, launch) for every Triton launch of a recorded op call."""
    parts = [("fwd", run["fwd"][0]), ("bwd", run["bwd"][0])] + ([("norm", run["norm"][0])] if "norm" in run else [])
    for part, recd in parts:
        for launch in recd.launches:
            if isinstance(launch, TritonLaunch):
                yield part, launch


def compile_all(jobs: dict[str, dict], n_jobs: int, sass_dir: Path | None) -> dict[str, dict]:
    """Compile every job for sm_90a in a process pool; spec key -> result."""
    results: dict[str, dict] = {}
    if not jobs:
        return results
    if sass_dir:
        sass_dir.mkdir(parents=True, exist_ok=True)
    with futures.ProcessPoolExecutor(max_workers=max(1, n_jobs)) as pool:
        pending = {pool.submit(compile_one, spec, sass_dir): key for key, spec in jobs.items()}
        for n, done in enumerate(futures.as_completed(pending), 1):
            key = pending[done]
            results[key] = res = done.result()
            spec = jobs[key]
            state = (f"{res['registers']} regs, {res['spill_bytes']} B spill, {res['stack_bytes']} B stack, "
                     f"{res['shared_bytes']} B smem, {res['sass_instructions']} SASS" if res["ok"] else "FAILED")
            print(f"[check_triton] {n}/{len(jobs)} {spec['kernel']} [{spec['config']}]: {state} ({res['seconds']} s)",
                  flush=True)
    return results


def gate_compiles(launch: TritonLaunch, results: dict, problems: list, where: str) -> None:
    """Every config the autotuner may select must compile without spills: a config over sm_90's
    shared memory cannot launch (the autotuner skips it), so it only fails the gate when no config
    of the launch fits."""
    fits = 0
    for key in launch.spec_keys:
        res = results.get(key)
        if res is None:
            continue
        cfg = json.loads(key)[0]
        if not res["ok"]:
            problems.append(f"{where}: {cfg} failed to compile: {res['error'][-300:]}")
            continue
        if res["shared_bytes"] > SMEM_LIMIT:
            continue
        fits += 1
        if res["spill_bytes"]:
            problems.append(f"{where}: {launch.name} [{_config_of(key, results)}] spills {res['spill_bytes']} B")
    if launch.spec_keys and all(k in results for k in launch.spec_keys) and not fits:
        problems.append(f"{where}: no config of {launch.name} fits sm_90's {SMEM_LIMIT} B of shared memory")


def _config_of(key: str, results: dict) -> str:
    return results[key].get("config", "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the records here")
    ap.add_argument("--full", action="store_true", help="the whole sweep (more shapes, ranks, M, fp32)")
    ap.add_argument("--device", choices=sorted(perf_model.DEVICES), default="h100", help="model ceilings")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    ap.add_argument("--no-compile", action="store_true",
                    help="the model only (no sm_90a compiles: the instruction-issue term is left out)")
    ap.add_argument("--sass-dir", type=Path, help="also write each compile's SASS here (to read the inner loop)")
    ap.add_argument("--only", action="append", metavar="OP", help="only this op's scenarios (repeatable)")
    args = ap.parse_args(argv)
    device = perf_model.DEVICES[args.device]
    started = time.time()

    records, problems, goals = [], [], []
    jobs: dict[str, dict] = {}  # spec key -> spec
    runs: list[tuple[Scenario, str, dict]] = []
    sweep = [sc for sc in scenarios(args.full) if not args.only or sc.op in args.only]
    # 1. record every scenario and variant on meta tensors; every config any launch may take is a compile
    for sc in sweep:
        for variant in VARIANTS if has_variants(sc.op) else (DEFAULT_VARIANT,):
            run = run_op(sc, variant)
            for _, launch in _triton_launches(run):
                specs = compile_specs(launch, True)
                launch.spec_keys = [_spec_key(spec) for spec in specs]
                if not args.no_compile:
                    for key, spec in zip(launch.spec_keys, specs):
                        jobs.setdefault(key, spec)
            runs.append((sc, variant, run))
    print(f"[check_triton] {len(runs)} op calls recorded from {len(sweep)} scenarios; {len(jobs)} distinct compiles",
          flush=True)
    # 2. compile them for sm_90a
    compile_started = time.time()
    results = compile_all(jobs, args.jobs, args.sass_dir)
    for key, spec in jobs.items():
        results[key]["config"] = spec["config"]
    compile_s = time.time() - compile_started
    # 3. the model (with each launch's SASS), the gates, the records
    lora_plans: dict[tuple, tuple[perf_model.Plan, perf_model.Plan]] = {}  # LoRA's default, for DoRA's over_lora
    op_plans: dict[tuple, tuple] = {}  # (op, scenario, variant) -> (fwd, bwd, frozen_fwd, frozen_bwd)
    frozen_cache: dict[str, tuple] = {}
    for sc, variant, run in runs:
        if sc.name + sc.op not in frozen_cache:
            frozen_cache[sc.name + sc.op] = frozen_plans(sc)
            if sc.op in ("lora_linear", "dora_linear") and sc.M >= 512:
                records += peft_records(sc, *frozen_cache[sc.name + sc.op], device)
        frozen_fwd, frozen_bwd = frozen_cache[sc.name + sc.op]
        default = variant == DEFAULT_VARIANT
        (fwd_rec, fwd_res), (bwd_rec, bwd_res) = run["fwd"], run["bwd"]
        fwd, bwd = to_plan(fwd_rec, results, device), to_plan(bwd_rec, results, device)
        norm_plan = None
        if "norm" in run:  # DoRA's row norms: once per training step; cached when decoding
            norm_plan = to_plan(run["norm"][0], results, device)
            if sc.M > 16:
                fwd = perf_model.Plan(norm_plan.launches + fwd.launches)
        op_plans[(sc.op, sc.name, variant)] = (fwd, bwd, frozen_fwd, frozen_bwd)
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
            "issue_term": not args.no_compile,
        }
        if sc.op == "bottleneck_adapter":
            rec.update(bottleneck_fields(sc, fwd, bwd, fwd_rec, bwd_rec, device))
            if default and sc.M >= 8192 and sc.dtype == BF16 and device.name == "H100":
                met = rec["predicted_speedup_over_eager"] >= BOTTLENECK_TARGET
                goals.append(f"series adapter {sc.name} ≥ {BOTTLENECK_TARGET}x eager (issue 18): predicted "
                             f"{rec['predicted_speedup_over_eager']}x — {'met' if met else 'MISSED'}")
        else:
            rec["frozen_us"] = round((frozen_fwd.seconds(device) + frozen_bwd.seconds(device)) * 1e6, 1)
            rec.update(curve_fields([fwd, bwd], [frozen_fwd, frozen_bwd], device))
            rec["predicted_fwd_over_frozen"] = round(fwd.seconds(device) / frozen_fwd.seconds(device), 4)
            if variant == "fused":
                rec["fused_needs_triton_gemm_efficiency"] = perf_model.break_even_efficiency(
                    (fwd, bwd), op_plans[(sc.op, sc.name, DEFAULT_VARIANT)][:2], device)
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
        where = f"{sc.op} {sc.name} {variant}"
        if norm_plan is not None:
            if rec["weight_sized_temp_bytes"]:
                problems.append(
                    f"{where}: a weight-sized temporary of {rec['weight_sized_temp_bytes'] / 2**20:.0f} MiB")
        elif temp > TEMP_CAP:
            problems.append(f"{where}: a {temp / 2**20:.0f} MiB temporary (cap 64 MiB)")
        decode = sc.op == "lora_linear" or (sc.op == "dora_linear" and sc.p == 0)  # decoding runs no dropout
        if default and decode and sc.M <= 16 and len(fwd) > DECODE_MAX_LAUNCHES:
            problems.append(f"{where}: decode forward takes {len(fwd)} launches (max 3)")
        if mask_bits_per_elem > mask_bits_allowed + 1e-12:
            problems.append(f"{where}: the saved mask holds {mask_bits_per_elem:.2f} bits per element")
        for part, launch in _triton_launches(run):
            gate_compiles(launch, results, problems, f"{where} ({part})")
            for key in launch.spec_keys:
                res = results.get(key)
                if res is not None:
                    records.append({"op": sc.op, "scenario": sc.name, "variant": variant, "pass": part,
                                    "kernel": launch.name, "config": res["config"], "default": default,
                                    **{k: res.get(k) for k in ("ok", "registers", "spill_bytes", "stack_bytes",
                                                               "shared_bytes", "sass_instructions")},
                                    **({"error": res["error"]} if not res["ok"] else {})})

    if not args.only or "lora_linear_4bit" in args.only:
        qlora_report(records, problems, device, compile_kernels=not args.no_compile, full=args.full)
    if not args.only or "lora_mixed" in args.only:
        mixed_report(records, problems, device, compile_kernels=not args.no_compile)
    _summary(records, device, op_plans)
    records += layer_report(op_plans, device)
    records += grad_a_placement(op_plans, device)
    print(f"\n[check_triton] compiled {len(jobs)} distinct launches for sm_90a in {compile_s:.0f} s "
          f"({args.jobs} workers)" + ("" if jobs else " (--no-compile: the issue term is left out of the model)"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1, default=str) + "\n")
        print(f"[check_triton] wrote {len(records)} records to {args.json}")
    for g in goals:
        print(f"[check_triton] goal (prediction, not a gate): {g}")
    for p in sorted(set(problems)):
        print(f"[check_triton] PROBLEM: {p}")
    print(f"[check_triton] {'FAIL' if problems else 'ok'} in {time.time() - started:.0f} s")
    return 1 if problems else 0


# ------------------------------------------------------------------------------------------------
# QLoRA: the 4-bit dequantizing GEMM (fastadapt/ops/lora_linear_4bit.py) vs bitsandbytes
# ------------------------------------------------------------------------------------------------

#: The SM clock the issue-rate term uses (H100 SXM boost; perf_model's) and the dequantize kernel's
#: tile, whose SASS per element stands for the per-element dequantization work of the GEMM's inner loop.
SM_CLOCK_HZ = perf_model.SM_CLOCK_HZ
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


def _summary(records: list[dict], device: perf_model.Device, op_plans: dict) -> None:
    ops = [r for r in records if ("predicted_us" in r or r.get("variant", "").startswith("peft"))
           and r["M"] in (1, 16, 8192) and r["op"] != "bottleneck_adapter"]
    fr = "/".join(f"{e:.2f}" for e in perf_model.CUBLAS_FRACTIONS)
    print(f"\npredictions ({device.name} model; per op call, forward + backward; × frozen with the Triton GEMM at "
          f"{fr} of cuBLAS; dominant terms of the extra time at {perf_model.CUBLAS_FRACTIONS[1]:.2f}):")
    print(f"{'op':12s} {'scenario':28s} {'variant':12s} {'x frozen ' + fr:>22s} {'fwd only':>8s} "
          f"{'fwd':>3s} {'bwd':>3s} {'temp MiB':>8s}  dominant")
    for r in ops:
        curve = r.get("over_frozen_at")
        over = r.get("predicted_over_frozen")
        cells = " ".join(f"{v:6.3f}" for v in curve.values()) if curve else f"{over:6.3f} (PEFT: no Triton GEMM)"
        fwd_only = r.get("predicted_fwd_over_frozen")
        print(f"{r['op'][:12]:12s} {r['scenario'][:28]:28s} {r['variant'][:12]:12s} {cells:>22s} "
              f"{(f'{fwd_only:.3f}' if fwd_only else '-'):>8s} {r['launches_fwd']:3d} {r['launches_bwd']:3d} "
              f"{r.get('temp_bytes', 0) / 2**20:8.1f}  {r.get('dominant', '')}")
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
            key = ("bottleneck_adapter", r["scenario"], r["variant"])
            if key in op_plans:
                print(f"{'':28s} where the time goes: "
                      f"{perf_model.top_launches(list(op_plans[key][:2]), device, top=4)}")


#: One LLaMA-7B decoder layer's seven adapted projections (M = 8192 tokens, r = 16, p = 0.1): the
#: q/k/v and gate/up groups share their input; o_proj and down_proj run alone.
LAYER = (("q/k/v", Scenario("lora_group", 8192, 4096, (4096, 4096, 4096), 16, 0.1)),
         ("o_proj", Scenario("lora_linear", 8192, 4096, 4096, 16, 0.1)),
         ("gate/up", Scenario("lora_group", 8192, 4096, (11008, 11008), 16, 0.1)),
         ("down_proj", Scenario("lora_linear", 8192, 11008, 4096, 16, 0.1)))
#: The issue-26 goals, at 0.90 of cuBLAS: the layer and one 4096² linear without producer fusion.
LAYER_GOAL, LINEAR_GOAL = 1.10, 1.15


def layer_report(op_plans: dict, device: perf_model.Device) -> list[dict]:
    """The layer's seven projections, fwd + bwd, × the frozen projections (fwd + dX), per variant and
    with the best variant per projection; and the single-linear goal. Predictions."""
    if not all((sc.op, sc.name, DEFAULT_VARIANT) in op_plans for _, sc in LAYER):
        return []
    out = []
    print(f"\nLLaMA-7B decoder layer, 7 adapted projections, M=8192 r=16 p=0.1 (PREDICTIONS, {device.name} model):")
    frozen = [p for _, sc in LAYER for p in op_plans[(sc.op, sc.name, DEFAULT_VARIANT)][2:]]
    for choice in (*VARIANTS, "best"):
        row = {"op": "layer", "scenario": "llama7b-M8192-r16-p0.1", "variant": choice, "device_model": device.name,
               "over_frozen_at": {}, "picks": {}}
        for eff in perf_model.CUBLAS_FRACTIONS:
            plans = []
            for label, sc in LAYER:
                options = [v for v in VARIANTS if (sc.op, sc.name, v) in op_plans] if choice == "best" else [choice]
                pick = min(options, key=lambda v: sum(p.seconds(device, triton_gemm_efficiency=eff)
                                                      for p in op_plans[(sc.op, sc.name, v)][:2]))
                row["picks"].setdefault(f"{eff:.2f}", {})[label] = pick
                plans += op_plans[(sc.op, sc.name, pick)][:2]
            row["over_frozen_at"][f"{eff:.2f}"] = round(
                sum(p.seconds(device, triton_gemm_efficiency=eff) for p in plans)
                / sum(p.seconds(device) for p in frozen), 4)
            if eff == perf_model.CUBLAS_FRACTIONS[1]:
                row["dominant"] = perf_model.dominant_terms(plans, frozen, device, triton_gemm_efficiency=eff)
                row["top_launches"] = perf_model.top_launches(plans, device, triton_gemm_efficiency=eff, top=5,
                                                              skip=("aten.addmm_", "aten.mm", "aten.addmm"))
        out.append(row)
        curve = " ".join(f"{v:.3f}" for v in row["over_frozen_at"].values())
        picks = row["picks"][f"{perf_model.CUBLAS_FRACTIONS[1]:.2f}"]
        print(f"  {choice:9s} × frozen at {'/'.join(row['over_frozen_at'])}: {curve}   dominant: {row['dominant']}"
              + (f"   picks at 0.90: {picks}" if choice == "best" else ""))
        print(f"  {'':9s} costliest adapter launches at 0.90: {row['top_launches']}")
    mid = f"{perf_model.CUBLAS_FRACTIONS[1]:.2f}"
    best = out[-1]["over_frozen_at"][mid]
    lin = [r for r in (_linear_best(op_plans, device),) if r]
    print(f"  goal: layer ≤ {LAYER_GOAL} at {mid} of cuBLAS: predicted {best:.3f} — "
          f"{'met' if best <= LAYER_GOAL else 'MISSED'}")
    if lin:
        v, ratio = lin[0]
        print(f"  goal: one 4096² linear (no producer fusion) ≤ {LINEAR_GOAL} at {mid}: predicted {ratio:.3f} "
              f"({v}) — {'met' if ratio <= LINEAR_GOAL else 'MISSED'}")
        out.append({"op": "goal", "scenario": "K4096xN4096-M8192-r16-p0.1", "variant": v, "over_frozen": ratio,
                    "goal": LINEAR_GOAL})
    out.append({"op": "goal", "scenario": "layer", "variant": "best", "over_frozen": best, "goal": LAYER_GOAL})
    return out


def grad_a_placement(op_plans: dict, device: perf_model.Device) -> list[dict]:
    """Where dA = s · dSᵀ (mask ⊙ X) goes, per variant, for the layer's projections (PREDICTIONS, at
    0.90 of cuBLAS): its own pass over X (``lora_grad_a``: a weight-gradient launch and its partials'
    sum) against inside the dX kernel that holds dS and the mask bits. ``fused``: inside the Triton
    dX GEMM (what runs: X's read hides under the MMAs, + the dA MMAs and 128-row partials).
    ``addmm``/``epilogue`` (dX by cuBLAS): inside the rank pass, modelled as that launch also reading
    X, doing the dA MMAs and writing one fp32 (R, K) partial per 64-row block, then a sum — its
    integer work left out (which favours it). The op layer follows the cheaper (``grad_a_inside_dx``)."""
    eff = perf_model.CUBLAS_FRACTIONS[1]
    out = []
    print(f"\ndA placement (PREDICTIONS, {device.name} model, µs at {eff:.2f} of cuBLAS; own pass vs inside dX):")
    for label, sc in LAYER:
        R = sc.r * (len(sc.N) if isinstance(sc.N, tuple) else 1)
        x_bytes = sc.M * sc.K * sc.dtype.itemsize
        own = None
        for variant in ("addmm", "epilogue", "fused"):
            plans = op_plans.get((sc.op, sc.name, variant))
            if plans is None:
                continue
            bwd = plans[1].launches
            names = [k.name for k in bwd]
            if "_weight_grad_kernel" in names:  # dA by its own pass: the weight-gradient launch (+ its sum)
                i = names.index("_weight_grad_kernel")
                own = bwd[i:i + 1 + (names[i + 1:i + 2] == ["_sum_partials_kernel"])]
                t_own = sum(k.seconds(device) for k in own)
                rows_inside = 64
                host = next(k for k in bwd if k.name == "_lora_rank_kernel")
                partial = -(-sc.M // rows_inside) * R * sc.K * 4
                merged = perf_model.Launch(host.name, host.flops + 2.0 * sc.M * sc.K * R,
                                           host.bytes + x_bytes + partial, programs=host.programs,
                                           l2_bytes=host.l2_bytes + x_bytes + partial, issue_s=host.issue_s)
                t_inside = merged.seconds(device) - host.seconds(device)
            elif own is not None:  # fused: inside the dX GEMM (as recorded) vs the addmm plan's own pass
                t_own = sum(k.seconds(device) for k in own)
                gemm = next(k for k in bwd if k.name in ("_lora_gemm_kernel", "_lora_gemm_tma_kernel"))
                partial = -(-sc.M // 128) * R * sc.K * 4
                bare = perf_model.Launch(gemm.name, gemm.flops - 4.0 * sc.M * sc.K * R,
                                         gemm.bytes - x_bytes - partial, triton_gemm=True, programs=gemm.programs)
                t_inside = (gemm.seconds(device, triton_gemm_efficiency=eff)
                            - bare.seconds(device, triton_gemm_efficiency=eff))
            else:
                continue
            t_inside += perf_model.Launch("_sum_partials_kernel", 0.0, partial + R * sc.K * 4).seconds(device)
            pick = "inside dX" if t_inside < t_own else "own pass"
            out.append({"op": "grad_a_placement", "scenario": sc.name, "projection": label, "variant": variant,
                        "own_pass_us": round(t_own * 1e6, 1), "inside_dx_us": round(t_inside * 1e6, 1),
                        "pick": pick})
            print(f"  {label:9s} {variant:9s} own pass {t_own * 1e6:6.1f}   inside dX {t_inside * 1e6:6.1f}"
                  f"   -> {pick}")
    return out


def _linear_best(op_plans: dict, device: perf_model.Device) -> tuple[str, float] | None:
    sc = LAYER[1][1]
    eff = perf_model.CUBLAS_FRACTIONS[1]
    best = None
    for v in VARIANTS:
        if (sc.op, sc.name, v) not in op_plans:
            continue
        fwd, bwd, ffwd, fbwd = op_plans[(sc.op, sc.name, v)]
        ratio = perf_model.over_frozen(fwd, bwd, ffwd, fbwd, device, triton_gemm_efficiency=eff)
        if best is None or ratio < best[1]:
            best = (v, round(ratio, 4))
    return best


if __name__ == "__main__":
    sys.exit(main())
