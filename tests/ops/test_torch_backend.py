"""The torch backend (``fastadapt.ops.torch_backend``, what ``auto`` runs without a GPU record): the
reference's function — outputs bit for bit, gradients vs the reference and vs float64 at odd shapes —
from fewer saved tensors: x as given, the dropout mask at 1 bit per element (never a dropped copy,
never a byte mask), the frozen weight as the parameter under autocast. Dropout masks are
``F.dropout``'s (hence PEFT's), independent per adapter, and redrawn identically by checkpointing."""

from __future__ import annotations

import contextlib
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import enable_activation_checkpointing, norm_rel_err, randomize_adapters, rel_err
from tiny_models import tiny_model, tokens
from torch.utils._python_dispatch import TorchDispatchMode

import fastadapt as fa
from fastadapt.ops import _dropout, dispatch, torch_backend
from fastadapt.ops.lora_linear_4bit import rank_term

lora_op = importlib.import_module("fastadapt.ops.lora_linear")  # the module, not the function
SCALING = 1.7
#: (x dtype, autocast): fp32, bf16 activations, an fp32 model under bf16 autocast (Trainer(bf16=True))
PRECISIONS = [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)]
PRECISION_IDS = ["fp32", "bf16", "autocast"]


def _rnd(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


class Case:
    """One op on the torch or reference backend: inputs from a fixed generator, the mask from seed 5."""

    def __init__(self, op: str, *, dtype=torch.float32, m=17, k=40, n=24, r=3, lead=(2,), strided=False,
                 train_base=False, seed=0, activation="tanh", learned=False):
        g = torch.Generator().manual_seed(seed)
        self.op, self.activation = op, activation
        x = _rnd(g, *lead, m, k + 5 if strided else k)
        self.x_full = x.to(dtype).requires_grad_()
        self.x = self.x_full[..., 3:3 + k] if strided else self.x_full
        n_out = k if op == "series" else n
        self.weight = _rnd(g, n, k, scale=k**-0.5).to(dtype).requires_grad_(train_base)
        self.bias = _rnd(g, n).to(dtype).requires_grad_(train_base)
        self.a = _rnd(g, r, k, scale=k**-0.5).requires_grad_()  # fp32 adapter parameters, as the modules keep
        self.b = _rnd(g, n_out, r, scale=0.3).requires_grad_()
        self.magnitude = (torch.rand(n, generator=g) + 0.5).requires_grad_()
        self.scaling = torch.tensor([SCALING], requires_grad=True) if learned else SCALING
        self.grad_seed = seed + 1

    def leaves(self):
        extra = {"dora": [self.magnitude], "series": [], "parallel": [], "lora": []}[self.op]
        base = [self.weight, self.bias] if self.weight.requires_grad else []
        learned = [self.scaling] if isinstance(self.scaling, torch.Tensor) else []
        return [self.x_full, self.a, self.b, *extra, *base, *learned]

    def run(self, backend, p, *, autocast=False, recompute=False):
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if self.op == "lora":
                return fa.ops.lora_linear(self.x, self.weight, self.a, self.b, scaling=SCALING, bias=self.bias,
                                          dropout_p=p, backend=backend)
            if self.op == "dora":
                if backend == "torch" and recompute:
                    norm = fa.ops.dora_norm(self.weight, self.a, self.b, scaling=SCALING, backend="torch")
                    return torch_backend.dora_linear(self.x, self.weight, self.a, self.b, self.magnitude, norm,
                                                     scaling=SCALING, bias=self.bias, dropout_p=p, recompute=True)
                return fa.ops.dora_linear(self.x, self.weight, self.a, self.b, self.magnitude, scaling=SCALING,
                                          bias=self.bias, dropout_p=p, backend=backend)
            kw = {"activation": self.activation, "scaling": self.scaling, "dropout_p": p, "backend": backend}
            if self.op == "series":
                return fa.ops.bottleneck_adapter(self.x, self.a, self.b, **kw)
            return fa.ops.parallel_adapter(self.x, self.weight, self.a, self.b, bias=self.bias, **kw)

    def grads(self, y, leaves=None):
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(self.grad_seed)).to(y.dtype)
        return torch.autograd.grad(y, self.leaves() if leaves is None else leaves, dy)


