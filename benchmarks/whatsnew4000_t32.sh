#!/usr/bin/env bash
# The 4,000-target isolated table (tail 32) of the README, resumable: rerun to continue where it stopped.
# One row at a time in one process (two threads score ~1.8x more targets per second here than two
# one-thread processes), the shipped row first; the last command merges the rows into one table.
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results/ppl_isolated_whatsnew4000_t32
eval_ppl() {
    .venv/bin/flashback eval ppl --examples benchmarks/eval/whatsnew_4000_seed7.examples.jsonl.gz \
        --prepend-adapter flashback_integrations/adapters/smollm2-135m-prepend \
        --isolated-adapter flashback_integrations/adapters/smollm2-135m-isolated --tail-tokens 32 --device cpu "$@"
}
eval_ppl --row 'isolated + adapter' --stem "$(basename $R)_row2"
eval_ppl --row 'no retrieval' --row 'prepend + LoRA + MT' --stem "$(basename $R)"
# issue 13: the layout untrained, on the same targets
eval_ppl --row 'isolated (untrained)' --stem "$(basename $R)_row6"
eval_ppl --row 'isolated + prepend adapter' --stem "$(basename $R)_row4"
# issue 14: "no retrieval with the adapter loaded" must equal no retrieval (the adapter is activated)
eval_ppl --row 'no retrieval + isolated adapter' --stem "$(basename $R)_row5"
eval_ppl --row 'no retrieval' --row 'isolated (untrained)' --row 'isolated + adapter' --row 'prepend + LoRA + MT' \
    --row 'isolated + prepend adapter' --row 'no retrieval + isolated adapter' --stem "$(basename $R)" \
    --merge-from "${R}_row2.partial.json" --merge-from "${R}_row6.partial.json" \
    --merge-from "${R}_row4.partial.json" --merge-from "${R}_row5.partial.json"
.venv/bin/python benchmarks/ppl_ratios.py "$R" --vs 'isolated + prepend adapter (tail 32)'
