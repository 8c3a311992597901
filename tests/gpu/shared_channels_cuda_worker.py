"""Ranks of test_shared_channels_cuda: two processes on ONE GPU over CUDA IPC mappings.

Spawned by `tests.kernels.shared_channels_worker.Ranks` (no Triton interpreter here); they
reuse that module's echo and MoE helpers with device "cuda:0". Two processes on one GPU
without MPS time-slice the GPU: a gather spinning in one process may wait up to a timeslice
for the other's put, so timeouts are generous and latencies are printed, not asserted.
"""

from __future__ import annotations

import pickle
import statistics
import time
from typing import Any

DEVICE = "cuda:0"


def echo_main(rank: int, conn: Any, rounds: int, timeout_s: float) -> None:
    """Warm-up, then `rounds` echo rounds, each timed to completion (synchronised), then the
    same rounds enqueued back to back (one synchronisation at the end)."""
    import torch

    from tests.kernels.shared_channels_worker import connect_rank, echo_layouts, echo_round
    from tests.kernels.shared_channels_worker import report_counters

    torch.cuda.set_device(0)
    mine, channels = connect_rank(conn, echo_layouts(), rank, timeout_s, DEVICE)
    t0 = time.perf_counter()
    mine.warm_up()
    warm_s = time.perf_counter() - t0
    ping, pong = channels["ping"], channels["pong"]
    results, lat = [], []
    for rnd in range(rounds):
        t0 = time.perf_counter()
        out = echo_round(rank, ping, pong, rnd)
        torch.cuda.synchronize()
        lat.append(time.perf_counter() - t0)
        results.append({k: tuple(t.cpu() for t in v) for k, v in out.items()})
    t0 = time.perf_counter()
    for rnd in range(rounds, 2 * rounds):
        out = echo_round(rank, ping, pong, rnd)
    torch.cuda.synchronize()
    back_to_back = (time.perf_counter() - t0) / rounds
    last = {k: tuple(t.cpu() for t in v) for k, v in out.items()}
    conn.send(pickle.dumps({"rounds": results, "last": last, "warm_s": warm_s,
                            "median_s": statistics.median(lat), "max_s": max(lat),
                            "back_to_back_s": back_to_back}))
    report_counters(conn, channels)
    mine.close()


def moe_main(rank: int, conn: Any, steps: int, sizes: tuple[int, ...], timeout_s: float) -> None:
    """The shard (rank 0) runs `steps` eager steps of layers 0 and 1; the server (rank 1) runs
    one eager step under ServerLoop, captures one CUDA graph per layer, and replays the rest
    with at most 2 steps enqueued ahead."""
    import asyncio

    import torch

    from eaas.engine.device_experts import (PAIRS, RESULTS, ROWS, ExchangeChannels,
                                            ServerExchange, ShardExchange, warm_up_experts)
    from eaas.engine.server_loop import ServerLoop
    from tests.kernels.shared_channels_worker import (connect_rank, moe_input, moe_setup,
                                                      report_counters)

    torch.cuda.set_device(0)
    fmt, placements, experts = moe_setup(DEVICE)
    if rank in fmt.server_ranks:  # compile the GEMM before any bounded wait depends on it
        warm_up_experts(fmt, experts)
    mine, ch = connect_rank(conn, fmt.layouts(), rank, timeout_s, DEVICE)
    mine.warm_up()
    channels = ExchangeChannels(ch[ROWS], ch[PAIRS], ch[RESULTS])
    if rank in fmt.shard_ranks:
        shard = ShardExchange(fmt, channels, placements)
        outs, step_s = [], []
        for step in range(steps):
            t0 = time.perf_counter()
            for layer in (0, 1):
                shard.send(layer, *moe_input(step, layer, sizes, DEVICE))
                outs.append(shard.receive())
            torch.cuda.synchronize()
            step_s.append(time.perf_counter() - t0)
        result = {"outs": [o.cpu() for o in outs], "overflow": int(shard.overflow),
                  "step_s": step_s}
        failures = shard.failures()
    else:
        loop = ServerLoop(ServerExchange(fmt, channels, experts), [0, 1], ahead=2)
        k = conn.recv()  # the shard's "run k steps"

        async def serve() -> None:
            loop.start(1)
            await loop.drain()
            loop.capture()
            await loop.run(k - 1, timeout=4 * timeout_s)

        asyncio.run(serve())
        result = {"steps_done": loop.steps_done, "captured": loop.captured}
        failures = loop.failures()
    result["failures"] = failures.tolist()
    conn.send(pickle.dumps(result))
    report_counters(conn, ch)
    mine.close()