OPS = ["lora", "dora", "series", "parallel"]


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype,autocast", PRECISIONS, ids=PRECISION_IDS)
@pytest.mark.parametrize("op", OPS)
def test_outputs_are_the_references_bit_for_bit_and_gradients_agree(op, dtype, autocast, p):
    case = Case(op, dtype=dtype, train_base=op in ("lora", "dora"), learned=op in ("series", "parallel"))
    y = case.run("torch", p, autocast=autocast)
    y_ref = case.run("reference", p, autocast=autocast)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    exact = dtype == torch.float32 and not autocast
    for got, want in zip(case.grads(y), case.grads(y_ref)):
        assert got.dtype == want.dtype and got.abs().sum() > 0
        # the only differences: where the reference sums two low-precision products in the low
        # precision, this path accumulates one onto the other in fp32 (addmm)
        assert norm_rel_err(got, want) < (1e-6 if exact else 1e-2)


def _float64_twin(case: Case, p: float, mask: torch.Tensor | None):
    """The op written out in float64 with the forward's mask: (y, the float64 leaves)."""
    leaves = [t.detach().double().requires_grad_() for t in case.leaves()]
    x_full, a, b = leaves[:3]
    strided = case.x is not case.x_full
    x = x_full[..., 3:3 + a.shape[1]] if strided else x_full
    rest = leaves[3:]
    magnitude = rest.pop(0) if case.op == "dora" else None
    if case.weight.requires_grad:
        w, c = rest.pop(0), rest.pop(0)
    else:
        w, c = case.weight.detach().double(), case.bias.detach().double()
    scaling = rest.pop(0) if rest else SCALING
    xd = x if mask is None else x * mask / (1 - p)
    if case.op == "lora":
        return x @ w.t() + c + SCALING * (xd @ a.t()) @ b.t(), leaves
    if case.op == "dora":
        g = magnitude / (w + SCALING * b @ a).norm(dim=1).detach()
        if mask is None:
            return g * (x @ w.t() + SCALING * (x @ a.t()) @ b.t()) + c, leaves
        return x @ w.t() + c + (g - 1) * (xd @ w.t()) + g * (SCALING * (xd @ a.t()) @ b.t()), leaves
    act = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}[case.activation]
    term = act(xd @ a.t()) @ b.t() * scaling
    return (x if case.op == "series" else x @ w.t() + c) + term, leaves


def _mask_of(shape, p):
    """The keep mask F.dropout draws after ``torch.manual_seed(5)`` (what the ops drew)."""
    torch.manual_seed(5)
    return F.dropout(torch.ones(shape), p) != 0


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("m,k,n,r,lead,strided", [
    (1, 40, 72, 1, (), False), (3, 72, 40, 3, (), True), (17, 100, 72, 8, (2,), False), (129, 40, 100, 16, (), True),
])
@pytest.mark.parametrize("op", OPS)
def test_gradients_match_float64_at_odd_shapes(op, m, k, n, r, lead, strided, p):
    activation = {"lora": "tanh", "dora": "tanh", "series": "gelu", "parallel": "silu"}[op]
    case = Case(op, m=m, k=k, n=n, r=r, lead=lead, strided=strided, train_base=op == "dora", activation=activation,
                learned=op == "series")
    y = case.run("torch", p)
    y64, leaves = _float64_twin(case, p, _mask_of(case.x.shape, p) if p else None)
    assert rel_err(y, y64) < 1e-5
    for got, want in zip(case.grads(y), case.grads(y64, leaves)):
        assert got.abs().sum() > 0
        assert norm_rel_err(got, want) < 1e-5


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_dora_recompute_gives_the_same_numbers(p):
    case = Case("dora", train_base=True)
    y = case.run("torch", p, recompute=True)
    y_kept = case.run("torch", p)
    assert torch.equal(y, y_kept)
    for got, want in zip(case.grads(y), case.grads(y_kept)):
        assert got.abs().sum() > 0 and norm_rel_err(got, want) < 1e-6


