"""The performance model of shared/PERF.md, in code: what a kernel launch costs on a GPU, predicted
from the FLOPs it must do, the bytes it must move, the instructions it must issue and a fixed
cost per launch.

    time(launch) = max(FLOPs / (peak · efficiency · fill),              "mma"
                       HBM bytes / (bandwidth · memory_efficiency),     "hbm"
                       L2 bytes / l2_bandwidth,                         "l2"
                       issue time of its SASS instruction mix,          "issue"
                       any other floor)                                 "floor"
                   + launch cost                                        "launch"

Constants, each named with where it comes from (an assumption is called one):

- ``flops``: dense bf16 FLOP/s, measured on the lent GPU (8192³ cuBLAS matmul: H100 798 TFLOP/s,
  H200 790; shared/PERF.md). ``efficiency`` is 1 for cuBLAS (the frozen baseline runs on it too) and an
  *input* for a Triton GEMM: every headline figure is printed as a curve at 0.80, 0.90 and 1.00
  of cuBLAS (``CUBLAS_FRACTIONS``). ``fill`` = programs / SMs for a launch of fewer programs than
  SMs (the idle SMs' tensor cores are lost).
- ``bandwidth``: the measured device-to-device copy of the lent GPU, read + write (H100 3.0 TB/s,
  H200 4.3 TB/s; shared/PERF.md). ``memory_efficiency`` (``MEMORY_EFFICIENCY`` = 0.85) is the fraction of
  that copy a memory-bound kernel other than a copy is assumed to reach — masked tile loads,
  strided rows, reductions and epilogues do not stream like a copy. It is an assumption, named so
  that the first GPU record replaces it; it applies to every launch, Triton and torch alike
  (compute-bound GEMMs never feel it).
- ``l2_bandwidth``: bytes/s the L2 delivers to the SMs. 5.5 TB/s, the figure Chips and Cheese
  measured on an H100 PCIe (2023, "Nvidia's H100: Funny L2, and Tons of Bandwidth"); an
  assumption for the SXM parts (more SMs, so likely higher: conservative). Used for L2 re-reads:
  an operand every program of a launch reads again (a weight re-read by each of 128 row blocks
  is 128 × its size of L2 traffic, though HBM sees it once). A GEMM's own tile re-reads are not
  counted: cuBLAS pays them too, and its measured rate already includes them (for a Triton GEMM
  they are part of the ``efficiency`` input).
- instruction issue (sm_90, per SM per clock, in warp-instructions; CUDA C++ Programming Guide,
  "Arithmetic Instructions", compute capability 9.0): 4 issued (one scheduler per quarter); 64
  lanes of 32-bit integer ALU work (LOP3, SEL, ISETP, shifts, adds: 2 warp-instructions); 64
  lanes of integer multiply-add (IMAD, on the FMA pipe: 2); 128 lanes of fp32 FMA/MUL/ADD (4);
  16 lanes of special functions and conversions (MUFU, F2F, I2F: 0.5). The counts come from the
  SASS of the launch compiled for sm_90a (``sass_mix``): the main loop's body × its trip count
  plus the rest once, per warp, × warps × programs. ``SM_CLOCK_HZ`` = 1.755 GHz (the H100's
  sustained boost under load, as the QLoRA term of the report used before).
- ``launch_s``: ~3 µs per launch (PERF.md).

This is a model — predictions, not measurements; bench/NOTES.md keeps each prediction beside the
GPU's outcome. ``Plan.terms`` says which term bounds each launch, so every figure can say what
dominates it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

#: The Triton GEMM's rate as a fraction of cuBLAS's: an input, so every figure is a curve over it.
CUBLAS_FRACTIONS = (0.80, 0.90, 1.00)
#: Fraction of the measured device copy that a memory-bound non-copy kernel reaches (assumption).
MEMORY_EFFICIENCY = 0.85
#: SM clock used to turn issue cycles into seconds (H100 SXM sustained boost).
SM_CLOCK_HZ = 1.755e9


@dataclass(frozen=True)
class Device:
    name: str
    flops: float  # dense bf16 FLOP/s, measured (8192³ matmul)
    bandwidth: float  # bytes/s, measured device copy (read + write)
    sms: int = 132  # H100 / H200 SXM
    launch_s: float = 3e-6
    memory_efficiency: float = MEMORY_EFFICIENCY
    l2_bandwidth: float = 5.5e12
    clock_hz: float = SM_CLOCK_HZ


DEVICES = {
    "h100": Device("H100", 798e12, 3.0e12),
    "h200": Device("H200", 790e12, 4.3e12),
}

# -- instruction issue (sm_90) ---------------------------------------------------------------------

#: Warp-instructions per clock per SM for each pipe the model tracks ("issue" bounds them all).
PIPE_RATES = {"issue": 4.0, "alu": 2.0, "imad": 2.0, "fp32": 4.0, "xu": 0.5}
_ALU = {"LOP3", "LOP", "SEL", "ISETP", "SHF", "SHL", "SHR", "IADD3", "IADD", "VIADD", "LEA", "PRMT", "PLOP3",
        "IMNMX", "VIMNMX", "FSEL", "FSETP", "FMNMX", "BMSK", "ISCADD", "F2FP", "IABS", "FLO", "POPC", "BREV", "P2R",
        "R2P", "LEA.HI", "SGXT"}
_IMAD = {"IMAD", "IMUL", "IMADSP", "IDP", "IMNMX3"}
_FP32 = {"FFMA", "FMUL", "FADD", "FFMA2", "FMUL2", "FADD2", "HFMA2", "HADD2", "HMUL2", "FCHK"}
_XU = {"MUFU", "F2F", "I2F", "F2I", "I2FP", "F2IP", "FRND"}
_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)\s*([^;]*);",
                   re.M)


def pipe_of(opcode: str) -> str | None:
    """The pipe an opcode (without modifiers) occupies besides its issue slot, or None."""
    if opcode in _ALU:
        return "alu"
    if opcode in _IMAD:
        return "imad"
    if opcode in _FP32:
        return "fp32"
    if opcode in _XU:
        return "xu"
    return None


@dataclass
class InstructionMix:
    """Static SASS of one compiled kernel, split into its main loop's body and the rest (counted
    once per program). ``loop`` / ``rest``: opcode -> instructions per warp."""

    loop: Counter = field(default_factory=Counter)
    rest: Counter = field(default_factory=Counter)

    def per_warp(self, trips: int) -> Counter:
        """Dynamic instructions of one warp whose main loop runs ``trips`` times."""
        out = Counter(self.rest)
        for op, n in self.loop.items():
            out[op] += n * trips
        return out

    def to_json(self) -> dict:
        return {"loop": dict(self.loop), "rest": dict(self.rest)}

    @classmethod
    def from_json(cls, d: dict) -> InstructionMix:
        return cls(Counter(d.get("loop", {})), Counter(d.get("rest", {})))


def sass_mix(sass: str) -> InstructionMix:
    """Opcode counts of a ``cuobjdump -sass`` listing: the body of its largest loop (the span
    between a backward branch and its target) and everything else. Nested or later loops count
    once (an approximation: the kernels here have one main loop that dominates)."""
    instrs = [(int(a, 16), op, args) for a, op, _, args in _LINE.findall(sass)]
    best = None
    for addr, op, args in instrs:
        if op != "BRA":
            continue
        m = re.match(r"\s*(?:`\()?\s*(0x[0-9a-f]+)", args)
        target = int(m.group(1), 16) if m else None
        if target is not None and target < addr and (best is None or addr - target > best[1] - best[0]):
            best = (target, addr)
    mix = InstructionMix()
    for addr, op, _ in instrs:
        inside = best is not None and best[0] <= addr <= best[1]
        (mix.loop if inside else mix.rest)[op] += 1
    return mix


def issue_seconds(per_warp: Counter, warps: int, device: Device, *, programs: int | None = None) -> float:
    """Seconds to issue ``warps`` warps' worth of ``per_warp`` instructions over the whole GPU: the
    busiest of the issue slots and the pipes (``PIPE_RATES``), spread evenly over the SMs that have
    work (``programs`` of them when fewer than the SMs). Latency is not modelled: it assumes each
    scheduler finds an independent instruction every clock."""
    load = Counter()
    for op, n in per_warp.items():
        load["issue"] += n
        pipe = pipe_of(op)
        if pipe is not None:
            load[pipe] += n
    cycles = max((load[p] * warps / PIPE_RATES[p] for p in PIPE_RATES), default=0.0)
    sms = min(programs, device.sms) if programs else device.sms
    return cycles / sms / device.clock_hz


def integer_share(per_warp: Counter) -> dict:
    """Instructions per pipe (for the report: what an issue-bound launch spends its slots on)."""
    load = Counter()
    for op, n in per_warp.items():
        load[pipe_of(op) or "other"] += n
    return dict(load)


# -- launches and plans ----------------------------------------------------------------------------

TERMS = ("mma", "hbm", "l2", "issue", "floor")


@dataclass
class Launch:
    """One kernel launch: who, how much work, and whether it is a GEMM whose speed is assumed."""

    name: str
    flops: float = 0.0
    bytes: float = 0.0
    triton_gemm: bool = False  # a Triton GEMM: its FLOP rate is peak × triton_gemm_efficiency
    programs: int | None = None  # the launch's grid size, when known
    #: a floor from work neither FLOPs nor bytes count (e.g. the instruction issue of dequantizing a
    #: 4-bit weight inside a GEMM), seconds
    min_seconds: float = 0.0
    #: L2 traffic beyond the HBM bytes: operands every program reads again (bytes)
    l2_bytes: float = 0.0
    #: instruction issue time from the compiled SASS (seconds; 0 when not compiled)
    issue_s: float = 0.0

    def term_seconds(self, device: Device, *, triton_gemm_efficiency: float = 1.0) -> dict[str, float]:
        rate = device.flops * (triton_gemm_efficiency if self.triton_gemm else 1.0)
        if self.programs is not None and self.programs < device.sms:
            rate *= self.programs / device.sms
        return {"mma": self.flops / rate, "hbm": self.bytes / (device.bandwidth * device.memory_efficiency),
                "l2": self.l2_bytes / device.l2_bandwidth, "issue": self.issue_s, "floor": self.min_seconds}

    def bound(self, device: Device, **kw) -> str:
        """The term that sets this launch's time."""
        t = self.term_seconds(device, **kw)
        return max(TERMS, key=lambda k: t[k])

    def seconds(self, device: Device, *, triton_gemm_efficiency: float = 1.0) -> float:
        t = self.term_seconds(device, triton_gemm_efficiency=triton_gemm_efficiency)
        return max(t.values()) + device.launch_s


