"""Scale and failure on N GPUs (issue 9): a Qwen3-30B-A3B-shaped random model, attention shards on
the first 2 GPUs (`placement.shard_devices`), expert-server processes on the other N - 2
(cudaipc://, every expert on 2 servers). Three phases under open-loop Poisson load (seeded):

  1. throughput at several request rates vs the same model co-located on 2 GPUs (2 shards and
     2 in-process expert servers on cuda:0-1, one copy of each expert)
  2. SIGKILL one expert-server process at a time (3 kills, servers taken in turn), waiting for
     its restart between kills: tokens/s in 1 s buckets, and requests lost (must be 0)
  3. scale the expert pool N-2 -> N-3 -> N-4 -> N-2 servers (remove_server, then add_server
     with the freed GPU as `device`): tokens/s and tokens/s per GPU at each size

tokens/s = tokens streamed in a window / window length (phase 1: the arrival window; phase 3:
from the end of a scaling step to the next step). tokens/s per GPU = tokens/s / GPUs in use
(2 shard GPUs + one per expert server; co-located: 2). lost = requests that did not finish
with finish_reason "length" (greedy, ignore_eos), raised, or did not finish in the drain time.

    python benchmarks/bench_scale.py --gpus 4 --out $OUT [--layers 8] [--phases 1,2,3]
    python benchmarks/bench_scale.py --smoke --out /tmp/scale   # CPU, 4 server processes, < 30 s

PNGs (matplotlib Agg) go to --out: scale_rates.png, scale_kills.png, scale_pool.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e_gpu import machine_line, make_model, model_line, num_gpus  # noqa: E402  (paths)

from eaas import AsyncEngine, EngineConfig, SamplingParams  # noqa: E402


# ---- configs ---------------------------------------------------------------------------------
def disaggregated_config(model: str | Path, *, gpus: int, smoke: bool, dtype: str,
                         smoke_servers: int = 4) -> EngineConfig:
    """Shards on cuda:0-1, N - 2 server processes on cuda:2.. (smoke: CPU, 4 over tcp://)."""
    servers = smoke_servers if smoke else gpus - 2
    placement: dict[str, Any] = {
        "num_attention_shards": 2, "num_expert_servers": servers, "expert_replicas": 2,
        "server_mode": "process", "transport": "tcp" if smoke else "cudaipc"}
    if not smoke:
        placement.update(shard_devices=["cuda:0", "cuda:1"],
                         server_devices=[f"cuda:{i}" for i in range(2, gpus)])
    return _config(model, placement, smoke=smoke, dtype=dtype)


def colocated_config(model: str | Path, *, smoke: bool, dtype: str) -> EngineConfig:
    """2 shards + 2 in-process expert servers on cuda:0-1, one copy of each expert."""
    placement: dict[str, Any] = {"num_attention_shards": 2, "num_expert_servers": 2,
                                 "expert_replicas": 1, "server_mode": "inproc"}
    if not smoke:
        placement.update(shard_devices=["cuda:0", "cuda:1"],
                         server_devices=["cuda:0", "cuda:1"])
    return _config(model, placement, smoke=smoke, dtype=dtype)


def _config(model: str | Path, placement: dict, *, smoke: bool, dtype: str) -> EngineConfig:
    return EngineConfig.from_dict({
        "model": str(model), "dtype": dtype, "device": "cpu" if smoke else "cuda:0",
        "batch_invariant": False, "placement": placement,
        "batching": {"max_batch_tokens": 8192, "max_wait_us": 200},
        "scheduler": {"max_num_seqs": 256, "max_waiting": 8192},
        "fault": {"unit_timeout_s": 2.0 if smoke else 30.0, "heartbeat_interval_s": 0.25,
                  "max_restarts": 10, "within_s": 60.0, "backoff_s": 0.05,
                  "no_replica_policy": "wait", "wait_timeout_s": 120.0}})


# ---- open-loop load --------------------------------------------------------------------------
@dataclass
class Load:
    """Poisson arrivals at `rate` requests/s of random `prompt_len`-token prompts, each asking
    `n_tokens` greedy tokens; records every streamed token's time and every outcome."""

    engine: AsyncEngine
    rate: float
    n_tokens: int
    prompt_len: int
    vocab: int
    seed: int
    stamps: list[tuple[float, int]] = field(default_factory=list)  # (time, new tokens)
    outcomes: list[str] = field(default_factory=list)  # finish reason, or "raised: ..."
    latencies: list[float] = field(default_factory=list)
    tasks: set[asyncio.Task] = field(default_factory=set)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _arrivals: asyncio.Task | None = None

    def start(self) -> None:
        self._arrivals = asyncio.create_task(self._arrive())

    def set_rate(self, rate: float) -> None:
        self.rate = rate

    async def _arrive(self) -> None:
        rng = random.Random(self.seed)
        params = SamplingParams(max_tokens=self.n_tokens, temperature=0, ignore_eos=True)
        loop = asyncio.get_running_loop()
        t_next = loop.time()
        while not self._stop.is_set():
            t_next += rng.expovariate(self.rate)
            try:
                await asyncio.wait_for(self._stop.wait(), max(0.0, t_next - loop.time()))
                return
            except TimeoutError:
                pass
            prompt = [rng.randrange(10, self.vocab) for _ in range(self.prompt_len)]
            task = asyncio.create_task(self._one(prompt, params))
            self.tasks.add(task)

    async def _one(self, prompt: list[int], params: SamplingParams) -> None:
        t0, seen = time.perf_counter(), 0
        try:
            async for out in self.engine.generate(prompt, params):
                k = len(out.outputs[0].token_ids)
                if k > seen:
                    self.stamps.append((time.perf_counter(), k - seen))
                    seen = k
                if out.finished:
                    self.outcomes.append(out.finish_reason or "none")
                    self.latencies.append(time.perf_counter() - t0)
        except asyncio.CancelledError:
            self.outcomes.append("unfinished at drain deadline")
            raise
        except Exception as e:  # a failed request is a lost one: count it, keep the load going
            self.outcomes.append(f"raised {type(e).__name__}")

    async def stop_and_drain(self, timeout_s: float) -> None:
        """Stop arrivals, wait for in-flight requests; cancel those still running at timeout."""
        self._stop.set()
        if self._arrivals is not None:
            await self._arrivals
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout_s)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def tokens_between(self, a: float, b: float) -> int:
        return sum(n for t, n in self.stamps if a <= t < b)

    def lost(self) -> int:
        return sum(1 for o in self.outcomes if o != "length")

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o] = counts.get(o, 0) + 1
        return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(math.ceil(q * len(s))) - 1)]


