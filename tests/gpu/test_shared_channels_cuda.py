"""Shared channels (eaas.gpu.shared_channels) between two processes on ONE GPU, CUDA IPC.

The CUDA twin of tests/kernels/test_shared_channels.py: the same ranks and references, the
real kernels, buffers exported with CUDA IPC handles and mapped by the other process. Without
MPS the two processes time-slice the GPU, so a spinning gather may wait up to a timeslice for
its partner's put: timeouts are seconds, latencies are printed (pytest -s), not asserted.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels import shared_channels_worker as helpers
from tests.kernels.shared_channels_worker import Ranks

from . import shared_channels_cuda_worker as worker
from .conftest import cuda_only

pytestmark = [pytest.mark.cuda, cuda_only]
DEADLINE = 120.0  # a fresh machine compiles every kernel variant during the warm-up
TIMEOUT_S = 5.0


def test_two_processes_on_one_gpu_echo_rows_over_cuda_ipc() -> None:
    """Warm-up, then 24 echo rounds each synchronised (every slot reused 12 times; both ranks'
    gathers equal exchange_reference bit for bit), then 24 back to back (the last checked);
    counters agree on both ranks, no failures. Prints the per-round latency."""
    rounds = 24
    with Ranks(worker.echo_main, 2, rounds, TIMEOUT_S, deadline=DEADLINE) as ranks:
        results = [ranks.recv(r) for r in (0, 1)]
        counters = ranks.counters()
        assert [ranks.join(r) for r in (0, 1)] == [0, 0]
    for rank, res in enumerate(results):
        for rnd in list(range(rounds)) + [2 * rounds - 1]:
            got_round = res["rounds"][rnd] if rnd < rounds else res["last"]
            want = helpers.echo_reference(rnd)
            for name in ("ping", "pong"):
                got, meta = got_round[name]
                assert torch.equal(meta, want[name][rank][1]), (rank, rnd, name)
                assert torch.equal(got, want[name][rank][0]), (rank, rnd, name)
        for name, c in counters[rank].items():
            assert c["sent"] == c["recvd"] == c["credit"] == [4 + 2 * rounds] * 2, (rank, name)
            assert c["failures"] == [[0, 0], [0, 0]], (rank, name)
    for rank, res in enumerate(results):
        print(f"rank {rank}: warm-up {res['warm_s']:.2f} s; echo round (ping + pong, "
              f"synchronised) median {res['median_s'] * 1e6:.0f} us, max "
              f"{res['max_s'] * 1e6:.0f} us; back to back {res['back_to_back_s'] * 1e6:.0f} "
              "us per round")


def test_moe_steps_with_a_captured_server_loop_on_one_gpu() -> None:
    """The shard process runs 6 eager steps of MoE layers 0 and 1; the server process runs one
    eager step under ServerLoop, captures a CUDA graph per layer and replays 5 steps: every
    output matches moe_per_pair_ref (Triton fused_moe tolerance), counters agree."""
    from eaas.engine.row_layout import moe_per_pair_ref
    from eaas_kernels.reference import expert_rows_ref
    from tests.kernels.conftest import TOLERANCE

    steps, sizes = 6, (5, 8, 0, 3, 7, 6)
    with Ranks(worker.moe_main, 2, steps, sizes, TIMEOUT_S, deadline=DEADLINE) as ranks:
        ranks.send(1, steps)
        results = [ranks.recv(r) for r in (0, 1)]
        counters = ranks.counters()
        assert [ranks.join(r) for r in (0, 1)] == [0, 0]
    _, _, experts = helpers.moe_setup()
    for step in range(steps):
        for layer in (0, 1):
            x, ids, w = helpers.moe_input(step, layer, sizes)
            w13, w2 = experts[layer]
            want = moe_per_pair_ref(x, ids, w, lambda r, e: expert_rows_ref(r, e, w13, w2))
            torch.testing.assert_close(results[0]["outs"][2 * step + layer], want,
                                       **TOLERANCE[torch.float32])
    assert results[1]["captured"] and results[1]["steps_done"] == steps
    for rank, res in enumerate(results):
        assert res["failures"] == [[0, 0], [0, 0]], rank
        for name, c in counters[rank].items():
            want = helpers.exchange_counts(rank, name, 2 * steps, base=4)
            assert {k: c[k] for k in want} == want, (rank, name)
    print("shard step times (ms): " + ", ".join(f"{s * 1e3:.2f}" for s in results[0]["step_s"]))
