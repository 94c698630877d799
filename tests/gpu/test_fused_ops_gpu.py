"""Op-level GPU correctness, one test per verification-record key (op, backend, shape class, variant).

``scripts/gpu-check.sh`` runs this file and ``scripts/gpu_records.py`` reads its results: a record is
written only for a key whose test passed here (and for which no GPU test that checks the same op and
backend failed: ``gpu_records.TEST_OPS``). Every case compares the op (forward and every gradient)
with a float64 reference that uses the same dropout mask; the tolerance is twice the error of the
same computation in eager PyTorch in the op's dtype, plus a little slack (DESIGN.md's rule). The CPU test ``tests/ops/test_gpu_harness.py``
runs the Triton cases of this harness in the interpreter at small sizes, so the harness itself is
tested where there is no GPU.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch

import fastadapt as fa
from fastadapt.ops._inputs import draw_seed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

VARIANTS = ("addmm", "epilogue", "fused")
VARIANTS_4BIT = ("fused", "dequantize")  # fastadapt.ops.lora_linear_4bit.VARIANTS
#: NF4's 16 values (bitsandbytes' table, QLoRA paper)
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
#: rows per shape class (verification.shape_class: decode ≤ 64 < batch) and the widths used
ROWS = {"decode": 16, "batch": 8192}  # 8192: the series adapter's fused (64-row wgmma) plan
WIDTH = (1024, 1536)  # K (d), N; odd enough: N is not a power of two


@dataclass(frozen=True)
class Case:
    op: str
    backend: str
    shape_class: str
    variant: str  # the LoRA join variant, "default" where the op has none
    dropout: float

    @property
    def id(self) -> str:
        return f"{self.op}-{self.backend}-{self.shape_class}-{self.variant}-p{self.dropout:g}"


def cases() -> list[Case]:
    out = []
    for cls in ROWS:
        for p in (0.0, 0.1):
            for v in VARIANTS:
                out += [Case(op, "triton", cls, v, p)
                        for op in ("lora_linear", "lora_linear_group", "parallel_adapter", "dora_linear")]
            out.append(Case("bottleneck_adapter", "triton", cls, "default", p))
            out += [Case("lora_linear_4bit", "triton", cls, v, p) for v in VARIANTS_4BIT]
        out += [Case("bottleneck_adapter", "cuda", cls, "default", 0.0),
                Case("parallel_adapter", "cuda", cls, "default", 0.0)]
    out.append(Case("lora_merge", "cuda", "any", "default", 0.0))
    return out


def _mask(seed_state: int, m: int, k: int, p: float, device) -> torch.Tensor | None:
    """The keep mask the op drew (re-drawn from the same torch RNG state), scaled: mask · 1/(1-p)."""
    if p == 0:
        return None
    from fastadapt.kernels import _common

    torch.manual_seed(seed_state)
    keep = _common.dropout_mask(draw_seed(device), m, k, p, device=device)
    return keep.to(torch.float64) * _common.keep_scale(p)


def _act(name, h):
    return {"tanh": torch.tanh, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
            "relu": torch.relu}[name](h)


def _compare(name: str, got: torch.Tensor, same: torch.Tensor, exact: torch.Tensor, slack: float) -> None:
    exact = exact.double()
    err = (got.double() - exact).abs().max().item()
    base = (same.double() - exact).abs().max().item()
    tol = 2.0 * base + slack * max(exact.abs().max().item(), 1.0)
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert err <= tol, f"{name}: error {err:.3e} > tol {tol:.3e} (eager same-dtype error {base:.3e})"


def weight4bit(n: int, k: int, generator: torch.Generator, device, *, scale: float):
    """A random double-quantized NF4 weight (block size 64) in bitsandbytes' layout, drawn on ``device``:
    any packed byte is a valid pair of codes, so no quantizer (nor bitsandbytes) is needed; the
    reference is its exact dequantization (checked against bitsandbytes' in tests/kernels)."""
    blocks = -(-n * k // 64)
    packed = torch.randint(0, 256, ((n * k + 1) // 2,), generator=generator, device=device, dtype=torch.uint8)
    q = torch.randint(0, 256, (blocks,), generator=generator, device=device, dtype=torch.uint8)
    outer = torch.rand(-(-blocks // 256), generator=generator, device=device) * 0.5 * scale
    return fa.ops.Weight4bit(packed, torch.tensor(NF4, device=device), q, (n, k), 64, nested_absmax=outer,
                      nested_code=torch.linspace(-1, 1, 256, device=device), nested_offset=torch.tensor(scale, device=device))


def check_case(case: Case, device: torch.device, rows: int, width: tuple[int, int], dtype=torch.bfloat16,
               monkeypatch=None) -> None:
    """Run ``case`` on ``device`` and compare it with float64 (forward and every gradient)."""
    if case.op == "lora_linear_4bit":  # its variant is chosen by rows until a record picks one: pin it
        op4 = importlib.import_module("fastadapt.ops.lora_linear_4bit")  # the module (the package exports the op)
        assert monkeypatch is not None, "a 4-bit case pins its variant with monkeypatch"
        monkeypatch.setattr(op4, "FUSED_MAX_ROWS", 1 << 62 if case.variant == "fused" else 0)
    elif monkeypatch is not None and case.variant in VARIANTS:
        monkeypatch.setenv("FASTADAPT_LORA_VARIANT", case.variant)
    slack = {torch.bfloat16: 2e-3, torch.float16: 5e-4, torch.float32: 1e-5}[dtype]
    k, n = width
    m = rows
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    if case.op == "lora_merge":
        w = rnd(n, k, scale=k**-0.5)
        a, b = rnd(8, k, scale=k**-0.5, dt=torch.float32), rnd(n, 8, scale=0.1, dt=torch.float32)
        exact = w.double() + 0.5 * (b.double() @ a.double())
        same = w + (0.5 * (b @ a)).to(dtype)
        got = w.clone()
        fa.ops.lora_merge(got, a, b, scaling=0.5, backend=case.backend)
        _compare("merged weight", got, same, exact, slack)
        return

    p, seed_state = case.dropout, 1234
    x = rnd(m, k)
    dy = rnd(m, n if case.op != "bottleneck_adapter" else k)
    if case.op in ("lora_linear", "lora_linear_group"):
        sizes = (n,) if case.op == "lora_linear" else (n, n // 2, 64)
        ws = [rnd(size, k, scale=k**-0.5) for size in sizes]
        As = [rnd(8, k, scale=k**-0.5, dt=torch.float32) for _ in sizes]
        Bs = [rnd(size, 8, scale=0.1, dt=torch.float32) for size in sizes]
        dys = [dy[:, :size] if size <= n else rnd(m, size) for size in sizes]
        biases = [None if i == 1 else rnd(size) for i, size in enumerate(sizes)]  # the group: with and without
        params = [*As, *Bs]

        def run(xx, ps, backend):
            a_s, b_s = ps[:len(sizes)], ps[len(sizes):]
            if case.op == "lora_linear":
                return [fa.ops.lora_linear(xx, ws[0], a_s[0], b_s[0], scaling=2.0, bias=biases[0], dropout_p=p,
                                           backend=backend)]
            return fa.ops.lora_linear_group(xx, ws, list(a_s), list(b_s), scaling=2.0, biases=biases, dropout_p=p,
                                            backend=backend)

        def formula(xx, ps, keep, dt):
            a_s, b_s = ps[:len(sizes)], ps[len(sizes):]
            xd = xx if keep is None else xx * keep.to(dt)
            return [xx @ w.to(dt).T + (0 if c is None else c.to(dt)) + 2.0 * ((xd @ a.to(dt).T) @ b.to(dt).T)
                    for w, a, b, c in zip(ws, a_s, b_s, biases)]
    elif case.op == "lora_linear_4bit":
        w4 = weight4bit(n, k, g, device, scale=k**-0.5)
        a, b = rnd(8, k, scale=k**-0.5, dt=torch.float32), rnd(n, 8, scale=0.1, dt=torch.float32)
        bias = rnd(n)
        dys = [dy]
        params = [a, b]

        def run(xx, ps, backend):
            return [fa.ops.lora_linear_4bit(xx, w4, *ps, scaling=2.0, bias=bias, dropout_p=p, backend=backend)]

        def formula(xx, ps, keep, dt):
            """The frozen product in the compute dtype (x's): deq(W) rounded to it once, as the op forms it."""
            a_, b_ = ps
            xd = xx if keep is None else xx * keep.to(dt)
            return [xx @ w4.dequantize(dt).T + bias.to(dt) + 2.0 * ((xd @ a_.to(dt).T) @ b_.to(dt).T)]
    elif case.op == "dora_linear":
        w = rnd(n, k, scale=k**-0.5)
        a, b = rnd(8, k, scale=k**-0.5, dt=torch.float32), rnd(n, 8, scale=0.1, dt=torch.float32)
        mag = (w.float().norm(dim=1) * (1 + 0.1 * torch.rand(n, generator=g, device=device))).float()
        bias = rnd(n)
        dys = [dy]
        params = [a, b, mag]

        def run(xx, ps, backend):
            return [fa.ops.dora_linear(xx, w, *ps, scaling=2.0, bias=bias, dropout_p=p, backend=backend)]

        def formula(xx, ps, keep, dt):
            """PEFT's DoRA: y = x Wᵀ + b + (g - 1) ⊙ x_d Wᵀ + g ⊙ s (x_d Aᵀ) Bᵀ, g = m / ‖W + s B A‖ (detached)."""
            a_, b_, m_ = ps
            wd = w.to(dt)
            nt = torch.float64 if dt == torch.float64 else torch.float32  # the op forms norms in fp32
            norm = (w.to(nt) + 2.0 * (b_.to(nt) @ a_.to(nt))).norm(dim=1).to(dt).detach()
            gain = m_.to(dt) / norm
            xd = xx if keep is None else xx * keep.to(dt)
            lora = gain * (2.0 * ((xd @ a_.to(dt).T) @ b_.to(dt).T))
            return [xx @ wd.T + bias.to(dt) + (gain - 1) * (xd @ wd.T) + lora]  # the bias is not rescaled
    else:
        b_dim = 64
        wd, scaling = rnd(b_dim, k, scale=k**-0.5, dt=torch.float32), torch.tensor([0.75], device=device)
        if case.op == "bottleneck_adapter":
            wu = rnd(k, b_dim, scale=b_dim**-0.5, dt=torch.float32)
            w = None
        else:
            wu = rnd(n, b_dim, scale=b_dim**-0.5, dt=torch.float32)
            w = rnd(n, k, scale=k**-0.5)
        dys = [dy]
        params = [wd, wu, scaling]

        def run(xx, ps, backend):
            wd_, wu_, s_ = ps
            if case.op == "bottleneck_adapter":
                return [fa.ops.bottleneck_adapter(xx, wd_, wu_, activation="gelu", scaling=s_, dropout_p=p,
                                                  backend=backend)]
            return [fa.ops.parallel_adapter(xx, w, wd_, wu_, activation="gelu", scaling=s_, dropout_p=p,
                                            backend=backend)]

        def formula(xx, ps, keep, dt):
            wd_, wu_, s_ = ps
            xd = xx if keep is None else xx * keep.to(dt)
            term = s_.to(dt) * (_act("gelu", xd @ wd_.to(dt).T) @ wu_.to(dt).T)
            return [(xx if w is None else xx @ w.to(dt).T) + term]

    inputs = [x.requires_grad_(), *[t.requires_grad_() for t in params]]
    torch.manual_seed(seed_state)
    outs = run(inputs[0], inputs[1:], case.backend)
    got_grads = torch.autograd.grad(outs, inputs, dys)
    keep = _mask(seed_state, m, k, p, x.device)  # the generator the op drew from: its input's device

    def reference(dt):
        ins = [t.detach().to(dt).requires_grad_() for t in inputs]
        ys = formula(ins[0], ins[1:], keep, dt)
        return ys, torch.autograd.grad(ys, ins, [d.to(dt) for d in dys])

    exact_y, exact_g = reference(torch.float64)
    same_y, same_g = reference(dtype)
    for i, (got, same, exact) in enumerate(zip(outs, same_y, exact_y)):
        assert got.dtype == dtype and got.shape == exact.shape
        _compare(f"output {i}", got, same, exact, slack)
    names = ["dx"] + [f"d param {i}" for i in range(len(params))]
    for name, got, same, exact in zip(names, got_grads, same_g, exact_g):
        assert got.abs().sum() > 0, f"{name} is all zeros"
        _compare(name, got, same, exact, slack)


#: FASTADAPT_TINY_SHAPES (the CPU rehearsal of scripts/gpu-check.sh): the sizes and dtype of
#: tests/ops/test_gpu_harness.py, which the Triton interpreter runs in seconds
TINY_ROWS, TINY_WIDTH = {"decode": 16, "batch": 70}, (48, 40)


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_op_matches_float64(case, monkeypatch):
    from fastadapt import settings

    if case.backend == "cuda":
        from fastadapt.ops import _native

        if not _native.native_available():
            pytest.fail(f"the CUDA extension is unavailable: {_native.native_load_error()}")
    tiny = settings.flag("FASTADAPT_TINY_SHAPES")
    rows, width = (TINY_ROWS, TINY_WIDTH) if tiny else (ROWS, WIDTH)
    check_case(case, torch.device("cuda"), 1 if case.shape_class == "any" else rows[case.shape_class], width,
               dtype=torch.float32 if tiny else torch.bfloat16, monkeypatch=monkeypatch)