@dataclass
class Plan:
    """The launches of one op call (forward or backward)."""

    launches: list[Launch] = field(default_factory=list)

    def seconds(self, device: Device, **kw) -> float:
        return sum(k.seconds(device, **kw) for k in self.launches)

    def terms(self, device: Device, **kw) -> dict[str, float]:
        """Seconds by the term that bounds each launch (plus ``launch``): where the time goes."""
        out = dict.fromkeys((*TERMS, "launch"), 0.0)
        for k in self.launches:
            t = k.term_seconds(device, **kw)
            out[max(TERMS, key=lambda name: t[name])] += max(t.values())
            out["launch"] += device.launch_s
        return out

    def by_launch(self, device: Device, **kw) -> list[tuple[str, str, float]]:
        """(launch name, bounding term, seconds incl. launch cost) per launch."""
        return [(k.name, k.bound(device, **kw), k.seconds(device, **kw)) for k in self.launches]

    @property
    def bytes(self) -> float:
        return sum(k.bytes for k in self.launches)

    @property
    def flops(self) -> float:
        return sum(k.flops for k in self.launches)

    def __len__(self) -> int:
        return len(self.launches)


def over_frozen(fwd: Plan, bwd: Plan, frozen_fwd: Plan, frozen_bwd: Plan, device: Device, **kw) -> float:
    """(op forward + backward time) / (frozen linear's forward + dX time), W frozen: no dW."""
    return (fwd.seconds(device, **kw) + bwd.seconds(device, **kw)) / (
        frozen_fwd.seconds(device, **kw) + frozen_bwd.seconds(device, **kw))


