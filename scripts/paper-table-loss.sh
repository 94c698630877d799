#!/usr/bin/env bash
# The held-out-loss table of docs/paper_table.md: LoRA, series, parallel and prefix tuning trained
# with one CPU budget and two seeds on GSM8K train, then each adapter's held-out loss (the
# teacher-forced loss of GSM8K *test* reference solutions, never trained on), and the base model's.
# Outputs in ${OUT:-runs/table-loss}/; prints a markdown table. Run after scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/table-loss}
SEEDS=${SEEDS:-"42 43"}
# one budget for every method: 30 optimizer steps of 4 GSM8K train examples (from the first 400),
# cutoff 192 tokens; each method's paper settings (--preset llm-adapters, its own learning rate)
BUDGET="--max-steps 30 --batch-size 4 --micro-batch-size 4 --cutoff-len 192 --limit 400"
LOSS="--limit 50 --batch-size 10"   # the first 50 GSM8K test problems

"$PY" -m fastadapt loss --model smollm2-135m $LOSS --output "$OUT/base"
for seed in $SEEDS; do
  for m in lora series parallel prefix; do
    start=$SECONDS
    "$PY" -m fastadapt train --model smollm2-135m --data gsm8k --method "$m" --seed "$seed" --overwrite \
      --output "$OUT/$m-$seed" $BUDGET
    echo $((SECONDS - start)) > "$OUT/$m-$seed/train_seconds"
    "$PY" -m fastadapt loss --model smollm2-135m --adapter "$OUT/$m-$seed" $LOSS --output "$OUT/$m-$seed"
  done
done

"$PY" - "$OUT" $SEEDS <<'PYEOF'
import json, pathlib, sys
out, seeds = pathlib.Path(sys.argv[1]), sys.argv[2:]
base = json.loads((out / "base" / "loss.json").read_text())["loss"]
print(f"held-out loss, first 50 GSM8K test solutions (base model: {base:.4f})")
print("| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | change vs base | train time (s) |")
print("|---" * (len(seeds) + 4) + "|")
for m in ["lora", "series", "parallel", "prefix"]:
    runs = [out / f"{m}-{s}" for s in seeds]
    losses = [json.loads((r / "loss.json").read_text())["loss"] for r in runs]
    secs = " / ".join((r / "train_seconds").read_text().strip() for r in runs)
    mean = sum(losses) / len(losses)
    print(f"| {m} | " + " | ".join(f"{x:.4f}" for x in losses) + f" | {mean:.4f} | {mean - base:+.4f} | {secs} |")
PYEOF
