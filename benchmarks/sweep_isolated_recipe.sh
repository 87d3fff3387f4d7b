#!/usr/bin/env bash
# Issue 14, item 2: the isolated recipe's learning rate, mark-row learning rate, distillation weight and LoRA rank,
# chosen on validation (never on `whatsnew`). Short runs from the shipped recipe's start (the prepend
# adapter, activated, tail 1, distilled from the prepend teacher), the same 24 steps x 16 examples each,
# one setting changed per run; the control is the shipped stage-1 setting (lr 2e-4, distill 0.5, r=8). The
# r=16 run starts as the same function (the r=8 weights in its first rows, the rest of B zero); its
# validation before the first step checks that on the real model, the other runs skip theirs (the control's).
# LoRA targets are not swept: the start already trains every linear projection (the widening cannot drop any).
# Resumable like retrain_paper_rows.sh: each call trains for at most $MINUTES in all (default 60), then stops;
# keep benchmarks/adapters/sweep-isolated/ (git-ignored) between calls. The table: benchmarks/results/val_sweep_isolated.*
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${MINUTES:-60}
D=benchmarks/data   # rebuilt (sha256-checked) by benchmarks/training_data.sh
[ -f $D/val256.jsonl.gz ] || benchmarks/training_data.sh $D
S=benchmarks/adapters/sweep-isolated
TEACHER=flashback_integrations/adapters/smollm2-135m-prepend
source benchmarks/resumable_train.sh

run() {  # NAME, then the options this run changes
    local name=$1
    shift
    train_row "$S/$name" --examples $D/train.jsonl.gz --val-examples $D/val256.jsonl.gz \
        --layout isolated --marks --activated --tail-tokens 1 --init-adapter $TEACHER \
        --steps 24 --batch-size 16 --micro-batch-size 8 --eval-every 12 --save-every 6 --keep-checkpoints 1 \
        --bf16 "$@"
}

run lr2e-4_distill0.5 --lr 2e-4 --teacher-adapter $TEACHER --distill-weight 0.5
run lr2e-4_distill0 --no-initial-eval --lr 2e-4 --distill-weight 0
run lr5e-4_distill0.5 --no-initial-eval --lr 5e-4 --teacher-adapter $TEACHER --distill-weight 0.5
run lr1e-3_distill0.5 --no-initial-eval --lr 1e-3 --teacher-adapter $TEACHER --distill-weight 0.5
run r16_lr2e-4_distill0.5 --lr 2e-4 --lora-r 16 --lora-alpha 32 --teacher-adapter $TEACHER --distill-weight 0.5
run lr2e-4_marklr2e-3_distill0.5 --no-initial-eval --lr 2e-4 --mark-lr 2e-3 --teacher-adapter $TEACHER --distill-weight 0.5
run lr2e-4_distill1 --no-initial-eval --lr 2e-4 --teacher-adapter $TEACHER --distill-weight 1
# the two best single changes together (lr 5e-4 and r=16 each gained about 0.003 nats at step 24)
run r16_lr5e-4_distill0.5 --no-initial-eval --lr 5e-4 --lora-r 16 --lora-alpha 32 --teacher-adapter $TEACHER \
    --distill-weight 0.5

.venv/bin/python benchmarks/sweep_table.py "$S" benchmarks/results/val_sweep_isolated
