"""What the HTTP layer costs: the same greedy requests through the Python AsyncEngine directly
(the peer) and through the OpenAI-compatible app over a real TCP socket, in one process/run.

    tokens/s   = generated tokens / wall seconds (all clients together)
    requests/s = finished requests / wall seconds
    p50 / p99  = per-request latency (submit -> last token), ms
    TTFT p50   = submit -> first streamed token, ms (streaming rows and the direct peer)

The sampling features (issue 20), on the direct engine in the same run, interleaved:
    n=4 (one request, one shared prefill) vs 4 separate requests of the same prompt;
    logprobs=5 and a JSON schema (xgrammar bitmasks) vs plain seeded sampling.
    tokens/s = generated tokens (all sequences) / wall seconds; prompts of --prompt-len tokens.

Usage: python benchmarks/bench_serving.py [--requests 48] [--max-tokens 16] [--clients 1 8]
       [--repeats 3] [--features-only] [--prompt-len 96] [--prompts 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time

import aiohttp
from aiohttp import web

from eaas import AsyncEngine, EngineConfig, SamplingParams
from eaas.engine.params import StructuredOutputsParams
from eaas.model import make_tiny
from eaas.serving import create_app


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} CPUs"


async def _clients(n_clients: int, n_requests: int, one) -> tuple[float, list[tuple]]:
    queue = list(range(n_requests))
    results: list[tuple] = []

    async def worker() -> None:
        while queue:
            i = queue.pop()
            results.append(await one(i))

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(n_clients):
            tg.create_task(worker())
    return time.perf_counter() - t0, results


def _row(name: str, clients: int, wall: float, results: list[tuple]) -> str:
    lat = sorted(r[0] for r in results)
    ttft = [r[2] for r in results if r[2] is not None]
    tokens = sum(r[1] for r in results)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    ttft_s = f"{statistics.median(ttft) * 1e3:.1f}" if ttft else "-"
    return (f"| {name} | {clients} | {len(results) / wall:.1f} | {tokens / wall:.1f} | "
            f"{statistics.median(lat) * 1e3:.1f} | {p99 * 1e3:.1f} | {ttft_s} |")


async def main(args: argparse.Namespace) -> None:
    model = make_tiny(tempfile.mkdtemp(prefix="bench-serving-"), "qwen3_moe", seed=0)
    cfg = EngineConfig(model=str(model))  # the `eaas serve` defaults
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    body = {"prompt": [5, 6, 7, 8, 9, 10, 11, 12], "max_tokens": args.max_tokens,
            "temperature": 0, "ignore_eos": True}
    rows = []
    async with AsyncEngine(cfg) as engine:
        features = await _feature_rows(engine, args)
        if args.features_only:
            _print_features(args, features)
            return
        runner = web.AppRunner(create_app(engine, admin_token="bench-token-0123"),
                               handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/completions"
        async with aiohttp.ClientSession() as http:

            async def direct(i: int) -> tuple:
                t0, first, n = time.perf_counter(), None, 0
                async for out in engine.generate(body["prompt"], params):
                    first = first or time.perf_counter() - t0
                    n = len(out.outputs[0].token_ids)
                return time.perf_counter() - t0, n, first

            async def plain(i: int) -> tuple:
                t0 = time.perf_counter()
                async with http.post(url, json=body) as r:
                    data = await r.json()
                return time.perf_counter() - t0, data["usage"]["completion_tokens"], None

            async def stream(i: int) -> tuple:
                t0, first, n = time.perf_counter(), None, 0
                async with http.post(url, json={**body, "stream": True}) as r:
                    async for line in r.content:
                        if line.startswith(b"data: {") and b'"text":""' not in line:
                            first = first or time.perf_counter() - t0
                            n += 1
                return time.perf_counter() - t0, n, first

            paths = (("direct AsyncEngine (peer)", direct), ("HTTP", plain),
                     ("HTTP + SSE stream", stream))
            await _clients(2, 4, direct)  # warm-up
            for clients in args.clients:
                runs: dict[str, list] = {name: [] for name, _ in paths}
                for _ in range(args.repeats):  # interleaved, so load drift hits every path
                    for name, fn in paths:
                        wall, res = await _clients(clients, args.requests, fn)
                        assert all(r[1] == args.max_tokens for r in res), "short outputs"
                        runs[name].append((wall, res))
                for name, _ in paths:  # the run with the median wall time
                    wall, res = sorted(runs[name], key=lambda r: r[0])[len(runs[name]) // 2]
                    rows.append(_row(name, clients, wall, res))
        await runner.cleanup()
    print(f"eaas serving overhead — {_cpu()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"tiny qwen3_moe, {args.requests} requests x {args.max_tokens} greedy tokens, 8-token "
          f"prompt, `eaas serve` default config; median of {args.repeats} interleaved runs")
    print("| path | clients | requests/s | tokens/s | p50 ms | p99 ms | TTFT p50 ms |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    _print_features(args, features)


SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["text", "n"]}


async def _feature_rows(engine, args: argparse.Namespace) -> list[str]:
    vocab = engine.model_config.vocab_size
    prompts = [[(13 * i + 7 * j) % (vocab - 1) + 1 for j in range(args.prompt_len)]
               for i in range(args.prompts)]
    base = dict(max_tokens=args.max_tokens, temperature=1.0)

    async def run(i: int, **kw) -> int:
        out = None
        async for out in engine.generate(prompts[i], SamplingParams(**base, seed=i, **kw)):
            pass
        return sum(len(c.token_ids) for c in out.outputs)

    async def n4(i: int) -> int:
        return await run(i, n=4, ignore_eos=True)

    async def four(i: int) -> int:
        counts = await asyncio.gather(*(run(i, ignore_eos=True) for _ in range(4)))
        return sum(counts)

    so = StructuredOutputsParams(json=SCHEMA)
    cases = (("n=4, one request (shared prefill)", n4), ("4 separate requests", four),
             ("plain sampling", lambda i: run(i, ignore_eos=True)),
             ("logprobs=5", lambda i: run(i, ignore_eos=True, logprobs=5)),
             ("JSON schema (xgrammar)", lambda i: run(i, structured_outputs=so)))
    await run(0, structured_outputs=so)  # warm-up (imports xgrammar, compiles the schema)
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name, _ in cases}
    for _ in range(args.repeats):
        for name, fn in cases:
            t0 = time.perf_counter()
            counts = await asyncio.gather(*(fn(i) for i in range(args.prompts)))
            runs[name].append((time.perf_counter() - t0, sum(counts)))
    rows = []
    for name, _ in cases:
        wall, tokens = sorted(runs[name])[len(runs[name]) // 2]
        rows.append(f"| {name} | {tokens} | {wall:.2f} | {tokens / wall:.1f} |")
    return rows


def _print_features(args: argparse.Namespace, rows: list[str]) -> None:
    print(f"\nsampling features — {_cpu()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"direct AsyncEngine, {args.prompts} concurrent prompts of {args.prompt_len} tokens, "
          f"max_tokens {args.max_tokens}, temperature 1; median of {args.repeats} interleaved "
          "runs; tokens/s = generated tokens / wall s")
    print("| case | tokens | wall s | tokens/s |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs; the median is shown")
    p.add_argument("--features-only", action="store_true",
                   help="only the sampling-feature table (n=4, logprobs, JSON schema)")
    p.add_argument("--prompt-len", type=int, default=96, help="feature rows: prompt tokens")
    p.add_argument("--prompts", type=int, default=8, help="feature rows: concurrent prompts")
    asyncio.run(main(p.parse_args()))
