#!/usr/bin/env bash
# Install prunetune and its test dependencies into the current Python.
# torch is pinned first so pip takes the CPU build (an unpinned torch pulls a multi-GB CUDA build);
# on a GPU machine install the torch build you want before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
