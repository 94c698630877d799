"""llama.cpp alone, no transformers reference (fast on a busy CPU): a fine-tuned adapter's GGUF files
against the merged f16 export, all run by llama.cpp (llama-cpp-python).

    python scripts/gguf_llamacpp_agreement.py --adapter runs/lora --out bench/results/cpu

On the first ``--prompts`` GSM8K test problems in the training prompt, ``--new-tokens`` greedy tokens,
|Δlogit| teacher-forced on the merged f16 file's continuation (app/gguf_agreement.py): the adapter
GGUF (``fa.save_adapter(format="gguf")``, llama.cpp's ``--lora``) on an f16 base file, the same
adapter on the shipped GGUF file of an embedded model, and the merged export in each ``--quants``
type. Writes ``gguf-llamacpp-agreement.json`` after every stage. scripts/gguf_agreement.py measures
against the adapted model in transformers instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import fastadapt as fa
from fastadapt import _files
from fastadapt.app.data import load_eval_set
from fastadapt.app.gguf_agreement import agreement, llamacpp_available, llamacpp_tokens, open_llamacpp, run_llamacpp
from fastadapt.app.prompts import build_prompt
from fastadapt.export import export_gguf
from fastadapt.models import EMBEDDED_MODELS, embedded_gguf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", required=True, help="the fine-tuned adapter folder (fastadapt train's --output)")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--quants", default="q4_0,q5_1,q4_1,q5_0,bf16", help="comma-separated GGUF types")
    p.add_argument("--work", default="runs/gguf-llamacpp-agreement", help="folder for the GGUF files")
    p.add_argument("--out", default=None, help="folder for the JSON (default: --work)")
    args = p.parse_args(argv)
    if not llamacpp_available():
        print("llama-cpp-python is not installed: pip install llama-cpp-python", file=sys.stderr)
        return 2
    work, out = Path(args.work), Path(args.out or args.work)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    base, tok = fa.load_model(args.model)
    model = fa.load_adapter(copy.deepcopy(base), args.adapter).eval()
    texts = [build_prompt(r["instruction"], r.get("input") or "") for r in load_eval_set("gsm8k", limit=args.prompts)]
    ids = [tok(t)["input_ids"] for t in texts]
    n = args.new_tokens
    res: dict = {"model": args.model, "adapter": str(args.adapter), "prompts": len(ids), "new_tokens": n,
                 "reference": "the merged f16 export in llama.cpp (greedy, then teacher-forced)", "llamacpp_threads": 1}

    def save() -> None:
        res["load_avg_1min"] = os.getloadavg()[0]
        res["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        text = json.dumps(res, indent=2) + "\n"
        _files.atomic_write(out / "gguf-llamacpp-agreement.json", lambda tmp: Path(tmp).write_text(text))
        print(f"[gguf-llamacpp-agreement] {json.dumps(res)}", flush=True)

    def run(path, lora=None, teacher=None):
        llm = open_llamacpp(path, lora=lora)
        try:
            same = sum(a == b for a, b in zip(llamacpp_tokens(llm, texts), ids))
            return run_llamacpp(llm, ids, new_tokens=n, teacher=teacher), same
        finally:
            llm.close()

    base_path = export_gguf(base, work / "base-f16.gguf", tokenizer=tok, quant="f16", overwrite=True).path
    merged_path = export_gguf(model, work / "merged-f16.gguf", tokenizer=tok, quant="f16", overwrite=True).path
    adapter = fa.save_adapter(model, work / "adapter.gguf", format="gguf")
    merged, _ = run(merged_path)
    merged, same = run(merged_path, teacher=merged.tokens)
    res["merged_f16_prompt_tokenization_identical"] = same
    with_lora, _ = run(base_path, adapter, teacher=merged.tokens)
    res["adapter_on_f16_base_vs_merged_f16"] = agreement(with_lora, merged).as_dict()
    res["adapter_bytes"] = adapter.stat().st_size
    save()
    if args.model in EMBEDDED_MODELS:  # GGUF in, GGUF out: the shipped file itself as the base
        folder, name = embedded_gguf(args.model)
        shipped, _ = run(folder / name, adapter, teacher=merged.tokens)
        res["adapter_on_shipped_file_vs_merged_f16"] = agreement(shipped, merged).as_dict()
        res["shipped_file"] = name
        save()
    res["quants_vs_merged_f16"] = {}
    for q in [q.strip() for q in args.quants.split(",") if q.strip()]:
        e = export_gguf(model, work / f"merged-{q}.gguf", tokenizer=tok, quant=q, overwrite=True)
        r, _ = run(e.path, teacher=merged.tokens)
        res["quants_vs_merged_f16"][q] = {"llamacpp": agreement(r, merged).as_dict(),
                                          "export_seconds": round(e.seconds, 2), "bytes": e.path.stat().st_size,
                                          "recorded_error": e.error.__dict__ if e.error else None}
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
