"""``fa.ops.lora_mixed`` / ``fa.ops.bottleneck_mixed``: a batch whose rows use different adapters,
both backends (torch; Triton in the interpreter) against the row-by-row float64 oracle
(``reference.lora_mixed_ref``), at odd shapes: slots no row uses (empty segments), one row per
adapter, every row on one adapter, base rows, ranks that are not powers of two, capacities larger
than the rank (a slot that held a larger adapter), decode (one token per row) and segment forms,
DoRA's per-adapter scale, the bottleneck activation, two sources (the active adapter and a bank)."""

from __future__ import annotations

import pytest
import torch

from fastadapt.ops import bottleneck_mixed, bottleneck_mixed_ref, lora_mixed, lora_mixed_ref
from fastadapt.ops.lora_mixed import SlotBank, SlotRows

F64 = torch.float64
BACKENDS = ["torch", "triton"]


def _bank(k: int, n: int, ranks: list[int], *, spare: tuple[int, ...] = (), dtype=F64, seed: int = 0,
          dora: bool = False, scalings: list[float] | None = None) -> SlotBank:
    """A compact bank of ``len(ranks)`` slots; ``spare[i]`` extra zero rows in slot i (capacity > rank)."""
    g = torch.Generator().manual_seed(seed)
    caps = [r + (spare[i] if i < len(spare) else 0) for i, r in enumerate(ranks)]
    total = sum(caps)
    down = torch.zeros(total + 1, k, dtype=F64)
    up = torch.zeros(total + 1, n, dtype=F64)
    off = 0
    offsets = []
    for r, c in zip(ranks, caps):
        down[off:off + r] = torch.randn(r, k, generator=g, dtype=F64) / k ** 0.5
        up[off:off + r] = torch.randn(r, n, generator=g, dtype=F64)
        offsets.append(off)
        off += c
    scal = scalings or [0.5 + i for i in range(len(ranks))]
    magnitude = norm = None
    if dora:
        magnitude = (1 + 0.3 * torch.randn(len(ranks), n, generator=g, dtype=F64)).abs().float()
        norm = (1 + 0.3 * torch.randn(len(ranks), n, generator=g, dtype=F64)).abs().float()
    return SlotBank(down=down.to(dtype), up=up.to(dtype), scalings=torch.tensor(scal, dtype=torch.float32),
                    offsets=tuple(offsets), capacities=tuple(caps), ranks=tuple(ranks), scalings_host=tuple(scal),
                    magnitude=magnitude, norm=norm)


def _cast(bank: SlotBank, dtype) -> SlotBank:
    return SlotBank(**{**bank.__dict__, "down": bank.down.to(dtype), "up": bank.up.to(dtype)})


#: (name, rows per slot as a list of slot ids per batch row, bank ranks, spare capacity)
CASES = [
    ("mixed-with-base", [0, 2, -1, 1, 2, -1, 0], [3, 8, 5], ()),
    ("one-row-per-adapter", [0, 1, 2, 3], [1, 16, 7, 40], (0, 4)),
    ("all-rows-one-adapter", [1, 1, 1, 1, 1], [8, 24], ()),
    ("empty-segments", [3, 3, -1], [4, 4, 4, 9], (2, 0, 0, 7)),
    ("only-base-rows", [-1, -1], [5], ()),
]


def _x(b, t, k, dtype, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, k, generator=g, dtype=F64).to(dtype)


