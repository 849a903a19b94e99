#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv/ (scripts/setup.sh), then merge SmolLM2-135M-Instruct into a
# depth-upscaled self-merge and compare source and merge (generations, perplexity). Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m dfsmerge.demo "$@"