def test_gradcheck_float64_with_dropout():
    """torch's own numerical gradients, each op at p = 0.3 with the mask fixed by the seed."""
    def seeded(fn):
        def run(*args):
            with torch.random.fork_rng():
                torch.manual_seed(11)
                return fn(*args)
        return run

    g = torch.Generator().manual_seed(3)
    x = _rnd(g, 2, 3, 5).double().requires_grad_()
    w = _rnd(g, 4, 5).double()
    a, b = _rnd(g, 2, 5).double().requires_grad_(), _rnd(g, 4, 2).double().requires_grad_()
    mag = (torch.rand(4, generator=g).double() + 0.5).requires_grad_()
    norm = (w + 1.3 * b @ a).norm(dim=1).detach()
    wd, wu = _rnd(g, 3, 5).double().requires_grad_(), _rnd(g, 5, 3).double().requires_grad_()
    s = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    checks = [
        (lambda x, a, b: torch_backend.lora_linear(x, w, a, b, scaling=1.3, dropout_p=0.3), (x, a, b)),
        (lambda x, a, b, m: torch_backend.dora_linear(x, w, a, b, m, norm, scaling=1.3, dropout_p=0.3), (x, a, b, mag)),
        (lambda x, a, b, m: torch_backend.dora_linear(x, w, a, b, m, norm, scaling=1.3, dropout_p=0.3, recompute=True),
         (x, a, b, mag)),
        (lambda x, d, u, s: torch_backend.bottleneck_adapter(x, d, u, activation="silu", scaling=s, dropout_p=0.3),
         (x, wd, wu, s)),
        (lambda x, d, u: torch_backend.parallel_adapter(x, w, d, u[:4], activation="gelu", scaling=0.7, dropout_p=0.3),
         (x, wd, wu)),
    ]
    for fn, inputs in checks:
        assert torch.autograd.gradcheck(seeded(fn), inputs)


# -- what backward keeps ---------------------------------------------------------------------------


