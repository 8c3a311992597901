#!/bin/bash
# One device call for the GPU data plane on a 2-GPU machine, from the repo root:
#   bash tests/gpu/run_gpu.sh [tests_timeout_s] [bench_timeout_s] [e2e_timeout_s]
# 1. pytest tests/gpu + the CUDA tests of model/ and kernels/ (PYTEST_ARGS overrides the set);
# 2. benchmarks/bench_dispatch.py on NVSHMEM, then on CUDA symmetric memory (BENCH_ARGS adds);
# 3. benchmarks/bench_e2e_gpu.py, transformers first (E2E_ARGS overrides). A timeout of 0 skips
#    a stage. Logs go to $OUT (default /tmp/out); a carried .whl/ supplies pytest-asyncio.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ date -u; nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
TR="python3 -m torch.distributed.run --nproc-per-node 2 --master-port"
if [ "${1:-300}" != 0 ]; then
  timeout "${1:-300}" python3 -m pytest -q -rs ${PYTEST_ARGS:-tests/gpu tests/model/test_cuda.py tests/kernels/test_cuda.py} \
    -p no:cacheprovider --timeout 150 --durations=10 > "$OUT/tests.log" 2>&1; echo "tests rc=$?"
  grep -E "passed|failed|FAILED|ERROR|SKIPPED" "$OUT/tests.log" | tail -30
fi
if [ "${2:-150}" != 0 ]; then
  for b in NVSHMEM CUDA; do
    timeout "${2:-150}" $TR 2954${#b} benchmarks/bench_dispatch.py --backend $b ${BENCH_ARGS:-} > "$OUT/bench_$b.log" 2>&1
    echo "bench_dispatch $b rc=$?"; grep -E "^\||UTC" "$OUT/bench_$b.log" | tail -14
  done
fi
if [ "${3:-0}" != 0 ]; then
  timeout "$3" python3 benchmarks/bench_e2e_gpu.py ${E2E_ARGS:---layers 4 --batches 1,32 --tokens 16 --setups c,b,a,n --invariant false --budget-s 15 --model-dir /tmp/q4} \
    --out "$OUT" > "$OUT/e2e.log" 2>&1; echo "e2e rc=$?"; grep -E "^\||measured" "$OUT/e2e.log" | tail -14
fi