async def warm_up(engine: AsyncEngine, vocab: int, n_tokens: int, prompt_len: int) -> None:
    """A few concurrent requests before timing (first calls compile kernels / allocate)."""
    params = SamplingParams(max_tokens=min(4, n_tokens), temperature=0, ignore_eos=True)
    rng = random.Random(12345)

    async def one() -> None:
        async for _ in engine.generate([rng.randrange(10, vocab) for _ in range(prompt_len)],
                                       params):
            pass

    await asyncio.gather(*(one() for _ in range(8)))


# ---- phases ----------------------------------------------------------------------------------
async def phase_rates(engine: AsyncEngine, args: argparse.Namespace, vocab: int,
                      gpus_used: int, label: str) -> list[dict]:
    rows = []
    for i, rate in enumerate(args.rates):
        load = Load(engine, rate, args.tokens, args.prompt_len, vocab, seed=args.seed + i)
        t0 = time.perf_counter()
        load.start()
        await asyncio.sleep(args.duration_s)
        t1 = time.perf_counter()
        await load.stop_and_drain(args.drain_s)
        tok_s = load.tokens_between(t0, t1) / (t1 - t0)
        rows.append({"setup": label, "gpus": gpus_used, "rate": rate,
                     "requests": len(load.outcomes), "tok_s": tok_s, "tok_s_gpu": tok_s / gpus_used,
                     "p50_s": _pct(load.latencies, 0.5), "p99_s": _pct(load.latencies, 0.99),
                     "lost": load.lost(), "outcomes": load.summary()})
    return rows


