"""Turn ``pytest bench/ --benchmark-json`` files into a Markdown report and PNG plots.

    python bench/report.py bench/results/<gpu>/ --out bench/results/<gpu>/report.md

Reads every ``*.json`` under the given files/folders. Each JSON file is one pytest run: ratios are
taken within a file only (a ratio measured in one run beats absolute times across runs). A
record is a benchmark whose ``extra_info`` has ``suite``, ``case``, ``mode``, ``variant`` and
``median_ms`` (schema: bench/README.md); anything else is counted and ignored, so suites written
by others (e.g. the bottleneck adapter) appear as soon as they follow the schema.

Plots need matplotlib (the ``bench`` extra); without it the Markdown is still written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

VARIANT_ORDER = (
    "frozen", "frozen_linear", "fastadapt", "fastadapt_group", "fastadapt_lora", "addmm", "peft_bf16",
    "peft_default", "fastadapt_series", "eager_series", "fastadapt_parallel", "eager_parallel",
    "triton", "cuda", "eager_bf16", "llm_adapters",
)
MODE_ORDER = ("forward", "decode", "backward", "fwd_bwd", "step")

# Issue-4 targets (H100/H200, bf16): the point they are stated at, and fwd+bwd limits per shape.
KERNEL_TARGET_POINT = {"r": 16, "M": 8192, "dropout": 0.1}
KERNEL_RATIO_TARGETS = {"K4096xN4096": 1.10, "K4096xN11008": 1.07}
ISSUE_SHAPES = ("K4096xN4096", "K4096xN11008", "K11008xN4096")


# -- loading ------------------------------------------------------------------------------------------


def find_json(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*.json") if q.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return files


def environment_of(data: dict) -> dict:
    env = data.get("fastadapt") or (data.get("machine_info") or {}).get("fastadapt") or {}
    if not env.get("git") and data.get("commit_info"):
        ci = data["commit_info"]
        env = dict(env, git={"commit": ci.get("id"), "dirty": ci.get("dirty"), "source": "pytest-benchmark"})
    if not env.get("date_utc") and data.get("datetime"):
        env = dict(env, date_utc=data["datetime"])
    return env


def load_run(path: Path) -> tuple[dict, list[dict], int]:
    """(environment, records, number of benchmarks without our schema)."""
    data = json.loads(path.read_text())
    records, ignored = [], 0
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        if not all(k in info for k in ("suite", "case", "mode", "variant")) or info.get("median_ms") is None:
            ignored += 1
            continue
        info["_name"] = b.get("name") or b.get("fullname")
        stats = b.get("stats") or {}
        info["_pytest_median_ms"] = stats["median"] * 1e3 if "median" in stats else None
        records.append(info)
    _fill_ratios(records)
    return environment_of(data), records, ignored


def _fill_ratios(records: list[dict]) -> None:
    """ratio_to_ref from the reference record of the same run when there is one; else keep the stored one."""
    by_key = {}
    for r in records:
        by_key[(r["suite"], r["case"], r["mode"], r["variant"])] = r
    for r in records:
        ref_variant = r.get("ref_variant")
        if not ref_variant or r["variant"] == ref_variant:
            continue
        ref = by_key.get((r["suite"], r.get("ref_key", r["case"]), r["mode"], ref_variant))
        if ref and ref.get("median_ms"):
            r["ratio_to_ref"] = r["median_ms"] / ref["median_ms"]
            r["pct_over_ref"] = 100.0 * (r["ratio_to_ref"] - 1.0)
            r["_ref_from_run"] = True


# -- formatting -----------------------------------------------------------------------------------------


def _order(values, preferred):
    rank = {v: i for i, v in enumerate(preferred)}
    return sorted(values, key=lambda v: (rank.get(v, len(rank)), str(v)))


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if v < 1 else f"{v:.3f}" if v < 100 else f"{v:.1f}"


def _pct(r: dict) -> str:
    pct = r.get("pct_over_ref")
    return "" if pct is None else f" ({pct:+.1f}%)"


def _case_sort_key(case: str, recs: list[dict]):
    r = recs[0]
    return (str(r.get("shape", r.get("model", ""))), r.get("r") or 0, r.get("dropout") or 0.0, r.get("M") or 0,
            r.get("layers") or 0, str(r.get("grad_ckpt", "")), case)


def env_line(env: dict) -> str:
    gpu = (env.get("gpu") or {}).get("name") or "no GPU (CPU)"  # a smoke run says so below
    git = env.get("git") or {}
    commit = git.get("commit") or "unknown"
    dirty = " (uncommitted changes)" if git.get("dirty") else ""
    return (f"{gpu} · torch {env.get('torch')} · triton {env.get('triton')} · CUDA {env.get('cuda_runtime')} · "
            f"transformers {env.get('transformers')} · peft {env.get('peft')} · commit `{commit}`{dirty} · "
            f"source sha256 `{env.get('source_sha256_16')}` · {env.get('date_utc')}")


def pivot_table(records: list[dict]) -> list[str]:
    """Rows = case, columns = variant, cell = median ms (+% over the reference variant)."""
    variants = _order({r["variant"] for r in records}, VARIANT_ORDER)
    cases: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        cases[r["case"]].append(r)
    lines = ["| case | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    # reference rows (e.g. frozen, case without r/p) sit in the table of their LoRA cases' ref_key
    for case in sorted(cases, key=lambda c: _case_sort_key(c, cases[c])):
        row = {r["variant"]: r for r in cases[case]}
        if set(row) == {records[0].get("ref_variant")} and any(
            r.get("ref_key") == case and r["case"] != case for r in records
        ):
            continue  # shown inside the LoRA rows below
        ref_rows = {r["variant"]: r for r in records
                    if r["case"] == cases[case][0].get("ref_key") and r["variant"] == r.get("ref_variant")}
        cells = []
        for v in variants:
            r = row.get(v) or ref_rows.get(v)
            cells.append("-" if r is None else f"{_ms(r['median_ms'])}{_pct(r)}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return lines


def memory_table(records: list[dict]) -> list[str]:
    with_mem = [r for r in records if r.get("peak_mem_bytes") is not None]
    if not with_mem:
        return []
    variants = _order({r["variant"] for r in with_mem}, VARIANT_ORDER)
    cases: dict[str, dict] = defaultdict(dict)
    for r in with_mem:
        cases[r["case"]][r["variant"]] = r
    lines = ["| case (peak MiB over inputs) | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for case in sorted(cases, key=lambda c: _case_sort_key(c, list(cases[c].values()))):
        cells = [f"{cases[case][v]['peak_mem_bytes'] / 2**20:.1f}" if v in cases[case] else "-" for v in variants]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return lines


def e2e_table(records: list[dict]) -> list[str]:
    lines = ["| case | variant | tokens/s | step ms (median) | × frozen | peak GiB | trainable params |",
             "|---|---|---|---|---|---|---|"]
    cases: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        cases[r["case"]].append(r)
    rank = {v: i for i, v in enumerate(VARIANT_ORDER)}
    for case in sorted(cases, key=lambda c: _case_sort_key(c, cases[c])):
        for r in sorted(cases[case], key=lambda r: rank.get(r["variant"], len(rank))):
            ratio = r.get("ratio_to_ref")
            trainable = r.get("trainable_params")
            lines.append(
                f"| {case} | {r['variant']} | {r.get('tokens_per_s', 0):,.0f} | {_ms(r['median_ms'])} | "
                f"{'-' if ratio is None else f'{ratio:.3f}'} | {_gib(r.get('peak_mem_bytes'))} | "
                f"{'-' if trainable is None else f'{trainable:,}'} |"
            )
    return lines


def cpu_e2e_table(records: list[dict]) -> list[str]:
    """test_e2e_embedded_interleaved: the step-time ratio to the compared variant beside the A/A
    ratio (the noise of that run)."""
    lines = ["| case | variant | vs | step ms | vs ms | ratio | A/A | goal |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['case']} | {r['variant']} | {r['ref_variant']} | {_ms(r['median_ms'])} | "
                     f"{_ms(r['ref_ms'])} | {r['ratio_to_ref']:.3f} | {r['aa_ratio']:.3f} | "
                     f"{_check(r.get('goal_met'))} |")
    return lines


def peak_rss_table(records: list[dict]) -> list[str]:
    """test_peak_rss_embedded: peak resident memory of each training run, fresh processes."""
    lines = ["| case | variant | peak RSS MiB | vs | peak RSS MiB | difference MiB | steps |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        rss = r["peak_rss_bytes"]
        lines.append(f"| {r['case']} | {r['variant']} | {rss[r['variant']] / 2**20:,.0f} | {r['ref_variant']} | "
                     f"{rss[r['ref_variant']] / 2**20:,.0f} | {r['peak_rss_delta_mib']:+,.0f} | {r['rss_steps']} |")
    return lines


def saved_memory_table(records: list[dict]) -> list[str]:
    """test_bench_saved_memory.py: MiB over the frozen model per count, the ratio to PEFT, the goal."""
    lines = ["| case | variant | saved, MiB over frozen | × PEFT | held, MiB over frozen | × PEFT | goal |",
             "|---|---|---|---|---|---|---|"]
    frozen = {r["case"]: r for r in records if r["variant"] == "frozen"}
    for r in records:
        if r["variant"] == "frozen":
            continue
        base = next((f for c, f in frozen.items() if r["case"].startswith(c)), None)
        cells = []
        for count in ("saved", "held"):
            ratio = r.get(f"{count}_ratio_to_peft")
            cells += [f"{r.get(f'{count}_extra_mib', 0):.1f}", "-" if ratio is None else f"{ratio:.3f}"]
        met = [r.get(f"goal_{c}_met") for c in ("saved", "held")]
        goal = "" if r.get("goal_saved") is None else (
            f"{r['goal_saved']}: saved {_check(met[0])}, held {_check(met[1])}")
        case = r["case"] if base is None else r["case"][len(base["case"]) + 1:]
        lines.append(f"| {case} | {r['variant']} | " + " | ".join(cells) + f" | {goal} |")
    for case, f in frozen.items():
        lines += ["", f"Frozen model ({case}): saved {f.get('saved_mib', 0):.1f} MiB, "
                      f"held {f.get('held_mib', 0):.1f} MiB."]
    return lines


def _check(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def kernel_targets(records: list[dict]) -> list[str]:
    """Issue 4's targets at r=16, M=8192, dropout 0.1, fwd_bwd; decode (M ≤ 16) ≤ 1.5× frozen."""
    pt = KERNEL_TARGET_POINT
    at = [r for r in records if r["suite"] == "lora_linear" and r.get("r") == pt["r"] and r.get("M") == pt["M"]
          and r.get("dropout") == pt["dropout"] and r["mode"] == "fwd_bwd"]
    out = []
    for shape in sorted({r.get("shape") for r in at}):
        row = {r["variant"]: r for r in at if r.get("shape") == shape}
        fa_r = row.get("fastadapt")
        if not fa_r:
            continue
        ratio = fa_r.get("ratio_to_ref")
        limit = KERNEL_RATIO_TARGETS.get(shape)
        out.append(f"| {shape} fwd+bwd ≤ {limit}× frozen | {'-' if ratio is None else f'{ratio:.3f}×'} | "
                   f"{_check(None if (limit is None or ratio is None) else ratio <= limit)} |")
        for base, need in (("peft_default", 1.8), ("peft_bf16", 1.3)):
            if base in row:
                speed = row[base]["median_ms"] / fa_r["median_ms"]
                out.append(f"| {shape} ≥ {need}× faster than {base} | {speed:.2f}× | {_check(speed >= need)} |")
    decode = [r for r in records if r["suite"] == "lora_linear" and r["variant"] == "fastadapt"
              and r.get("shape") in ISSUE_SHAPES and (r.get("M") or 99) <= 16 and r.get("ratio_to_ref") is not None]
    if decode:
        worst = max(decode, key=lambda r: r["ratio_to_ref"])
        out.append(f"| decode (M ≤ 16) ≤ 1.5× frozen, worst case {worst['case']} {worst['mode']} | "
                   f"{worst['ratio_to_ref']:.3f}× | {_check(worst['ratio_to_ref'] <= 1.5)} |")
    return (["| target (issue 4) | measured | status |", "|---|---|---|", *out]) if out else []


