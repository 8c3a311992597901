"""What starting a warm spare costs the serving engine on CPU (issue 18), at niceness 0 against
`fault.spare_nice` (the default), in the same run.

The bench_faults load (12 client loops of greedy 16-token requests, 3 expert-server processes
x 2 replicas, warm spares off so none starts by itself) runs throughout. Each trial measures the
tokens/s of the 3 s before, then starts one spare exactly as the engine does
(eaas.engine.process_home.SpareProcesses) and measures the tokens/s until it is ready (its
start-up: interpreter, torch import, listening socket), then stops it. Trials alternate the
niceness (0 first on even trials, spare_nice first on odd ones).
  while starting = tokens streamed from start to ready / seconds to ready, / tokens/s before

    OMP_NUM_THREADS=1 python benchmarks/bench_spare_start.py [--trials 4]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e_gpu import machine_line, prompts  # noqa: E402  (puts the checkout on sys.path)
from bench_faults import Load, engine_config, warm_up  # noqa: E402

from eaas import AsyncEngine  # noqa: E402
from eaas.engine.process_home import SpareProcesses, may_unnice  # noqa: E402
from eaas.engine.server_process import restart_transport, server_argv  # noqa: E402
from eaas.model import make_tiny  # noqa: E402


async def trial(load: Load, spares: SpareProcesses, before_s: float) -> dict:
    n0 = load.tokens
    await asyncio.sleep(before_s)
    n1, t0 = load.tokens, time.monotonic()
    spares.fill()
    while not spares._ready:
        await asyncio.sleep(0.02)
    ready_s, n2 = time.monotonic() - t0, load.tokens
    await spares.aclose()
    before = (n1 - n0) / before_s
    return {"nice": spares.nice, "before_tok_s": before, "ready_s": ready_s,
            "while_starting": (n2 - n1) / ready_s / before}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=4, help="per niceness")
    ap.add_argument("--before-s", type=float, default=3.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny(Path(tmp) / "model", "qwen3_moe")
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        pool = prompts(48, 12, vocab, seed=1)
        cfg = engine_config(model, 2, {"warm_spares": 0})
        argv = functools.partial(server_argv, cfg.model, {}, dtype=cfg.dtype, device="cpu",
                                 load_format=cfg.load_format,
                                 batch_invariant=cfg.batch_invariant,
                                 transport=restart_transport(cfg.placement.transport))
        rows = []
        async with AsyncEngine(cfg) as engine:
            await warm_up(engine, pool)
            load = Load(engine, pool, [[]] * len(pool), 16, 12, keep_stamps=False)
            load.start()
            for k in range(2 * args.trials):
                nice = cfg.fault.spare_nice if (k % 2) != (k // 2 % 2) else 0
                spares = SpareProcesses(argv, lambda name: str(Path(tmp) / f"{name}.log"),
                                        count=1, start_timeout_s=120.0, nice=nice)
                rows.append(await trial(load, spares, args.before_s))
            await load.stop(60.0)
    print(f"# bench_spare_start  {machine_line()}")
    print(f"# while starting = tok/s from the spare's start to its ready line / tok/s in the "
          f"{args.before_s} s before; load as bench_faults (12 clients, 3 servers x 2)")
    if not may_unnice(0):
        print("# this process may not give a priority back: spares start at niceness 0 only")
    print("\n| niceness | trials | tok/s before (median) | while starting (median) | "
          "while starting (each) | ready s (median) |")
    print("|---:|---:|---:|---:|---|---:|")
    for nice in sorted({r["nice"] for r in rows}):
        rs = [r for r in rows if r["nice"] == nice]
        each = " ".join(f"{r['while_starting']:.0%}" for r in rs)
        print(f"| {nice} | {len(rs)} | {statistics.median(r['before_tok_s'] for r in rs):.0f} | "
              f"{statistics.median(r['while_starting'] for r in rs):.0%} | {each} | "
              f"{statistics.median(r['ready_s'] for r in rs):.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