def _saved_during(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("op", OPS)
def test_saves_x_itself_and_one_bit_per_element(op, autocast):
    """No dropped copy, no byte mask, no cast copy of x or of the frozen weight: besides x and the
    parameters as given (under autocast too), S or H (M × r), the mask as uint8 bits (⌈numel/8⌉
    bytes) and, for DoRA, the norms and the one M × N product d magnitude needs (x_d Wᵀ)."""
    case = Case(op, m=64, k=48, n=40, r=4, lead=(), learned=op in ("series", "parallel"))
    y, saved = _saved_during(lambda: case.run("torch", 0.2, autocast=autocast))
    params = {t.untyped_storage().data_ptr() for t in (case.weight, case.bias, case.a, case.b, case.magnitude)}
    if isinstance(case.scaling, torch.Tensor):
        params.add(case.scaling.untyped_storage().data_ptr())
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert case.x.untyped_storage().data_ptr() in ptrs
    if op in ("lora", "dora"):
        assert case.weight.untyped_storage().data_ptr() in ptrs  # the parameter, not autocast's copy
    others = sorted((tuple(t.shape), t.dtype) for t in saved
                    if t.untyped_storage().data_ptr() not in params | {case.x.untyped_storage().data_ptr()})
    low = torch.bfloat16 if autocast else torch.float32
    want = [((64, 4), low), ((math.ceil(64 * 48 / 8),), torch.uint8)]
    if op == "dora":
        want += [((40,), torch.float32), ((64, 40), low)]
    assert others == sorted(want)
    y.float().sum().backward()
    assert case.a.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype,autocast", PRECISIONS, ids=PRECISION_IDS)
def test_rank_term_beside_a_quantized_base_is_the_references_and_keeps_bits(dtype, autocast):
    """``lora_linear_4bit.rank_term`` (the LoRA term beside a 4-bit or 8-bit base): the lean op's
    outputs and gradients equal plain autograd's bit for bit (same mask), from x, S and the bits."""
    case = Case("lora", dtype=dtype, m=64, k=48, n=40, r=4, lead=())

    def run(backend):
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return rank_term(case.x, case.a, case.b, scaling=SCALING, dropout_p=0.2, backend=backend)

    y, saved = _saved_during(lambda: run("torch"))
    y_ref = run("reference")
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    leaves = [case.x_full, case.a, case.b]
    for got, want in zip(case.grads(y, leaves), case.grads(y_ref, leaves)):
        assert got.abs().sum() > 0 and torch.equal(got, want)
    params = {t.untyped_storage().data_ptr() for t in (case.a, case.b, case.x)}
    others = sorted((tuple(t.shape), t.dtype) for t in saved if t.untyped_storage().data_ptr() not in params)
    assert others == sorted([((64, 4), y.dtype), ((math.ceil(64 * 48 / 8),), torch.uint8)])


def test_dora_recompute_keeps_no_product():
    case = Case("dora", m=64, k=48, n=40, r=4, lead=())
    norm = fa.ops.dora_norm(case.weight, case.a, case.b, scaling=SCALING, backend="torch")
    for p in (0.0, 0.2):
        _, saved = _saved_during(lambda p=p: torch_backend.dora_linear(
            case.x, case.weight, case.a, case.b, case.magnitude, norm, scaling=SCALING, dropout_p=p, recompute=True))
        assert not [t for t in saved if tuple(t.shape) == (64, 40)]


def test_group_members_save_x_once_and_draw_independent_masks():
    """q/k/v on the torch backend: each member draws its own mask (as PEFT's three nn.Dropout do),
    every one keeps the same x, so backward holds one x and three 1-bit masks."""
    model = tiny_model("llama").train()
    fa.patch(model, "lora", r=4, targets=["q_proj", "k_proj", "v_proj"], dropout=0.5)
    attn = model.model.layers[0].self_attn
    x = torch.randn(4, 64, attn.q_proj.in_features, requires_grad=True)
    torch.manual_seed(0)
    _, saved = _saved_during(lambda: [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)])
    x_sized = {t.untyped_storage().data_ptr() for t in saved if t.numel() >= x.numel()}
    assert x_sized == {x.untyped_storage().data_ptr()}
    bits = [t for t in saved if t.dtype == torch.uint8]
    assert len(bits) == 3
    masks = [_dropout.unpack(b, x.shape, torch.float32, 0.0).bool() for b in bits]
    for i in range(3):
        for j in range(i):
            agree = (masks[i] == masks[j]).float().mean().item()
            assert abs(agree - 0.5) < 0.02  # independent p = 0.5 masks agree half the time
    # the three draws are the three F.dropout calls PEFT would make, in order
    torch.manual_seed(0)
    for mask in masks:
        assert torch.equal(mask, F.dropout(torch.ones(x.shape), 0.5) != 0)


def test_the_training_path_reads_no_cache():
    """bf16 activations with fp32 adapters (the cast cache's case): after a no-grad call has cached
    low-precision copies, a write through ``.data`` (no version bump) is seen by the training path."""
    case = Case("lora", dtype=torch.bfloat16)
    with torch.no_grad():
        case.run("torch", 0.0)
    for p in (0.0, 0.2):
        case.b.data.mul_(1.5)
        y = case.run("torch", p)
        assert torch.equal(y, case.run("reference", p))


def test_reference_backend_is_selectable(monkeypatch):
    calls = []
    real = lora_op.lora_linear_ref
    monkeypatch.setattr(lora_op, "lora_linear_ref", lambda *a, **k: calls.append(1) or real(*a, **k))
    case = Case("lora")
    case.run("reference", 0.1)
    assert calls == [1]
    monkeypatch.setenv("FASTADAPT_BACKEND", "reference")
    case.run("auto", 0.1)
    assert calls == [1, 1]
    monkeypatch.delenv("FASTADAPT_BACKEND")
    case.run("auto", 0.1)  # auto never picks the reference
    assert calls == [1, 1]
    assert dispatch.decide("lora_linear", "auto", torch.device("cpu"), available={}).backend == "torch"