def e2e_targets(records: list[dict]) -> list[str]:
    out = []
    cases: dict[str, dict] = defaultdict(dict)
    for r in records:
        if r["suite"] == "e2e":
            cases[r["case"]][r["variant"]] = r
    for case, row in sorted(cases.items()):
        fa_r = row.get("fastadapt_lora")
        if not fa_r:
            continue
        ratio = fa_r.get("ratio_to_ref")
        if ratio is not None:
            out.append(f"| {case}: step ≤ 1.12× frozen | {ratio:.3f}× | {_check(ratio <= 1.12)} |")
        for base, need in (("peft_default", 1.6), ("peft_bf16", 1.25)):
            if base in row:
                speed = fa_r["tokens_per_s"] / row[base]["tokens_per_s"]
                out.append(f"| {case}: ≥ {need}× tokens/s of {base} | {speed:.2f}× | {_check(speed >= need)} |")
        peft_peaks = [row[b]["peak_mem_bytes"] for b in ("peft_default", "peft_bf16")
                      if b in row and row[b].get("peak_mem_bytes") is not None]
        if fa_r.get("peak_mem_bytes") is not None and peft_peaks:
            ok = fa_r["peak_mem_bytes"] <= min(peft_peaks)
            out.append(f"| {case}: peak memory ≤ PEFT's | {_gib(fa_r['peak_mem_bytes'])} GiB vs "
                       f"{_gib(min(peft_peaks))} GiB | {_check(ok)} |")
            layers = fa_r.get("layers") or 0
            if "peft_default" in row and layers and row["peft_default"].get("peak_mem_bytes") is not None:
                saved = (row["peft_default"]["peak_mem_bytes"] - fa_r["peak_mem_bytes"]) / layers * 8
                note = "" if fa_r.get("tokens_per_step") == 16384 else " (target is stated at 16k tokens/step)"
                out.append(f"| {case}: ≥ 1 GB less than PEFT default per 8 layers{note} | "
                           f"{saved / 1e9:.2f} GB | {_check(saved >= 1e9)} |")
    return (["| target (issue 9) | measured | status |", "|---|---|---|", *out]) if out else []


