#!/usr/bin/env bash
# Issue 14, item 5: the paper's rows given the shipped isolated adapter's CPU budget and recipe, so the
# 4,000-target table compares like with like. Resumable across sessions and machines: rerun to continue
# (each call trains for at most $MINUTES in all, default 60, row after row, then stops; keep the
# checkpoints (git-ignored) between runs).
#
# The shipped isolated adapter = a GPU-trained start (prepend-marks, 253 x 32) + 222 CPU steps x 16 examples
# (161 at tail 1, lr 2e-4, then 61 at tail 32, lr 1e-4), distilled from the prepend teacher (KL top-20,
# weight 0.5), bf16 autocast, the same training data. Here each paper row continues from its own GPU-trained
# adapter for 222 steps x 16 of that data at lr 2e-4 (cosine), distilled from the same teacher; the prepend
# row trains on the target CE alone (its teacher would be its own starting point).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${MINUTES:-60}
D=benchmarks/data   # rebuilt (sha256-checked) by benchmarks/training_data.sh
[ -f $D/val256.jsonl.gz ] || benchmarks/training_data.sh $D
A=benchmarks/adapters/cpu-budget
TEACHER=flashback_integrations/adapters/smollm2-135m-prepend

source benchmarks/resumable_train.sh
train() {  # OUT, then the row's own options; the recipe every row shares
    local out=$1
    shift
    train_row "$out" --examples $D/train.jsonl.gz --val-examples $D/val256.jsonl.gz --lr 2e-4 --steps 222 \
        --batch-size 16 --micro-batch-size 8 --eval-every 37 --save-every 5 --keep-checkpoints 1 --bf16 "$@"
}

train $A/flashback --layout append --marks --init-adapter flashback_integrations/adapters/smollm2-135m-flashback \
    --teacher-adapter $TEACHER --distill-weight 0.5
train $A/append-nomarks --layout append --no-marks --init-adapter benchmarks/adapters/append-nomarks \
    --teacher-adapter $TEACHER --distill-weight 0.5
train $A/prepend-marks --layout prepend --marks --init-adapter $TEACHER

# The same 4,000 targets as benchmarks/whatsnew4000_t32.sh; paired ratios against its rows. Scoring keeps
# its partial results (benchmarks/results/ppl_cpu_budget_whatsnew4000.partial.json, saved every 30 s), so
# the budget stops it like the training and the next call resumes it.
left=$(( MINUTES - SECONDS / 60 ))
if [ "$left" -lt 5 ]; then
    echo "scoring not started, ${left} of $MINUTES minutes left; rerun this script"
    exit 0
fi
status=0
timeout "${left}m" .venv/bin/flashback eval ppl --examples benchmarks/eval/whatsnew_4000_seed7.examples.jsonl.gz \
    --device cpu --flashback-adapter $A/flashback --append-adapter $A/append-nomarks \
    --prepend-adapter $A/prepend-marks --row 'append + LoRA + MT (FlashBack)' --row 'append + LoRA' \
    --row 'prepend + LoRA + MT' --stem ppl_cpu_budget_whatsnew4000 || status=$?
if [ "$status" -eq 124 ]; then
    echo "scoring stopped after $MINUTES minutes; rerun to continue from benchmarks/results/ppl_cpu_budget_whatsnew4000.partial.json"
    exit 0
fi
[ "$status" -eq 0 ] || exit "$status"
# Ratios against the committed references and, like with like, against the retrained prepend row; the
# shipped isolated adapter (_row2) and the baseline (_row4) sit beside them.
R=benchmarks/results/ppl_isolated_whatsnew4000_t32
.venv/bin/python benchmarks/ppl_ratios.py $R ${R}_row2 ${R}_row4 benchmarks/results/ppl_cpu_budget_whatsnew4000 \
    --vs 'prepend + LoRA + MT [ppl_cpu_budget_whatsnew4000]' --out benchmarks/results/ppl_cpu_budget_whatsnew4000
