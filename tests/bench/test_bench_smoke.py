"""CI proof that the benchmark suite (bench/) and its report run: the suite's smoke mode on a few
variants, then bench/report.py on its JSON and on a hand-written GPU-like JSON (targets,
ratios, a suite written by someone else, a benchmark without our schema, no matplotlib)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


def _report_module():
    spec = importlib.util.spec_from_file_location("fastadapt_bench_report", BENCH / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def test_bench_smoke_mode_and_report_run(tmp_path):
    out_json = tmp_path / "cpu" / "smoke.json"
    out_json.parent.mkdir()  # pytest-benchmark does not create the folder
    # an xdist worker's variables would make the inner run's pytest-benchmark disable itself (no JSON)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.pop("FASTADAPT_BACKEND", None)
    # every kernel-level variant and mode; end to end: the floor, fastadapt and PEFT (the rest is
    # the same code path; `pytest bench/` on CPU runs them all)
    select = ("test_smoke_lora_linear or (test_smoke_dora_linear and fwd_bwd) or "
              "(test_smoke_e2e and ckptoff and (frozen or fastadapt_lora or peft_default)) or "
              "(test_smoke_saved_memory and (frozen or lora-p0.1 or series)) or "
              "(test_smoke_mixed_batch_generation and lora)")
    cmd = [sys.executable, "-m", "pytest", str(BENCH), "-q", "-p", "no:cacheprovider", "-m", "smoke",
           "--bench-smoke", "-k", select, f"--benchmark-json={out_json}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "fastadapt bench summary" in proc.stdout

    data = json.loads(out_json.read_text())
    assert data["fastadapt"]["torch"] and "git" in data["fastadapt"]
    assert data["machine_info"]["fastadapt"]["torch"]
    infos = [b["extra_info"] for b in data["benchmarks"]]
    lora = {(i["variant"], i["mode"]) for i in infos if i["suite"] == "lora_linear"}
    assert {v for v, _ in lora} == {"frozen", "peft_default", "peft_bf16", "addmm", "fastadapt", "fastadapt_epilogue",
                                    "fastadapt_fused"}
    assert {m for _, m in lora} == {"forward", "backward", "fwd_bwd"}
    assert {i["variant"] for i in infos if i["suite"] == "lora_linear_group"} >= {"fastadapt_group", "frozen"}
    assert {i["variant"] for i in infos if i["suite"] == "dora_linear"} == {
        "frozen", "peft_default", "peft_bf16", "addmm", "fastadapt", "fastadapt_fused", "fastadapt_lora"}
    e2e = [i for i in infos if i["suite"] == "e2e"]
    assert {i["variant"] for i in e2e} == {"frozen", "fastadapt_lora", "peft_default"}
    for i in infos:
        assert i["median_ms"] > 0
        # saved_memory: bytes, not times; lora_linear_4bit (matched by the -k above): no ratio recorded
        if i["variant"] != "frozen" and i["suite"] not in ("saved_memory", "lora_linear_4bit"):
            assert i.get("ref_ms", 0) > 0 and i.get("ratio_to_ref", 0) > 0, i
    assert all(i["tokens_per_s"] > 0 and i["trainable_params"] >= 0 for i in e2e)
    # saved for backward (tiny model): with dropout fastadapt keeps less than PEFT, and the series
    # adapter's dropout costs at most a bit per element of its inputs
    memory = {(i["method"], i["dropout"], i["variant"]): i for i in infos if i["suite"] == "saved_memory"}
    assert memory[("lora", 0.1, "fastadapt_lora")]["saved_ratio_to_peft"] < 0.6
    assert memory[("lora", 0.1, "reference_lora")]["saved_ratio_to_peft"] == pytest.approx(1.0)
    assert memory[("series", 0.1, "fastadapt_series")]["goal_saved_met"] is True
    mixed = [i for i in infos if i["suite"] == "mixed_generation"]  # issue 27: vs base and PEFT
    assert [i["method"] for i in mixed] == ["lora"] and mixed[0]["ratio_to_base"] > 0 < mixed[0]["ratio_to_peft"]

    report = tmp_path / "cpu" / "report.md"
    proc = subprocess.run([sys.executable, str(BENCH / "report.py"), str(out_json.parent), "--out", str(report)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = report.read_text()
    assert "### lora_linear · fwd_bwd" in text and "### End to end" in text and "CPU smoke run" in text
    assert "### Saved for backward" in text and "| fastadapt_lora |" in text
    if _has_matplotlib():
        assert (report.parent / "smoke_e2e_tokens.png").stat().st_size > 0
        assert (report.parent / "smoke_lora_linear_fwd_bwd_pct.png").stat().st_size > 0


def _bench(name, **info):
    return {"name": name, "stats": {"median": info["median_ms"] / 1e3}, "extra_info": info}


def _gpu_json() -> dict:
    kernel = []
    for variant, ms in (("frozen", 1.0), ("fastadapt", 1.08), ("addmm", 1.3), ("peft_bf16", 1.5),
                        ("peft_default", 2.0)):
        lora = variant != "frozen"
        kernel.append(_bench(
            f"test_lora_linear[fwd_bwd-K4096xN4096-M8192-{variant}]", suite="lora_linear",
            case="K4096xN4096-M8192-r16-p0.1" if lora else "K4096xN4096-M8192", mode="fwd_bwd", variant=variant,
            ref_variant="frozen", ref_key="K4096xN4096-M8192", median_ms=ms, peak_mem_bytes=2**30,
            group="K4096xN4096 r16 p0.1" if lora else "K4096xN4096", x=8192, shape="K4096xN4096", M=8192,
            r=16 if lora else None, dropout=0.1 if lora else None,
            # a stale stored ratio: the report must recompute it from this run's frozen record
            ratio_to_ref=9.9 if lora else None,
        ))
    e2e = []
    for variant, ms, peak in (("frozen", 100.0, 40e9), ("fastadapt_lora", 111.0, 42e9),
                              ("peft_default", 190.0, 60e9), ("peft_bf16", 130.0, 50e9)):
        e2e.append(_bench(
            f"test_e2e[llama7b-ckptoff-{variant}]", suite="e2e", case="llama7b-L8-b8-s2048-ckptoff", mode="step",
            variant=variant, ref_variant="frozen", ref_key="llama7b-L8-b8-s2048-ckptoff", median_ms=ms,
            tokens_per_s=16384 / (ms / 1e3), tokens_per_step=16384, peak_mem_bytes=int(peak), layers=8,
            group="llama7b ckpt off", trainable_params=0 if variant == "frozen" else 40_000_000,
        ))
    other = [  # another author's suite in the same schema, no numeric x
        _bench("test_bottleneck[eager]", suite="bottleneck_adapter", case="d4096-b256-M8192", mode="fwd_bwd",
               variant="eager", ref_variant="eager", median_ms=3.0),
        _bench("test_bottleneck[fused]", suite="bottleneck_adapter", case="d4096-b256-M8192", mode="fwd_bwd",
               variant="fused", ref_variant="eager", median_ms=1.0),
        {"name": "test_unrelated", "stats": {"median": 0.1}, "extra_info": {}},
    ]
    env = {"gpu": {"name": "NVIDIA H100 80GB HBM3"}, "torch": "2.11.0", "triton": "3.6.0", "cuda_runtime": "12.8",
           "git": {"commit": "abc123", "dirty": False}, "date_utc": "2026-01-01T00:00:00+00:00"}
    return {"fastadapt": env, "machine_info": {}, "benchmarks": kernel + e2e + other}


@pytest.mark.parametrize("plots", [True, False], ids=["plots", "no-matplotlib"])
def test_report_on_tiny_gpu_json(tmp_path, monkeypatch, capsys, plots):
    report = _report_module()
    if plots and not _has_matplotlib():
        pytest.skip("matplotlib not installed")
    if not plots:
        monkeypatch.setattr(report, "_matplotlib", lambda: None)
    src = tmp_path / "nvidia-h100" / "run.json"
    src.parent.mkdir()
    src.write_text(json.dumps(_gpu_json()))
    out = tmp_path / "nvidia-h100" / "report.md"
    assert report.main([str(src.parent), "--out", str(out)]) == 0
    text = out.read_text()
    assert "NVIDIA H100 80GB HBM3" in text and "`abc123`" in text
    # ratios recomputed within the run (1.08 / 1.0), not the stale stored 9.9
    assert "1.080 (+8.0%)" in text and "+890.0%" not in text
    assert "| K4096xN4096 fwd+bwd ≤ 1.1× frozen | 1.080× | met |" in text
    assert "≥ 1.8× faster than peft_default | 1.85× | met |" in text
    assert "≥ 1.3× faster than peft_bf16 | 1.39× | met |" in text
    assert "step ≤ 1.12× frozen | 1.110× | met |" in text
    assert "≥ 1.6× tokens/s of peft_default | 1.71× | met |" in text
    assert "≥ 1.25× tokens/s of peft_bf16 | 1.17× | **missed** |" in text
    assert "### bottleneck_adapter · fwd_bwd" in text and "| d4096-b256-M8192 | 3.000 | 1.000 (-66.7%) |" in text
    assert "1 benchmark(s) without the fastadapt extra_info schema ignored" in text
    pngs = sorted(p.name for p in out.parent.glob("*.png"))
    if plots:
        assert pngs == ["run_bottleneck_adapter_fwd_bwd_pct.png", "run_e2e_tokens.png",
                        "run_lora_linear_fwd_bwd_pct.png"]
    else:
        assert pngs == [] and "matplotlib is not installed" in capsys.readouterr().err


def test_report_renders_the_cpu_rounds(tmp_path):
    """test_e2e_embedded_interleaved's records (the ratio beside the A/A ratio) and
    test_peak_rss_embedded's."""
    report = _report_module()
    case = "smollm2-135m-cpu-b2x128-lora-p0.1"
    step = {"suite": "e2e", "case": case, "mode": "step", "variant": "fastadapt_lora", "ref_variant": "peft_lora",
            "median_ms": 900.0, "ref_ms": 1000.0, "ratio_to_ref": 0.9, "aa_ratio": 1.03, "goal_met": True}
    rss = {"suite": "peak_rss", "case": case, "mode": "train", "variant": "fastadapt_lora", "ref_variant": "peft_lora",
           "median_ms": 900.0, "peak_rss_bytes": {"fastadapt_lora": 1536 * 2**20, "peft_lora": 2048 * 2**20},
           "peak_rss_delta_mib": -512.0, "rss_steps": 20}
    src = tmp_path / "cpu" / "e2e_cpu.json"
    src.parent.mkdir()
    src.write_text(json.dumps({"fastadapt": {"torch": "2.13.0", "git": {"commit": "abc123"}}, "machine_info": {},
                               "benchmarks": [_bench("test_e2e_embedded_interleaved[lora-0.1]", **step),
                                              _bench("test_peak_rss_embedded[lora]", **rss)]}))
    out = tmp_path / "cpu" / "report.md"
    assert report.main([str(src.parent), "--out", str(out)]) == 0
    text = out.read_text()
    assert f"| {case} | fastadapt_lora | peft_lora | 900.0 | 1000.0 | 0.900 | 1.030 | met |" in text
    assert f"| {case} | fastadapt_lora | 1,536 | peft_lora | 2,048 | -512 | 20 |" in text
    assert "CPU smoke run" not in text and "### End to end" not in text
