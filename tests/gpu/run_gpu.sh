#!/bin/bash
# One device call for the GPU data plane: tests (tests/gpu) then benchmarks/bench_dispatch.py.
# Usage on a 2-GPU machine from the repo root: bash tests/gpu/run_gpu.sh [test_timeout_s] [bench_timeout_s]
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0
mkdir -p /tmp/pp && ln -sfn "$PWD/kernels" /tmp/pp/eaas_kernels
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:/tmp/pp${PYTHONPATH:+:$PYTHONPATH}
{ date -u; nvidia-smi -L; nvidia-smi topo -m | head -4
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -m pip list 2>/dev/null | grep -i -E "^(pytest|hypothesis|nvidia-ml-py|nvidia-nvshmem)"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout "${1:-300}" python3 -m pytest -q -rs ${PYTEST_ARGS:-tests/gpu} -p no:cacheprovider --timeout 280 \
  > "$OUT/tests.log" 2>&1; echo "tests rc=$?"
tail -40 "$OUT/tests.log"
timeout "${2:-200}" python3 -m torch.distributed.run --nproc-per-node 2 --master-port 29533 \
  benchmarks/bench_dispatch.py ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
grep -v -E "^\[rank|Warning|warn" "$OUT/bench.log" | tail -40
