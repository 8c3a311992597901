"""Decode latency: a lone request's work units are flushed at once (nothing else can join them),
whatever the batching window; with two requests in flight the window still applies."""

from __future__ import annotations

import asyncio

from eaas import AsyncEngine, EngineConfig, SamplingParams
from tests.engine.conftest import final


def _cfg(model_dir: str, mode: str, max_wait_us: int) -> EngineConfig:
    return EngineConfig.from_dict({"model": model_dir, "placement": {
        "num_attention_shards": 1, "num_expert_servers": 2, "expert_replicas": 1,
        "server_mode": mode}, "batching": {"max_wait_us": max_wait_us},
        "fault": {"unit_timeout_s": 120.0}})


async def _batcher_stats(engine: AsyncEngine) -> list[dict]:
    return [v for k, v in (await engine.stats()).items() if k.startswith("batcher-")]


async def test_lone_request_never_waits_out_the_window(tiny_dirs, reference_greedy):
    # a 60 s window per layer would take minutes; each flush must be a "complete" one
    model = tiny_dirs["qwen3_moe"]
    async with AsyncEngine(_cfg(model, "inproc", 60_000_000)) as engine:
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        out = await asyncio.wait_for(final(engine, [5, 6, 7], params), 20)
        stats = await _batcher_stats(engine)
    assert out.outputs[0].token_ids == reference_greedy(model, [5, 6, 7], 4)
    assert sum(s["flushes"] for s in stats) > 0
    assert all(s["timer_flushes"] == 0 and s["full_flushes"] == 0 for s in stats)


async def test_lone_request_over_server_processes(tiny_dirs, reference_greedy):
    model = tiny_dirs["qwen3_moe"]
    async with AsyncEngine(_cfg(model, "process", 60_000_000)) as engine:
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        out = await asyncio.wait_for(final(engine, [9, 4], params), 60)
        stats = await _batcher_stats(engine)
    assert out.outputs[0].token_ids == reference_greedy(model, [9, 4], 3)
    assert all(s["timer_flushes"] == 0 for s in stats)


async def test_two_requests_still_batch_in_the_window(tiny_dirs, reference_greedy):
    # two lanes run: a unit waits for the other lane's unit of its layer (or the timer)
    model = tiny_dirs["qwen3_moe"]
    async with AsyncEngine(_cfg(model, "inproc", 20_000)) as engine:
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        outs = await asyncio.wait_for(asyncio.gather(
            final(engine, [5, 6, 7], params), final(engine, [1, 2], params)), 20)
        stats = await _batcher_stats(engine)
    assert outs[0].outputs[0].token_ids == reference_greedy(model, [5, 6, 7], 3)
    assert outs[1].outputs[0].token_ids == reference_greedy(model, [1, 2], 3)
    assert sum(s["units"] for s in stats) > sum(s["flushes"] for s in stats)  # some coalesced
