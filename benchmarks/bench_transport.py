"""Transport benchmark: round-trip latency (p50/p99) and bytes/s per scheme and message size.

    .venv/bin/python benchmarks/bench_transport.py [--sizes 64,4096,...] [--quick]

The echo peer runs in ANOTHER OS process (this script re-run with --serve) for tcp:// and
shm://; inproc:// echoes in-process. Message: {"x": uint8 tensor [size]}. Floors measured in
the same run: a raw asyncio stream echo of the same bytes (8-byte length + payload, no codec)
over TCP loopback and a unix socket, against a peer process of the same kind; and a memcpy
(torch copy_) of the same size.

    rate (bytes/s) = 2 * size / p50 round-trip time   (payload out and back)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

import torch

from eaas.transport import Connection, connect, listen

SIZES = [64, 4 << 10, 256 << 10, 4 << 20, 64 << 20]
LEN = struct.Struct("<Q")


def iters_for(size: int, quick: bool) -> int:
    n = 2000 if size <= 4096 else 500 if size <= 256 << 10 else 50 if size <= 4 << 20 else 8
    return max(3, n // 10) if quick else n


# ---- peers -------------------------------------------------------------------------------
async def echo(conn: Connection) -> None:
    while True:
        await conn.send(await conn.recv())


async def echo_lease(conn: Connection) -> None:  # shm zero-copy: send back the slot views
    while True:
        with await conn.recv_lease() as msg:
            await conn.send(msg)


async def raw_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            (n,) = LEN.unpack(await reader.readexactly(8))
            data = await reader.readexactly(n)
            writer.write(LEN.pack(n))
            writer.write(data)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def serve(mode: str, url: str) -> None:
    if mode == "raw-tcp":
        server = await asyncio.start_server(raw_echo, "127.0.0.1", 0)
        print(f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    elif mode == "raw-unix":
        path = f"/tmp/eaas-bench-{os.getpid()}.sock"
        server = await asyncio.start_unix_server(raw_echo, path)
        print(f"unix://{path}", flush=True)
    else:
        listener = await listen(url, echo_lease if mode == "lease" else echo)
        print(listener.url, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


# ---- clients -----------------------------------------------------------------------------
def summary(times: list[float], size: int) -> dict[str, float]:
    times.sort()
    p50 = statistics.median(times)
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    return {"p50_us": p50 * 1e6, "p99_us": p99 * 1e6, "gbps": 2 * size / p50 / 1e9}


async def bench_conn(conn: Connection, size: int, iters: int) -> dict[str, float]:
    msg = {"x": torch.randint(0, 255, (size,), dtype=torch.uint8)}
    for _ in range(2):
        await conn.send(msg)
        out = await conn.recv(timeout=60)
    assert torch.equal(out["x"], msg["x"])
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        await conn.send(msg)
        await conn.recv(timeout=60)
        times.append(time.perf_counter() - t0)
    return summary(times, size)


async def bench_raw(url: str, size: int, iters: int) -> dict[str, float]:
    if url.startswith("tcp://"):
        host, port = url[6:].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
    else:
        reader, writer = await asyncio.open_unix_connection(url[7:])
    data = os.urandom(size)
    times = []
    for i in range(iters + 2):
        t0 = time.perf_counter()
        writer.write(LEN.pack(size))
        writer.write(data)
        await writer.drain()
        (n,) = LEN.unpack(await reader.readexactly(8))
        await reader.readexactly(n)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.05)  # let the peer see EOF and end its handler before it is stopped
    return summary(times, size)


def bench_memcpy(size: int, iters: int) -> dict[str, float]:
    src = torch.randint(0, 255, (size,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for _ in range(iters + 2):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    times = times[2:]
    times.sort()
    p50 = statistics.median(times)
    return {"p50_us": p50 * 1e6, "p99_us": times[int(len(times) * 0.99)] * 1e6,
            "gbps": size / p50 / 1e9}


class Peer:
    """This script in another process serving `mode` on `url`; stops when stdin closes."""

    def __init__(self, mode: str, url: str) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", mode, url],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


async def run(sizes: list[int], quick: bool) -> list[tuple[str, int, dict[str, float]]]:
    rows: list[tuple[str, int, dict[str, float]]] = []
    listener = await listen("inproc://bench", echo)
    conn = await connect(listener.url)
    for size in sizes:
        rows.append(("inproc://", size, await bench_conn(conn, size, iters_for(size, quick))))
    await conn.aclose()
    await listener.aclose()
    for name, mode, url in (("tcp://", "echo", "tcp://127.0.0.1:0"), ("shm:// recv", "echo", "shm://"),
                            ("shm:// lease", "lease", "shm://")):
        peer = Peer(mode, url)
        try:
            conn = await connect(peer.url)
            for size in sizes:
                rows.append((name, size, await bench_conn(conn, size, iters_for(size, quick))))
            await conn.aclose()
        finally:
            peer.close()
    for name, mode in (("floor: raw asyncio tcp", "raw-tcp"),
                       ("floor: raw asyncio unix", "raw-unix")):
        peer = Peer(mode, "")
        try:
            for size in sizes:
                rows.append((name, size, await bench_raw(peer.url, size, iters_for(size, quick))))
        finally:
            peer.close()
    for size in sizes:
        rows.append(("floor: memcpy (1 copy)", size, bench_memcpy(size, iters_for(size, quick))))
    return rows


def fmt_size(n: int) -> str:
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n // div} {unit}"
    return f"{n} B"


def table(rows: list[tuple[str, int, dict[str, float]]]) -> str:
    lines = ["| transport | size | p50 RTT (us) | p99 RTT (us) | GB/s (2*size/p50) |",
             "|---|---:|---:|---:|---:|"]
    for name, size, s in rows:
        lines.append(f"| {name} | {fmt_size(size)} | {s['p50_us']:.1f} | {s['p99_us']:.1f} | "
                     f"{s['gbps']:.3f} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", nargs=2, metavar=("MODE", "URL"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--quick", action="store_true", help="10x fewer iterations")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(*args.serve))
        return
    torch.set_num_threads(1)
    rows: Any = asyncio.run(run([int(s) for s in args.sizes.split(",")], args.quick))
    print(f"machine: {machine()}")
    print("rate = 2 * size / p50 round-trip time (memcpy row: size / p50 copy time)")
    print(table(rows))


if __name__ == "__main__":
    main()
