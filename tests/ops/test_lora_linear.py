"""fa.ops.lora_linear on the Triton backend (interpreter on CPU) vs a float64 reference."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from helpers import enable_activation_checkpointing, norm_rel_err, randomize_adapters, rel_err
from tiny_models import tiny_model, tokens

import fastadapt as fa
from fastadapt.kernels import _common as kernel_common
from fastadapt.ops._inputs import draw_seed
from fastadapt.ops.reference import lora_linear_ref

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

op_module = importlib.import_module("fastadapt.ops.lora_linear")  # the module, not the function
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(m, k, n, r, *, dtype=torch.float32, bias=True, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)
    x = rnd(*lead, m, k).to(DEVICE, dtype).requires_grad_()
    w = (rnd(n, k) / k**0.5).to(DEVICE, dtype)
    a = (rnd(r, k) / k**0.5).to(DEVICE).requires_grad_()  # fp32 adapter params, as LoraLinear keeps them
    b = (rnd(n, r) * 0.1).to(DEVICE).requires_grad_()
    c = rnd(n).to(DEVICE, dtype) if bias else None
    return x, w, a, b, c


def grads(y, inputs, seed=1):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    return torch.autograd.grad(y, inputs, g)


@pytest.fixture(params=op_module.VARIANTS)
def fused_gemm(request, monkeypatch):
    """Every way of joining the rank term to the frozen GEMM (addmm, epilogue, fused)."""
    monkeypatch.setenv("FASTADAPT_LORA_VARIANT", request.param)
    return request.param


@pytest.mark.parametrize("m,k,n,r", [(1, 40, 72, 1), (3, 72, 40, 3), (17, 100, 72, 8), (129, 40, 100, 16)])
def test_forward_and_grads_match_float64(fused_gemm, m, k, n, r):
    x, w, a, b, c = make(m, k, n, r, lead=(2,) if m == 17 else ())
    y = fa.ops.lora_linear(x, w, a, b, scaling=1.7, bias=c, backend="triton")
    ref_in = [t.detach().double().requires_grad_() for t in (x, a, b)]
    y_ref = lora_linear_ref(ref_in[0], w.double(), ref_in[1], ref_in[2], scaling=1.7, bias=c.double())
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    assert rel_err(y, y_ref) < 1e-5
    for got, want in zip(grads(y, (x, a, b)), grads(y_ref, ref_in)):
        assert got.abs().sum() > 0
        assert norm_rel_err(got, want) < 1e-5


def test_non_contiguous_input_and_transposed_weight(fused_gemm):
    x_wide, w_t, a, b, _ = make(9, 96, 40, 4, bias=False)
    x = x_wide[:, 5:77]  # a column slice: strided, not copied
    w = torch.randn(72, 40, device=DEVICE).t()  # (N=40, K=72) view of a (K, N) weight, like Conv1D
    a = torch.randn(4, 72, device=DEVICE, requires_grad=True)
    y = fa.ops.lora_linear(x, w, a, b, scaling=0.5, backend="triton")
    y_ref = lora_linear_ref(x.double(), w.double(), a.double(), b.double(), scaling=0.5)
    assert rel_err(y, y_ref) < 1e-5
    gx, ga = grads(y, (x_wide, a))
    xd = x_wide.detach().double().requires_grad_()
    ad = a.detach().double().requires_grad_()
    y2 = lora_linear_ref(xd[:, 5:77], w.double(), ad, b.detach().double(), scaling=0.5)
    rx, ra = grads(y2, (xd, ad))
    assert norm_rel_err(gx, rx) < 1e-5 and norm_rel_err(ga, ra) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_2x_of_torch_same_dtype(dtype):
    x, w, a, b, c = make(33, 72, 100, 8, dtype=dtype)
    y = fa.ops.lora_linear(x, w, a, b, scaling=2.0, bias=c, backend="triton")
    same_dtype = lora_linear_ref(x, w, a, b, scaling=2.0, bias=c)
    exact_in = [t.detach().double().requires_grad_() for t in (x, a, b)]  # float64 leaves: exact grads
    exact = lora_linear_ref(exact_in[0], w.double(), exact_in[1], exact_in[2], scaling=2.0, bias=c.double())
    assert y.dtype == dtype
    assert rel_err(y, exact) <= 2 * rel_err(same_dtype, exact) + 1e-3
    for got, same, want in zip(grads(y, (x, a, b)), grads(same_dtype, (x, a, b)), grads(exact, exact_in)):
        assert norm_rel_err(got, want) <= 2 * norm_rel_err(same, want) + 1e-3


def test_dropout_mask_drawn_once_and_reused_in_backward(fused_gemm):
    kernels = op_module._kernels()
    p = 0.3
    x, w, a, b, _ = make(40, 64, 48, 4, bias=False)
    torch.manual_seed(123)
    y = fa.ops.lora_linear(x, w, a, b, scaling=1.5, dropout_p=p, backend="triton")
    torch.manual_seed(123)
    seed = draw_seed(x.device)
    mask = kernels.dropout_mask(seed, 40, 64, p, device=x.device)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.05
    # the reference with exactly that mask: kept values scaled by 1/(1-p)
    xd, ad, bd = (t.detach().double().requires_grad_() for t in (x, a, b))
    dropped = xd * mask * kernel_common.keep_scale(p)
    y_ref = xd @ w.double().t() + 1.5 * (dropped @ ad.t()) @ bd.t()
    assert rel_err(y, y_ref) < 1e-5
    for got, want in zip(grads(y, (x, a, b)), grads(y_ref, (xd, ad, bd))):
        assert norm_rel_err(got, want) < 1e-5
    # a new seed gives a new mask
    y2 = fa.ops.lora_linear(x, w, a, b, scaling=1.5, dropout_p=p, backend="triton")
    assert not torch.equal(y, y2)


def test_saved_tensors_are_x_s_and_the_mask_at_one_bit_per_element():
    x, w, a, b, _ = make(64, 48, 40, 4, bias=False)
    saved = []
    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fa.ops.lora_linear(x, w, a, b, scaling=1.0, dropout_p=0.2, backend="triton")
    activations = [t for t in saved if t.dim() == 2 and t.shape[0] == 64]
    assert {t.data_ptr() for t in activations if t.shape[1] == 48} == {x.data_ptr()}  # only X itself
    bits = [t for t in activations if t.dtype == torch.int32]
    assert [tuple(t.shape) for t in bits] == [(64, 2)]  # 48 columns in two 32-bit words: 1 bit each
    assert [tuple(t.shape) for t in activations if t.shape[1] != 48 and t.dtype != torch.int32] == [(64, 4)]  # S
    assert not any(t.dtype == torch.bool for t in saved)
    # the stored mask is the one the forward drew from its seed
    torch.manual_seed(3)
    want = kernel_common.dropout_mask(draw_seed(x.device), 64, 48, 0.2, device=x.device)
    assert torch.equal(kernel_common.unpack_bits(bits[0], 48), want)


def test_seed_under_graph_capture_is_a_device_tensor_the_kernel_reads(monkeypatch):
    """The plumbing of the graph-safe seed on CPU: with capture forced on, the op draws the seed as a
    one-element int64 tensor from torch's generator (on x's device) and hands the tensor itself to
    the shrink kernel, which draws the mask from its value; manual_seed repeats it, the next draw
    differs. (test_gpu_each_cuda_graph_replay_draws_a_fresh_mask: a real replay on a GPU.)"""
    from fastadapt.ops import _inputs

    monkeypatch.setattr(_inputs, "_capturing", lambda device: True)
    kernels = op_module._kernels()
    seeds = []
    real_shrink = kernels.lora_shrink
    monkeypatch.setattr(kernels, "lora_shrink", lambda x, a, **kw: seeds.append(kw["seed"]) or real_shrink(x, a, **kw))
    x, w, a, b, _ = make(33, 48, 40, 4, bias=False)
    saved = []
    torch.manual_seed(11)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fa.ops.lora_linear(x, w, a, b, scaling=1.0, dropout_p=0.3, backend="triton")
    (seed,) = seeds
    assert isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.numel() == 1
    assert seed.device == x.device
    torch.manual_seed(11)
    assert torch.equal(seed, torch.randint(0, 2**62, (1,), dtype=torch.int64))  # torch's generator drew it
    (bits,) = [t for t in saved if t.dtype == torch.int32]
    mask = kernel_common.dropout_mask(int(seed), 33, 48, 0.3, device=x.device)
    assert torch.equal(kernel_common.unpack_bits(bits, 48), mask)
    xd, wd = x.double(), w.double()
    y_ref = xd @ wd.t() + ((xd * mask) @ a.double().t()) @ b.double().t() / 0.7
    assert rel_err(y, y_ref) < 1e-5
    torch.manual_seed(11)
    assert torch.equal(fa.ops.lora_linear(x, w, a, b, scaling=1.0, dropout_p=0.3, backend="triton"), y)
    y_next = fa.ops.lora_linear(x, w, a, b, scaling=1.0, dropout_p=0.3, backend="triton")
    assert not torch.equal(seeds[2], seeds[1]) and not torch.equal(y_next, y)


def test_bad_backend_and_forced_backend(monkeypatch):
    x, w, a, b, _ = make(3, 8, 6, 2, bias=False)
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    calls = []
    real = torch.ops.fastadapt.lora_linear_fwd
    monkeypatch.setattr(op_module, "lora_linear_ref", lambda *a_, **k: calls.append("torch") or real)
    fa.ops.lora_linear(x, w, a, b, scaling=1.0)  # auto -> forced triton, never the reference
    assert calls == []
    monkeypatch.setenv("FASTADAPT_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FASTADAPT_BACKEND must be one of"):
        fa.ops.lora_linear(x, w, a, b, scaling=1.0)


def test_torch_compile_fullgraph_no_graph_break():
    x, w, a, b, c = make(5, 16, 12, 2)

    def f(x, a, b):
        return fa.ops.lora_linear(x, w, a, b, scaling=2.0, bias=c, dropout_p=0.1, backend="triton").sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, a, b)
    loss.backward()
    assert torch.isfinite(loss) and a.grad is not None and a.grad.abs().sum() > 0


# -- whole models through the Triton kernels ---------------------------------------------------------


def test_tiny_llama_triton_equals_torch_backend(monkeypatch):
    ids = tokens(2, 9)
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTADAPT_BACKEND", backend)
        model = tiny_model("llama").train()
        fa.patch(model, "lora", r=4, targets="all-linear", dropout=0.0)
        randomize_adapters(model, scale=0.1)
        res = model(ids, labels=ids)
        res.loss.backward()
        out[backend] = (res.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert rel_err(out["triton"][0], out["torch"][0]) < 1e-5
    for n, g in out["torch"][1].items():
        assert norm_rel_err(out["triton"][1][n], g) < 1e-5, n


def test_gradient_checkpointing_with_dropout_regenerates_the_same_mask(monkeypatch):
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    ids = tokens(2, 9)
    grads_by_mode = {}
    for mode in ("plain", "checkpointed"):
        model = tiny_model("llama").train()
        fa.patch(model, "lora", r=4, targets=["q_proj", "down_proj"], dropout=0.3)
        randomize_adapters(model, scale=0.1)
        if mode == "checkpointed":
            enable_activation_checkpointing(model, use_reentrant=False)
        torch.manual_seed(7)
        model(ids, labels=ids).loss.backward()
        grads_by_mode[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, g in grads_by_mode["plain"].items():
        assert norm_rel_err(grads_by_mode["checkpointed"][n], g) < 1e-5, n


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="real shapes: compiled kernels only")
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 11008), (11008, 4096)])
def test_gpu_real_shapes_bf16(k, n):
    x, w, a, b, _ = make(2048, k, n, 16, dtype=torch.bfloat16, bias=False)
    y = fa.ops.lora_linear(x, w, a, b, scaling=2.0, backend="triton")
    same = lora_linear_ref(x, w, a, b, scaling=2.0)
    exact = lora_linear_ref(x.float(), w.float(), a.float(), b.float(), scaling=2.0)
    assert rel_err(y, exact) <= 2 * rel_err(same, exact) + 1e-4
    for got, ref, want in zip(grads(y, (x, a, b)), grads(same, (x, a, b)), grads(exact, (x, a, b))):
        assert torch.isfinite(got).all()
        assert norm_rel_err(got, want) <= 2 * norm_rel_err(ref, want) + 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="CUDA graphs: compiled kernels only")
def test_gpu_each_cuda_graph_replay_draws_a_fresh_mask():
    """Under torch.cuda.graph the shrink reads its seed from a device tensor drawn inside the graph,
    so each replay draws a fresh mask (a host int would be baked in). W = 0, A = B = I, scaling 1:
    y = mask ⊙ x / (1-p) shows the mask itself."""
    k, m, p = 256, 512, 0.25
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16).abs() + 0.5
    w = torch.zeros(k, k, device="cuda", dtype=torch.bfloat16)
    eye = torch.eye(k, device="cuda")

    def step():
        return fa.ops.lora_linear(x, w, eye, eye, scaling=1.0, dropout_p=p, backend="triton")

    step()  # compile and autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    kept = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        keep = y != 0
        torch.testing.assert_close(y[keep].float(), (x[keep].float() / (1 - p)).to(torch.bfloat16).float())
        assert abs(keep.float().mean().item() - (1 - p)) < 0.02
        kept.append(keep.clone())
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[1], kept[2])


def test_shared_input_groups_read_x_once_per_group(monkeypatch):
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    kernels = op_module._kernels()
    calls = []
    real_shrink = kernels.lora_shrink
    monkeypatch.setattr(kernels, "lora_shrink", lambda x, a, **kw: calls.append(tuple(a.shape)) or real_shrink(x, a, **kw))
    model = tiny_model("llama")
    fa.patch(model, "lora", r=4, targets="all-linear", dropout=0.0)
    layer0 = model.model.layers[0]
    assert layer0.self_attn.q_proj.group is layer0.self_attn.v_proj.group is not None
    assert layer0.mlp.gate_proj.group is layer0.mlp.up_proj.group is not None
    assert layer0.self_attn.o_proj.group is None and layer0.mlp.down_proj.group is None
    with torch.no_grad():
        model(tokens(1, 5))
    # per layer: q/k/v (r=12), o, gate/up (r=8), down — 4 passes over an input instead of 7
    assert calls == [(12, 48), (4, 48), (8, 48), (4, 72)] * 2


def test_group_member_called_with_another_input_falls_back(monkeypatch):
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    model = tiny_model("llama")
    fa.patch(model, "lora", r=4, targets=["q_proj", "k_proj", "v_proj"], dropout=0.0)
    randomize_adapters(model)
    attn = model.model.layers[0].self_attn
    x1, x2 = torch.randn(3, 48), torch.randn(3, 48)
    with torch.no_grad():
        q = attn.q_proj(x1)
        k = attn.k_proj(x2)  # a different tensor: must not take the output computed for x1
        v = attn.v_proj(x1)
        for mod, x, got in ((attn.q_proj, x1, q), (attn.k_proj, x2, k), (attn.v_proj, x1, v)):
            want = lora_linear_ref(x, mod.base_layer.weight, mod.lora_A.weight, mod.lora_B.weight, scaling=mod.scaling)
            assert rel_err(got, want) < 1e-5


def test_group_member_output_is_not_handed_over_after_an_optimizer_step(monkeypatch):
    """The outputs the first member computed for its siblings are theirs within one forward only: a
    fused optimizer step (no version counter moves) before a sibling's call makes it recompute."""
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    model = tiny_model("llama")
    fa.patch(model, "lora", r=4, targets=["q_proj", "k_proj", "v_proj"], dropout=0.0)
    randomize_adapters(model)
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, 48)
    attn.q_proj(x).sum().backward()  # computes k's and v's outputs for x too
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.ones_like(p)
    torch.optim.AdamW(params, lr=0.1, fused=True).step()
    with torch.no_grad():
        k = attn.k_proj(x)
        m = attn.k_proj
        want = lora_linear_ref(x, m.base_layer.weight, m.lora_A.weight, m.lora_B.weight, scaling=m.scaling)
    assert rel_err(k, want) < 1e-5


