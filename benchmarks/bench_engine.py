"""Engine throughput on CPU with a tiny model: the disaggregated engine (in-process, and with
expert servers as OS processes over tcp:// and shm://) vs the monolithic pure-torch reference in
the same run, plus a run with one expert-server process SIGKILLed mid-run.

tokens/s = generated tokens / wall time of the whole batch (all requests concurrent).
mean expert batch = rows computed by the expert servers / their compute calls.

    OMP_NUM_THREADS=1 python benchmarks/bench_engine.py [--requests 32] [--tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time

import torch

from eaas import AsyncEngine, EngineConfig, SamplingParams
from eaas.model import Checkpoint, DecoderModel, make_tiny


def prompts(tokenizer, n: int) -> list[list[int]]:
    ids = tokenizer.encode("Experts are stateless services; attention shards call them "
                           "asynchronously. The quick brown fox jumps over the lazy dog.")
    return [ids[i % 7: i % 7 + 4 + i % 9] for i in range(n)]


def bench_reference(model_dir: str, ps: list[list[int]], n: int, batch_invariant: bool) -> float:
    model = DecoderModel.load(Checkpoint.open(model_dir), torch.float32,
                                batch_invariant=batch_invariant)
    t0 = time.perf_counter()
    for p in ps:  # the reference runs one sequence at a time
        model.generate_greedy(p, n)
    return len(ps) * n / (time.perf_counter() - t0)


async def bench_engine(model_dir: str, ps: list[list[int]], n: int, *, mode: str,
                       transport: str = "tcp", batch_invariant: bool = True,
                       kill_at_s: float | None = None) -> dict:
    cfg = EngineConfig.from_dict({
        "model": model_dir, "batch_invariant": batch_invariant,
        "placement": {"num_attention_shards": 1, "num_expert_servers": 3, "expert_replicas": 2,
                      "server_mode": mode, "transport": transport},
        "batching": {"max_batch_tokens": 512, "max_wait_us": 200},
        "fault": {"unit_timeout_s": 1.0, "heartbeat_interval_s": 0.2}})
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    async with AsyncEngine(cfg) as engine:
        # warm-up (first calls pay allocation and lazy-init costs)
        async for _ in engine.generate(ps[0], SamplingParams(max_tokens=2, temperature=0)):
            pass
        before = await engine.stats()
        stamps: list[float] = []
        kill: dict = {}

        async def one(p):
            async for out in engine.generate(p, params):
                stamps.append(time.perf_counter())
            return out

        async def killer():
            await asyncio.sleep(kill_at_s)
            kill["t"] = time.perf_counter()
            inc = engine.incarnation("expert-1")
            await engine.inject_fault("expert-1", "kill")
            await engine.wait_servers_ready(60.0, {"expert-1": inc})
            kill["recovered"] = time.perf_counter()

        t0 = time.perf_counter()
        tasks = [one(p) for p in ps] + ([killer()] if kill_at_s is not None else [])
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        after = await engine.stats()
        counters = dict(engine.counters)
    outs = [r for r in results if r is not None]
    assert all(o.finish_reason == "length" for o in outs)
    calls = sum(after[s]["calls"] - before[s]["calls"] for s in after if s.startswith("expert-")
                and "calls" in after[s] and s in before)
    rows = sum(after[s]["rows"] - before[s]["rows"] for s in after if s.startswith("expert-")
               and "rows" in after[s] and s in before)
    row = {"tok_s": len(ps) * n / wall, "mean_batch": rows / max(1, calls), "wall": wall,
           "tokens": [o.outputs[0].token_ids for o in outs], "counters": counters}
    if kill:
        k, r = kill["t"] - t0, kill["recovered"] - t0
        def rate(a: float, b: float) -> float:
            m = sum(1 for s in stamps if a <= s - t0 < b)
            return m / (b - a) if b > a else float("nan")
        row.update(kill_s=k, recovery_s=r - k, before=rate(0, k), during=rate(k, r),
                   after=rate(r, wall))
    return row


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--arch", default="qwen3_moe")
    args = ap.parse_args()
    n = args.tokens
    with tempfile.TemporaryDirectory() as tmp:
        d = str(make_tiny(f"{tmp}/{args.arch}", args.arch, seed=0))
        ps = prompts(Checkpoint.open(d).tokenizer, args.requests)
        rows = []
        for inv in (False, True):
            rows.append((f"reference, monolithic, batch_invariant={inv}",
                         {"tok_s": bench_reference(d, ps, n, inv)}))
        for inv in (False, True):
            rows.append((f"eaas in-process, 3 servers x2 replicas, batch_invariant={inv}",
                         await bench_engine(d, ps, n, mode="inproc", batch_invariant=inv)))
        for tr in ("tcp", "shm"):
            rows.append((f"eaas 3 server processes over {tr}://, batch_invariant=True",
                         await bench_engine(d, ps, n, mode="process", transport=tr)))
        rows.append(("eaas 3 server processes over tcp://, batch_invariant=False",
                     await bench_engine(d, ps, n, mode="process", transport="tcp",
                                        batch_invariant=False)))
        base = await bench_engine(d, ps, n, mode="process", transport="tcp")
        killed = await bench_engine(d, ps, n, mode="process", transport="tcp",
                                    kill_at_s=base["wall"] / 3)
        assert killed["tokens"] == base["tokens"], "a kill changed the output"
        rows.append(("eaas processes over tcp://, expert-1 SIGKILLed at 1/3", killed))
    print(f"# bench_engine  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"# {args.requests} concurrent requests x {n} greedy tokens, tiny {args.arch}")
    print("| run | tokens/s | mean expert batch (rows/call) |")
    print("|---|---:|---:|")
    for name, r in rows:
        mb = f"{r['mean_batch']:.1f}" if "mean_batch" in r else "-"
        print(f"| {name} | {r['tok_s']:.0f} | {mb} |")
    k = killed
    print(f"\nkill run: killed at {k['kill_s']:.2f}s, server back after {k['recovery_s']:.2f}s; "
          f"tokens/s before {k['before']:.0f}, during {k['during']:.0f}, after {k['after']:.0f}; "
          f"resent units {k['counters'].get('resent_units', 0)}, reroutes "
          f"{k['counters'].get('reroutes', 0)}; outputs identical to the no-kill run")


if __name__ == "__main__":
    asyncio.run(main())
