"""A server that keeps crashing exceeds its restart intensity: it is marked dead and routed
around; with a single copy of an expert and policy `fail`, only the requests that need that
expert error (clearly), the others complete with the right tokens."""

from __future__ import annotations

import asyncio

import torch

from eaas import AsyncEngine, EngineConfig, SamplingParams
from eaas.model import Checkpoint, DecoderModel
from tests.engine.conftest import final, prompts_of

N_TOKENS = 6


async def _crash_until_dead(engine: AsyncEngine, server: str) -> None:
    for _ in range(2):  # max_restarts=1: the second crash in the window escalates
        before = engine.incarnation(server)
        await engine.inject_fault(server, "kill")
        try:
            await engine.wait_servers_ready(10.0, {server: before})
        except TimeoutError:
            pass
    while engine.snapshot()["servers"][0]["state"] != "dead":
        await asyncio.sleep(0.01)


def _cfg(d: str, explicit: dict, replicas_policy: str = "fail") -> EngineConfig:
    return EngineConfig.from_dict({
        "model": d,
        "placement": {"num_expert_servers": 3, "strategy": "explicit", "explicit_map": explicit,
                      "server_mode": "inproc"},
        "fault": {"max_restarts": 1, "within_s": 60.0, "backoff_s": 0.01,
                  "no_replica_policy": replicas_policy, "unit_timeout_s": 2.0,
                  "replace_after_s": 600.0}})  # no replacement here: the dead server stays dead


def _uses_expert(model: DecoderModel, prompt: list[int], n: int, expert: int) -> bool:
    """Does greedy decoding of `prompt` route any token to `expert` in any MoE layer?"""
    hit = False
    for layer in model.layers:
        if layer.is_moe:
            orig = layer.router

            def spy(x, orig=orig):
                nonlocal hit
                ids, w = orig(x)
                hit = hit or bool((ids == expert).any())
                return ids, w

            layer.router = spy
    model.generate_greedy(prompt, n)
    return hit


async def test_intensity_breach_marks_dead_and_routes_around(tiny_dirs, reference_greedy):
    d = tiny_dirs["qwen3_moe"]
    every_expert_twice = {0: list(range(8)), 1: list(range(8)), 2: list(range(8))}
    async with AsyncEngine(_cfg(d, every_expert_twice)) as engine:
        gen0 = engine.routing.generation
        await _crash_until_dead(engine, "expert-0")
        assert "expert-0" in engine.routing.dead and engine.routing.generation > gen0
        events = [e["type"] for e in engine.events_bus.recent]
        prompts = prompts_of(engine.tokenizer, 8, seed=4)
        params = SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True)
        outs = [await final(engine, p, params) for p in prompts]
        health = await engine.check_health()
    assert "escalated" in events
    assert [o.outputs[0].token_ids for o in outs] == [reference_greedy(d, p, N_TOKENS)
                                                      for p in prompts]
    assert health["healthy"] and "expert-0" not in health["actors"]


async def test_single_copy_policy_fail_errors_only_affected_requests(tiny_dirs, reference_greedy):
    d = tiny_dirs["qwen3_moe"]
    lone = 7  # expert 7 lives only on expert-0
    explicit = {0: [lone], 1: list(range(7)), 2: list(range(7))}
    ref = DecoderModel.load(Checkpoint.open(d), torch.float32, batch_invariant=True)
    async with AsyncEngine(_cfg(d, explicit)) as engine:
        await _crash_until_dead(engine, "expert-0")
        prompts = prompts_of(engine.tokenizer, 24, seed=9)
        params = SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True)

        outs = await asyncio.gather(*(final(engine, p, params) for p in prompts))
    needs = [_uses_expert(ref, p, N_TOKENS, lone) for p in prompts]
    assert any(needs) and not all(needs), "the prompt set must contain both kinds of request"
    for p, out, need in zip(prompts, outs, needs):
        if need:
            assert out.finish_reason == "error" and "no live server" in out.error
        else:
            assert out.finish_reason == "length"
            assert out.outputs[0].token_ids == reference_greedy(d, p, N_TOKENS)


async def test_single_copy_policy_degrade_flags_and_completes(tiny_dirs, reference_greedy):
    d = tiny_dirs["qwen3_moe"]
    lone = 7
    explicit = {0: [lone], 1: list(range(7)), 2: list(range(7))}
    ref = DecoderModel.load(Checkpoint.open(d), torch.float32, batch_invariant=True)
    async with AsyncEngine(_cfg(d, explicit, "degrade")) as engine:
        await _crash_until_dead(engine, "expert-0")
        prompts = prompts_of(engine.tokenizer, 12, seed=9)
        params = SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True)
        outs = [await final(engine, p, params) for p in prompts]
        counters = dict(engine.counters)
    needs = [_uses_expert(ref, p, N_TOKENS, lone) for p in prompts]
    assert any(needs)
    assert all(o.finish_reason == "length" for o in outs)  # nobody fails under degrade
    for p, out, need in zip(prompts, outs, needs):
        if not need:
            assert not out.outputs[0].degraded
            assert out.outputs[0].token_ids == reference_greedy(d, p, N_TOKENS)
    assert counters["degraded_requests"] == sum(o.outputs[0].degraded for o in outs) >= 1


async def test_single_copy_policy_wait_rides_out_a_restart(tiny_dirs, reference_greedy):
    d = tiny_dirs["qwen3_moe"]
    explicit = {0: [0, 1, 2, 3], 1: [4, 5, 6, 7], 2: [4, 5, 6, 7]}  # experts 0-3: one copy
    cfg = _cfg(d, explicit, "wait").replace(**{"fault.max_restarts": 5})
    async with AsyncEngine(cfg) as engine:
        await engine.inject_fault("expert-0", "delay", seconds=0.2)  # hold steps in flight
        prompts = prompts_of(engine.tokenizer, 8, seed=2)
        params = SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True)

        tasks = [asyncio.create_task(final(engine, p, params)) for p in prompts]
        await asyncio.sleep(0.1)
        await engine.inject_fault("expert-0", "kill")  # its experts have no other copy
        outs = await asyncio.gather(*tasks)
    assert [o.outputs[0].token_ids for o in outs] == [reference_greedy(d, p, N_TOKENS)
                                                      for p in prompts]
    assert all(o.finish_reason == "length" and not o.outputs[0].degraded for o in outs)


async def test_a_unit_that_fails_everywhere_stops_after_max_attempts(tiny_dirs, reference_greedy):
    """A server that is alive but never answers in time (one copy of its experts): the rows are
    resent until fault.max_unit_attempts, then the request errors clearly; no livelock."""
    d = tiny_dirs["qwen3_moe"]
    cfg = EngineConfig.from_dict({
        "model": d, "placement": {"num_expert_servers": 1, "expert_replicas": 1,
                                  "server_mode": "inproc"},
        "fault": {"unit_timeout_s": 0.05, "max_unit_attempts": 3, "no_replica_policy": "fail"}})
    async with AsyncEngine(cfg) as engine:
        await engine.inject_fault("expert-0", "delay", seconds=0.2)
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        bad = await final(engine, [1, 2, 3], params)
        counters = dict(engine.counters)
        await engine.inject_fault("expert-0", "delay", seconds=0.0)
        good = await final(engine, [1, 2, 3], params)
    assert bad.finish_reason == "error" and "every attempt failed" in bad.error
    assert counters["attempts_exhausted"] >= 1 and counters["unit_timeouts"] >= 3
    assert good.outputs[0].token_ids == reference_greedy(d, [1, 2, 3], 4)
