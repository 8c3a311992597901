"""Issue 18: with the default no_replica_policy `wait`, losing every replica of an expert costs a
short pause, never a request; a server past its restart intensity is replaced under a fresh name;
readiness is false (naming the experts) while an expert has no live replica."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from eaas import AsyncEngine, EngineConfig, SamplingParams
from tests.engine.conftest import final, prompts_of

N_TOKENS = 12


def _params(n: int = N_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


async def _until(pred, timeout: float, what: str) -> float:
    """Poll `pred` (cheap, in-process state) until true; returns the seconds it took."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not {what} after {timeout}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def test_default_wait_both_replicas_sigkilled_loses_nothing(tiny_dirs, reference_greedy):
    """Default config, server processes: SIGKILL both servers hosting expert 0 at once while
    requests run; every request completes with the fault-free greedy tokens."""
    d = tiny_dirs["qwen3_moe"]
    cfg = EngineConfig.from_dict({"model": d, "placement": {
        "num_expert_servers": 3, "expert_replicas": 2, "server_mode": "process"}})
    assert cfg.fault.no_replica_policy == "wait"
    async with AsyncEngine(cfg) as engine:
        prompts = prompts_of(engine.tokenizer, 12, seed=5)
        tasks = [asyncio.create_task(final(engine, p, _params())) for p in prompts]
        await _until(lambda: engine.counters.get("tokens_generated", 0) >= 12, 60, "decoding")
        hosts = engine.routing.table[next(iter(engine.routing.table))][0]  # expert 0's servers
        assert len(hosts) == 2
        pids = {s["name"]: s["pid"] for s in engine.snapshot()["servers"]}
        t_kill = time.monotonic()
        for name in hosts:
            os.kill(pids[name], signal.SIGKILL)
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        await engine.wait_servers_ready(60)
        recovered_s = time.monotonic() - t_kill
        ready, reasons = engine.readiness()
        counters = dict(engine.counters)
    assert [(o.finish_reason, o.error) for o in outs] == [("length", None)] * len(outs)
    assert [o.outputs[0].token_ids for o in outs] == [reference_greedy(d, p, N_TOKENS)
                                                      for p in prompts]
    assert counters["restarts"] >= 2 and counters["combine_violations"] == 0
    assert recovered_s < 20.0, f"both servers back only after {recovered_s:.1f}s"
    assert ready and reasons == []


async def test_sigstopped_server_is_hedged_around_and_replaced_fast(tiny_dirs, reference_greedy):
    """Default config, a SIGSTOPped server process (its experts have another replica): tokens
    keep flowing while the heartbeat has yet to declare it — its late units are hedged to the
    other replicas after fault.hedge_after_s and new units avoid it — and it is declared hung
    within 3 heartbeat intervals. Before hedging: no token until the heartbeat's verdict
    (~1.35 s: unit_timeout_s 2.0 s is longer); before issue 18: ~6 intervals."""
    d = tiny_dirs["qwen3_moe"]
    cfg = EngineConfig.from_dict({"model": d, "placement": {
        "num_expert_servers": 3, "expert_replicas": 2, "server_mode": "process"}})
    hb, hedge = cfg.fault.heartbeat_interval_s, cfg.fault.hedge_after_s
    assert hedge < 3 * hb < cfg.fault.unit_timeout_s
    async with AsyncEngine(cfg) as engine:
        prompts = prompts_of(engine.tokenizer, 8, seed=6)
        stamps: list[float] = []

        async def client(p):
            out = None
            async for out in engine.generate(p, _params(40)):
                stamps.append(time.monotonic())
            return out

        tasks = [asyncio.create_task(client(p)) for p in prompts]
        await _until(lambda: len(stamps) >= 16, 60, "decoding")
        victim = engine.snapshot()["servers"][0]
        before = engine.incarnation(victim["name"])
        t_stop = time.monotonic()
        os.kill(victim["pid"], signal.SIGSTOP)
        detected_s = await _until(lambda: victim["name"] in engine.routing.dead, 30, "detected")
        await engine.wait_servers_ready(60, {victim["name"]: before})
        replaced_s = time.monotonic() - t_stop
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        counters = dict(engine.counters)
    after = [t for t in stamps if t >= t_stop]
    gaps = [b - a for a, b in zip([t_stop, *after], after)]
    assert all(o.finish_reason == "length" for o in outs)
    assert [o.outputs[0].token_ids for o in outs] == [reference_greedy(d, p, 40)
                                                      for p in prompts]
    assert detected_s < 3 * hb + 0.8, f"hung server declared after {detected_s:.2f}s"
    assert counters["hedged_units"] >= 1 and counters["combine_violations"] == 0
    # the hedge delay plus a step or two; the heartbeat's verdict (>= 3 intervals) is not awaited
    assert max(gaps) < hedge + 0.55 < 3 * hb, f"no token for {max(gaps):.2f}s after the SIGSTOP"
    assert replaced_s < 30.0