async def phase_kills(engine: AsyncEngine, args: argparse.Namespace, vocab: int) -> dict:
    load = Load(engine, args.load_rate, args.tokens, args.prompt_len, vocab, seed=args.seed + 100)
    t0 = time.perf_counter()
    load.start()
    await asyncio.sleep(args.settle_s)
    servers = engine.server_names()
    kills = []
    for k in range(args.kills):
        victim = servers[k % len(servers)]
        inc = engine.incarnation(victim)
        tk = time.perf_counter()
        await engine.inject_fault(victim, "kill")
        await engine.wait_servers_ready(args.recover_timeout_s, {victim: inc})
        tr = time.perf_counter()
        kills.append({"server": victim, "killed_at_s": tk - t0, "recovered_after_s": tr - tk})
        await asyncio.sleep(args.settle_s)
    t_end = time.perf_counter()
    await load.stop_and_drain(args.recover_timeout_s)
    buckets = [load.tokens_between(t0 + s, t0 + s + 1.0) for s in range(int(math.ceil(t_end - t0)))]
    return {"kills": kills, "buckets": buckets, "requests": len(load.outcomes),
            "lost": load.lost(), "outcomes": load.summary(),
            "restarts": engine.counters.get("restarts", 0),
            "resent_units": engine.counters.get("resent_units", 0)}


async def phase_pool(engine: AsyncEngine, args: argparse.Namespace, vocab: int,
                     shard_gpus: int) -> dict:
    """Remove servers one by one down to max(1, S - 2), then add them back on their GPUs."""
    start = engine.server_names()
    s0 = len(start)
    sizes = [s0, s0 - 1, max(1, s0 - 2), s0]
    sizes = [x for i, x in enumerate(sizes) if i == 0 or x != sizes[i - 1]]
    load = Load(engine, args.load_rate, args.tokens, args.prompt_len, vocab, seed=args.seed + 200)
    t0 = time.perf_counter()
    load.start()
    removed: list[dict] = []  # snapshots of removed servers: their experts and device
    segments = []
    for size in sizes:
        live = engine.server_names()
        t_op = time.perf_counter()
        ops = []
        while len(live) > size:
            victim = live[-1]
            snap = next(s for s in engine.snapshot()["servers"] if s["name"] == victim)
            await engine.remove_server(victim)
            removed.append(snap)
            ops.append(f"removed {victim} ({snap['device']})")
            live = engine.server_names()
        while len(live) < size:
            snap = removed.pop()
            experts = {int(l): ids for l, ids in snap["experts"].items()}
            name = await engine.add_server(experts, device=snap["device"])
            ops.append(f"added {name} on {snap['device']}")
            live = engine.server_names()
        op_s = time.perf_counter() - t_op if segments else 0.0
        a = time.perf_counter()
        await asyncio.sleep(args.segment_s)
        b = time.perf_counter()
        devices = sorted({s["device"] for s in engine.snapshot()["servers"]})
        tok_s = load.tokens_between(a, b) / (b - a)
        gpus = shard_gpus + size
        segments.append({"servers": size, "gpus": gpus, "op": "; ".join(ops) or "start",
                         "op_s": op_s,
                         "tok_s": tok_s, "tok_s_gpu": tok_s / gpus, "devices": devices,
                         "from_s": a - t0, "to_s": b - t0})
    t_end = time.perf_counter()
    await load.stop_and_drain(args.recover_timeout_s)
    buckets = [load.tokens_between(t0 + s, t0 + s + 1.0) for s in range(int(math.ceil(t_end - t0)))]
    return {"segments": segments, "buckets": buckets, "requests": len(load.outcomes),
            "lost": load.lost(), "outcomes": load.summary()}


