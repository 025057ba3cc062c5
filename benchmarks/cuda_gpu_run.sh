#!/bin/bash
# Run the CUDA tests and/or the benchmark on a GPU machine, from the repository root,
# without installing: the repo and its plugins go on PYTHONPATH and the entry points
# come from llmcore.egg-info (carried), else from an editable install.
#   bash benchmarks/cuda_gpu_run.sh tests [pytest args...]   (the whole GPU suite: the CUDA plugin,
#       its conformance checks, the quantization Triton kernels, tensor parallelism on 2+ GPUs)
#   bash benchmarks/cuda_gpu_run.sh bench [cuda_bench.py args...]
#   bash benchmarks/cuda_gpu_run.sh probe [cuda_launch_probe.py args...]   (where an overlapped step waits)
set -o pipefail
ROOT=$(pwd)
export PYTHONPATH=$ROOT:$ROOT/plugins/cpu:$ROOT/plugins/cuda:$ROOT/plugins/neuron:$ROOT/plugins/rbln${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ! python3 -c "from importlib.metadata import entry_points as e; import sys; sys.exit('cuda' not in [x.name for x in e(group='llmcore.plugins')])"; then
  python3 -m pip install -q -e . --no-deps --no-build-isolation || exit 1
fi
what=$1; shift
case $what in
  tests) python3 -m pytest tests/cuda tests/conformance/test_cuda_conformance.py \
           tests/quantization/test_triton_kernels.py tests/parallel/test_tensor_parallel_gpu.py -q -rs "$@" ;;
  bench) python3 benchmarks/cuda_bench.py "$@" ;;
  probe) python3 benchmarks/cuda_launch_probe.py "$@" ;;
  *) echo "usage: $0 tests|bench|probe [args]"; exit 2 ;;
esac