# -- plots ----------------------------------------------------------------------------------------------


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_tokens(plt, records: list[dict], path: Path) -> Path | None:
    e2e = [r for r in records if r["suite"] == "e2e" and r.get("tokens_per_s")]
    if not e2e:
        return None
    cases = sorted({r["case"] for r in e2e})
    variants = _order({r["variant"] for r in e2e}, VARIANT_ORDER)
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases) * max(1, len(variants) / 4)), 4.5))
    for i, v in enumerate(variants):
        ys = [next((r["tokens_per_s"] for r in e2e if r["case"] == c and r["variant"] == v), 0) for c in cases]
        ax.bar([j + i * width for j in range(len(cases))], ys, width, label=v)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("tokens / s (median step, AdamW included)")
    ax.set_title("End-to-end training throughput")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pct(plt, records: list[dict], suite: str, mode: str, path: Path) -> Path | None:
    """% over the reference variant: one panel per ``group``, x = ``x`` (e.g. M) when numeric."""
    recs = [r for r in records if r["suite"] == suite and r["mode"] == mode and r.get("pct_over_ref") is not None]
    if not recs:
        return None
    groups = sorted({str(r.get("group") or r["case"]) for r in recs})
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    numeric_x = all(isinstance(r.get("x"), (int, float)) and r.get("x") > 0 for r in recs)
    for ax, gname in zip(axes.flat, groups):
        grp = [r for r in recs if str(r.get("group") or r["case"]) == gname]
        variants = _order({r["variant"] for r in grp}, VARIANT_ORDER)
        if numeric_x:
            for v in variants:
                pts = sorted((r["x"], r["pct_over_ref"]) for r in grp if r["variant"] == v)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("M (tokens)")
        else:
            ax.bar(range(len(variants)), [next(r["pct_over_ref"] for r in grp if r["variant"] == v) for v in variants])
            ax.set_xticks(range(len(variants)))
            ax.set_xticklabels(variants, rotation=30, ha="right", fontsize=7)
        if max(abs(r["pct_over_ref"]) for r in grp) > 300:  # decode sizes dwarf the large-M points
            ax.set_yscale("symlog", linthresh=10)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(gname, fontsize=9)
        ax.set_ylabel(f"% over {grp[0].get('ref_variant', 'ref')}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    if numeric_x:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{suite} · {mode}: time over the {recs[0].get('ref_variant', 'reference')} (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- report ---------------------------------------------------------------------------------------------


def build_report(files: list[Path], out: Path, *, plots: bool = True, command: str | None = None) -> str:
    plt = _matplotlib() if plots else None
    if plots and plt is None:
        print("report.py: matplotlib is not installed (pip install 'fastadapt[bench]' or pip install matplotlib); "
              "writing the Markdown without plots", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# fastadapt benchmark report", ""]
    if command:
        lines += [f"Generated by `{command}`.", ""]
    lines += ["Each section is one pytest run; ratios are within that run. Cells: median ms (+% over the "
              "reference variant, the frozen base unless stated).", ""]
    for path in files:
        env, records, ignored = load_run(path)
        lines += [f"## {path.name}", "", env_line(env), ""]
        if ignored:
            lines += [f"({ignored} benchmark(s) without the fastadapt extra_info schema ignored.)", ""]
        if not records:
            lines += ["No records.", ""]
            continue
        measured_anywhere = [r for r in records if (r["suite"] == "saved_memory" and not r["case"].startswith("tiny"))
                             or (r["suite"] in ("e2e", "peak_rss") and "-cpu-" in r["case"])]
        if not (env.get("gpu") or {}).get("name") and len(measured_anywhere) < len(records):
            lines += ["> CPU smoke run: these numbers only prove the code runs (no targets checked).", ""]
        stem = path.stem
        on_gpu = bool((env.get("gpu") or {}).get("name"))
        kt, et = (kernel_targets(records), e2e_targets(records)) if on_gpu else ([], [])
        targets = kt + ([""] if kt and et else []) + et
        if targets:
            lines += ["### Targets", "", *targets, ""]
        suites = _order({r["suite"] for r in records}, ("e2e", "lora_linear", "lora_linear_group"))
        for suite in suites:
            srecs = [r for r in records if r["suite"] == suite]
            if suite == "saved_memory":
                lines += ["### Saved for backward (bytes autograd keeps after one training forward)", "",
                          *saved_memory_table(srecs), ""]
                continue
            if suite == "peak_rss":
                lines += ["### Peak RSS of a training run (fresh process per variant)", "", *peak_rss_table(srecs), ""]
                continue
            cpu = [r for r in srecs if suite == "e2e" and "aa_ratio" in r]
            if cpu:
                lines += ["### CPU training step and peak RSS, interleaved rounds with an A/A run", "",
                          *cpu_e2e_table(cpu), ""]
                srecs = [r for r in srecs if r not in cpu]
            if suite == "e2e" and srecs:
                lines += ["### End to end (tokens/s, step time, peak memory)", "", *e2e_table(srecs), ""]
                if plt is not None and (p := plot_tokens(plt, srecs, out.parent / f"{stem}_e2e_tokens.png")):
                    lines += [f"![tokens/s]({p.name})", ""]
                continue
            for mode in _order({r["mode"] for r in srecs}, MODE_ORDER):
                mrecs = [r for r in srecs if r["mode"] == mode]
                lines += [f"### {suite} · {mode}", "", *pivot_table(mrecs), ""]
                mem = memory_table(mrecs)
                if mem:
                    lines += ["Peak memory while the call runs (MiB over what was allocated before):", "", *mem, ""]
                if plt is not None:
                    p = plot_pct(plt, mrecs, suite, mode, out.parent / f"{stem}_{suite}_{mode}_pct.png")
                    if p:
                        lines += [f"![% over reference]({p.name})", ""]
    text = "\n".join(lines)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", help="benchmark JSON files or folders holding them")
    ap.add_argument("--out", required=True, help="Markdown file to write (plots go beside it)")
    ap.add_argument("--no-plots", action="store_true", help="write the Markdown only")
    args = ap.parse_args(argv)
    files = find_json(args.paths)
    if not files:
        print(f"report.py: no .json files under {args.paths}", file=sys.stderr)
        return 2
    command = "python bench/report.py " + " ".join(argv if argv is not None else sys.argv[1:])
    build_report(files, Path(args.out), plots=not args.no_plots, command=command)
    print(f"wrote {args.out} from {len(files)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