# -- the dropout mask ------------------------------------------------------------------------------


#: (pack, unpack): the CPU form (numpy) and the one every other device runs (torch operations)
_BIT_FORMS = {"cpu": (_dropout.pack, _dropout.unpack), "torch": (_dropout._pack_torch, _dropout._unpack_torch)}


@pytest.mark.parametrize("form", list(_BIT_FORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 9, 13), (64, 48)])
def test_bits_round_trip(shape, dtype, form):
    pack, unpack = _BIT_FORMS[form]
    keep = (torch.rand(shape) < 0.6).to(dtype)
    bits = pack(keep)
    # one format, whichever form wrote it: element i is bit i % 8 of byte i // 8, the last byte padded
    # with zeros
    flat = [int(v) for v in keep.reshape(-1).tolist()]
    want = [sum(v << i for i, v in enumerate(flat[j:j + 8])) for j in range(0, len(flat), 8)]
    assert bits.dtype == torch.uint8 and bits.tolist() == want
    assert torch.equal(unpack(bits, shape, dtype, 0.0), keep)
    # the factor is F.dropout's: keep / (1 - p) formed in the dtype
    for p in (0.3, 0.1, 0.05):
        got = unpack(bits, shape, dtype, p)
        assert got.dtype == dtype and torch.equal(got, keep.clone().div_(1 - p))
    # a transposed (non-contiguous) mask packs in its logical row-major order
    if len(shape) >= 2:
        assert torch.equal(pack(keep.mT), pack(keep.mT.contiguous()))


def test_bits_off_the_cpu_take_the_torch_form():
    """numpy packs and unpacks CPU tensors only: a tensor on another device (meta here, where numpy
    would fail) takes the torch-operation form, on its own device."""
    keep = torch.empty(3, 5, device="meta")
    bits = _dropout.pack(keep)
    assert bits.device.type == "meta" and bits.shape == (2,) and bits.dtype == torch.uint8
    factor = _dropout.unpack(bits, (3, 5), torch.bfloat16, 0.1)
    assert factor.device.type == "meta" and factor.shape == (3, 5) and factor.dtype == torch.bfloat16


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_mask_is_f_dropouts_and_its_statistics(p):
    """The drawn mask is F.dropout's, bit for bit (so PEFT's), and the dropped input is F.dropout's
    output; its keep rate is 1 - p, with no structure across rows or columns."""
    x = torch.randn(512, 384)
    torch.manual_seed(2)
    want = F.dropout(x, p)
    torch.manual_seed(2)
    keep = _dropout.draw(x, p)
    assert torch.equal(x * _dropout.scale_(keep.clone(), p), want)
    n = keep.numel()
    rate = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sigma
    for dim, count in ((0, 512), (1, 384)):  # per-column and per-row rates: binomial spread, no bias
        rates = keep.float().mean(dim)
        local = math.sqrt(p * (1 - p) / count)
        assert abs(rates.mean().item() - (1 - p)) < 5 * sigma
        assert 0.5 * local < rates.std().item() < 1.5 * local
    # E[dropout(x)] = x: the kept values carry exactly 1 / (1 - p)
    kept = keep.bool()
    assert torch.allclose(want[kept], x[kept] / (1 - p))
    assert (want[~kept] == 0).all()
    # a new draw is a new mask; the same seed the same mask
    assert not torch.equal(_dropout.draw(x, p), keep)
    torch.manual_seed(2)
    assert torch.equal(_dropout.draw(x, p), keep)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_mask_is_f_dropouts_for_inputs_that_are_not_contiguous(layout):
    """F.dropout draws into a tensor laid out like x (``empty_like``): for a transposed or
    channels-last input the draw order differs from a contiguous buffer's, and the mask must follow
    x's layout to be PEFT's (those two cases fail on a contiguous draw; a slice, not dense, gets a
    contiguous buffer either way and checks the packing of a strided mask)."""
    base = torch.randn(2, 6, 40, 33)
    x = {"transposed": base[0, 0].t(), "sliced": base[..., 3:30],
         "channels_last": base.contiguous(memory_format=torch.channels_last)}[layout]
    torch.manual_seed(3)
    want = F.dropout(x, 0.3)
    torch.manual_seed(3)
    keep = _dropout.draw(x, 0.3)
    assert torch.equal(x * _dropout.scale_(keep, 0.3), want)
    assert torch.equal(_dropout.unpack(_dropout.pack((keep > 0).float()), x.shape, torch.float32, 0.3), keep)


