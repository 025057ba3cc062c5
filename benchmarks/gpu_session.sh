#!/bin/bash
# Everything the open GPU checks need, in two calls of about 8 minutes each on one lent GPU, from
# the repository root. Python packages the GPU image lacks (xgrammar and its needs, jsonschema)
# travel as wheels in .whl/ (see /work/.library/device/README.md); the SmolLM2 tokenizer files
# (tokenizer.json, tokenizer_config.json, chat_template.jinja) in $TOKENIZER_DIR, default .gpu_tok/.
#
#   bash benchmarks/gpu_session.sh a   # the 256-request workload, overlapped (profiled) and
#                                      # synchronous, then the whole GPU test suite
#   bash benchmarks/gpu_session.sh c   # a short call: the GPU tests, then the overlapped workload profiled
#   bash benchmarks/gpu_session.sh p   # where an overlapped step waits: benchmarks/cuda_launch_probe.py
#                                      # with and without PDL, then the overlapped workload without PDL
#   bash benchmarks/gpu_session.sh w   # the JIT and overlap GPU tests, then the 256-request workload
#                                      # in both loops, each in a cold Triton cache of its own
#   bash benchmarks/gpu_session.sh v   # the overlapped workload (cold Triton cache), the GPU test suite,
#                                      # then HF generate on all 256 requests, within $BUDGET s
#   bash benchmarks/gpu_session.sh k   # the overlapped workload at token budgets $BUDGETS (default
#                                      # "8192 2048 4096"), one Triton cache, in that order
#   bash benchmarks/gpu_session.sh h   # v without the suite: the overlapped workload (cold Triton
#                                      # cache), then HF generate on all 256 requests, within $BUDGET s
#   bash benchmarks/gpu_session.sh b   # HF generate on all 256 requests (the ratio of issue #15),
#                                      # structured-output overhead on CUDA (issue #19)
# Logs go to $OUT (or /tmp/gpu-session).
set -o pipefail
OUT=${OUT:-/tmp/gpu-session}; mkdir -p "$OUT"
TOKENIZER_DIR=${TOKENIZER_DIR:-.gpu_tok}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__)"
hf_all() {  # HF generate on all 256 requests of the workload, within what is left of $BUDGET s
  local S=$SECONDS
  if [ $((BUDGET-SECONDS)) -lt 60 ]; then echo "hf skipped: $((BUDGET-SECONDS)) s of BUDGET left"; return; fi
  timeout $((BUDGET-SECONDS)) bash benchmarks/cuda_gpu_run.sh bench --phases hf --hf-requests 256 > $OUT/hf.log 2>&1
  echo "hf rc=$? $((SECONDS-S))s"
  grep -E "RESULT|hf_" $OUT/hf.log | cut -c1-1200
}
overlapped_cold() {  # the default (overlapped) loop on the 256-request workload in an empty Triton cache
  local S=$SECONDS
  TRITON_CACHE_DIR=/tmp/triton-async timeout 160 bash benchmarks/cuda_gpu_run.sh bench --phases build,llmcore \
    --tune none --async-engine --warmup-s 1 --single-tokens 128 > $OUT/async.log 2>&1
  echo "async rc=$? $((SECONDS-S))s"
  grep -E "llmcore_workload|llmcore_single\"|warm-up:|captured" $OUT/async.log | cut -c1-1800
}
case $1 in
a)
  S=$SECONDS
  bash benchmarks/cuda_gpu_run.sh bench --phases build,llmcore --tune none --async-engine --profile-workload \
    --warmup-s 1 --single-tokens 128 > $OUT/async.log 2>&1
  echo "overlapped rc=$? $((SECONDS-S))s"
  grep -E "llmcore_workload|llmcore_single\"|warm-up|captured" $OUT/async.log | cut -c1-1500
  sed -n '/--- profile: the/,/--- CUDA sync debug/p' $OUT/async.log | head -75
  sed -n '/--- CUDA sync debug/,+12p' $OUT/async.log
  S=$SECONDS
  bash benchmarks/cuda_gpu_run.sh bench --phases llmcore --tune none --sync-engine --warmup-s 1 --single-tokens 128 \
    > $OUT/sync.log 2>&1
  echo "synchronous rc=$? $((SECONDS-S))s"
  grep -E "llmcore_workload" $OUT/sync.log | cut -c1-1500
  S=$SECONDS
  timeout $((460-SECONDS)) bash benchmarks/cuda_gpu_run.sh tests -n 8 -p no:cacheprovider --timeout 300 > $OUT/tests.log 2>&1
  echo "tests rc=$? $((SECONDS-S))s"
  grep -E "passed|failed|FAILED|Error|assert" $OUT/tests.log | tail -25 ;;
b)
  S=$SECONDS
  bash benchmarks/cuda_gpu_run.sh bench --phases build,hf --hf-requests 256 > $OUT/hf.log 2>&1
  echo "hf rc=$? $((SECONDS-S))s"
  grep -E "RESULT|hf_" $OUT/hf.log | cut -c1-1200
  S=$SECONDS
  export PYTHONPATH=$(pwd):$(pwd)/plugins/cuda:$(pwd)/plugins/cpu${PYTHONPATH:+:$PYTHONPATH}
  python3 - "$TOKENIZER_DIR" /tmp/smolvocab-1b > $OUT/struct.log 2>&1 <<'PY'
