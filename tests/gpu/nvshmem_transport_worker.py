"""Two-rank check of the nvshmem:// transport (rank 1 echoes, rank 0 checks).

    torchrun --nproc-per-node 2 tests/gpu/nvshmem_transport_worker.py

Rank 1 listens on nvshmem:// and echoes every message, adding the device its CUDA tensors
arrived on. Rank 0 checks: every dtype, mixed CPU/CUDA values, 200 split-phase sends in order,
a message near the window, an over-window send refused, a zero-copy lease, a latency figure;
then tells rank 1 to die (os._exit) and checks that it sees the close in time, that the slots
to rank 1 came back, and that the fabric still carries a self connection afterwards.
Prints "PASS <name>" per check; exits non-zero on the first failure.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import torch
import torch.distributed as dist

from eaas.errors import TransportError
from eaas.gpu import init_rank
from eaas.transport import DTYPES, connect, listen
from eaas.transport.fabric import join_fabric

SLOT, SLOTS = 1 << 20, 8  # window: 4 slots = 4 MiB per connection end


def sample(dtype: torch.dtype, shape: tuple[int, ...], dev: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        return (torch.rand(shape, generator=g) > 0.5).to(dev)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype).to(dev)
    return torch.randint(0, 100, shape, generator=g).to(dtype).to(dev)


def passed(name: str) -> None:
    print(f"[rank{dist.get_rank()}] PASS {name}", flush=True)


async def server(url_box: list) -> None:
    done = asyncio.Event()

    async def echo(conn):
        while True:
            msg = await conn.recv(timeout=120)
            if msg.get("op") == "die":
                os._exit(0)  # a crash as far as the peer is concerned: no goodbye
            if msg.get("op") == "stop":
                done.set()
                return
            devs = sorted({str(v.device) for v in msg.values() if isinstance(v, torch.Tensor)})
            await conn.send({**msg, "seen": devs})

    listener = await listen("nvshmem://", echo)
    url_box[0] = listener.url
    dist.broadcast_object_list(url_box, src=1)
    await done.wait()
    await listener.aclose()


async def client(url_box: list, fabric) -> None:
    dist.broadcast_object_list(url_box, src=1)
    assert url_box[0].startswith("nvshmem://1/"), url_box
    conn = await connect(url_box[0], timeout=30)

    for dtype in DTYPES.values():
        x = sample(dtype, (33, 40), "cuda:0")
        await conn.send({"x": x, "none": x[:0]})
        out = await conn.recv(timeout=30)
        assert out["seen"] == ["cuda:1"], out["seen"]  # landed in rank 1's GPU memory
        assert out["x"].device == x.device and out["x"].dtype == dtype
        assert torch.equal(out["x"], x) and out["none"].shape == (0, 40), dtype
    passed("every_dtype_round_trips_gpu_to_gpu")

    cpu = torch.arange(10)
    unit = {"rows": sample(torch.bfloat16, (64, 2048), "cuda:0"), "ids": cpu, "layer": 5,
            "nested": [1, (2, 3)], "strided": sample(torch.float32, (16, 8), "cuda:0").t()}
    await conn.send(unit)
    out = await conn.recv(timeout=30)
    assert torch.equal(out["rows"], unit["rows"]) and torch.equal(out["ids"], cpu)
    assert out["ids"].device.type == "cpu" and out["layer"] == 5 and out["nested"] == [1, (2, 3)]
    assert torch.equal(out["strided"], unit["strided"])
    passed("mixed_cpu_and_cuda_values")

    sizes = [1, 70_000, 0, 300_000] * 50
    handles = [conn.send_start({"i": i, "x": torch.full((n,), i, dtype=torch.int32,
                                                         device="cuda:0")})
               for i, n in enumerate(sizes)]
    for i, n in enumerate(sizes):
        out = await conn.recv(timeout=30)
        assert out["i"] == i and out["x"].shape == (n,) and bool((out["x"] == i).all()), i
    await asyncio.wait_for(asyncio.gather(*handles), 30)
    passed("200_split_phase_sends_in_order")

    big = sample(torch.bfloat16, (4 * SLOT // 2 - 256 * 8,), "cuda:0")  # just under 4 MiB
    await conn.send({"x": big})
    assert torch.equal((await conn.recv(timeout=30))["x"], big)
    try:
        conn.send_start({"x": torch.zeros(5 * SLOT, dtype=torch.uint8, device="cuda:0")})
        raise AssertionError("an over-window message was accepted")
    except ValueError as exc:
        assert "window" in str(exc)
    passed("window_edge_and_over_window_refused")

    x = sample(torch.float16, (128, 512), "cuda:0")
    await conn.send({"x": x})
    lease = await conn.recv_lease(timeout=30)
    heap = fabric.heap
    assert heap.data_ptr() <= lease.msg["x"].data_ptr() < heap.data_ptr() + heap.numel()
    assert torch.equal(lease.msg["x"], x)
    lease.release()
    passed("zero_copy_lease_aliases_the_heap")

    rows = sample(torch.bfloat16, (128, 2048), "cuda:0")
    times = []
    for i in range(60):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        await conn.send({"x": rows})
        y = (await conn.recv(timeout=30))["x"]
        torch.cuda.synchronize()
        if i >= 10:
            times.append(time.perf_counter() - t0)
    assert torch.equal(y, rows)
    times.sort()
    print(f"[rank0] nvshmem:// round trip [128, 2048] bf16: p50 {times[len(times) // 2] * 1e6:.0f}"
          f" us, min {times[0] * 1e6:.0f} us", flush=True)

    await conn.send({"x": rows})  # in flight while the peer dies
    await conn.send({"op": "die"})
    t0 = time.perf_counter()
    try:
        while True:
            await conn.recv(timeout=20)
    except TransportError:
        pass
    took = time.perf_counter() - t0
    assert took < 10, took
    await conn.aclose()
    assert not any(fabric._busy[1]), fabric._busy[1]
    passed("dead_peer_seen_and_its_slots_returned")

    async def echo(c):
        while True:
            await c.send(await c.recv(timeout=30))

    me = await listen("nvshmem://", echo)
    async with await connect(me.url) as c:
        await c.send({"x": rows})
        assert torch.equal((await c.recv(timeout=30))["x"], rows)
    await me.aclose()
    passed("fabric_still_serves_after_a_peer_died")


def main() -> int:
    info = init_rank()
    fabric = join_fabric("unused:0", info.rank, info.world_size, info.device,
                         slot_bytes=SLOT, num_slots=SLOTS)
    box: list = [None]
    if info.rank == 1:
        asyncio.run(server(box))
    else:
        asyncio.run(client(box, fabric))
    sys.stdout.flush()
    os._exit(0)  # NVSHMEM finalize is collective: with a dead peer it would wait forever


if __name__ == "__main__":
    sys.exit(main())