def _tolerance(dtype):
    return {torch.float32: (2e-5, 2e-5), F64: (1e-10, 1e-10), torch.bfloat16: (3e-2, 3e-2)}[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", [1, 5], ids=["decode", "segments"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("kind", ["lora", "dora", "parallel"])
def test_lora_mixed_matches_the_row_by_row_reference(case, tokens, kind, backend):
    _, slots, ranks, spare = case
    k, n = 19, 23
    bank64 = _bank(k, n, ranks, spare=spare, dora=kind == "dora")
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(n, k, generator=g, dtype=F64)
    bias = torch.randn(n, generator=g, dtype=F64)
    activation = "tanh" if kind == "parallel" else None
    x64 = _x(len(slots), tokens, k, F64)
    rows = SlotRows(tuple(slots), torch.device("cpu"))
    want = lora_mixed_ref(x64, weight, [bank64], [rows], bias=bias, activation=activation)
    dtype = torch.float32
    got = lora_mixed(x64.to(dtype), weight.to(dtype), [_cast(bank64, dtype)], [SlotRows(tuple(slots), rows.device)],
                     bias=bias.to(dtype), activation=activation, backend=backend)
    assert got.shape == (len(slots), tokens, n) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    base = torch.nn.functional.linear(x64, weight, bias)
    for b, s in enumerate(slots):  # rows without an adapter get the base output, the others do not
        if s < 0:
            torch.testing.assert_close(got[b].double(), base[b], rtol=2e-5, atol=2e-5)
        else:
            assert (got[b].double() - base[b]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", [1, 4], ids=["decode", "segments"])
def test_two_sources_active_and_bank(tokens, backend):
    """The active adapter (one slot: its parameters) and a bank in one call: every row takes one."""
    k, n = 13, 17
    active = _bank(k, n, [6], spare=(2,), seed=1)
    bank = _bank(k, n, [2, 9], seed=2)
    names = ["act", "b0", "base", "b1", "act", "b1"]
    active_rows = SlotRows(tuple(0 if m == "act" else -1 for m in names), torch.device("cpu"))
    bank_rows = SlotRows(tuple({"b0": 0, "b1": 1}.get(m, -1) for m in names), torch.device("cpu"))
    weight = torch.randn(n, k, dtype=F64)
    x = _x(len(names), tokens, k, F64)
    want = lora_mixed_ref(x, weight, [active, bank], [active_rows, bank_rows])
    got = lora_mixed(x.float(), weight.float(), [_cast(active, torch.float32), _cast(bank, torch.float32)],
                     [active_rows, bank_rows], backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", [1, 3], ids=["decode", "segments"])
@pytest.mark.parametrize("side", ["input", "output"])
def test_bottleneck_mixed_matches_the_reference(side, tokens, backend):
    d = 21
    bank = _bank(d, d, [5, 3, 11], spare=(0, 6), seed=4)
    slots = (2, -1, 0, 2, 1)
    rows = SlotRows(slots, torch.device("cpu"))
    x = _x(len(slots), tokens, d, F64)
    residual = None if side == "input" else _x(len(slots), tokens, d, F64, seed=9)
    want = bottleneck_mixed_ref(x, [bank], [rows], activation="gelu", residual=residual)
    got = bottleneck_mixed(x.float(), [_cast(bank, torch.float32)], [rows], activation="gelu",
                           residual=None if residual is None else residual.float(), backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    assert torch.equal(got[1], (x if residual is None else residual)[1].float())  # the base row: nothing added


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_within_twice_torchs_own_error(backend):
    """bf16 activations: the error vs float64 is at most 2x that of the same math done by torch in
    bf16 (fp32-accumulated products), plus a bf16 ulp of the output."""
    k, n = 40, 24
    bank = _bank(k, n, [8, 3], seed=5)
    rows = SlotRows((0, 1, -1, 1), torch.device("cpu"))
    weight = torch.randn(n, k, dtype=F64)
    x = _x(4, 3, k, F64)
    want = lora_mixed_ref(x, weight, [bank], [rows])
    torch_bf16 = lora_mixed_ref(x.bfloat16(), weight.bfloat16(), [_cast(bank, torch.bfloat16)], [rows]).double()
    got = lora_mixed(x.bfloat16(), weight.bfloat16(), [_cast(bank, torch.bfloat16)], [rows], backend=backend)
    err, ref_err = (got.double() - want).abs().max(), (torch_bf16 - want).abs().max()
    assert err <= 2 * ref_err + 4e-3 * want.abs().max(), (err, ref_err)


def test_gradients_flow_on_the_torch_path():
    """Grad mode in eval (not training): the torch path is differentiable in x and the active adapter."""
    k, n = 9, 11
    active = _bank(k, n, [4], seed=3)
    down = active.down.clone().requires_grad_()
    src = SlotBank(**{**active.__dict__, "down": down})
    rows = SlotRows((0, -1, 0), torch.device("cpu"))
    x = _x(3, 2, k, F64).requires_grad_()
    weight = torch.randn(n, k, dtype=F64)
    got = lora_mixed(x, weight, [src], [rows], backend="torch")
    want = lora_mixed_ref(x, weight, [src], [rows])
    gx, gd = torch.autograd.grad(got.sum(), (x, down))
    wx, wd = torch.autograd.grad(want.sum(), (x, down))
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(gd, wd)
    assert gd[:4].abs().sum() > 0


def test_bad_arguments_are_named():
    bank = _bank(5, 6, [2], dtype=torch.float32)
    x = torch.randn(2, 1, 5)
    w = torch.randn(6, 5)
    with pytest.raises(ValueError, match="rows\\[0\\] names an adapter for 3 rows"):
        lora_mixed(x, w, [bank], [SlotRows((0, 0, 0), x.device)])
    with pytest.raises(ValueError, match="uses slot 4"):
        lora_mixed(x, w, [bank], [SlotRows((0, 4), x.device)])
    with pytest.raises(ValueError, match="x's dtype"):
        lora_mixed(x.double(), w.double(), [bank], [SlotRows((0, 0), x.device)])
    with pytest.raises(ValueError, match="activation must be one of"):
        bottleneck_mixed(x, [bank], [SlotRows((0, 0), x.device)], activation="swish")
