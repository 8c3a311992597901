"""Actor runtime micro-benchmarks: tell throughput and ask round-trip latency, one process.

Peers measured in the same run:
- floor: a bare asyncio.Queue feeding one consumer task that resolves a Future (the least
  any asyncio request/reply can cost);
- Ray: a Ray actor method call round trip, if `ray` is importable (it is not a dependency).

Rates: tell throughput = N / (time to enqueue N tells and get the reply to one ask behind
them); ask latency = wall time of one `await ref.ask(msg, timeout=...)`, N in a row.

Usage: python benchmarks/bench_actors.py [--n 200000] [--asks 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time
from typing import Any

from eaas.actors import Actor, ActorSystem


class Counter(Actor):
    def __init__(self) -> None:
        self.count = 0

    async def on_receive(self, msg: Any) -> Any:
        self.count += 1
        return msg


def _pct(samples_ns: list[int], q: float) -> float:
    s = sorted(samples_ns)
    return s[min(len(s) - 1, int(q * len(s)))] / 1e3


async def bench_actor(n: int, asks: int) -> dict[str, float]:
    async with ActorSystem() as system:
        ref = await system.spawn(Counter, "counter", mailbox_size=4096)
        for i in range(2000):                                     # warm-up
            await ref.ask(i, timeout=5.0)
        t0 = time.perf_counter()
        for i in range(n):
            await ref.tell(i)
        await ref.ask("flush", timeout=30.0)
        tell_s = time.perf_counter() - t0
        lat: list[int] = []
        clock = time.perf_counter_ns
        for i in range(asks):
            t = clock()
            await ref.ask(i, timeout=5.0)
            lat.append(clock() - t)
    return {"tell_per_s": n / tell_s, "p50_us": _pct(lat, 0.5), "p99_us": _pct(lat, 0.99),
            "mean_us": statistics.fmean(lat) / 1e3}


async def bench_floor(n: int, asks: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[Any] = asyncio.Queue(4096)

    async def consumer() -> None:
        while True:
            fut, msg = await q.get()
            if fut is not None:
                fut.set_result(msg)

    task = asyncio.create_task(consumer())
    try:
        t0 = time.perf_counter()
        for i in range(n):
            await q.put((None, i))
        fut = loop.create_future()
        await q.put((fut, "flush"))
        await fut
        tell_s = time.perf_counter() - t0
        lat: list[int] = []
        clock = time.perf_counter_ns
        for i in range(asks):
            t = clock()
            fut = loop.create_future()
            q.put_nowait((fut, i))
            await fut
            lat.append(clock() - t)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return {"tell_per_s": n / tell_s, "p50_us": _pct(lat, 0.5), "p99_us": _pct(lat, 0.99),
            "mean_us": statistics.fmean(lat) / 1e3}


def bench_ray(asks: int) -> dict[str, float] | None:
    try:
        import ray  # type: ignore[import-not-found]
    except ImportError:
        return None
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote
        class Echo:
            def echo(self, x: Any) -> Any:
                return x

        a = Echo.remote()
        ray.get(a.echo.remote(0))
        lat = []
        for i in range(min(asks, 2000)):
            t = time.perf_counter_ns()
            ray.get(a.echo.remote(i))
            lat.append(time.perf_counter_ns() - t)
        return {"tell_per_s": float("nan"), "p50_us": _pct(lat, 0.5), "p99_us": _pct(lat, 0.99),
                "mean_us": statistics.fmean(lat) / 1e3}
    finally:
        ray.shutdown()


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="tells for the throughput run")
    ap.add_argument("--asks", type=int, default=20_000, help="asks for the latency run")
    args = ap.parse_args()
    rows = [("eaas ActorRef", asyncio.run(bench_actor(args.n, args.asks))),
            ("floor: asyncio.Queue+Future", asyncio.run(bench_floor(args.n, args.asks)))]
    ray_row = bench_ray(args.asks)
    print(f"machine: {_cpu()}, Python {platform.python_version()}, "
          f"tells N={args.n}, asks N={args.asks}")
    print("tell msg/s = N / (enqueue N + one flushing ask); ask = one awaited round trip")
    print(f"{'peer':<30} {'tell msg/s':>12} {'ask p50 us':>11} {'ask p99 us':>11} {'mean us':>9}")
    for name, r in rows:
        print(f"{name:<30} {r['tell_per_s']:>12,.0f} {r['p50_us']:>11.1f} {r['p99_us']:>11.1f} "
              f"{r['mean_us']:>9.1f}")
    if ray_row is None:
        print(f"{'ray actor call':<30} {'(ray not installed: not measured)':>45}")
    else:
        print(f"{'ray actor call':<30} {'-':>12} {ray_row['p50_us']:>11.1f} "
              f"{ray_row['p99_us']:>11.1f} {ray_row['mean_us']:>9.1f}")


if __name__ == "__main__":
    main()