# -- whole models ----------------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("method", ["lora", "dora", "series", "parallel"])
def test_gradient_checkpointing_with_dropout_gives_the_same_gradients(method, use_reentrant):
    grads = {}
    for mode in ("plain", "checkpointed"):
        model = tiny_model("llama").train()
        if method in ("lora", "dora"):
            fa.patch(model, method, r=4, targets="all-linear", dropout=0.3)
            randomize_adapters(model, scale=0.1)
        else:
            fa.patch(model, method, bottleneck=5, dropout=0.3, scaling="learned")
        if mode == "checkpointed":
            enable_activation_checkpointing(model, use_reentrant=use_reentrant)
        ids = tokens(2, 9)
        torch.manual_seed(7)
        model(ids, labels=ids).loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, g in grads["plain"].items():
        assert g is not None and g.abs().sum() > 0, n
        assert norm_rel_err(grads["checkpointed"][n], g) < 1e-5, n


def _patched_layer(method: str, dropout: float):
    model = tiny_model("llama").train()
    if method in ("lora", "dora"):
        fa.patch(model, method, r=4, targets="all-linear", dropout=dropout)
        randomize_adapters(model, scale=0.1)
    else:
        fa.patch(model, method, bottleneck=5, dropout=dropout, scaling="learned")
    layer = model.model.layers[0]
    x = torch.randn(2, 9, model.config.hidden_size, requires_grad=True)
    emb = model.model.rotary_emb(x, torch.arange(9)[None])

    def step(h):
        out = layer(h, position_embeddings=emb)
        return out[0] if isinstance(out, tuple) else out

    return model, step, x


def _step_grads(model, step, x, seed=0):
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed)
    y = step(x)
    (y * dy).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return y.detach(), grads


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("method", ["lora", "dora", "series", "parallel"])
def test_torch_compile_fullgraph_equals_eager(method, backend):
    """No graph break, and with dropout the same numbers as eager: the masks are drawn inside the
    ops (opaque to the compiler), so they are eager's; what backward keeps is the ops' saved set."""
    if backend == "inductor" and method in ("dora", "series"):
        pytest.skip("inductor's C++ compile is slow on 2 cores: LoRA (q/k/v, o, the MLP) and parallel cover it")
    model, step, x = _patched_layer(method, 0.3)
    y0, g0 = _step_grads(model, step, x)  # eager first: the backend decision is made (and cached) outside
    torch._dynamo.reset()
    y1, g1 = _step_grads(model, torch.compile(step, fullgraph=True, backend=backend), x)
    assert rel_err(y1, y0) < 1e-5
    assert g0 and g0.keys() == g1.keys()
    for n, g in g0.items():
        assert g.abs().sum() > 0 and norm_rel_err(g1[n], g) < 1e-5, n


@pytest.mark.parametrize("method", ["lora", "dora", "series", "parallel"])
def test_compiled_activation_checkpointing_with_dropout_recomputes_the_same_masks(method):
    """torch.compile over ``checkpoint(use_reentrant=False)`` recomputes the forward ops in the
    backward graph: unless an op says it draws random numbers (``SEEDED``), the recompute draws a
    fresh mask and the gradients belong to a different forward (dx off by 1e2 before the tag)."""
    from torch.utils.checkpoint import checkpoint

    model, _, x = _patched_layer(method, 0.3)
    mlp = model.model.layers[0].mlp  # not the whole layer: transformers' attention has side effects dynamo refuses

    def step(h):
        return mlp(h)

    y0, g0 = _step_grads(model, step, x)
    torch._dynamo.reset()
    compiled = torch.compile(lambda h: checkpoint(step, h, use_reentrant=False), fullgraph=True, backend="aot_eager")
    y1, g1 = _step_grads(model, compiled, x)
    assert rel_err(y1, y0) < 1e-5
    assert g0 and g0.keys() == g1.keys()
    for n, g in g0.items():
        assert g.abs().sum() > 0 and norm_rel_err(g1[n], g) < 1e-5, n


