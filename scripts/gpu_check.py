"""Bookkeeping of ``scripts/gpu-check.sh`` that needs no GPU and no torch.

    python scripts/gpu_check.py merge-bench --step bench-lora --results R.jsonl --pytest-json P.json --out B.json
    python scripts/gpu_check.py show-records verified-<gpu>.json

``merge-bench`` writes a step's pytest-benchmark JSON under ``$OUT`` from every benchmark that any run
of the step finished (``results.jsonl``): pytest's own entry (with its round statistics) where this
run's pytest JSON or the earlier file has it, else the record streamed by ``gpu_check_plugin`` — a
step stopped at its cap by SIGKILL never writes its pytest JSON, and a ``--resume`` run writes only
the cases it ran. ``bench/report.py`` needs only the records.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _load(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def streamed(results: Path, step: str, tree: str | None = None) -> dict[str, dict]:
    """{node id: benchmark record} of the passed benchmarks of ``step`` on the stamped tree
    (``GPU_CHECK_TREE``: a --resume after the code changed must not carry the old code's timings;
    the last line of a test wins)."""
    tree = tree if tree is not None else (os.environ.get("GPU_CHECK_TREE") or None)
    out: dict[str, dict] = {}
    if not results.is_file():
        return out
    for line in results.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("step") != step or row.get("tree") != tree:
            continue
        if row.get("nodeid") and row.get("outcome") == "passed" and row.get("bench"):
            out[row["nodeid"]] = row["bench"]
    return out


def merge_bench(step: str, results: Path, pytest_json: Path | None, out: Path) -> dict:
    new, old = _load(pytest_json), _load(out)
    entries = {b.get("fullname"): b for b in old.get("benchmarks", [])}
    entries.update({b.get("fullname"): b for b in new.get("benchmarks", [])})
    merged = []
    for nodeid, info in streamed(results, step).items():
        entry = entries.get(nodeid)
        ran = (entry or {}).get("extra_info") or {}
        if entry is None or ran.get("median_ms") != info.get("median_ms"):  # not written, or another run's
            entry = {"name": nodeid.split("::")[-1], "fullname": nodeid, "stats": None,
                     "source": "results.jsonl (pytest's JSON was not written: step stopped)"}
        merged.append({**entry, "extra_info": info})
    data = {key: value for key, value in (old | new).items() if key != "benchmarks"}
    data["benchmarks"] = merged
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(out)
    print(f"gpu_check: {out.name}: {len(merged)} benchmarks ({len(new.get('benchmarks', []))} from this run's "
          f"pytest JSON{'' if new else ', which was not written'})")
    return data


def show_records(path: Path) -> None:
    records = _load_list(path)
    if records is None:
        print(f"records: none written ({path.name} missing or unreadable)")
        return
    print(f"records: {len(records)} in {path.name}")
    for r in records:
        print(f"  {r.get('op', ''):<20} {r.get('backend', ''):<7} {r.get('shape_class', ''):<7} "
              f"{r.get('variant', ''):<9} {float(r.get('speedup_over_torch') or 0):.3f}x torch")


def _load_list(path: Path) -> list | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, list) else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    mb = sub.add_parser("merge-bench", help="a step's benchmark JSON under $OUT from everything it finished")
    mb.add_argument("--step", required=True)
    mb.add_argument("--results", type=Path, required=True)
    mb.add_argument("--pytest-json", type=Path, default=None)
    mb.add_argument("--out", type=Path, required=True)
    sr = sub.add_parser("show-records", help="one line per record")
    sr.add_argument("path", type=Path)
    args = ap.parse_args(argv)
    if args.command == "merge-bench":
        merge_bench(args.step, args.results, args.pytest_json, args.out)
    else:
        show_records(args.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
