#!/usr/bin/env bash
# The prepared GPU runtime benchmark (issue 7): bf16, a 1.1B Llama-shaped config with random weights,
# T up to 16K, batch 1. Sized to finish within ten minutes on one H100-class GPU: every run decodes
# 512 tokens (a retrieval every 16) after a prompt that fills the rest of T, so prepend must recompute
# up to 16K tokens at each retrieval while append re-feeds 16 + 128 tokens.
# Batch 16 is not run: the engine generates one sequence at a time (see the issue's closing note).
# Usage on the GPU machine, from the repository root:  bash benchmarks/gpu_speed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
make install
.venv/bin/flashback bench speed --model config:llama-1b --dtype bfloat16 --device cuda \
    --lengths 2048,4096,8192,16384 --gen-tokens 512 --stride 16 --doc-tokens 128 --repeats 2 \
    --out benchmarks/results --stem speed_gpu_llama1b_bf16
