"""Dispatch + combine on 2 GPUs: our nvshmem:// mailboxes and cudaipc:// beside NCCL and torch.

    torchrun --nproc-per-node 2 benchmarks/bench_dispatch.py [--tokens 1 32 128 512 4096]
             [--hidden 2048 7168] [--iters 20]

Per rank, T tokens each go to K = 8 experts, spread evenly over the 2 ranks: 8T bf16 rows of H,
4T for the peer and 4T for itself; combine sends the same rows back. One "pair" is dispatch +
combine. Variants (all times are per pair, GPU time from CUDA events, mean over --iters):

  nccl        dist.all_to_all_single (dispatch) + all_to_all_single (combine), eager
  vdev_2d     torch.ops.symm_mem.all_to_all_vdev_2d + all_to_all_vdev_2d_offset (NVSHMEM), eager
  ours_graph  NvshmemChannel send/recv (putmem_signal + credits, copy-out receive), the whole
              pair captured once in a CUDA graph and replayed
  ours_eager  the same, launched from Python each time (launch-bound at small T)
  ours_view   zero-copy receive (wait + credit only, rows read in place), eager
  cudaipc     one request/reply over cudaipc:// between the two processes: rank 0 sends 4T rows
              on cuda:0, rank 1 moves them to cuda:1 and sends them back, rank 0 moves the reply
              to cuda:0 (wall time incl. asyncio + socket; one direction at a time)
  nvshmem_tr  the same request/reply over the nvshmem:// transport (GPU-initiated puts straight
              into the peer's heap, header over a unix socket after the put completes); T <= 512
  floor       bytes that must cross per direction (4T * H * 2 per stage, 2 stages) divided by
              the measured per-direction NVLink bandwidth with both directions busy

Rate formula: floor_us = 2 * 4T*H*2 B / bw; ratios are ours_graph / nccl and ours_graph / floor.
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

from eaas.gpu import ChannelLayout, NvshmemPlane, init_rank  # noqa: E402

K = 8


def cuda_time(fn, iters: int) -> float:
    """Mean microseconds per call of fn() on the current stream (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    us = start.elapsed_time(end) * 1e3 / iters
    t = torch.tensor([us], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slower rank bounds the pair
    return float(t)


def p2p_bandwidth(dev: str, rank: int) -> float:
    """Bytes/s per direction, both ranks writing 256 MiB into the other's memory at once."""
    import torch.distributed._symmetric_memory as symm_mem

    n = 256 << 20
    buf = symm_mem.empty(n, dtype=torch.uint8, device=dev)
    hdl = symm_mem.rendezvous(buf, dist.group.WORLD.group_name)
    remote = hdl.get_remote_tensor(1 - rank, (n,), torch.uint8)
    local = torch.ones(n, dtype=torch.uint8, device=dev)
    us = cuda_time(lambda: remote.copy_(local), 10)
    return n / (us * 1e-6)


def bench_nccl(x: torch.Tensor, iters: int) -> float:
    mid, back = torch.empty_like(x), torch.empty_like(x)

    def pair():
        dist.all_to_all_single(mid, x)
        dist.all_to_all_single(back, mid)

    return cuda_time(pair, iters)


def bench_vdev_2d(T: int, H: int, dev: str, iters: int) -> float:
    import torch.distributed._symmetric_memory as symm_mem

    W, ne = 2, K // 2  # 4 local experts per rank; every token visits all 8 experts
    rows = K * T
    inp = symm_mem.empty((rows, H), dtype=torch.bfloat16, device=dev).normal_()
    out = symm_mem.empty((rows + ne * 16, H), dtype=torch.bfloat16, device=dev)
    back = symm_mem.empty((rows, H), dtype=torch.bfloat16, device=dev)
    in_splits = symm_mem.empty(W * ne, dtype=torch.int64, device=dev).fill_(T)
    oso = symm_mem.empty((2, W * ne), dtype=torch.int64, device=dev)
    back_oso = symm_mem.empty((2, W * ne), dtype=torch.int64, device=dev)
    name = dist.group.WORLD.group_name
    dist.barrier()

    def pair():
        torch.ops.symm_mem.all_to_all_vdev_2d(inp, out, in_splits, oso, name)
        torch.ops.symm_mem.all_to_all_vdev_2d_offset(out, back, oso, back_oso, name)

    us = cuda_time(pair, iters)
    assert torch.equal(back, inp), "all_to_all_vdev_2d round trip differs"
    return us


class Ours:
    """One dispatch+combine pair through a plane's two channels (peer and self)."""

    recv_ctas = 128  # CTAs that copy a message out of the mailbox (memory parallelism)

    def __init__(self, plane: NvshmemPlane, H: int, T: int, rank: int, dev: str) -> None:
        self.d, self.c = plane.channels[f"dispatch{H}"], plane.channels[f"combine{H}"]
        self.rank, self.peer = rank, 1 - rank
        R = self.d.layout.max_rows
        n = (K // 2) * T
        g = torch.Generator(device=dev).manual_seed(rank)
        self.x = torch.randn(2, n, H, generator=g, device=dev).to(torch.bfloat16)  # [dst, n, H]
        self.meta = torch.zeros(R + 1, dtype=torch.int64, device=dev)
        self.meta[0] = n
        self.got = torch.empty(2, R, H, dtype=torch.bfloat16, device=dev)  # dispatched rows
        self.got_meta = torch.empty(2, R + 1, dtype=torch.int64, device=dev)
        self.back = torch.empty(2, R, H, dtype=torch.bfloat16, device=dev)  # combined rows
        self.back_meta = torch.empty(2, R + 1, dtype=torch.int64, device=dev)
        self.n = n

    def pair(self) -> None:
        me, peer = self.rank, self.peer
        self.d.send(peer, self.x[peer], self.meta)
        self.d.send(me, self.x[me], self.meta)
        self.d.recv(peer, self.got[peer], self.got_meta[peer], self.recv_ctas)
        self.d.recv(me, self.got[me], self.got_meta[me], self.recv_ctas)
        # experts would run here; combine sends the rows back where they came from
        self.c.send(peer, self.got[peer], self.got_meta[peer])
        self.c.send(me, self.got[me], self.got_meta[me])
        self.c.recv(peer, self.back[peer], self.back_meta[peer], self.recv_ctas)
        self.c.recv(me, self.back[me], self.back_meta[me], self.recv_ctas)

    def pair_view(self) -> None:
        me, peer = self.rank, self.peer
        self.d.send(peer, self.x[peer], self.meta)
        self.d.send(me, self.x[me], self.meta)
        for src in (peer, me):
            self.d.recv_view(src)
        for src in (peer, me):
            self.c.send(src, self.x[src], self.meta)  # stands for the expert output rows
        for src in (peer, me):
            self.d.release(src)
            self.c.recv_view(src)
        for src in (peer, me):
            self.c.release(src)

    def check(self) -> None:
        torch.cuda.synchronize()
        n = self.n
        assert torch.equal(self.back[:, :n], self.x), "nvshmem round trip differs"
        assert int(self.back_meta[0, 0]) == n

    def graphed(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        dist.barrier()
        with torch.cuda.graph(graph):
            self.pair()
        torch.cuda.synchronize()
        dist.barrier()
        return graph


async def transport_side(scheme: str, rank: int, T: int, H: int, iters: int,
                         url_box: list) -> float:
    """Wall us of one request/reply of 4T rows over `scheme`:// between the two processes."""
    from eaas.transport import connect, listen

    n = (K // 2) * T
    if rank == 1:
        done = asyncio.Event()

        async def serve(conn):
            while True:
                msg = await conn.recv(timeout=600)
                if msg.get("stop"):
                    done.set()
                    return
                y = msg["x"].to("cuda:1", non_blocking=True)  # rows cross to this GPU
                await conn.send({"y": y})

        listener = await listen(f"{scheme}://", serve)
        url_box[0] = listener.url
        dist.broadcast_object_list(url_box, src=1)
        await done.wait()
        await listener.aclose()
        return 0.0
    dist.broadcast_object_list(url_box, src=1)
    x = torch.randn(n, H, device="cuda:0").to(torch.bfloat16)
    async with await connect(url_box[0], timeout=30) as conn:
        try:
            times = []
            for i in range(iters + 3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                await conn.send({"x": x})
                y = (await conn.recv(timeout=60))["y"].to("cuda:0")
                torch.cuda.synchronize()
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            assert torch.equal(y, x), f"{scheme} round trip differs"
        finally:
            await conn.send({"stop": True})  # never leave rank 1 waiting
    return sum(times) / len(times) * 1e6


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 128, 512, 4096])
    p.add_argument("--hidden", type=int, nargs="+", default=[2048, 7168])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--ctas", type=int, default=24, help="CTAs per send (puts)")
    p.add_argument("--recv-ctas", type=int, default=128, help="CTAs per receive (copy-out)")
    p.add_argument("--skip", nargs="*", default=[], help="variants to leave out")
    p.add_argument("--check", action="store_true",
                   help="first run tests/gpu/nvshmem_worker.py's checks (credits, CUDA graph)")
    args = p.parse_args()
    Ours.recv_ctas = args.recv_ctas
    info = init_rank()
    rank, dev = info.rank, info.device
    assert info.world_size == 2, "run with --nproc-per-node 2"
    max_rows = (K // 2) * max(args.tokens)
    layouts = {}
    for H in args.hidden:
        lay = ChannelLayout(world_size=2, num_slots=2, max_rows=max_rows, hidden=H,
                            ctas_per_send=args.ctas)
        layouts[f"dispatch{H}"] = layouts[f"combine{H}"] = lay
    plane = NvshmemPlane.create(dist.group.WORLD, dev, layouts)
    if args.check:
        from tests.gpu.nvshmem_worker import checks

        checks(rank, dev)
    if "nvshmem_tr" not in args.skip:  # the transport's fabric: windows of 8 x 8 MiB
        from eaas.transport.fabric import join_fabric

        join_fabric("unused:0", rank, 2, dev, slot_bytes=8 << 20, num_slots=16)
    bw = p2p_bandwidth(dev, rank)
    t0 = time.time()
    for H in args.hidden:  # compile + cumodule_init once (~13 s the first time)
        Ours(plane, H, 1, rank, dev).pair()
        Ours(plane, H, 1, rank, dev).pair_view()
    torch.cuda.synchronize()
    dist.barrier()
    if rank == 0:
        print(f"# warm-up (Triton/NVSHMEM compile) {time.time() - t0:.1f} s; "
              f"P2P {bw / 1e9:.0f} GB/s per direction", flush=True)
    rows = []
    for H in args.hidden:
        for T in args.tokens:
            r: dict[str, float] = {"T": T, "H": H}
            x = torch.randn(K * T, H, device=dev).to(torch.bfloat16)  # [8T, H]
            r["nccl"] = bench_nccl(x, args.iters)
            if "vdev_2d" not in args.skip:
                try:
                    r["vdev_2d"] = bench_vdev_2d(T, H, dev, args.iters)
                except Exception as exc:  # noqa: BLE001
                    if rank == 0:
                        print(f"# vdev_2d T={T} H={H} failed: {exc!r}"[:300], flush=True)
            ours = Ours(plane, H, T, rank, dev)
            ours.pair()
            ours.check()
            r["ours_eager"] = cuda_time(ours.pair, args.iters)
            ours.check()
            graph = ours.graphed()
            r["ours_graph"] = cuda_time(graph.replay, args.iters)
            ours.check()
            r["ours_view"] = cuda_time(ours.pair_view, args.iters)
            r["floor"] = 2 * (K // 2) * T * H * 2 / bw * 1e6
            if rank == 0:
                print("  " + "  ".join(f"{k}={v:.1f}" for k, v in r.items()), flush=True)
            for scheme, col in (("cudaipc", "cudaipc"), ("nvshmem", "nvshmem_tr")):
                if col in args.skip or (scheme == "nvshmem" and T > 512):
                    continue
                try:
                    us = asyncio.run(transport_side(scheme, rank, T, H, min(args.iters, 10),
                                                    [None]))
                    if rank == 0:
                        r[col] = us
                except Exception as exc:  # noqa: BLE001
                    print(f"# {col} T={T} H={H} failed on rank {rank}: {exc!r}"[:300])
                dist.barrier()
                if rank == 0 and col in r:
                    print(f"  T={T} H={H} {col}={r[col]:.1f}", flush=True)
            rows.append(r)
    if rank == 0:
        name = torch.cuda.get_device_name(0)
        print(f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, 2x {name}, "
              f"torch {torch.__version__}, P2P {bw / 1e9:.0f} GB/s per direction (both busy)")
        cols = ["nccl", "vdev_2d", "ours_graph", "ours_eager", "ours_view", "cudaipc",
                "nvshmem_tr", "floor"]
        print("| T | H | " + " | ".join(f"{c} us" for c in cols) + " | graph/nccl | graph/floor |")
        print("|" + "---|" * (len(cols) + 4))
        for r in rows:
            cells = [f"{r[c]:.1f}" if c in r else "-" for c in cols]
            print(f"| {r['T']} | {r['H']} | " + " | ".join(cells)
                  + f" | {r['ours_graph'] / r['nccl']:.2f} | {r['ours_graph'] / r['floor']:.2f} |")
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip NVSHMEM/NCCL teardown at exit (collective; nothing left to measure)


if __name__ == "__main__":
    sys.exit(main())
