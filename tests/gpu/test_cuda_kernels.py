"""GPU tests of the hand-written CUDA kernels (csrc/: torch.ops.fastadapt.*_cuda*).

Skipped without a CUDA device or without the extension (build it with
``FASTADAPT_BUILD_CUDA=1 pip install --no-build-isolation -e .``; otherwise the first test JIT-builds
it, a few minutes). No CUDA call happens at import time.

Tolerance rule (DESIGN.md): against a float64 reference, the kernel's max error must be at most
2x the error of the same computation done by eager PyTorch in the same dtype (+ a quarter-ulp of
slack at the output's scale, so an eager result that happens to be exact cannot fail a test).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parents[2]
ACTS = ("tanh", "relu", "gelu", "silu")
EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}


@pytest.fixture(scope="module")
def ops():
    from fastadapt import settings
    from fastadapt.ops import _native

    if not _native.native_available():
        why = f"fastadapt CUDA extension unavailable: {_native.native_load_error()}"
        if settings.flag("FASTADAPT_REQUIRE_CUDA_EXT"):  # scripts/gpu-check.sh: a failed build is a failure
            pytest.fail(why)
        pytest.skip(why)
    return _cuda_ops()


def _cuda_ops() -> SimpleNamespace:
    """The extension's kernels under short names (schemas in fastadapt/ops/bottleneck_adapter.py
    and fastadapt/ops/lora_merge.py)."""
    ns = torch.ops.fastadapt
    return SimpleNamespace(bottleneck_adapter_fwd=ns.bottleneck_adapter_cuda_fwd,
                           bottleneck_adapter_bwd=ns.bottleneck_adapter_cuda_bwd, lora_merge_=ns.lora_merge_cuda_)


def _act(name: str, h: torch.Tensor) -> torch.Tensor:
    if name == "tanh":
        return torch.tanh(h)
    if name == "relu":
        return torch.relu(h)
    if name == "gelu":
        return torch.nn.functional.gelu(h)  # erf form, as ACT2FN["gelu"]
    return torch.nn.functional.silu(h)


def _poison_allocator(nbytes: int) -> None:
    """Leaves NaN-filled blocks in the caching allocator so unwritten outputs show up as NaN."""
    t = torch.full((max(nbytes // 4, 1),), float("nan"), device="cuda")
    del t


def _check_close(name: str, got: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    ref = ref.double()
    err_k = (got.double() - ref).abs().max().item()
    err_t = (eager.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    tol = 2.0 * err_t + 0.25 * EPS[dtype] * scale
    assert math.isfinite(err_k), f"{name}: non-finite values in the kernel output"
    assert err_k <= tol, (
        f"{name}: kernel error {err_k:.3e} > 2 x eager {dtype} error {err_t:.3e} (+slack, tol {tol:.3e})"
    )


def _bottleneck_forward(x, wd, wu, s, res, act):
    h = x @ wd.t()
    y = _act(act, h) @ wu.t()
    return (x if res is None else res) + s * y


def _inputs(M, d_in, d_out, b, dtype, residual, seed=0, lead=()):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*lead, M, d_in, device="cuda", generator=g).to(dtype)
    # Scales chosen so hidden is O(1) (exercises the non-linear part of every activation).
    wd = (torch.randn(b, d_in, device="cuda", generator=g) / math.sqrt(d_in)).to(dtype)
    wu = (torch.randn(d_out, b, device="cuda", generator=g) / math.sqrt(b)).to(dtype)
    res = torch.randn(*lead, M, d_out, device="cuda", generator=g).to(dtype) if residual else None
    dout = torch.randn(*lead, M, d_out, device="cuda", generator=g).to(dtype)
    return x, wd, wu, res, dout


def _run_and_check(ops, M, d_in, d_out, b, dtype, act, residual, lead=()):
    s_val = 0.75  # exact in bf16/fp16, so the eager reference may cast it without error
    x, wd, wu, res, dout = _inputs(M, d_in, d_out, b, dtype, residual, lead=lead)
    scaling = torch.tensor([s_val], device="cuda", dtype=torch.float32)

    # Float64 reference, forward and backward through autograd.
    x64, wd64, wu64 = (t.double().requires_grad_() for t in (x, wd, wu))
    s64 = torch.tensor(s_val, device="cuda", dtype=torch.float64, requires_grad=True)
    res64 = None if res is None else res.double()
    out64 = _bottleneck_forward(x64, wd64, wu64, s64, res64, act)
    dx64, dwd64, dwu64, ds64 = torch.autograd.grad(out64, (x64, wd64, wu64, s64), dout.double())
    h64 = (x64 @ wd64.t()).detach().reshape(-1, b)

    # Eager reference in the kernel's dtype (what the 2x rule compares against).
    xt, wdt, wut = (t.clone().requires_grad_() for t in (x, wd, wu))
    st = torch.tensor(s_val, device="cuda", dtype=dtype, requires_grad=True)
    outt = _bottleneck_forward(xt, wdt, wut, st, res, act)
    dxt, dwdt, dwut, dst = torch.autograd.grad(outt, (xt, wdt, wut, st), dout)
    ht = (x @ wd.t()).reshape(-1, b)

    _poison_allocator(4 * (x.numel() + dout.numel() + b * (d_in + d_out) + x.numel() // d_in * b) + (1 << 20))
    out, hidden, *_ = ops.bottleneck_adapter_fwd(x, wd, wu, scaling, res, act)
    assert out.shape == (*lead, M, d_out) and out.dtype == dtype
    assert hidden.shape == (x.numel() // d_in, b) and hidden.dtype == dtype
    _check_close("out", out, outt, out64, dtype)
    _check_close("hidden", hidden, ht, h64, dtype)

    _poison_allocator(4 * (x.numel() + dout.numel() + b * (d_in + d_out) + x.numel() // d_in * b) + (1 << 20))
    dx, dwd, dwu, ds = ops.bottleneck_adapter_bwd(dout, x, hidden, wd, wu, scaling, act, residual)
    assert dx.shape == x.shape and dx.dtype == dtype
    assert dwd.shape == wd.shape and dwd.dtype == torch.float32
    assert dwu.shape == wu.shape and dwu.dtype == torch.float32
    assert ds.shape == scaling.shape and ds.dtype == torch.float32
    _check_close("dx", dx, dxt, dx64, dtype)
    _check_close("dw_down", dwd, dwdt, dwd64, dtype)
    _check_close("dw_up", dwu, dwut, dwu64, dtype)
    _check_close("dscaling", ds.reshape(()), dst, ds64, dtype)
    for name, g in (("dw_down", dwd), ("dw_up", dwu), ("dscaling", ds)):
        assert g.abs().sum() > 0, f"{name} is all zeros"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("b", [8, 24, 256])
@pytest.mark.parametrize("d", [72, 100, 4096])
@pytest.mark.parametrize("M", [1, 3, 17, 129, 4099])
def test_bottleneck_matches_reference(ops, M, d, b, dtype):
    # Cycle activations and residual on/off over the grid rather than multiplying the grid by 8.
    i = M + d + b
    _run_and_check(ops, M, d, d, b, dtype, ACTS[i % 4], residual=bool(i % 2))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True], ids=["x_residual", "residual"])
def test_bottleneck_activations(ops, act, residual):
    _run_and_check(ops, 129, 136, 136, 40, torch.bfloat16, act, residual)


def test_bottleneck_residual_with_other_width_and_3d(ops):
    # d_out != d_in needs an explicit residual; 3-D input; b = 264: five 64-wide column blocks of
    # hidden / dh, the last partial.
    _run_and_check(ops, 33, 100, 72, 264, torch.float16, "gelu", residual=True, lead=(2,))


@pytest.mark.parametrize("M,d,b", [(2048, 4096, 256), (8192, 4096, 256), (257, 264, 1500)],
                         ids=["issue18-M2048", "issue18-M8192", "b1500"])
def test_bottleneck_split_design_shapes(ops, M, d, b):
    # The issue-18 shapes (d = 4096, b = 256: 128 / 512 CTAs for the b-wide GEMMs, 1024 / 4096 for
    # the d-wide ones), and a bottleneck wider than the first design's on-chip limit (1024).
    _run_and_check(ops, M, d, d, b, torch.bfloat16, "tanh", residual=False)


def test_bottleneck_misaligned_input(ops):
    # A view starting one element in: the 16-byte path must not be taken.
    x_big = torch.randn(17 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    x = x_big[1:].view(17, 64)
    wd = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16) / 8
    wu = torch.randn(64, 16, device="cuda", dtype=torch.bfloat16) / 4
    s = torch.tensor([1.5], device="cuda")
    out, *_ = ops.bottleneck_adapter_fwd(x, wd, wu, s, None, "silu")
    ref = x.double() + 1.5 * torch.nn.functional.silu(x.double() @ wd.double().t()) @ wu.double().t()
    assert (out.double() - ref).abs().max().item() < 0.1


def test_bottleneck_scaling_stays_on_device(ops):
    # The kernels read scaling from device memory: changing it in place changes the result.
    x, wd, wu, _, _ = _inputs(17, 72, 72, 8, torch.bfloat16, residual=False)
    s = torch.tensor([1.0], device="cuda")
    out1, *_ = ops.bottleneck_adapter_fwd(x, wd, wu, s, None, "tanh")
    s.fill_(0.0)
    out0, *_ = ops.bottleneck_adapter_fwd(x, wd, wu, s, None, "tanh")
    assert torch.equal(out0, x)
    assert not torch.equal(out1, x)


def test_bottleneck_bad_inputs(ops):
    x, wd, wu, _, _ = _inputs(3, 72, 72, 8, torch.bfloat16, residual=False)
    s = torch.tensor([1.0], device="cuda")
    with pytest.raises(RuntimeError, match="activation"):
        ops.bottleneck_adapter_fwd(x, wd, wu, s, None, "swishy")
    with pytest.raises(RuntimeError, match="w_down"):
        ops.bottleneck_adapter_fwd(x, wd[:, :70], wu, s, None, "tanh")
    with pytest.raises(RuntimeError, match="w_up must be a floating-point tensor"):
        ops.bottleneck_adapter_fwd(x, wd, wu.int(), s, None, "tanh")
    with pytest.raises(RuntimeError, match="scaling"):
        ops.bottleneck_adapter_fwd(x, wd, wu, s.double(), None, "tanh")
    with pytest.raises(RuntimeError, match="x must be bfloat16 or float16"):
        ops.bottleneck_adapter_fwd(x.float(), wd.float(), wu.float(), s, None, "tanh")
    with pytest.raises(RuntimeError, match="residual"):
        ops.bottleneck_adapter_fwd(x, wd, wu[:64], s, None, "tanh")


def test_bottleneck_takes_fp32_master_weights(ops):
    # fp32 adapter weights are cast to x's dtype inside: the same result as casting first
    x, wd, wu, _, _ = _inputs(9, 72, 72, 8, torch.bfloat16, residual=False)
    s = torch.tensor([0.5], device="cuda")
    out_lp, *_ = ops.bottleneck_adapter_fwd(x, wd, wu, s, None, "tanh")
    out_fp32, _, wd_lp, wu_lp = ops.bottleneck_adapter_fwd(x, wd.float(), wu.float(), s, None, "tanh")
    assert torch.equal(out_lp, out_fp32)
    # the copies it cast are returned for backward (which then casts nothing)
    assert torch.equal(wd_lp, wd) and torch.equal(wu_lp, wu) and wd_lp.dtype == torch.bfloat16


def test_bottleneck_empty_rows(ops):
    x, wd, wu, _, _ = _inputs(3, 72, 72, 8, torch.bfloat16, residual=False)
    x = x[:0]
    s = torch.tensor([1.0], device="cuda")
    out, hidden, *_ = ops.bottleneck_adapter_fwd(x, wd, wu, s, None, "relu")
    assert out.shape == (0, 72) and hidden.shape == (0, 8)
    dx, dwd, dwu, ds = ops.bottleneck_adapter_bwd(out, x, hidden, wd, wu, s, "relu", False)
    assert dx.shape == (0, 72) and not dwd.any() and not dwu.any() and not ds.any()


def test_bottleneck_fake_impls(ops):
    x, wd, wu, _, _ = _inputs(5, 72, 72, 8, torch.bfloat16, residual=False)
    s = torch.tensor([1.0], device="cuda")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx, fwd, fwu, fs = (mode.from_tensor(t) for t in (x, wd, wu, s))
        out, hidden, wd_lp, wu_lp = ops.bottleneck_adapter_fwd(fx, fwd, fwu, fs, None, "tanh")
        assert wd_lp.numel() == 0 and wu_lp.numel() == 0  # bf16 weights: nothing cast
        assert out.shape == (5, 72) and hidden.shape == (5, 8)
        dx, dwd, dwu, ds = ops.bottleneck_adapter_bwd(out, fx, hidden, fwd, fwu, fs, "tanh", False)
        assert dwd.dtype == torch.float32 and ds.shape == (1,)


# ---------------------------------------------------------------------------------------------
# LoRA merge


def _merge_inputs(N, K, r, dtype, transposed, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(N, K, device="cuda", generator=g).to(dtype)
    a = torch.randn(r, K, device="cuda", generator=g) / math.sqrt(K)
    b = torch.randn(N, r, device="cuda", generator=g)  # non-zero B: merge is not trivially right
    if transposed:
        w = w.t().contiguous()
    return w, a, b


@pytest.mark.parametrize("transposed", [False, True], ids=["plain", "fan_in_fan_out"])
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)
@pytest.mark.parametrize(
    ("N", "K", "r"), [(1, 1, 1), (3, 17, 3), (129, 100, 8), (72, 4099, 16), (300, 520, 64), (257, 264, 33)]
)
def test_merge_matches_reference(ops, N, K, r, dtype, transposed):
    w, a, b = _merge_inputs(N, K, r, dtype, transposed)
    s = 0.37
    delta64 = s * (b.double() @ a.double())
    if transposed:
        delta64 = delta64.t()
    ref = w.double() + delta64
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        delta32 = s * (b @ a)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    eager = (w.float() + (delta32.t() if transposed else delta32)).to(dtype)

    w0 = w.clone()
    flag = ops.lora_merge_(w, a, b, s, transposed)
    assert flag.dtype == torch.int32 and flag.shape == (1,) and flag.item() == 0
    assert not torch.equal(w, w0), "merge did not change the weight"
    _check_close("merged weight", w, eager, ref, dtype)

    # Unmerge (sign=-1) returns to the original up to two roundings.
    flag = ops.lora_merge_(w, a, b, s, transposed, sign=-1)
    assert flag.item() == 0
    ulp = EPS[dtype] * w0.double().abs().clamp_min(1e-3)
    assert ((w.double() - w0.double()).abs() <= 2 * ulp + 2 * EPS[dtype] * delta64.abs()).all()


def test_merge_strided_view_in_place(ops):
    # Only the viewed columns change; the merge writes through the view's row stride.
    base = torch.randn(65, 300, device="cuda", dtype=torch.bfloat16)
    before = base.clone()
    w = base[:, 10:210]
    a = torch.randn(4, 200, device="cuda")
    b = torch.randn(65, 4, device="cuda")
    ops.lora_merge_(w, a, b, 0.5, False)
    ref = (before[:, 10:210].float() + 0.5 * (b @ a)).to(torch.bfloat16)
    err = (base[:, 10:210].float() - ref.float()).abs().max().item()
    assert err <= 2 * EPS[torch.bfloat16] * ref.float().abs().max().item()
    assert torch.equal(base[:, :10], before[:, :10]) and torch.equal(base[:, 210:], before[:, 210:])


def test_merge_flags_nan_and_overflow(ops):
    w, a, b = _merge_inputs(40, 48, 4, torch.float16, False)
    b_nan = b.clone()
    b_nan[3, 1] = float("nan")
    assert ops.lora_merge_(w.clone(), a, b_nan, 1.0, False).item() == 1

    # Finite in fp32 but past fp16's max after rounding: must be flagged.
    w = torch.full((40, 48), 65000.0, device="cuda", dtype=torch.float16)
    a = torch.ones(1, 48, device="cuda")
    b = torch.full((40, 1), 1000.0, device="cuda")
    w_before = w.clone()
    flag = ops.lora_merge_(w, a, b, 1.0, False, check_only=True)
    assert flag.item() == 1
    assert torch.equal(w, w_before), "check_only must not write"
    assert ops.lora_merge_(w, a, b, 1.0, False).item() == 1

    # A clean merge leaves the flag at 0, also with check_only.
    w, a, b = _merge_inputs(40, 48, 4, torch.bfloat16, True)
    w_before = w.clone()
    assert ops.lora_merge_(w, a, b, 1.0, True, check_only=True).item() == 0
    assert torch.equal(w, w_before)


def test_merge_bad_inputs(ops):
    w, a, b = _merge_inputs(8, 16, 2, torch.bfloat16, False)
    with pytest.raises(RuntimeError, match="lora_a must be float32"):
        ops.lora_merge_(w, a.bfloat16(), b, 1.0, False)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ops.lora_merge_(w, a, b, 1.0, True)
    with pytest.raises(RuntimeError, match="lora_b must have shape"):
        ops.lora_merge_(w, a, b[:, :1], 1.0, False)
    with pytest.raises(RuntimeError, match="sign"):
        ops.lora_merge_(w, a, b, 1.0, False, sign=2)


# ---------------------------------------------------------------------------------------------
# compute-sanitizer on small cases (every kernel, both load paths)

_SANITIZER_SCRIPT = textwrap.dedent(
    """
    import torch
    import fastadapt  # declares the ops' schemas
    from fastadapt.ops import _native
    assert _native.native_available(), _native.native_load_error()
    ns = torch.ops.fastadapt
    class ops:
        bottleneck_adapter_fwd = ns.bottleneck_adapter_cuda_fwd
        bottleneck_adapter_bwd = ns.bottleneck_adapter_cuda_bwd
        lora_merge_ = ns.lora_merge_cuda_
    torch.manual_seed(0)
    s = torch.tensor([0.5], device="cuda")
    for dtype in (torch.bfloat16, torch.float16):
        for (M, d, b) in ((17, 72, 24), (5, 100, 8), (70, 64, 264)):
            x = torch.randn(M, d, device="cuda", dtype=dtype)
            wd = torch.randn(b, d, device="cuda", dtype=dtype) / d ** 0.5
            wu = torch.randn(d, b, device="cuda", dtype=dtype) / b ** 0.5
            for res in (None, torch.randn(M, d, device="cuda", dtype=dtype)):
                out, h, *_ = ops.bottleneck_adapter_fwd(x, wd, wu, s, res, "gelu")
                dout = torch.randn_like(out)
                ops.bottleneck_adapter_bwd(dout, x, h, wd, wu, s, "gelu", res is not None)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for (N, K, r, t) in ((33, 40, 3, False), (17, 100, 40, True), (3, 1, 1, False)):
            w = torch.randn(*((K, N) if t else (N, K)), device="cuda").to(dtype)
            a, b = torch.randn(r, K, device="cuda"), torch.randn(N, r, device="cuda")
            ops.lora_merge_(w, a, b, 0.3, t)
    torch.cuda.synchronize()
    print("SANITIZER_SCRIPT_OK")
    """
)


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "compute-sanitizer").exists():
        return str(Path(CUDA_HOME) / "bin" / "compute-sanitizer")
    return None


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck", "initcheck"])
def test_compute_sanitizer_clean(ops, tool):
    exe = _sanitizer()
    if exe is None:
        pytest.skip("compute-sanitizer not found")
    from fastadapt.ops import _native

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if _native.jit_cache_dir() is not None:  # load the parent's JIT build, never compile a second one
        env["FASTADAPT_CACHE_DIR"] = str(_native.jit_cache_dir())
    cmd = [exe, "--tool", tool, "--error-exitcode", "86"]
    if tool == "memcheck":
        cmd += ["--leak-check", "no"]
    proc = subprocess.run(
        cmd + [sys.executable, "-c", _SANITIZER_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0 and "SANITIZER_SCRIPT_OK" in proc.stdout, f"{tool} failed:\n{tail}"
