"""The performance model's terms (bench/perf_model.py): the SASS instruction mix split into the main
loop and the rest, the issue time it implies on sm_90, the named memory fraction, L2 re-reads, and
which term bounds a launch. CPU only; hand-written SASS in cuobjdump's layout."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def pm():
    spec = importlib.util.spec_from_file_location("fastadapt_bench_perf_model", BENCH / "perf_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def _sass(lines: list[str]) -> str:
    body = "\n".join(f"        /*{16 * i:04x}*/                   {ln} ;   /* 0x0000 */\n"
                     "                                                  /* 0x000f */" for i, ln in enumerate(lines))
    return f"\tcode for sm_90a\n\t\tFunction : k\n{body}\n"


def test_sass_mix_splits_the_main_loop_from_the_rest(pm):
    # 0x00-0x10 prologue; 0x20-0x50 the loop (backward branch at 0x50 to 0x20); a forward branch
    # and an epilogue; predicated instructions count under their opcode
    sass = _sass(["S2R R0, SR_TID.X", "IMAD.U32 R3, RZ, RZ, UR5", "LOP3.LUT R4, R0, 0xff, RZ, 0xc0, !PT",
                  "@P0 SEL R5, R4, RZ, P1", "HMMA.16816.F32.BF16 R8, R12, R16, R8", "@P6 BRA 0x20",
                  "@!P2 BRA 0x80", "STG.E [R2.64], R8", "EXIT"])
    mix = pm.sass_mix(sass)
    assert mix.loop == Counter({"LOP3": 1, "SEL": 1, "HMMA": 1, "BRA": 1})
    assert mix.rest == Counter({"S2R": 1, "IMAD": 1, "BRA": 1, "STG": 1, "EXIT": 1})
    per_warp = mix.per_warp(10)
    assert per_warp["LOP3"] == 10 and per_warp["IMAD"] == 1 and per_warp["STG"] == 1
    assert pm.InstructionMix.from_json(mix.to_json()).per_warp(3) == mix.per_warp(3)


def test_issue_time_is_the_busiest_pipe(pm):
    dev = pm.DEVICES["h100"]
    # integer ALU work only: 2 warp-instructions per clock per SM (half the issue rate)
    per_warp = Counter({"LOP3": 1000})
    t = pm.issue_seconds(per_warp, warps=dev.sms * 8, device=dev)
    assert t == pytest.approx(1000 * 8 / 2.0 / dev.clock_hz)
    # other instructions fill the issue slots: 4 per clock bound them
    per_warp = Counter({"LOP3": 1000, "LDG": 7000})
    assert pm.issue_seconds(per_warp, warps=dev.sms * 8, device=dev) == pytest.approx(8000 * 8 / 4.0 / dev.clock_hz)
    # fewer programs than SMs: the work lands on those SMs only
    assert pm.issue_seconds(Counter({"LOP3": 1000}), warps=8, device=dev, programs=1) == pytest.approx(
        1000 * 8 / 2.0 / dev.clock_hz)
    assert pm.integer_share(Counter({"LOP3": 3, "IMAD": 2, "HMMA": 1})) == {"alu": 3, "imad": 2, "other": 1}


def test_a_launch_names_its_bound(pm):
    dev = pm.DEVICES["h100"]
    copy = pm.Launch("copy", flops=0.0, bytes=3.0e12)  # 1 s at the copy peak: slower at the named fraction
    assert copy.seconds(dev) == pytest.approx(1.0 / pm.MEMORY_EFFICIENCY + dev.launch_s)
    assert copy.bound(dev) == "hbm"
    gemm = pm.Launch("gemm", flops=798e12, bytes=1.0, triton_gemm=True)
    assert gemm.bound(dev) == "mma"
    assert gemm.seconds(dev, triton_gemm_efficiency=0.8) == pytest.approx(1 / 0.8 + dev.launch_s)
    reread = pm.Launch("reread", flops=0.0, bytes=1e6, l2_bytes=5.5e12)
    assert reread.bound(dev) == "l2" and reread.seconds(dev) == pytest.approx(1.0 + dev.launch_s)
    shrink = pm.Launch("shrink", flops=0.0, bytes=1e6, issue_s=2e-3)
    assert shrink.bound(dev) == "issue"
    plan, frozen = pm.Plan([gemm, shrink]), pm.Plan([pm.Launch("base", flops=798e12, bytes=1.0)])
    terms = plan.terms(dev)
    assert terms["mma"] == pytest.approx(1.0) and terms["issue"] == pytest.approx(2e-3)
    assert terms["launch"] == pytest.approx(2 * dev.launch_s)
    assert pm.dominant_terms([plan], [frozen], dev).startswith("issue +2000 µs")
