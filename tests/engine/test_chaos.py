"""Chaos: expert-server processes die and hang while 64 requests run; nothing is lost.

3 expert-server OS processes, every expert on 2 of them, 64 concurrent greedy requests; SIGKILL a
random server process 5 times while they run, and SIGSTOP one for longer than the deadline.
All 64 complete with the fault-free run's tokens; every work unit is combined exactly once.
"""

from __future__ import annotations

import asyncio

import pytest

from eaas import AsyncEngine, EngineConfig, SamplingParams
from eaas.engine.faults import FaultEvent, FaultInjector, FaultPlan
from tests.engine.conftest import final, prompts_of

N_TOKENS = 24


def _cfg(model_dir: str, mode: str) -> EngineConfig:
    return EngineConfig.from_dict({
        "model": model_dir,
        "placement": {"num_attention_shards": 2, "num_expert_servers": 3, "expert_replicas": 2,
                      "server_mode": mode},
        "fault": {"unit_timeout_s": 1.0, "heartbeat_interval_s": 0.2, "max_restarts": 20,
                  "within_s": 60.0, "backoff_s": 0.05},
    })


async def _run_all(engine: AsyncEngine, prompts):
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True)

    return await asyncio.gather(*(final(engine, p, params) for p in prompts))


async def run_waves(engine: AsyncEngine, prompts, until: asyncio.Event) -> list[list]:
    """Run all prompts concurrently, again and again, until `until` is set: the faults always
    land on requests in flight."""
    waves = []
    while not until.is_set() or not waves:
        waves.append(await _run_all(engine, prompts))
    return waves


@pytest.mark.slow
async def test_kill_and_hang_servers_under_load_loses_nothing(tiny_dirs):
    d = tiny_dirs["qwen3_moe"]
    async with AsyncEngine(_cfg(d, "inproc")) as engine:
        prompts = prompts_of(engine.tokenizer, 64, seed=11)
        expected = [o.outputs[0].token_ids for o in await _run_all(engine, prompts)]

    async with AsyncEngine(_cfg(d, "process")) as engine:
        plan = FaultPlan(
            tuple(FaultEvent(at_s=0.3 * (i + 1), kind="kill") for i in range(5))
            + (FaultEvent(at_s=1.8, kind="hang", seconds=3.0),), seed=5)
        faults_done = asyncio.Event()

        async def inject():
            try:
                return await FaultInjector(engine, plan).run()
            finally:
                faults_done.set()

        waves, injected = await asyncio.gather(run_waves(engine, prompts, faults_done), inject())
        counters = dict(engine.counters)
        health = await engine.check_health()
        servers = engine.snapshot()["servers"]

    assert [i["kind"] for i in injected] == ["kill"] * 5 + ["hang"]
    for outs in waves:
        assert all(o.finished and o.finish_reason == "length" for o in outs), \
            [(o.finish_reason, o.error) for o in outs if o.finish_reason != "length"]
        assert [o.outputs[0].token_ids for o in outs] == expected
    # exactly once: every unit sent was either combined or retired (and resent); no pair twice
    assert counters["combine_violations"] == 0
    assert counters["units_dispatched"] == counters["units_combined"] + counters["units_retired"]
    assert counters["restarts"] >= 6  # 5 kills + the hung one replaced after missed heartbeats
    assert counters["reroutes"] > 0 and counters["resent_units"] > 0
    assert health["healthy"]
    assert all(s["state"] == "alive" for s in servers)
    assert all(s["inflight_tokens"] == 0 for s in servers)  # nothing left in flight anywhere