def test_every_op_that_takes_a_dropout_p_is_tagged_as_drawing_random_numbers():
    """The compiler replays the generator only for ops tagged ``nondeterministic_seeded``: every
    fastadapt op whose schema has a ``dropout_p`` draws its mask (or the mask's seed) inside."""
    import fastadapt.ops.lora_linear_4bit  # noqa: F401  (registers its ops)

    names = [n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastadapt::")]
    drawing = [n for n in names if "dropout_p" in str(getattr(torch.ops.fastadapt, n).default._schema)
               and not n.endswith("_bwd")]
    assert len(drawing) >= 10, drawing
    for n in drawing:
        assert torch.Tag.nondeterministic_seeded in getattr(torch.ops.fastadapt, n).default.tags, n


class _PassThrough(torch.overrides.TorchFunctionMode):
    """A torch function mode that changes nothing: the ops then take their registered path."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _saved_bytes(fn):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype,autocast", PRECISIONS, ids=PRECISION_IDS)
@pytest.mark.parametrize("op", OPS)
def test_the_eager_path_is_the_registered_ops_bit_for_bit(op, dtype, autocast, p):
    """Plain eager calls run the ops' own implementation through a torch.autograd.Function (the
    custom-op wrapper costs tens of µs a call); under a torch function mode (as under compile, fake
    tensors, DTensor) the registered op runs. Outputs, every gradient and the bytes saved for
    backward are the same."""
    case = Case(op, dtype=dtype, train_base=op != "series")
    y0, saved0 = _saved_bytes(lambda: case.run("torch", p, autocast=autocast))
    with _PassThrough():
        y1, saved1 = _saved_bytes(lambda: case.run("torch", p, autocast=autocast))
    assert "_eagerBackward" in type(y0.grad_fn).__name__
    assert "_eagerBackward" not in type(y1.grad_fn).__name__
    assert torch.equal(y0, y1) and saved0 == saved1
    for g0, g1 in zip(case.grads(y0), case.grads(y1), strict=True):
        assert torch.equal(g0, g1)


class _PassThroughDispatch(TorchDispatchMode):
    """A torch dispatch mode that changes nothing: the ops then take their registered path."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu", "silu"])
@pytest.mark.parametrize("op", ["series", "parallel"])
def test_bottleneck_adapters_equal_plain_autograd_bit_for_bit_for_every_activation(op, activation, p, learned):
    """fp32: the torch path's outputs and every gradient are plain autograd's (the reference backend's)
    bit for bit, whether backward keeps act(H) (tanh, relu) or H (gelu, silu), with a fixed or a
    learned scaling."""
    case = Case(op, activation=activation, learned=learned, train_base=op == "parallel")
    y_t, y_r = case.run("torch", p), case.run("reference", p)
    assert torch.equal(y_t, y_r)
    for g_t, g_r in zip(case.grads(y_t), case.grads(y_r), strict=True):
        assert torch.equal(g_t, g_r)


