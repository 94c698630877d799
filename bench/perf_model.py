"""The performance model of shared/PERF.md, in code: what a kernel launch costs on a GPU, predicted
from the bytes it must move, the FLOPs it must do, and a fixed cost per launch.

    time(kernel) = max(FLOPs / (peak · efficiency · fill), bytes / bandwidth) + launch cost

Peaks are the measured ceilings of the lent GPUs (PERF.md): H100 798 TFLOP/s bf16 and 3.0 TB/s
device copy, H200 790 TFLOP/s and 4.3 TB/s; ~3 µs per launch. ``efficiency`` is 1 for cuBLAS (the
frozen baseline runs on it too) and a stated assumption for a Triton GEMM. ``fill`` = programs / SMs
for a launch of fewer programs than the GPU has SMs (known for Triton launches with a fixed grid;
1 otherwise): the idle SMs' tensor cores are lost, which is what sinks a row-block kernel at small
M (32 programs of 64 rows at M = 2048). Bytes are HBM traffic:
every tensor a kernel touches counts once (its operands' re-reads from L2 do not), an in-place
accumulation twice (read and write). This is a model — predictions, not measurements; bench/NOTES.md
keeps each prediction beside the GPU's outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Device:
    name: str
    flops: float  # dense bf16 FLOP/s, measured (8192³ matmul)
    bandwidth: float  # bytes/s, measured device copy (read + write)
    sms: int = 132  # H100 / H200 SXM
    launch_s: float = 3e-6


DEVICES = {
    "h100": Device("H100", 798e12, 3.0e12),
    "h200": Device("H200", 790e12, 4.3e12),
}


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

    def seconds(self, device: Device, *, triton_gemm_efficiency: float = 1.0) -> float:
        rate = device.flops * (triton_gemm_efficiency if self.triton_gemm else 1.0)
        if self.programs is not None and self.programs < device.sms:
            rate *= self.programs / device.sms
        return max(self.flops / rate, self.bytes / device.bandwidth, self.min_seconds) + device.launch_s


@dataclass
class Plan:
    """The launches of one op call (forward or backward)."""

    launches: list[Launch] = field(default_factory=list)

    def seconds(self, device: Device, **kw) -> float:
        return sum(k.seconds(device, **kw) for k in self.launches)

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