def dominant_terms(plans: list[Plan], frozen: list[Plan], device: Device, *, top: int = 3, **kw) -> str:
    """What the time over the frozen baseline is made of: the op's seconds by bounding term minus
    the frozen plans' (their GEMMs are "mma"), largest first, e.g. ``hbm 118 µs, launch 24 µs``."""
    extra = dict.fromkeys((*TERMS, "launch"), 0.0)
    for sign, group in ((1, plans), (-1, frozen)):
        for p in group:
            for k, v in p.terms(device, **kw).items():
                extra[k] += sign * v
    ranked = sorted(((v, k) for k, v in extra.items() if abs(v) >= 0.5e-6), reverse=True)
    return ", ".join(f"{k} {v * 1e6:+.0f} µs" for v, k in ranked[:top]) or "none"


def top_launches(plans: list[Plan], device: Device, *, top: int = 4, skip: tuple[str, ...] = (), **kw) -> str:
    """The costliest launches of ``plans`` and what bounds each, e.g. ``_lora_shrink_kernel 43 µs (issue)``."""
    rows = [(s, n, b) for p in plans for n, b, s in p.by_launch(device, **kw) if n not in skip]
    rows.sort(reverse=True)
    return ", ".join(f"{n.removeprefix('_').removesuffix('_kernel')} {s * 1e6:.0f} µs ({b})" for s, n, b in rows[:top])


def break_even_efficiency(candidate: tuple[Plan, Plan], default: tuple[Plan, Plan], device: Device) -> float | None:
    """The Triton GEMM efficiency (relative to cuBLAS) above which ``candidate`` beats ``default``,
    by bisection; None when it wins or loses at every efficiency in (0.3, 1.5]."""
    def gap(eff: float) -> float:
        return sum(p.seconds(device, triton_gemm_efficiency=eff) for p in candidate) - sum(
            p.seconds(device, triton_gemm_efficiency=eff) for p in default)

    lo, hi = 0.3, 1.5
    if gap(lo) <= 0 or gap(hi) > 0:
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gap(mid) > 0 else (lo, mid)
    return hi
