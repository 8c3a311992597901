"""nvshmem:// transport between two GPU processes: conformance checks, lease, a dead peer."""

from __future__ import annotations

import os
import subprocess

import pytest

from eaas.gpu import nvshmem_available

from .conftest import NUM_GPUS, PYTHON, ROOT, child_env

pytestmark = [pytest.mark.multi_gpu, pytest.mark.nvshmem, pytest.mark.cuda,
              pytest.mark.skipif(NUM_GPUS < 2 or not nvshmem_available(),
                                 reason="needs two GPUs and NVSHMEM in torch")]

CHECKS = ("every_dtype_round_trips_gpu_to_gpu", "mixed_cpu_and_cuda_values",
          "200_split_phase_sends_in_order", "window_edge_and_over_window_refused",
          "zero_copy_lease_aliases_the_heap", "dead_peer_seen_and_its_slots_returned",
          "fabric_still_serves_after_a_peer_died")


def test_two_rank_transport_conformance_and_dead_peer() -> None:
    proc = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29519",
         os.path.join(ROOT, "tests", "gpu", "nvshmem_transport_worker.py")],
        env=child_env(), capture_output=True, text=True, timeout=240, cwd=ROOT)
    log = proc.stdout + proc.stderr
    print(log[-3000:])
    assert proc.returncode == 0, log[-4000:]
    for check in CHECKS:
        assert f"[rank0] PASS {check}" in log, (check, log[-4000:])
