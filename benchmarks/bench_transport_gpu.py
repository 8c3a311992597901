"""Request/reply latency between two GPU processes over tcp://, cudaipc:// and nvshmem://.

    torchrun --nproc-per-node 2 benchmarks/bench_transport_gpu.py [--iters 40]

Rank 1 echoes; rank 0 times send -> reply received (and, for CUDA payloads, the reply's rows
usable on cuda:0: a `.to("cuda:0")` and a synchronize), p50 and min over --iters after 5
warm-up round trips. Payloads: a control message (no tensor), hidden rows [128, 2048] and
[512, 7168] bf16 created on cuda:0. tcp:// is the peer: it copies CUDA rows to the host and
back on each side. cudaipc:// hands the rows over through device slots; nvshmem:// puts them
into the peer's symmetric heap from a GPU kernel (the reply lands on cuda:0 directly).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eaas.gpu import init_rank  # noqa: E402
from eaas.transport import connect, listen  # noqa: E402
from eaas.transport.fabric import join_fabric  # noqa: E402

PAYLOADS = {"control": None, "rows 128x2048": (128, 2048), "rows 512x7168": (512, 7168)}


async def echo_side(scheme: str) -> None:
    done = asyncio.Event()

    async def serve(conn):
        while True:
            msg = await conn.recv(timeout=120)
            if msg.get("stop"):
                done.set()
                return
            await conn.send(msg)

    listener = await listen(f"{scheme}://" + ("127.0.0.1:0" if scheme == "tcp" else ""), serve)
    dist.broadcast_object_list([listener.url], src=1)
    await done.wait()
    await listener.aclose()


async def timing_side(scheme: str, shape: tuple[int, int] | None,
                      iters: int) -> tuple[float, float]:
    box: list = [None]
    dist.broadcast_object_list(box, src=1)
    msg: dict = {"op": "compute", "layer": 3}
    if shape is not None:
        msg["x"] = torch.randn(*shape, device="cuda:0").to(torch.bfloat16)
    times = []
    async with await connect(box[0], timeout=30) as conn:
        try:
            for i in range(iters + 5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                await conn.send(msg)
                reply = await conn.recv(timeout=30)
                if shape is not None:
                    y = reply["x"].to("cuda:0")
                    torch.cuda.synchronize()
                if i >= 5:
                    times.append(time.perf_counter() - t0)
            if shape is not None:
                assert torch.equal(y, msg["x"]), f"{scheme} round trip differs"
        finally:
            await conn.send({"stop": True})
    times.sort()
    return times[len(times) // 2] * 1e6, times[0] * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=40)
    args = ap.parse_args()
    info = init_rank()
    assert info.world_size == 2, "run with --nproc-per-node 2"
    join_fabric("unused:0", info.rank, 2, info.device, slot_bytes=8 << 20, num_slots=16)
    rows = []
    for name, shape in PAYLOADS.items():
        for scheme in ("tcp", "cudaipc", "nvshmem"):
            if info.rank == 1:
                asyncio.run(echo_side(scheme))
            else:
                p50, best = asyncio.run(timing_side(scheme, shape, args.iters))
                rows.append((name, scheme, p50, best))
                print(f"  {name:14s} {scheme:8s} p50 {p50:8.0f} us  min {best:8.0f} us",
                      flush=True)
            dist.barrier()
    if info.rank == 0:
        when = datetime.datetime.now(datetime.timezone.utc)
        print(f"\n{when:%Y-%m-%d %H:%M} UTC, 2x {torch.cuda.get_device_name(0)}, "
              f"torch {torch.__version__}, {args.iters} round trips each")
        print("| payload | scheme | p50 us | min us |\n|---|---|---|---|")
        for name, scheme, p50, best in rows:
            print(f"| {name} | {scheme} | {p50:.0f} | {best:.0f} |")
    sys.stdout.flush()
    os._exit(0)  # skip NVSHMEM teardown (collective) at exit


if __name__ == "__main__":
    sys.exit(main())
