"""Where one batch-1 decode step spends its time, layer by layer (the latency profile).

For each eaas setup it decodes one request and stamps the hops of every MoE layer by wrapping
the engine's methods (nothing in the engine changes):

    before   = AttentionShard._layer entered -> Dispatcher.start (attention, ffn norm, router)
    dispatch = Dispatcher.start (group pairs by server, build and tell the work units)
    experts  = units told -> ExpertCall.wait returned (batcher, server call, reply, ledger)
    after    = wait returned -> layer done (combine_experts + residual)
    ms/token = median gap between streamed tokens (batch 1, after a warm-up)

plus the batchers' flush reasons (complete / timer / full) and, on CUDA, the host syncs per
decode step in the engine process with the code lines that cause them
(torch.cuda.set_sync_debug_mode). Peer in the same run: the monolithic DecoderModel's greedy
decode on the same device, ms/token.

    OMP_NUM_THREADS=1 python benchmarks/bench_latency.py --smoke            # CPU, tiny shape
    python benchmarks/bench_latency.py --layers 4 --setups b,a,n            # GPUs, Qwen3 shape

Setups as in bench_e2e_gpu.py: b in-process servers, a server processes (tcp:// on --smoke,
cudaipc:// on GPUs), n one server process over nvshmem:// (GPUs only, last: one job/process).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e_gpu as e2e  # noqa: E402  (puts the checkout and eaas_kernels on sys.path)

import torch  # noqa: E402

from eaas import AsyncEngine, SamplingParams  # noqa: E402
from eaas.engine import dispatch, shard  # noqa: E402
from eaas.model import Checkpoint, DecoderModel  # noqa: E402

STAMPS: dict[str, list[float]] = collections.defaultdict(list)


def _stamp_sync(cls: Any, name: str, tag: str, after: bool = False) -> None:
    f = getattr(cls, name)

    def g(*a: Any, **k: Any) -> Any:
        if not after:
            STAMPS[tag].append(time.perf_counter())
        r = f(*a, **k)
        if after:
            STAMPS[tag].append(time.perf_counter())
        return r

    setattr(cls, name, g)


def _stamp_async(cls: Any, name: str, tag_in: str | None, tag_out: str) -> None:
    f = getattr(cls, name)

    async def g(*a: Any, **k: Any) -> Any:
        if tag_in:
            STAMPS[tag_in].append(time.perf_counter())
        r = await f(*a, **k)
        STAMPS[tag_out].append(time.perf_counter())
        return r

    setattr(cls, name, g)


_stamp_async(shard.AttentionShard, "_layer", "layer_in", "layer_out")
_stamp_sync(dispatch.Dispatcher, "start", "start")
_stamp_sync(dispatch.Dispatcher, "start", "sent", after=True)
_stamp_async(dispatch.ExpertCall, "wait", None, "combined")


async def decode(engine: AsyncEngine, prompt: list[int], n: int) -> float:
    """Median ms between streamed tokens of one greedy request of n tokens."""
    t: list[float] = []
    async for _ in engine.generate(prompt, SamplingParams(max_tokens=n, temperature=0,
                                                          ignore_eos=True)):
        t.append(time.perf_counter())
    return statistics.median(b - a for a, b in zip(t[1:], t[2:])) * 1e3


def hops() -> dict[str, float]:
    """Median microseconds of each hop over the stamped layers."""
    m = min(len(v) for v in STAMPS.values())
    s = {k: v[-m:] for k, v in STAMPS.items()}

    def med(a: str, b: str) -> float:
        return statistics.median(y - x for x, y in zip(s[a], s[b])) * 1e6

    return {"layer": med("layer_in", "layer_out"), "before": med("layer_in", "start"),
            "dispatch": med("start", "sent"), "experts": med("sent", "combined"),
            "after": med("combined", "layer_out")}


async def sync_sites(engine: AsyncEngine, prompt: list[int], n: int) -> collections.Counter:
    """Host syncs in the engine process during n decode tokens, by eaas code line."""
    sites: collections.Counter = collections.Counter()

    def show(*_: Any, **__: Any) -> None:
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/eaas/" in f.filename or "kernels" in f.filename]
        sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-3:][::-1])] += 1

    old = warnings.showwarning
    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                await decode(engine, prompt, n)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    finally:
        warnings.showwarning = old
    return sites


async def run_setup(setup: str, model: Path, args: argparse.Namespace) -> dict:
    cfg = e2e.eaas_config(model, setup=setup, batch_invariant=args.batch_invariant,
                          smoke=args.smoke, servers=args.servers, max_batch=1,
                          dtype="float32" if args.smoke else "bfloat16")
    prompt = e2e.prompts(1, 16, vocab_of(model))[0]
    async with AsyncEngine(cfg) as engine:
        await decode(engine, prompt, 8)  # warm-up (kernels compile per shape)
        STAMPS.clear()
        ms = await decode(engine, prompt, args.tokens)
        h = hops()
        flushes = collections.Counter()
        for name, st in (await engine.stats()).items():
            if name.startswith("batcher-"):
                for why in ("complete", "timer", "full"):
                    flushes[why] += int(st.get(f"{why}_flushes", 0))
        sites = await sync_sites(engine, prompt, 5) if torch.cuda.is_available() else None
    return {"ms": ms, "hops": h, "flushes": dict(flushes), "sites": sites}


def vocab_of(model: Path) -> int:
    return json.loads((model / "config.json").read_text())["vocab_size"]


def reference_ms(model: Path, args: argparse.Namespace) -> float:
    device = "cpu" if args.smoke else "cuda:0"
    ref = DecoderModel.load(Checkpoint.open(model), torch.float32 if args.smoke else
                              torch.bfloat16, device=device, batch_invariant=args.batch_invariant)
    prompt = e2e.prompts(1, 16, vocab_of(model))[0]
    ref.generate_greedy(prompt, 4)
    t0 = time.perf_counter()
    ref.generate_greedy(prompt, args.tokens)
    return (time.perf_counter() - t0) / args.tokens * 1e3  # prefill included: an upper bound


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shape, tcp://")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--setups", default="b,a")
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch-invariant", action="store_true")
    ap.add_argument("--model-dir", default=None)
    args = ap.parse_args()
    setups = [s for s in args.setups.split(",") if s in ("a", "b", "n")]
    if args.smoke:
        setups = [s for s in setups if s != "n"]
    with tempfile.TemporaryDirectory() as tmp:
        model = e2e.make_model(args.model_dir or Path(tmp) / "m", smoke=args.smoke,
                               layers=args.layers)
        shape = e2e.model_line(model)
        peer = reference_ms(model, args)
        results = {s: await run_setup(s, model, args) for s in setups}
    print(f"# bench_latency{' --smoke' if args.smoke else ''}  {e2e.machine_line()}")
    print(f"# {shape}; batch 1, {args.tokens} greedy tokens, "
          f"batch_invariant={args.batch_invariant}, {args.servers} expert servers")
    print("# ms/token: median gap between streamed tokens; hops: median us per MoE layer "
          "(before = attention+norm+router, experts = units told -> combined)")
    print(f"# peer in the same run: DecoderModel.generate_greedy {peer:.2f} ms/token "
          "(prefill included)")
    print("| setup | ms/token | layer us | before | dispatch | experts | after | flushes "
          "complete/timer/full |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for s, r in results.items():
        h, f = r["hops"], r["flushes"]
        print(f"| {s} | {r['ms']:.2f} | {h['layer']:.0f} | {h['before']:.0f} | "
              f"{h['dispatch']:.0f} | {h['experts']:.0f} | {h['after']:.0f} | "
              f"{f.get('complete', 0)}/{f.get('timer', 0)}/{f.get('full', 0)} |")
    for s, r in results.items():
        if r["sites"] is not None:
            print(f"\n## setup {s}: host syncs in the engine process, 5 decode tokens")
            for site, n in r["sites"].most_common(25):
                print(f"  {n:5d}  {site}")


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    os._exit(0)