# ---- output ----------------------------------------------------------------------------------
def plot(out: Path, rates: list[dict], kills: dict | None, pool: dict | None) -> list[str]:
    try:
        import matplotlib
    except ImportError:  # the table and scale_results.json still carry every number
        print("matplotlib is not installed: no PNGs (carry its wheel to get them)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if rates:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in dict.fromkeys(r["setup"] for r in rates):
            rs = [r for r in rates if r["setup"] == label]
            ax.plot([r["rate"] for r in rs], [r["tok_s_gpu"] for r in rs], "o-", label=label)
        ax.set(xlabel="offered load (requests/s, Poisson)", ylabel="tokens/s per GPU",
               title="Throughput vs load")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "scale_rates.png", dpi=120)
        made.append("scale_rates.png")
    for name, data, title in (("scale_kills.png", kills, "Expert-server SIGKILLs under load"),
                              ("scale_pool.png", pool, "Expert pool resized under load")):
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(range(len(data["buckets"])), data["buckets"], width=1.0, align="edge",
               color="#4a7")
        for k in data.get("kills", []):
            ax.axvline(k["killed_at_s"], color="r", ls="--")
            ax.axvline(k["killed_at_s"] + k["recovered_after_s"], color="b", ls=":")
        for s in data.get("segments", []):
            ax.axvspan(s["from_s"], s["to_s"], alpha=0.08)
            ax.text(s["from_s"], max(data["buckets"] or [1]) * 0.95, f"{s['servers']} srv",
                    fontsize=7)
        ax.set(xlabel="time (s), 1 s buckets", ylabel="tokens/s", title=title)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        made.append(name)
    plt.close("all")
    return made