def _inproc(d: str, explicit: dict, **fault) -> EngineConfig:
    return EngineConfig.from_dict({
        "model": d, "placement": {"num_expert_servers": len(explicit), "expert_replicas": 1,
                                  "strategy": "explicit",
                                  "explicit_map": explicit, "server_mode": "inproc"},
        "fault": {"within_s": 60.0, "backoff_s": 0.01, **fault}})


async def test_server_past_intensity_is_replaced_under_a_fresh_name(tiny_dirs, reference_greedy):
    """Experts 0-3 live only on expert-0, killed past its intensity while requests run: the
    engine is not ready (naming them) until expert-2 replaces it; every request completes."""
    d = tiny_dirs["qwen3_moe"]
    cfg = _inproc(d, {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}, max_restarts=1, replace_after_s=0.3)
    async with AsyncEngine(cfg) as engine:
        moe_layers = sorted(engine.routing.table)
        await engine.inject_fault("expert-0", "delay", seconds=0.1)  # hold steps in flight
        prompts = prompts_of(engine.tokenizer, 8, seed=8)
        tasks = [asyncio.create_task(final(engine, p, _params(6))) for p in prompts]
        for _ in range(2):  # max_restarts=1: the second crash in the window escalates
            await engine.inject_fault("expert-0", "kill")
            await asyncio.sleep(0.05)
        await _until(lambda: "expert-0" in engine.routing.dead and
                     "expert-0" in engine.snapshot()["servers"][0]["name"] and
                     engine.snapshot()["servers"][0]["state"] == "dead", 10, "escalated")
        ready, reasons = engine.readiness()
        health = await engine.check_health()
        await _until(lambda: "expert-2" in engine.server_names(), 30, "replaced")
        await _until(lambda: engine.readiness()[0], 30, "ready again")
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        table = engine.routing.table
        events = [e for e in engine.events_bus.recent if e["type"] == "server_replaced"]
        names = engine.server_names()
    assert not ready and reasons == [f"layer {l}: experts [0, 1, 2, 3] have no live replica"
                                     for l in moe_layers]
    assert not health["healthy"] and health["no_live_replica"] == [
        {"layer": l, "experts": [0, 1, 2, 3]} for l in moe_layers]
    assert events == [{**events[0], "server": "expert-2", "replaces": "expert-0"}]
    assert names == ["expert-1", "expert-2"]
    assert all(table[l][e] == ("expert-2",) for l in moe_layers for e in range(4))
    assert [o.outputs[0].token_ids for o in outs] == [reference_greedy(d, p, 6) for p in prompts]


async def test_wait_timeout_error_names_the_wait_policy(tiny_dirs):
    d = tiny_dirs["qwen3_moe"]
    cfg = _inproc(d, {0: list(range(8))}, max_restarts=0, replace_after_s=600.0,
                  wait_timeout_s=0.3)
    async with AsyncEngine(cfg) as engine:
        await engine.inject_fault("expert-0", "kill")  # max_restarts=0: dead for good at once
        await _until(lambda: "expert-0" in engine.routing.dead, 10, "dead")
        t0 = time.monotonic()
        out = await final(engine, [1, 2, 3], _params(4))
        took = time.monotonic() - t0
    assert out.finish_reason == "error"
    assert "s for a live server (no_replica_policy=wait)" in out.error and "waited 0." in out.error
    assert took < 5.0