def test_group_with_a_trainable_base_weight_falls_back_to_per_layer_ops(monkeypatch):
    """The grouped backward computes adapter gradients only: a base weight or bias that trains must
    get its gradient through the per-layer op."""
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    model = tiny_model("qwen2")  # q/k/v with biases
    fa.patch(model, "lora", r=4, targets=["q_proj", "k_proj", "v_proj"], dropout=0.0)
    attn = model.model.layers[0].self_attn
    attn.q_proj.base_layer.weight.requires_grad_(True)
    attn.k_proj.base_layer.bias.requires_grad_(True)
    x = torch.randn(5, 48)
    (attn.q_proj(x).sum() + attn.k_proj(x).sum() + attn.v_proj(x).sum()).backward()
    wq, bk = attn.q_proj.base_layer.weight, attn.k_proj.base_layer.bias
    assert wq.grad is not None and bk.grad is not None
    assert torch.allclose(wq.grad, torch.ones(wq.shape[0], 1) * x.sum(0), rtol=1e-5, atol=1e-5)
    assert torch.allclose(bk.grad, torch.full_like(bk, 5.0))


def test_lora_linear_group_with_dropout_biases_and_unused_members():
    kernels = op_module._kernels()
    p = 0.25
    x = torch.randn(9, 40, device=DEVICE, dtype=torch.float64).float().requires_grad_()
    ws = [torch.randn(n, 40, device=DEVICE) / 6 for n in (40, 24, 24)]
    As = [torch.randn(3, 40, device=DEVICE, requires_grad=True) for _ in range(3)]
    Bs = [torch.randn(n, 3, device=DEVICE, requires_grad=True) for n in (40, 24, 24)]
    cs = [torch.randn(40, device=DEVICE), None, torch.randn(24, device=DEVICE)]
    torch.manual_seed(5)
    ys = fa.ops.lora_linear_group(x, ws, As, Bs, scaling=1.5, biases=cs, dropout_p=p, backend="triton")
    torch.manual_seed(5)
    mask = kernels.dropout_mask(draw_seed(x.device), 9, 40, p, device=x.device)
    xd = x.detach().double().requires_grad_()
    Ad = [a.detach().double().requires_grad_() for a in As]
    Bd = [b.detach().double().requires_grad_() for b in Bs]
    dropped = xd * mask * kernel_common.keep_scale(p)  # one mask shared by the group
    refs = [xd @ w.double().t() + (0 if c is None else c.double()) + 1.5 * (dropped @ a.t()) @ b.t()
            for w, a, b, c in zip(ws, Ad, Bd, cs)]
    for y, r in zip(ys, refs):
        assert rel_err(y, r) < 1e-5
    weights = [torch.randn(y.shape, device=DEVICE) for y in ys]
    loss = (ys[0] * weights[0]).sum() + (ys[2] * weights[2]).sum()  # the middle member is unused
    loss_ref = (refs[0] * weights[0].double()).sum() + (refs[2] * weights[2].double()).sum()
    got = torch.autograd.grad(loss, [x, *As, *Bs])
    want = torch.autograd.grad(loss_ref, [xd, *Ad, *Bd], allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g.abs().max() == 0  # unused member: zero gradient
        else:
            assert g.abs().sum() > 0 and norm_rel_err(g, w) < 1e-5


def test_no_grad_path_sees_every_change_of_the_adapter():
    """The no-grad torch path casts A and B on every call (no cache: checking one would read as much):
    an optimizer step that moves no version counter (fused AdamW), a ``.data`` write and new storage
    all show in the next output."""
    x, w, a, b, _ = make(3, 40, 24, 4, dtype=torch.bfloat16, bias=False)

    def run():
        with torch.no_grad():
            got = fa.ops.lora_linear(x, w, a, b, scaling=1.0, backend="torch")
        want = lora_linear_ref(x.float(), w.float(), a.detach(), b.detach(), scaling=1.0)
        assert rel_err(got, want) < 2e-2
        return got

    first = run()
    fa.ops.lora_linear(x, w, a, b, scaling=1.0, backend="torch").float().sum().backward()
    torch.optim.AdamW([a, b], lr=0.1, fused=True).step()
    second = run()
    assert not torch.equal(second, first)
    b.data.copy_(torch.randn_like(b))  # same storage, same version, new values
    third = run()
    assert not torch.equal(third, second)
    a.data = torch.zeros_like(a)  # new storage, version unchanged
    with torch.no_grad():
        torch.testing.assert_close(run(), x @ w.T)