def _bwd_ops_dispatched(fn) -> set[str]:
    """The fastadapt backward ops that went through the dispatcher while ``fn`` ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("fastadapt::") and e.key.endswith("_bwd")}


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype,autocast", PRECISIONS, ids=PRECISION_IDS)
@pytest.mark.parametrize("op", OPS)
def test_eager_backward_runs_the_implementation_and_equals_the_registered_backward_op(op, dtype, autocast, p):
    """A plain eager backward runs each backward op's implementation (no dispatcher call); under a
    torch dispatch mode (as fake tensors and compiled autograd's tracing are), or when the backward
    records a graph (``create_graph``), the registered op runs. Every gradient is the same, bit for
    bit."""
    case = Case(op, dtype=dtype, train_base=op != "series")
    results = {}

    def grads(name, mode=None, create_graph=False):
        y = case.run("torch", p, autocast=autocast)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(case.grad_seed)).to(y.dtype)

        def run():
            with mode() if mode else contextlib.nullcontext():
                results[name] = torch.autograd.grad(y, case.leaves(), dy, create_graph=create_graph)

        return _bwd_ops_dispatched(run)

    assert grads("eager") == set()
    assert grads("mode", _PassThroughDispatch) == {f"fastadapt::{_BWD_OP[op]}"}
    assert grads("graph", create_graph=True) == {f"fastadapt::{_BWD_OP[op]}"}
    for name in ("mode", "graph"):
        for g0, g1 in zip(results["eager"], results[name], strict=True):
            assert torch.equal(g0, g1.detach())


_BWD_OP = {"lora": "lora_linear_torch_bwd", "dora": "dora_linear_torch_bwd", "series": "bottleneck_torch_bwd",
           "parallel": "bottleneck_torch_bwd"}


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_the_eager_rank_term_and_no_grad_calls_are_the_registered_ops(p):
    """The fourth wrapped op (the rank term beside a quantized base), and calls without gradients
    (the implementation itself): the same numbers as the registered op, which a torch dispatch mode
    (as fake tensors are) also selects."""
    g = torch.Generator().manual_seed(4)
    x = _rnd(g, 2, 7, 24).requires_grad_()
    a, b = _rnd(g, 3, 24).requires_grad_(), _rnd(g, 10, 3).requires_grad_()
    dy = _rnd(g, 2, 7, 10)
    results = []
    for mode in (None, _PassThrough, _PassThroughDispatch):
        torch.manual_seed(6)
        with mode() if mode else contextlib.nullcontext():
            y = torch_backend.lora_rank(x, a, b, scaling=SCALING, dropout_p=p)
            with torch.no_grad():
                torch.manual_seed(7)
                y_ng = torch_backend.lora_rank(x, a, b, scaling=SCALING, dropout_p=p)
        assert ("_eagerBackward" in type(y.grad_fn).__name__) == (mode is None)
        results.append((y.detach(), y_ng, *torch.autograd.grad(y, (x, a, b), dy)))
    for other in results[1:]:
        for t0, t1 in zip(results[0], other, strict=True):
            assert torch.equal(t0, t1)


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schemas, fakes (shapes, dtypes, strides) and autograd registrations
    against the real ops, with dropout and without, for each op."""
    case = Case("dora", m=5, k=16, n=12, r=2, lead=(2,), train_base=True)
    x, w, c, a, b, mag = case.x, case.weight, case.bias, case.a, case.b, case.magnitude
    norm = fa.ops.dora_norm(w, a, b, scaling=SCALING, backend="torch")
    wd, wu = a, torch.randn(16, 2, requires_grad=True)
    s = torch.tensor([0.5], requires_grad=True)
    ops = torch.ops.fastadapt
    for p in (0.0, 0.3):
        samples = [
            (ops.lora_linear_torch_fwd, (x, w, a, b, c, SCALING, p, torch.float32, True)),
            (ops.dora_linear_torch_fwd, (x, w, a, b, mag, norm, c, SCALING, p, torch.float32, True, True)),
            (ops.dora_linear_torch_fwd, (x, w, a, b, mag, norm, None, SCALING, p, torch.float32, False, True)),
            (ops.bottleneck_torch_fwd, (x, wd, wu, s, None, None, None, 0.0, "silu", p, torch.float32, True)),
            (ops.bottleneck_torch_fwd, (x, wd, b, None, None, w, c, 1.5, "tanh", p, torch.float32, True)),
            (ops.lora_rank_torch_fwd, (x, a, b, SCALING, p, torch.bfloat16, True)),
        ]
        for op, args in samples:
            # the masks are random: opcheck's repeated calls must draw the same one
            torch.manual_seed(0)
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