def print_results(header: list[str], rates: list[dict], kills: dict | None,
                  pool: dict | None) -> None:
    for line in header:
        print(f"# {line}")
    if rates:
        print("\n## phase 1: throughput vs offered load")
        print("| setup | GPUs | offered req/s | requests | tok/s | tok/s per GPU | p50 latency s | "
              "p99 latency s | lost |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rates:
            print(f"| {r['setup']} | {r['gpus']} | {r['rate']:g} | {r['requests']} | "
                  f"{r['tok_s']:.1f} | {r['tok_s_gpu']:.1f} | {r['p50_s']:.2f} | "
                  f"{r['p99_s']:.2f} | {r['lost']} |")
    if kills:
        print("\n## phase 2: one expert-server process SIGKILLed at a time, under load")
        print("| kill | server | killed at s | back after s |")
        print("|---:|---|---:|---:|")
        for i, k in enumerate(kills["kills"], 1):
            print(f"| {i} | {k['server']} | {k['killed_at_s']:.2f} | "
                  f"{k['recovered_after_s']:.2f} |")
        print(f"tokens per 1 s bucket: {' '.join(str(b) for b in kills['buckets'])}")
        print(f"requests lost: {kills['lost']} (of {kills['requests']}; {kills['outcomes']}); "
              f"restarts {kills['restarts']}, resent units {kills['resent_units']}")
    if pool:
        print("\n## phase 3: expert pool resized under load")
        print("| expert servers | GPUs | step before the window | step took s | tok/s | "
              "tok/s per GPU | server devices |")
        print("|---:|---:|---|---:|---:|---:|---|")
        for s in pool["segments"]:
            print(f"| {s['servers']} | {s['gpus']} | {s['op']} | {s['op_s']:.2f} | "
                  f"{s['tok_s']:.1f} | {s['tok_s_gpu']:.1f} | {', '.join(s['devices'])} |")
        print(f"tokens per 1 s bucket: {' '.join(str(b) for b in pool['buckets'])}")
        print(f"pool phase requests lost: {pool['lost']} (of {pool['requests']}; "
              f"{pool['outcomes']})")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, 4 server processes")
    ap.add_argument("--gpus", type=int, default=None, help="N: 2 shard GPUs + N - 2 for servers")
    ap.add_argument("--smoke-servers", type=int, default=4,
                    help="--smoke only: server processes (2 walks the N = 4 path on CPU)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--phases", default="1,2,3")
    ap.add_argument("--rates", default=None, help="phase 1 request rates (req/s), comma list")
    ap.add_argument("--load-rate", type=float, default=None, help="phases 2 and 3 (req/s)")
    ap.add_argument("--duration-s", type=float, default=None, help="phase 1, per rate")
    ap.add_argument("--segment-s", type=float, default=None, help="phase 3, per pool size")
    ap.add_argument("--settle-s", type=float, default=None, help="phase 2, load between kills")
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=None, help="greedy tokens per request")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--drain-s", type=float, default=None)
    ap.add_argument("--recover-timeout-s", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", default=None,
                    help="checkpoint folder: reused if it has config.json, else made there")
    ap.add_argument("--out", default="bench_scale_out")
    args = ap.parse_args()
    smoke = args.smoke
    d = (dict(rates="4,12", load_rate=8.0, duration_s=1.0, segment_s=0.8, settle_s=0.3,
              tokens=6, drain_s=10.0, recover_timeout_s=30.0) if smoke else
         dict(rates="4,16,48", load_rate=None, duration_s=20.0, segment_s=15.0, settle_s=5.0,
              tokens=64, drain_s=60.0, recover_timeout_s=180.0))
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    auto_rate = args.load_rate is None  # GPU default: 60% of phase 1's best (else 8 req/s)
    args.rates = [float(x) for x in str(args.rates).split(",")]
    phases = {int(p) for p in args.phases.split(",")}
    gpus = args.gpus if args.gpus is not None else num_gpus()
    if not smoke:
        if num_gpus() < gpus or gpus < 4:
            sys.exit(f"--gpus {gpus}: needs N >= 4 GPUs present (found {num_gpus()}); "
                     f"use --smoke on CPU")
    dtype = "float32" if smoke else "bfloat16"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rates: list[dict] = []
    kills = pool = None
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(args.model_dir or Path(tmp) / "model", smoke=smoke,
                           layers=args.layers)
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        shape = model_line(model)
        cfg = disaggregated_config(model, gpus=gpus, smoke=smoke, dtype=dtype,
                                   smoke_servers=args.smoke_servers)
        n_servers = cfg.placement.num_expert_servers
        label = (f"eaas: 2 shards (cuda:0-1) + {n_servers} server processes (cuda:2-{gpus - 1}),"
                 f" cudaipc://" if not smoke else
                 f"eaas (smoke, CPU): 2 shards + {n_servers} server processes, tcp://")
        t0 = time.perf_counter()
        async with AsyncEngine(cfg) as engine:
            start_s = time.perf_counter() - t0
            await warm_up(engine, vocab, args.tokens, args.prompt_len)
            if 1 in phases:
                rates += await phase_rates(engine, args, vocab, 2 + n_servers, label)
            if auto_rate:  # below saturation, so phases 2-3 drain and show the dips
                best = max((r["tok_s"] for r in rates), default=0.0)
                args.load_rate = round(max(1.0, 0.6 * best / args.tokens), 1) if best else 8.0
            if 2 in phases:
                kills = await phase_kills(engine, args, vocab)
            if 3 in phases:
                pool = await phase_pool(engine, args, vocab, shard_gpus=2)
        if 1 in phases:
            peer = ("co-located: 2 shards + 2 in-process servers on cuda:0-1" if not smoke else
                    "co-located (smoke, CPU): 2 shards + 2 in-process servers")
            async with AsyncEngine(colocated_config(model, smoke=smoke, dtype=dtype)) as engine:
                await warm_up(engine, vocab, args.tokens, args.prompt_len)
                rates += await phase_rates(engine, args, vocab, 2, peer)
    header = [
        f"bench_scale{' --smoke' if smoke else f' --gpus {gpus}'}  {machine_line()}",
        shape + f"; disaggregated engine started in {start_s:.1f} s",
        f"{args.prompt_len}-token random prompts, {args.tokens} greedy tokens each (ignore_eos), "
        f"Poisson arrivals seeded {args.seed}; phases 2-3 at {args.load_rate} req/s"
        f"{' (60% of phase 1 best)' if auto_rate and 1 in phases else ''}; "
        f"batch_invariant=False; experts x2 copies "
        f"(disaggregated), x1 (co-located); no_replica_policy=wait",
        "peer in the same run (phase 1): the same model co-located on 2 GPUs"
        if 1 in phases else "phase 1 not run: no co-located peer",
        "tok/s = tokens streamed in the window / window; per GPU = / (2 shard GPUs + servers); "
        "lost = not finish_reason 'length' (raised or unfinished counted)"]
    if smoke:
        header.append("smoke: CPU only, 'GPUs' counts 2 shard slots + 1 per server process")
    print_results(header, rates, kills, pool)
    made = plot(out, rates, kills, pool)
    (out / "scale_results.json").write_text(json.dumps(
        {"header": header, "rates": rates, "kills": kills, "pool": pool}, indent=1))
    print(f"\nfigures: {', '.join(str(out / m) for m in made)}")


if __name__ == "__main__":
    asyncio.run(main())
