#!/bin/bash
# Tensor parallel on a machine with >= 2 NVIDIA GPUs, from the repository root, without
# installing (like benchmarks/cuda_gpu_run.sh: the repo and its plugins go on PYTHONPATH; the
# entry points come from llmcore.egg-info, else from an editable install). ~4-6 minutes:
#   bash benchmarks/tp_gpu_run.sh            # tests, then the benchmark
#   bash benchmarks/tp_gpu_run.sh tests [pytest args...]
#   bash benchmarks/tp_gpu_run.sh bench [tensor_parallel.py args...]
# (a) tests/parallel/test_tensor_parallel_gpu.py: TP=2 greedy == TP=1 token for token on random
#     Llama and Qwen2 models, float32 and bfloat16, CUDA graphs on (and one eager, chunked case),
#     plus a worker crash that must be an error, not a hang;
# (b) benchmarks/tensor_parallel.py: Llama-3-8B shapes (random bf16), TP=1 vs TP=2, single-stream
#     decode and 64-concurrent throughput, printed as a table (JSON in /tmp/tp_bench.json).
# Exit status: 0 when every part passed, 1 otherwise (each part's output is printed either way).
set -o pipefail
ROOT=$(pwd)
export PYTHONPATH=$ROOT:$ROOT/plugins/cpu:$ROOT/plugins/cuda:$ROOT/plugins/neuron:$ROOT/plugins/rbln${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# NVLink multicast stays off on shared GPU hosts (llmcore sets these in every rank too)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ! python3 -c "from importlib.metadata import entry_points as e; import sys; sys.exit('cuda' not in [x.name for x in e(group='llmcore.plugins')])"; then
  python3 -m pip install -q -e . --no-deps --no-build-isolation || exit 1
fi
echo "== $(date -u +%FT%TZ) $(hostname)"
nvidia-smi -L || true
python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count()); sys.exit(torch.cuda.device_count() < 2)" \
  || { echo "error: tensor parallel needs 2 GPUs visible to torch"; exit 1; }

what=${1:-all}; shift || true
status=0
run_tests() {
  echo "== tests: tests/parallel/test_tensor_parallel_gpu.py"
  local t0=$SECONDS
  timeout 330 python3 -m pytest tests/parallel/test_tensor_parallel_gpu.py -q -rs -s -p no:cacheprovider "$@" \
    || { echo "== tests FAILED (exit $?)"; status=1; }
  echo "== tests took $((SECONDS - t0)) s"
}
run_bench() {
  echo "== benchmark: benchmarks/tensor_parallel.py"
  local t0=$SECONDS
  timeout 420 python3 benchmarks/tensor_parallel.py --out /tmp/tp_bench.json "$@" \
    || { echo "== benchmark FAILED (exit $?)"; status=1; }
  echo "== benchmark took $((SECONDS - t0)) s"
}
case $what in
  tests) run_tests "$@" ;;
  bench) run_bench "$@" ;;
  all) run_tests; run_bench ;;
  *) echo "usage: $0 [all|tests|bench] [args]"; exit 2 ;;
esac
# nothing may outlive the run (tensor-parallel workers are named llmcore-tp-rank<N>)
left=$(pgrep -f "multiprocessing.spawn" -u "$(id -u)" -a 2>/dev/null | grep -c . || true)
echo "== leftover spawned processes: $left"
exit $status
