"""Measure how a fine-tuned model's GGUF exports run in real clients (issue 29's goals).

    python scripts/gguf_agreement.py --adapter runs/lora --out bench/results/cpu

For the base model plus ``--adapter`` (fp32, in transformers: the reference), on the first ``--prompts``
GSM8K test problems in the training prompt:

- every ``--quants`` type: the merged GGUF export's greedy continuation (``--new-tokens`` tokens) in
  llama.cpp (llama-cpp-python) and in transformers' GGUF loader, against the reference's: identical
  continuations, and mean/max |Δlogit| and argmax agreement over the positions that predict the
  reference's continuation (teacher-forced); llama.cpp's tokenization of each prompt against the
  tokenizer's; the export's wall-clock time and the error it recorded;
- the LoRA adapter as a GGUF adapter file on an f16 GGUF of the base model (llama.cpp's ``--lora``)
  against the merged f16 file, both in llama.cpp; for an embedded model also on the shipped GGUF
  file itself (the file the model was loaded from) against the reference.

Writes ``gguf-agreement.json`` (and the files, under ``--work``) and prints a Markdown table. Needs
``llama-cpp-python``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

import fastadapt as fa
from fastadapt.app.data import load_eval_set
from fastadapt.app.gguf_agreement import (
    agreement,
    gguf_transformers,
    llamacpp_available,
    llamacpp_tokens,
    open_llamacpp,
    run_llamacpp,
    run_transformers,
)
from fastadapt.app.prompts import build_prompt
from fastadapt.export import export_gguf
from fastadapt.gguf_io import QUANTS
from fastadapt.models import EMBEDDED_MODELS, embedded_gguf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", required=True, help="the fine-tuned adapter folder (fastadapt train's --output)")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--quants", default=",".join(QUANTS), help="comma-separated GGUF types")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    p.add_argument("--work", default="runs/gguf-agreement", help="folder for the GGUF files")
    p.add_argument("--out", default=None, help="folder for gguf-agreement.json (default: --work)")
    args = p.parse_args(argv)
    if not llamacpp_available():
        print("llama-cpp-python is not installed: pip install llama-cpp-python", file=sys.stderr)
        return 2
    import llama_cpp

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base, tok = fa.load_model(args.model)
    model = fa.load_adapter(copy.deepcopy(base), args.adapter).eval()
    texts = [build_prompt(r["instruction"], r.get("input") or "") for r in load_eval_set("gsm8k", limit=args.prompts)]
    ids = [tok(t)["input_ids"] for t in texts]
    n = args.new_tokens

    def say(message: str) -> None:
        print(f"[gguf-agreement] {message}", flush=True)

    t = time.perf_counter()
    reference = run_transformers(model, ids, new_tokens=n)
    reference = run_transformers(model, ids, new_tokens=n, teacher=reference.tokens)
    say(f"reference (transformers, fp32, adapted): {time.perf_counter() - t:.0f} s")

    def in_llamacpp(path: Path, lora: Path | None = None, teacher=None):
        llm = open_llamacpp(path, lora=lora, threads=args.threads)
        try:
            same = sum(a == b for a, b in zip(llamacpp_tokens(llm, texts), ids))
            run = run_llamacpp(llm, ids, new_tokens=n, teacher=teacher or reference.tokens)
            return run, same
        finally:
            llm.close()

    results: dict = {"model": args.model, "adapter": str(args.adapter), "prompts": len(ids), "new_tokens": n,
                     "reference": "the adapted model, fp32, transformers", "quants": {}}
    for quant in [q.strip() for q in args.quants.split(",") if q.strip()]:
        path = work / f"merged-{quant}.gguf"
        exported = export_gguf(model, path, tokenizer=tok, quant=quant, overwrite=True)
        run, same_tokens = in_llamacpp(path)
        loaded = gguf_transformers(path)
        hf_run = run_transformers(loaded, ids, new_tokens=n, teacher=reference.tokens)
        del loaded
        results["quants"][quant] = {
            "export_seconds": round(exported.seconds, 2), "bytes": path.stat().st_size,
            "recorded_error": None if exported.error is None else exported.error.__dict__,
            "llamacpp": agreement(run, reference).as_dict(), "llamacpp_prompt_tokenization_identical": same_tokens,
            "transformers_gguf": agreement(hf_run, reference).as_dict(),
            # the same file in both clients: what llama.cpp's own arithmetic adds (it quantizes the
            # activations of quantized matmuls, keeps an F16 KV cache)
            "llamacpp_vs_transformers_same_file": agreement(run, hf_run).as_dict(),
        }
        say(f"{quant}: {json.dumps(results['quants'][quant])}")

    # the adapter file on an f16 base file, against the merged f16 file, both in llama.cpp
    base_path = export_gguf(base, work / "base-f16.gguf", tokenizer=tok, quant="f16", overwrite=True).path
    merged_path = work / "merged-f16.gguf"
    if not merged_path.exists():
        export_gguf(model, merged_path, tokenizer=tok, quant="f16")
    adapter_path = fa.save_adapter(model, work / "adapter.gguf", format="gguf")
    merged, _ = in_llamacpp(merged_path)
    merged, _ = in_llamacpp(merged_path, teacher=merged.tokens)
    with_lora, _ = in_llamacpp(base_path, adapter_path, teacher=merged.tokens)
    results["lora_file"] = {"base": "f16", "vs_merged_f16_llamacpp": agreement(with_lora, merged).as_dict(),
                          "adapter_bytes": adapter_path.stat().st_size}
    if args.model in EMBEDDED_MODELS:  # GGUF in, GGUF out: the shipped file itself as the base
        folder, name = embedded_gguf(args.model)
        shipped, _ = in_llamacpp(folder / name, adapter_path)
        results["lora_file"]["shipped_file_plus_adapter_vs_reference"] = agreement(shipped, reference).as_dict()
        results["lora_file"]["shipped_file"] = name
        # the baseline: the shipped file alone, llama.cpp against transformers' GGUF loader reading it
        plain = gguf_transformers(folder / name)
        hf_plain = run_transformers(plain, ids, new_tokens=n)
        hf_plain = run_transformers(plain, ids, new_tokens=n, teacher=hf_plain.tokens)
        lc_plain, _ = in_llamacpp(folder / name, teacher=hf_plain.tokens)
        results["shipped_file_llamacpp_vs_transformers"] = agreement(lc_plain, hf_plain).as_dict()
    say(f"adapter file: {json.dumps(results['lora_file'])}")
    results["environment"] = {"llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
                              "machine": platform.machine(), "threads_llamacpp": args.threads,
                              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    out = Path(args.out or work)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf-agreement.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


def table(r: dict) -> str:
    lines = [f"{r['model']} + {r['adapter']}: {r['prompts']} GSM8K test prompts, greedy {r['new_tokens']} new tokens; "
             f"reference: {r['reference']}",
             "| type | export s | MiB | llama.cpp identical | llama.cpp mean / max abs Δlogit | transformers GGUF "
             "identical | transformers GGUF mean / max abs Δlogit | recorded error (probe) |",
             "|---|---|---|---|---|---|---|---|"]
    for q, x in r["quants"].items():
        lc, hf, rec = x["llamacpp"], x["transformers_gguf"], x["recorded_error"]
        lines.append(f"| {q} | {x['export_seconds']:.1f} | {x['bytes'] / 2**20:.0f} | "
                     f"{lc['identical']}/{lc['prompts']} | {lc['mean_abs_logit_diff']:.4f} / "
                     f"{lc['max_abs_logit_diff']:.3f} | "
                     f"{hf['identical']}/{hf['prompts']} | {hf['mean_abs_logit_diff']:.4f} / "
                     f"{hf['max_abs_logit_diff']:.3f} | "
                     f"{'—' if rec is None else format(rec['mean_abs_logit_diff'], '.4f')} |")
    a = r["lora_file"]["vs_merged_f16_llamacpp"]
    lines.append(f"\nllama.cpp, f16 base + adapter GGUF vs merged f16 GGUF: identical {a['identical']}/{a['prompts']}, "
                 f"mean |Δlogit| {a['mean_abs_logit_diff']:.4f}, max {a['max_abs_logit_diff']:.3f}, "
                 f"argmax agreement {a['argmax_agreement']:.1%}")
    for q, x in r["quants"].items():
        same = x.get("llamacpp_vs_transformers_same_file")
        if same:
            lines.append(f"{q}: llama.cpp vs transformers on the same file: identical {same['identical']}/"
                         f"{same['prompts']}, mean |Δlogit| {same['mean_abs_logit_diff']:.4f}")
    base = r.get("shipped_file_llamacpp_vs_transformers")
    if base:
        lines.append(f"the shipped file alone, llama.cpp vs transformers' GGUF loader: identical {base['identical']}/"
                     f"{base['prompts']}, mean |Δlogit| {base['mean_abs_logit_diff']:.4f}, max "
                     f"{base['max_abs_logit_diff']:.3f}")
    shipped = r["lora_file"].get("shipped_file_plus_adapter_vs_reference")
    if shipped:
        lines.append(f"llama.cpp, the shipped {r['lora_file']['shipped_file']} + adapter GGUF vs the reference: "
                     f"identical {shipped['identical']}/{shipped['prompts']}, mean |Δlogit| "
                     f"{shipped['mean_abs_logit_diff']:.4f}, max {shipped['max_abs_logit_diff']:.3f}, argmax agreement "
                     f"{shipped['argmax_agreement']:.1%}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
