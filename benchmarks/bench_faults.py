"""Failover under load on CPU (issue 18): tokens/s around a SIGKILL and a SIGSTOP of an expert
server process, the time of each failover phase, requests lost, and a soak of the processes' RSS.

Setups (3 expert-server processes over tcp://, batch_invariant true, no_replica_policy wait: the
default config): `replicas` = every expert on 2 servers (the default), `single` = one copy, so the
killed server's experts have no live replica until it is back (requests pause, none is lost).
C client loops each issue greedy requests (ignore_eos) back to back; every streamed token is
stamped. At T1 one server process gets SIGKILL (os.kill, not inject_fault), at T2 another gets
SIGSTOP (SIGCONT after --hold-s only if the pool has not replaced that process by then).

phase times are seconds after the signal, from the engine's event stream (engine.events()):
  detected        = the server actor's first `actor_crashed` after the signal
  rerouted        = the first `routing_changed` whose `dead` holds the server (a new generation
                    pushed to the shards: no new unit goes to it)
  restart begun   = its `actor_restarted` (the new process is spawned from here)
  back in routing = the `routing_changed` that drops it from `dead` (or `server_replaced`)
  first token     = the first token streamed after the signal; gap = longest pause between
                    streamed tokens from the signal to back in routing + 1 s
  80% back        = start of the first 1 s window (two 0.5 s bins) that, with the next one,
                    averages >= 80% of the pre-fault median, after the first window below it
                    (0: no window below 80% from 0.5 s before to 5 s after the signal)
tokens/s = tokens streamed in a 0.5 s bin / 0.5 s (plotted); the 80% rule uses 1 s windows
(mean of two adjacent bins: single 0.5 s bins on a shared 2-core VM swing +-30%); pre-fault
median over the windows from 1 s after the load starts to T1. lost = requests that did not
finish with finish_reason "length" (raised, or unfinished at the drain deadline); mismatched =
finished, but token ids differ from DecoderModel.generate_greedy on the same checkpoint (the
fault-free reference).
Soak: a fresh `replicas` engine under the same load for --soak-s; VmRSS (/proc/PID/status) of
this process and the sum over the server processes (pids from engine.snapshot()) every second.

    python benchmarks/bench_faults.py [--out benchmarks/figures]  # both setups + 180 s soak
    python benchmarks/bench_faults.py --smoke --out /tmp/faults   # replicas only, soak 5 s

Writes faults_timeline.png, faults_soak.png (matplotlib Agg) and faults_results.json to --out.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e_gpu import machine_line, prompts  # noqa: E402  (puts the checkout on sys.path)

import torch  # noqa: E402
import yaml  # noqa: E402

from eaas import AsyncEngine, EngineConfig, SamplingParams  # noqa: E402
from eaas.model import Checkpoint, DecoderModel, make_tiny  # noqa: E402

SETUPS = {"replicas": 2, "single": 1}  # name -> expert_replicas (3 server processes each)


# ---- load ------------------------------------------------------------------------------------
@dataclass
class Load:
    """`clients` loops, each issuing greedy requests back to back over a fixed prompt pool;
    each finished request is checked against refs (the fault-free tokens) at once. What it
    keeps is compact (the soak measures this process's RSS): per streamed output a float and an
    int in arrays (none with keep_stamps False), per request only counters."""

    engine: AsyncEngine
    pool: list[list[int]]
    refs: list[list[int]]
    n_tokens: int
    clients: int
    keep_stamps: bool = True
    times: array.array = field(default_factory=lambda: array.array("d"))  # monotonic, per output
    counts: array.array = field(default_factory=lambda: array.array("l"))  # its new tokens
    tokens: int = 0
    requests: int = 0
    mismatched: int = 0
    lost: Counter = field(default_factory=Counter)  # reason -> requests
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(c)) for c in range(self.clients)]

    async def _client(self, c: int) -> None:
        params = SamplingParams(max_tokens=self.n_tokens, temperature=0, ignore_eos=True)
        k = 0
        while not self._stop.is_set():
            i = (c + k * self.clients) % len(self.pool)
            k += 1
            seen, ids, reason = 0, [], "unfinished at drain deadline"
            try:
                async for out in self.engine.generate(self.pool[i], params):
                    ids = list(out.outputs[0].token_ids)
                    if len(ids) > seen:
                        self.tokens += len(ids) - seen
                        if self.keep_stamps:
                            self.times.append(time.monotonic())
                            self.counts.append(len(ids) - seen)
                        seen = len(ids)
                    if out.finished:
                        reason = out.finish_reason or "none"
            except asyncio.CancelledError:
                self._finish(i, reason, ids)
                raise
            except Exception as e:  # a failed request is a lost one: count it, keep going
                reason = f"raised {type(e).__name__}"
            self._finish(i, reason, ids)

    def _finish(self, i: int, reason: str, ids: list[int]) -> None:
        self.requests += 1
        if reason != "length":
            self.lost[reason] += 1
        elif ids != self.refs[i]:
            self.mismatched += 1

    async def stop(self, timeout_s: float) -> None:
        """Let every client finish its current request (cancelled after timeout_s)."""
        self._stop.set()
        _, late = await asyncio.wait(self._tasks, timeout=timeout_s)
        for t in late:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def verify(self) -> dict:
        return {"requests": self.requests, "lost": sum(self.lost.values()),
                "mismatched": self.mismatched, "lost_reasons": sorted(self.lost)}

    def bins(self, t0: float, t1: float, width: float) -> list[float]:
        """tokens/s per bin of `width` seconds from t0 to t1."""
        n = max(1, int((t1 - t0) / width))
        out = [0] * n
        for t, k in zip(self.times, self.counts):
            b = int((t - t0) / width)
            if 0 <= b < n:
                out[b] += k
        return [x / width for x in out]


async def record_events(engine: AsyncEngine, into: list[tuple[float, dict]]) -> None:
    """Every engine event with its `mono` stamp (time.monotonic() at emission: every engine
    event carries it, whichever actor emitted it)."""
    async for ev in engine.events():
        into.append((ev["mono"], ev))


def windows(bins: list[float]) -> list[float]:
    """1 s moving average of 0.5 s bins: window k = mean of bins k and k + 1."""
    return [(a + b) / 2 for a, b in zip(bins, bins[1:])]


def phases(events: list[tuple[float, dict]], load: Load, server: str, t0: float,
           t_next: float, median: float, width: float, t_load: float) -> dict:
    """Seconds after the signal at t0 for each phase of `server`'s failover (module doc)."""
    after = [(t, e) for t, e in events if t >= t0]

    def first(pred: Any) -> float | None:
        return next((t - t0 for t, e in after if pred(e)), None)

    detected = first(lambda e: e["type"] == "actor_crashed" and e.get("name") == server)
    rerouted = first(lambda e: e["type"] == "routing_changed" and server in e["dead"])
    restart = first(lambda e: e["type"] == "actor_restarted" and e.get("name") == server)
    back = None
    if rerouted is not None:
        back = next((t - t0 for t, e in after if t - t0 > rerouted and (
            (e["type"] == "routing_changed" and server not in e["dead"]) or
            (e["type"] == "server_replaced" and e.get("replaces") == server))), None)
    toks = sorted(t for t in load.times if t >= t0)
    first_tok = toks[0] - t0 if toks else None
    horizon = t0 + (back if back is not None else t_next - t0) + 1.0
    seen = [t0, *[t for t in toks if t <= horizon]]
    gap = max((b - a for a, b in zip(seen, seen[1:])), default=None)
    # throughput back to >= 80% of the pre-fault median: 1 s windows aligned to the load start
    thr = 0.8 * median
    win = windows(load.bins(t_load, t_next, width))
    k0 = max(0, int((t0 - t_load) / width) - 1)
    dip = next((k for k in range(k0, min(len(win), k0 + int(5.5 / width))) if win[k] < thr),
               None)
    back80: float | None = 0.0
    if dip is not None:
        back80 = next((t_load + k * width - t0 for k in range(dip + 1, len(win) - 1)
                       if win[k] >= thr and win[k + 1] >= thr), None)
    return {"server": server, "detected_s": detected, "rerouted_s": rerouted,
            "restart_begun_s": restart, "back_in_routing_s": back, "first_token_s": first_tok,
            "max_gap_s": gap, "back_80pct_s": back80}


# ---- one setup: SIGKILL at T1, SIGSTOP at T2 ---------------------------------------------------
def engine_config(model: Path, replicas: int, fault: dict | None = None) -> EngineConfig:
    """The default config but for expert_replicas (3 process servers over tcp://) and the
    `fault` keys given (--fault: for A/B runs; none by default)."""
    return EngineConfig.from_dict({"model": str(model), "placement": {
        "num_expert_servers": 3, "expert_replicas": replicas}, "fault": fault or {}})


async def warm_up(engine: AsyncEngine, pool: list[list[int]]) -> None:
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    async def one(p: list[int]) -> None:
        async for _ in engine.generate(p, params):
            pass

    await asyncio.gather(*(one(p) for p in pool[:8]))


def pid_of(engine: AsyncEngine, server: str) -> int | None:
    return next(s["pid"] for s in engine.snapshot()["servers"] if s["name"] == server)


async def run_setup(name: str, model: Path, pool: list[list[int]], refs: list[list[int]],
                    args: argparse.Namespace) -> dict:
    cfg = engine_config(model, SETUPS[name], args.fault)
    events: list[tuple[float, dict]] = []
    t_start = time.monotonic()
    async with AsyncEngine(cfg) as engine:
        start_s = time.monotonic() - t_start
        recorder = asyncio.create_task(record_events(engine, events))
        await warm_up(engine, pool)
        servers = engine.server_names()
        load = Load(engine, pool, refs, args.tokens, args.clients)
        t_load = time.monotonic()
        load.start()
        faults = []
        for at, sig, victim in ((args.kill_at, signal.SIGKILL, servers[0]),
                                (args.stop_at, signal.SIGSTOP, servers[1])):
            await asyncio.sleep(max(0.0, t_load + at - time.monotonic()))
            pid = pid_of(engine, victim)
            t0 = time.monotonic()
            os.kill(pid, sig)
            faults.append({"signal": signal.Signals(sig).name, "server": victim, "pid": pid,
                           "t0": t0, "at_s": t0 - t_load, "sigcont_sent": False})
        stopped = faults[1]
        await asyncio.sleep(max(0.0, stopped["t0"] + args.hold_s - time.monotonic()))
        if pid_of(engine, stopped["server"]) == stopped["pid"]:  # not replaced: let it go on
            os.kill(stopped["pid"], signal.SIGCONT)
            stopped["sigcont_sent"] = True
        try:  # both back (bounded), then the planned end
            await engine.wait_servers_ready(args.recover_timeout_s)
        except TimeoutError as e:
            print(f"# {name}: {e}")
        await asyncio.sleep(max(0.0, t_load + args.duration_s - time.monotonic()))
        t_end = time.monotonic()
        await load.stop(args.drain_s)
        counters = dict(engine.counters)
        recorder.cancel()
        await asyncio.gather(recorder, return_exceptions=True)
    pre = windows(load.bins(t_load + 1.0, faults[0]["t0"], args.bin_s))
    median = statistics.median(pre) if pre else float("nan")
    ends = [faults[1]["t0"], t_end]
    for f, t_next in zip(faults, ends):
        f.update(phases(events, load, f["server"], f["t0"], t_next, median, args.bin_s, t_load))
    return {"setup": name, "replicas": SETUPS[name], "start_s": start_s,
            "pre_fault_median_tok_s": median, "bins": load.bins(t_load, t_end, args.bin_s),
            "bin_s": args.bin_s, "duration_s": t_end - t_load,
            "faults": [{k: v for k, v in f.items() if k != "t0"} for f in faults],
            "counters": {k: counters.get(k, 0) for k in (
                "restarts", "replacements", "resent_units", "degraded_requests", "hedged_units",
                "hedge_wins", "unit_timeouts")},
            "event_types": sorted({e["type"] for _, e in events}), **load.verify()}


# ---- soak ------------------------------------------------------------------------------------
def rss_mib(pid: int | str) -> float:
    """VmRSS of `pid` in MiB (0 if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


async def soak(model: Path, pool: list[list[int]], refs: list[list[int]],
               args: argparse.Namespace) -> dict:
    async with AsyncEngine(engine_config(model, SETUPS["replicas"], args.fault)) as engine:
        await warm_up(engine, pool)
        load = Load(engine, pool, refs, args.tokens, args.clients, keep_stamps=False)
        t0 = time.monotonic()
        load.start()
        samples = []
        every = min(1.0, args.soak_s / 10)
        while (t := time.monotonic() - t0) < args.soak_s:
            pids = [s["pid"] for s in engine.snapshot()["servers"] if s["pid"]]
            samples.append({"t": t, "engine_mib": rss_mib("self"),
                            "servers_mib": sum(rss_mib(p) for p in pids),
                            "tokens": load.tokens})
            await asyncio.sleep(every)
        await load.stop(args.drain_s)
        restarts = engine.counters.get("restarts", 0)
    out: dict[str, Any] = {"soak_s": args.soak_s, "samples": samples, "restarts": restarts,
                           "tok_s": samples[-1]["tokens"] / samples[-1]["t"], **load.verify()}
    n, half = max(1, len(samples) // 10), len(samples) // 2  # first / last tenth; 2nd half
    for key in ("engine_mib", "servers_mib"):
        xs = [s[key] for s in samples]
        ts = [s["t"] for s in samples]
        slope = statistics.linear_regression(ts[half:], xs[half:]).slope * 60 \
            if len(xs) - half > 2 else float("nan")
        first, last = statistics.mean(xs[:n]), statistics.mean(xs[-n:])
        out[key] = {"start": xs[0], "end": xs[-1], "max": max(xs), "first_tenth": first,
                    "last_tenth": last, "slope_mib_min": slope,
                    "grows": slope > 0.005 * statistics.mean(xs[half:])}
    return out


# ---- output ----------------------------------------------------------------------------------
def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_results(header: list[str], runs: list[dict], soaked: dict) -> None:
    for line in header:
        print(f"# {line}")
    print("\n| setup | fault | server | detected s | rerouted s | restart begun s | "
          "back in routing s | first token s | longest gap s | 80% tok/s back s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        for f in r["faults"]:
            print(f"| {r['setup']} | {f['signal']} at {f['at_s']:.1f} s | {f['server']} | "
                  f"{fmt(f['detected_s'])} | {fmt(f['rerouted_s'])} | "
                  f"{fmt(f['restart_begun_s'])} | {fmt(f['back_in_routing_s'])} | "
                  f"{fmt(f['first_token_s'])} | {fmt(f['max_gap_s'])} | "
                  f"{fmt(f['back_80pct_s'])} |")
    print("\n| setup | engine start s | pre-fault median tok/s | requests | lost | mismatched | "
          "restarts | resent units | hedged units (won) | SIGCONT sent |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in runs:
        c = r["counters"]
        print(f"| {r['setup']} | {r['start_s']:.1f} | {r['pre_fault_median_tok_s']:.0f} | "
              f"{r['requests']} | {r['lost']} | {r['mismatched']} | {c['restarts']} | "
              f"{c['resent_units']} | {c['hedged_units']} ({c['hedge_wins']}) | "
              f"{r['faults'][1]['sigcont_sent']} |")
    for r in runs:
        print(f"{r['setup']}: lost {r['lost']} {r['lost_reasons'] or ''}, mismatched "
              f"{r['mismatched']}; tok/s per {r['bin_s']} s bin: "
              f"{' '.join(f'{b:.0f}' for b in r['bins'])}")
    s = soaked
    print(f"\nsoak {s['soak_s']:.0f} s ({len(s['samples'])} samples), {s['tok_s']:.0f} tok/s, "
          f"requests {s['requests']}, lost {s['lost']}, mismatched {s['mismatched']}, "
          f"restarts {s['restarts']}")
    print("| RSS MiB | start | end | max | first tenth | last tenth | 2nd-half slope MiB/min | "
          "grows |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for key, label in (("engine_mib", "engine process"), ("servers_mib", "sum of 3 servers")):
        m = s[key]
        print(f"| {label} | {m['start']:.1f} | {m['end']:.1f} | {m['max']:.1f} | "
              f"{m['first_tenth']:.1f} | {m['last_tenth']:.1f} | {m['slope_mib_min']:+.2f} | "
              f"{'yes' if m['grows'] else 'no'} |")


def plot(out: Path, runs: list[dict], soaked: dict) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNGs (faults_results.json has every number)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 2.8 * len(runs)), squeeze=False)
    for ax, r in zip(axes[:, 0], runs):
        w = r["bin_s"]
        ax.bar([i * w for i in range(len(r["bins"]))], r["bins"], width=w, align="edge",
               color="#4a7")
        ax.axhline(0.8 * r["pre_fault_median_tok_s"], color="gray", ls=":", lw=1)
        for f, color in zip(r["faults"], ("r", "m")):
            ax.axvline(f["at_s"], color=color, ls="--", lw=1, label=f"{f['signal']} {f['server']}")
            if f["back_in_routing_s"] is not None:
                ax.axvline(f["at_s"] + f["back_in_routing_s"], color=color, ls=":", lw=1)
        ax.set(ylabel="tokens/s", title=f"{r['setup']}: 3 server processes x{r['replicas']} "
               f"({w} s bins; dashed = signal, dotted = back in routing)")
        ax.legend(fontsize=7, loc="lower right")
    axes[-1, 0].set_xlabel("seconds since the load started")
    fig.tight_layout()
    fig.savefig(out / "faults_timeline.png", dpi=120)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ts = [s["t"] for s in soaked["samples"]]
    ax.plot(ts, [s["engine_mib"] for s in soaked["samples"]], label="engine process")
    ax.plot(ts, [s["servers_mib"] for s in soaked["samples"]], label="sum of server processes")
    ax.set(xlabel="seconds under load", ylabel="VmRSS (MiB)", ylim=(0, None),
           title=f"Soak: RSS under steady load ({soaked['tok_s']:.0f} tok/s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "faults_soak.png", dpi=120)
    plt.close("all")
    return ["faults_timeline.png", "faults_soak.png"]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="replicas only, short phases, soak 5 s")
    ap.add_argument("--setups", default=None, help="comma list of replicas,single (default both;"
                    " smoke: replicas)")
    ap.add_argument("--clients", type=int, default=12, help="concurrent client loops")
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens per request")
    ap.add_argument("--prompt-len", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=48, help="distinct prompts (cycled)")
    ap.add_argument("--kill-at", type=float, default=None, help="SIGKILL, s after load start")
    ap.add_argument("--stop-at", type=float, default=None, help="SIGSTOP, s after load start")
    ap.add_argument("--hold-s", type=float, default=None, help="SIGCONT after this if not replaced")
    ap.add_argument("--duration-s", type=float, default=None, help="load per setup (at least)")
    ap.add_argument("--soak-s", type=float, default=None)
    ap.add_argument("--bin-s", type=float, default=0.5)
    ap.add_argument("--drain-s", type=float, default=60.0)
    ap.add_argument("--recover-timeout-s", type=float, default=60.0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "figures"))
    ap.add_argument("--fault", action="append", default=[], metavar="KEY=VALUE",
                    help="override a fault config key (YAML value), e.g. hedge_after_s=0")
    args = ap.parse_args()
    try:
        args.fault = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.fault)}
    except ValueError:
        sys.exit("--fault takes KEY=VALUE")
    d = (dict(kill_at=2.5, stop_at=5.5, hold_s=3.0, duration_s=9.0, soak_s=5.0) if args.smoke
         else dict(kill_at=12.0, stop_at=30.0, hold_s=6.0, duration_s=50.0, soak_s=180.0))
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    setups = (args.setups or ("replicas" if args.smoke else "replicas,single")).split(",")
    bad = [s for s in setups if s not in SETUPS]
    if bad:
        sys.exit(f"--setups: {bad} not in {sorted(SETUPS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_faults.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny(Path(tmp) / "model", "qwen3_moe")
        mc = json.loads((model / "config.json").read_text())
        pool = prompts(args.prompts, args.prompt_len, mc["vocab_size"], seed=1)
        ref_model = DecoderModel.load(Checkpoint.open(str(model)), torch.float32,
                                      batch_invariant=True)
        refs = [ref_model.generate_greedy(p, args.tokens) for p in pool]
        del ref_model
        soaked = await soak(model, pool, refs, args)  # first: no earlier engine's leftovers
        runs = [await run_setup(s, model, pool, refs, args) for s in setups]
    hb = engine_config(model, 2, args.fault).fault
    header = [
        f"bench_faults{' --smoke' if args.smoke else ''}  {machine_line()}",
        f"command: {command}",
        f"model: make_tiny qwen3_moe (H={mc['hidden_size']} E={mc['num_experts']} "
        f"K={mc['num_experts_per_tok']} layers={mc['num_hidden_layers']}, float32); default "
        f"config: 3 expert-server processes over tcp://, batch_invariant true, "
        f"no_replica_policy wait, heartbeat {hb.heartbeat_interval_s} s, unit timeout "
        f"{hb.unit_timeout_s} s, hedge after {hb.hedge_after_s} s (or 4 x p99), "
        f"{hb.warm_spares} warm spare(s) at niceness +{hb.spare_nice} until adopted",
        f"load: {args.clients} client loops, greedy {args.tokens} tokens (ignore_eos), "
        f"{args.prompts} random {args.prompt_len}-token prompts cycled; SIGKILL at "
        f"{args.kill_at} s, SIGSTOP at {args.stop_at} s (SIGCONT at +{args.hold_s} s only if "
        f"not replaced), >= {args.duration_s} s per setup",
        "phase s = seconds after the signal: detected = actor_crashed, rerouted = routing_changed"
        " with it dead, restart begun = actor_restarted, back = routing_changed without it",
        f"tok/s = tokens streamed in a {args.bin_s} s bin / {args.bin_s} s; 80% back = first 2 "
        "1 s windows >= 0.8 x pre-fault median (of 1 s windows) after the first one below it "
        "(0: no dip within 5 s); lost = not finish_reason 'length'; mismatched = ids != "
        "DecoderModel.generate_greedy",
        "soak: VmRSS every second (soak run first, in a fresh engine); grows = slope over the "
        "second half > 0.5% of its mean per minute"]
    print_results(header, runs, soaked)
    made = plot(out, runs, soaked)
    (out / "faults_results.json").write_text(json.dumps(
        {"header": header, "runs": runs, "soak": soaked}, indent=1))
    print(f"\nfigures: {', '.join(str(out / m) for m in made)}; numbers: "
          f"{out / 'faults_results.json'}")


if __name__ == "__main__":
    asyncio.run(main())
