"""fa.ops.lora_linear_4bit, both backends and both Triton variants (fused dequantizing GEMM and
dequantize + cuBLAS path), forward and every gradient, against float64 on bitsandbytes' dequantized
weight; odd shapes, a 3-D input, a bias. The Triton backend runs in the interpreter here."""

from __future__ import annotations

import importlib

import pytest
import torch

op = importlib.import_module("fastadapt.ops.lora_linear_4bit")

bnb = pytest.importorskip("bitsandbytes", reason="the 4-bit op tests need bitsandbytes: pip install 'fastadapt[quant]'")


def weight4(n, k, *, nested=True, quant_type="nf4", seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.2
    packed, st = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    return op.Weight4bit(packed.reshape(-1), st.code.float(), st.absmax.reshape(-1), (n, k), 64, None,
                         st.state2.absmax if nested else None, st.state2.code.float() if nested else None,
                         st.offset.float() if nested else None)


def run(backend, x, weight, a, b, bias):
    x = x.detach().clone().requires_grad_(True)
    a = a.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    y = op.lora_linear_4bit(x, weight, a, b, scaling=1.5, bias=bias, backend=backend)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    (y * g).sum().backward()
    return y.detach(), x.grad, a.grad, b.grad, g


@pytest.mark.parametrize("variant_rows", [10**9, 0])  # fused at every M; dequantize + cuBLAS at every M
@pytest.mark.parametrize("shape", [(3, 40, 128, True), (2, 5, 72, 200, False)])
def test_both_backends_match_float64(monkeypatch, shape, variant_rows):
    monkeypatch.setattr(op, "FUSED_MAX_ROWS", variant_rows)
    *lead, n, k, nested = shape
    weight = weight4(n, k, nested=nested)
    gen = torch.Generator().manual_seed(1)
    x, a, b = torch.randn(*lead, k, generator=gen), torch.randn(3, k, generator=gen) * 0.3, torch.randn(n, 3,
                                                                                                          generator=gen)
    bias = torch.randn(n, generator=gen)
    w64 = weight.dequantize(torch.float64)
    xd, ad, bd = (t.double().requires_grad_(True) for t in (x, a, b))
    want = xd @ w64.t() + bias.double() + 1.5 * (xd @ ad.t()) @ bd.t()
    for backend in ("torch", "triton"):
        y, dx, da, db, g = run(backend, x, weight, a, b, bias)
        if backend == "torch":
            want.backward(g.double())
        for got, ref in ((y, want), (dx, xd.grad), (da, ad.grad), (db, bd.grad)):
            assert got.shape == ref.shape
            assert (got.double() - ref).abs().max() <= 1e-4 * max(ref.abs().max().item(), 1.0), backend


def test_torch_path_keeps_no_dequantized_weight_for_backward():
    weight = weight4(64, 128)
    x = torch.randn(4, 128, requires_grad=True)
    y = op.lora_linear_4bit(x, weight, torch.randn(2, 128), torch.zeros(64, 2), scaling=1.0, backend="torch")
    saved, node, todo = [], y.grad_fn, [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is None:
            continue
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                saved += [value] if isinstance(value, torch.Tensor) else [v for v in value if isinstance(v, torch.Tensor)] \
                    if isinstance(value, (tuple, list)) else []
        saved += list(getattr(node, "saved_tensors", ()) or ())
        todo += [f for f, _ in node.next_functions]
    assert not any(t.shape == (64, 128) and t.is_floating_point() for t in saved)


def test_bad_arguments_are_named():
    weight = weight4(8, 64)
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match="weight must be a fastadapt.ops.Weight4bit"):
        op.lora_linear_4bit(x, torch.randn(8, 64), torch.randn(2, 64), torch.randn(8, 2), scaling=1.0)
    with pytest.raises(ValueError, match=r"lora_b must have shape \(out_features, r\) = \(8, 2\)"):
        op.lora_linear_4bit(x, weight, torch.randn(2, 64), torch.randn(8, 3), scaling=1.0)
    with pytest.raises(ValueError, match="x must have last dimension in_features = 64"):
        op.lora_linear_4bit(torch.randn(2, 63), weight, torch.randn(2, 64), torch.randn(8, 2), scaling=1.0)
