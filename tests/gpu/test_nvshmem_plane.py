"""nvshmem:// mailboxes on two GPUs: round trips under credit pressure, and a CUDA graph;
the direct path (put / gather) over NVSHMEM's heap and over CUDA IPC mappings, and its bounded
waits when the partner process is stopped."""

from __future__ import annotations

import os
import subprocess

import pytest

from eaas.gpu import nvshmem_available

from .conftest import NUM_GPUS, PYTHON, ROOT, child_env

pytestmark = [pytest.mark.multi_gpu, pytest.mark.nvshmem, pytest.mark.cuda,
              pytest.mark.skipif(NUM_GPUS < 2 or not nvshmem_available(),
                                 reason="needs two GPUs and NVSHMEM in torch")]


@pytest.mark.parametrize("stream", ["default", "pool"])
def test_two_rank_round_trip_credits_and_graph_replay(stream: str) -> None:
    """The NVSHMEM device-library path (send/recv, putmem_signal_block) under credit pressure,
    on the legacy default stream and on a pool stream. It hung (2026-11-28 04:38) while its
    receives compiled a second, alignment-specialised variant with sends spinning: a timeout
    here is a liveness bug, not flakiness."""
    env = child_env()
    proc = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
         os.path.join(ROOT, "tests", "gpu", "nvshmem_worker.py"), stream],
        env=env, capture_output=True, text=True, timeout=90, cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for check in ("credits_round_trip_and_self_send", "cuda_graph_replay_20"):
        assert log.count(f"PASS {check}") == 2, log[-4000:]


@pytest.mark.parametrize("backend", ["NVSHMEM", "CUDA"])
def test_direct_path_rounds_credits_graph_and_views(backend: str) -> None:
    proc = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29519",
         os.path.join(ROOT, "tests", "gpu", "nvshmem_direct_worker.py"), backend],
        env=child_env(), capture_output=True, text=True, timeout=240, cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for check in ("rounds", "credits", "graph_replay_20", "view"):
        assert log.count(f"PASS {check}") == 2, log[-4000:]


def test_direct_path_waits_time_out_when_the_partner_is_stopped() -> None:
    """Rank 1 is SIGSTOPped: rank 0's gather and its put into rank 1's full slots return within
    2 * timeout_s with their failure words set; then rank 1 resumes and the ranks get back in
    step. About 2 s of waiting plus start-up; a hang here means a wait is not bounded."""
    proc = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29521",
         os.path.join(ROOT, "tests", "gpu", "nvshmem_direct_worker.py"), "NVSHMEM", "timeouts"],
        env=child_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("PASS timeouts") == 2, log[-4000:]
    for what in ("gather", "put"):
        line = next(x for x in log.splitlines() if f"{what} with rank 1 stopped returned" in x)
        print(line)  # the measured wall time (pytest -s shows it)