# a random Llama-1B-shaped model with SmolLM2's 49,152-token vocabulary (the mask cost scales with it)
import shutil, sys
from llmcore_cuda.testing import LLAMA_1B, make_model_folder
tok, out = sys.argv[1:]
make_model_folder(out, "llama", dtype="bfloat16", init_std=0.02, **{**LLAMA_1B, "vocab_size": 49152})
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(f"{tok}/{f}", f"{out}/{f}")
PY
  timeout $((540-SECONDS)) python3 benchmarks/structured_bench.py --model /tmp/smolvocab-1b --device cuda \
    --dtype bfloat16 --requests 64 >> $OUT/struct.log 2>&1
  echo "structured rc=$? $((SECONDS-S))s"
  tail -20 $OUT/struct.log ;;
c)  # a short call: the GPU test suite, then the overlapped workload profiled
  S=$SECONDS
  timeout 220 bash benchmarks/cuda_gpu_run.sh tests -n 8 -p no:cacheprovider --timeout 200 > $OUT/tests.log 2>&1
  echo "tests rc=$? $((SECONDS-S))s"
  grep -E "passed|failed|FAILED|Error|assert" $OUT/tests.log | tail -25
  S=$SECONDS
  timeout $((340-SECONDS)) bash benchmarks/cuda_gpu_run.sh bench --phases build,llmcore --tune none --async-engine \
    --profile-workload --warmup-s 1 --single-tokens 64 > $OUT/async.log 2>&1
  echo "overlapped rc=$? $((SECONDS-S))s"
  grep -E "llmcore_workload|llmcore_single\"|warm-up|captured" $OUT/async.log | cut -c1-1500
  sed -n '/--- profile: the/,/--- CUDA sync debug/p' $OUT/async.log | head -75
  sed -n '/--- CUDA sync debug/,+12p' $OUT/async.log ;;
p)  # where the overlapped step waits (issue #15): the launch probe with and without PDL, then
    # the overlapped workload without PDL
  for pdl in 1 0; do
    S=$SECONDS
    LLMCORE_CUDA_PDL=$pdl timeout 200 bash benchmarks/cuda_gpu_run.sh probe > $OUT/probe$pdl.log 2>&1
    echo "probe PDL=$pdl rc=$? $((SECONDS-S))s"
    grep -vE "^\s*$|INFO|it/s\]" $OUT/probe$pdl.log | tail -60
  done
  S=$SECONDS
  LLMCORE_CUDA_PDL=0 timeout $((560-SECONDS)) bash benchmarks/cuda_gpu_run.sh bench --phases llmcore --tune none \
    --async-engine --warmup-s 1 --single-tokens 64 > $OUT/async0.log 2>&1
  echo "overlapped, PDL off rc=$? $((SECONDS-S))s"
  grep -E "llmcore_workload" $OUT/async0.log | cut -c1-1500 ;;
w)  # the 256-request workload, each loop in its own cold Triton cache (the start-up warm-up
    # compiles; the timed workload should compile nothing: jit_in_workload), the no-JIT GPU
    # test, then HF generate on all 256 requests (the ratio of issue #15), within $BUDGET s
  BUDGET=${BUDGET:-590}
  for loop in async sync; do
    S=$SECONDS
    TRITON_CACHE_DIR=/tmp/triton-$loop timeout 150 bash benchmarks/cuda_gpu_run.sh bench --phases build,llmcore \
      --tune none --$loop-engine --warmup-s 1 --single-tokens 128 > $OUT/$loop.log 2>&1
    echo "$loop rc=$? $((SECONDS-S))s"
    grep -E "llmcore_workload|llmcore_single\"|warm-up:|captured" $OUT/$loop.log | cut -c1-1800
  done
  S=$SECONDS
  timeout 120 bash benchmarks/cuda_gpu_run.sh tests -p no:cacheprovider --timeout 110 -k compiles_no_kernels \
    > $OUT/tests.log 2>&1
  echo "tests rc=$? $((SECONDS-S))s"
  grep -E "passed|failed|FAILED|Error|assert" $OUT/tests.log | tail -15
  hf_all ;;
k)  # the token budget (max_num_batched_tokens) against the overlapped loop's GPU busy: each
    # eager (prefill) step costs the host ~13 ms of launches whatever its size
  for t in ${BUDGETS:-8192 2048 4096}; do
    S=$SECONDS
    TRITON_CACHE_DIR=/tmp/triton-k timeout 170 bash benchmarks/cuda_gpu_run.sh bench --phases build,llmcore --tune none \
      --async-engine --warmup-s 1 --single-tokens 16 --max-num-batched-tokens $t > $OUT/budget$t.log 2>&1
    echo "budget $t rc=$? $((SECONDS-S))s"
    grep -E "llmcore_workload" $OUT/budget$t.log | cut -c1-900
  done ;;
h)  # the overlapped workload in a cold Triton cache, then HF on all 256 (issue #15's ratio)
  BUDGET=${BUDGET:-590}
  overlapped_cold
  hf_all ;;
v)  # the default (overlapped) loop on the 256-request workload in a cold Triton cache, the GPU
    # suite, then HF generate on all 256 requests (the same-run ratio of issue #15)
  BUDGET=${BUDGET:-590}
  overlapped_cold
  S=$SECONDS
  timeout 200 bash benchmarks/cuda_gpu_run.sh tests -n 8 -p no:cacheprovider --timeout 180 > $OUT/tests.log 2>&1
  echo "tests rc=$? $((SECONDS-S))s"
  grep -E "passed|failed|FAILED|Error|assert" $OUT/tests.log | tail -15
  hf_all ;;
t)  # the GPU test suite alone
  timeout 220 bash benchmarks/cuda_gpu_run.sh tests -n 8 -p no:cacheprovider --timeout 200 > $OUT/tests.log 2>&1
  echo "tests rc=$?"
  grep -E "passed|failed|FAILED|Error|assert" $OUT/tests.log | tail -25 ;;
*) echo "usage: $0 a|b|c|p|t|v|w"; exit 2 ;;
esac
