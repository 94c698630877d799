"""Layer-1 tests of kernels/fastadapt_kernels/lora_linear_4bit.py in the interpreter: the dequantizing
GEMM (forward and the dX orientation) and the dequantize kernel against bitsandbytes' own
``dequantize_4bit`` followed by a float64 matmul, at odd shapes (M in {1, 3, 17}, K not a multiple
of the block size or odd, N not a multiple of the tiles), NF4 and FP4, with and without double
quantization, block sizes 32/64/128, fp32 and bf16, with the dropout mask and a bias.

The oracle is bitsandbytes' reference dequantization (its torch backend, ``backends/default``): its
CPU C++ kernel (0.50.2) decodes rows shorter than a block (e.g. 48 columns, blocksize 64) off the
layout its quantizer wrote (error 0.38 on a weight whose quantization error is 0.077, measured);
the CUDA kernel and the reference agree with the quantizer, and so do we.

Tolerance: fp32 ~1e-5 of the largest reference value (fp32 accumulation); bf16: 2x the error of
torch's bf16 matmul on the same dequantized values plus one output ulp (4e-3), the house rule.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
bnb = pytest.importorskip("bitsandbytes", reason="the 4-bit tests need bitsandbytes: pip install 'fastadapt[quant]'")

from fastadapt.kernels import _common  # noqa: E402
from fastadapt.kernels import lora_linear_4bit as Q  # noqa: E402

F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every float buffer the launchers allocate starts as NaN, so an unwritten element shows."""
    real = _common.alloc

    def nan_alloc(shape, *, dtype, device):
        t = real(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(_common, "alloc", nan_alloc)


def bnb_dequantize(packed, state) -> torch.Tensor:
    """bitsandbytes' reference (torch backend) dequantization, fp32."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = _get_4bit_code(state.quant_type, packed.device)
    return _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), code, state.blocksize, state.shape,
                                    torch.float32)


def quantized(n, k, *, quant_type="nf4", nested=True, blocksize=64, seed=0):
    """(bitsandbytes' dequantized fp32 weight, the launcher arguments) of a random (n, k) weight."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.2
    packed, state = bnb.functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested,
                                                 quant_type=quant_type)
    ref = bnb_dequantize(packed, state)
    args = {"packed": packed.reshape(-1), "code": state.code.float(), "absmax": state.absmax.reshape(-1)}
    kw = {"shape": (n, k), "blocksize": blocksize,
          "nested": (state.state2.absmax, state.state2.code.float(), state.offset.reshape(1).float(),
                     state.state2.blocksize)
          if nested else None}
    return ref, args, kw


def rand(*shape, seed=1, dtype=F32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def check(out, want64, torch_low=None):
    assert not torch.isnan(out).any(), "an output element was not written"
    err = (out.double() - want64).abs().max().item()
    top = want64.abs().max().item()
    if out.dtype == F32:
        assert err <= 2e-5 * max(top, 1.0), err
    else:
        base = (torch_low.double() - want64).abs().max().item()
        assert err <= 2 * base + 4e-3 * top, (err, base)


CASES = [  # (M, N, K, quant_type, nested, blocksize): aligned (K % blocksize == 0, K even) and not
    (3, 40, 128, "nf4", True, 64),
    (17, 72, 200, "nf4", False, 64),
    (1, 33, 96, "fp4", True, 32),
    (5, 48, 48, "nf4", True, 64),
    (3, 50, 256, "fp4", False, 128),
    (4, 24, 37, "nf4", True, 64),  # odd K: rows start mid-byte
]


@pytest.mark.parametrize("m,n,k,qt,nested,bs", CASES)
def test_dequantize_kernel_equals_bitsandbytes(m, n, k, qt, nested, bs):
    ref, args, kw = quantized(n, k, quant_type=qt, nested=nested, blocksize=bs)
    out = Q.dequantize_4bit(args["packed"], args["code"], args["absmax"], dtype=F32, **kw)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("m,n,k,qt,nested,bs", CASES)
def test_forward_gemm_vs_bitsandbytes_dequantize_then_matmul(m, n, k, qt, nested, bs, dtype):
    ref, args, kw = quantized(n, k, quant_type=qt, nested=nested, blocksize=bs)
    r = 3
    x, s, b, bias = rand(m, k, dtype=dtype), rand(m, r, seed=2, dtype=dtype), rand(n, r, seed=3), rand(n, seed=4)
    out = Q.lora_gemm_4bit(x, args["packed"], args["code"], args["absmax"], s, b, bias=bias.to(dtype), **kw)
    w = ref.to(dtype)  # the kernel rounds the dequantized values to the compute dtype, as .to(dtype) does
    want = x.double() @ w.double().t() + s.double() @ b.to(dtype).double().t() + bias.to(dtype).double()
    low = x @ w.t() + s @ b.to(dtype).t() + bias.to(dtype)
    check(out, want, low)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("m,n,k,qt,nested,bs", CASES)
def test_dx_gemm_vs_bitsandbytes_dequantize_then_matmul(m, n, k, qt, nested, bs, dtype):
    """dX = dY deq(W) + scale · mask ⊙ (dS A) through the same dequantizing load."""
    ref, args, kw = quantized(n, k, quant_type=qt, nested=nested, blocksize=bs)
    r = 4
    dy, ds, a = rand(m, n, dtype=dtype), rand(m, r, seed=2), rand(r, k, seed=3)
    bits = _common.dropout_bits(7, m, k, 0.3, device="cpu")
    keep = _common.unpack_bits(bits, k)
    out = Q.lora_gemm_4bit(dy, args["packed"], args["code"], args["absmax"], ds, a.t(), trans_w=True, scale=0.7,
                           bits=bits, **kw)
    w = ref.to(dtype)
    want = dy.double() @ w.double() + 0.7 * keep.double() * (ds.double() @ a.double())
    low = dy @ w + (0.7 * keep * (ds @ a)).to(dtype)
    check(out, want, low)


def test_decode_and_batch_configs_cover_the_same_math():
    """The GPU tile choices (decode / batch) run in the interpreter too when passed explicitly."""
    ref, args, kw = quantized(64, 128, nested=True)
    x, s, b = rand(2, 128), rand(2, 2, seed=2), rand(64, 2, seed=3)
    want = x.double() @ ref.double().t() + s.double() @ b.double().t()
    for m in (1, 4096):
        cfg = Q.gemm_4bit_config(m, trans_w=False)
        cfg = {**cfg, "BLOCK_M": 16, "num_stages": 1}  # the interpreter needs no 128-row tile to check the math
        out = Q.lora_gemm_4bit(x, args["packed"], args["code"], args["absmax"], s, b, config=cfg, **kw)
        check(out, want)
