#!/usr/bin/env bash
# The prepared GPU runtime benchmark (issue 7): bf16, a 1.1B Llama-shaped config with random weights,
# T up to 16K, batch 1. Sized to finish within ten minutes on one H100-class GPU: every run decodes
# 512 tokens (a retrieval every 16) after a prompt that fills the rest of T, so prepend recomputes up to
# 16K tokens at each retrieval while append re-feeds 16 + 128 tokens.
# Batch 16 is not run: the engine generates one sequence at a time (see the issue's closing note).
#
# Runs with the GPU machine's own python3 (torch, transformers, typer, rich, matplotlib are there); the
# package is used from the working tree, and nothing is downloaded (random weights, synthetic tokenizer).
# Usage from the repository root:  OUT=benchmarks/results bash benchmarks/gpu_speed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" FLASHBACK_HOME="${FLASHBACK_HOME:-/tmp/flashback-home}"
python3 -m flashback_integrations.cli bench speed --model config:llama-1b --dtype bfloat16 --device cuda \
    --lengths 2048,4096,8192,16384 --gen-tokens 512 --stride 16 --doc-tokens 128 --repeats 2 \
    --out "${OUT:-benchmarks/results}" --stem speed_gpu_llama1b_bf16
