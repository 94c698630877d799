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
import os
import platform
import sys
import time
from pathlib import Path

import torch

import fastadapt as fa
from fastadapt import _files
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
    p.add_argument("--hf-quants", default=None,
                   help="the types also run through transformers' GGUF loader (default: all of --quants)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the shipped file's own llama.cpp vs transformers comparison")
    p.add_argument("--no-adapter-file", action="store_true", help="skip the adapter file's comparisons")
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
    reference_seconds = time.perf_counter() - t
    say(f"reference (transformers, fp32, adapted): {reference_seconds:.0f} s")

    def in_llamacpp(path: Path, lora: Path | None = None, teacher=None):
        llm = open_llamacpp(path, lora=lora, threads=args.threads)
        try:
            same = sum(a == b for a, b in zip(llamacpp_tokens(llm, texts), ids))
            run = run_llamacpp(llm, ids, new_tokens=n, teacher=teacher or reference.tokens)
            return run, same
        finally:
            llm.close()

    def adapter_file(entry: dict) -> None:
        """The adapter file on an f16 base file, against the merged f16 file, both in llama.cpp; for an
        embedded model also on the shipped GGUF file itself (GGUF in, GGUF out) against the reference."""
        base_path = export_gguf(base, work / "base-f16.gguf", tokenizer=tok, quant="f16", overwrite=True).path
        merged_path = export_gguf(model, work / "merged-f16.gguf", tokenizer=tok, quant="f16", overwrite=True).path
        adapter_path = fa.save_adapter(model, work / "adapter.gguf", format="gguf")
        merged, _ = in_llamacpp(merged_path)
        merged, _ = in_llamacpp(merged_path, teacher=merged.tokens)
        with_lora, _ = in_llamacpp(base_path, adapter_path, teacher=merged.tokens)
        entry.update({"base": "f16", "vs_merged_f16_llamacpp": agreement(with_lora, merged).as_dict(),
                      "adapter_bytes": adapter_path.stat().st_size})
        if args.model in EMBEDDED_MODELS:
            folder, name = embedded_gguf(args.model)
            shipped, _ = in_llamacpp(folder / name, adapter_path)
            entry["shipped_file_plus_adapter_vs_reference"] = agreement(shipped, reference).as_dict()
            entry["shipped_file"] = name
        say(f"adapter file: {json.dumps(entry)}")

    results: dict = {"model": args.model, "adapter": str(args.adapter), "prompts": len(ids), "new_tokens": n,
                     "reference": "the adapted model, fp32, transformers",
                     "reference_seconds": round(reference_seconds), "reference_tokens": reference.tokens,
                     "quants": {}, "lora_file": {}}
    out = Path(args.out or work)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every stage: a run stopped part-way keeps what it measured
        results["environment"] = {"llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
                                  "machine": platform.machine(), "threads_llamacpp": args.threads,
                                  "threads_torch": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0],
                                  "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
        text = json.dumps(results, indent=2) + "\n"
        _files.atomic_write(out / "gguf-agreement.json", lambda tmp: Path(tmp).write_text(text))

    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    hf_quants = quants if args.hf_quants is None else [q.strip() for q in args.hf_quants.split(",") if q.strip()]
    for i, quant in enumerate(quants):
        path = work / f"merged-{quant}.gguf"
        exported = export_gguf(model, path, tokenizer=tok, quant=quant, overwrite=True)
        run, same_tokens = in_llamacpp(path)
        entry = results["quants"][quant] = {
            "export_seconds": round(exported.seconds, 2), "bytes": path.stat().st_size,
            "recorded_error": None if exported.error is None else exported.error.__dict__,
            "llamacpp": agreement(run, reference).as_dict(), "llamacpp_prompt_tokenization_identical": same_tokens,
        }
        if quant in hf_quants:
            loaded = gguf_transformers(path)
            hf_run = run_transformers(loaded, ids, new_tokens=n, teacher=reference.tokens)
            del loaded
            entry["transformers_gguf"] = agreement(hf_run, reference).as_dict()
            # the same file in both clients: what llama.cpp's own arithmetic adds (it quantizes the
            # activations of quantized matmuls, keeps an F16 KV cache)
            entry["llamacpp_vs_transformers_same_file"] = agreement(run, hf_run).as_dict()
        say(f"{quant}: {json.dumps(entry)}")
        save()
        if i == 0 and not args.no_adapter_file:  # the adapter file early: llama.cpp only, fast
            adapter_file(results["lora_file"])
            save()
    if args.model in EMBEDDED_MODELS and not args.no_baseline:
        # the baseline: the shipped file alone, llama.cpp against transformers' GGUF loader reading it
        folder, name = embedded_gguf(args.model)
        plain = gguf_transformers(folder / name)
        hf_plain = run_transformers(plain, ids, new_tokens=n)
        hf_plain = run_transformers(plain, ids, new_tokens=n, teacher=hf_plain.tokens)
        lc_plain, _ = in_llamacpp(folder / name, teacher=hf_plain.tokens)
        results["shipped_file_llamacpp_vs_transformers"] = agreement(lc_plain, hf_plain).as_dict()
        save()
    print(table(results))
    return 0


def table(r: dict) -> str:
    lines = [f"{r['model']} + {r['adapter']}: {r['prompts']} GSM8K test prompts, greedy {r['new_tokens']} new tokens; "
             f"reference: {r['reference']}",
             "| type | export s | MiB | llama.cpp identical | llama.cpp mean / max abs Δlogit | transformers GGUF "
             "identical | transformers GGUF mean / max abs Δlogit | recorded error (probe) |",
             "|---|---|---|---|---|---|---|---|"]
    for q, x in r["quants"].items():
        lc, hf, rec = x["llamacpp"], x.get("transformers_gguf"), x["recorded_error"]
        hf_cells = (f"{hf['identical']}/{hf['prompts']} | {hf['mean_abs_logit_diff']:.4f} / "
                    f"{hf['max_abs_logit_diff']:.3f}") if hf else "not run | not run"
        lines.append(f"| {q} | {x['export_seconds']:.1f} | {x['bytes'] / 2**20:.0f} | "
                     f"{lc['identical']}/{lc['prompts']} | {lc['mean_abs_logit_diff']:.4f} / "
                     f"{lc['max_abs_logit_diff']:.3f} | {hf_cells} | "
                     f"{'—' if rec is None else format(rec['mean_abs_logit_diff'], '.4f')} |")
    a = r["lora_file"].get("vs_merged_f16_llamacpp")
    if a:
        lines.append(f"\nllama.cpp, f16 base + adapter GGUF vs merged f16 GGUF: identical {a['identical']}/"
                     f"{a['prompts']}, mean |Δlogit| {a['mean_abs_logit_diff']:.4f}, max "
                     f"{a['max_abs_logit_diff']:.3f}, argmax agreement {a['argmax_agreement']:.1%}")
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
