"""Elastic expert pool while serving: scale out and in, replicate hot experts, roll back."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import pytest
from safetensors.torch import load_file, save_file

from eaas import AsyncEngine, EngineConfig
from eaas.engine.monitor import HealthMonitor
from eaas.engine.planner import plan_table
from tests.engine.conftest import prompts_of
from tests.engine.test_chaos import _run_all, run_waves


def _cfg(d: str, servers: int, replicas: int, mode: str = "inproc", **extra) -> EngineConfig:
    return EngineConfig.from_dict({"model": d, "placement": {
        "num_attention_shards": 2, "num_expert_servers": servers, "expert_replicas": replicas,
        "server_mode": mode},
        **extra})


@pytest.mark.parametrize("mode", ["inproc", "process"])
async def test_scale_2_to_4_to_1_while_serving(tiny_dirs, mode):
    d = tiny_dirs["qwen3_moe"]
    async with AsyncEngine(_cfg(d, 1, 1)) as engine:
        prompts = prompts_of(engine.tokenizer, 32, seed=21)
        expected = [o.outputs[0].token_ids for o in await _run_all(engine, prompts)]

    async with AsyncEngine(_cfg(d, 2, 2, mode)) as engine:
        done = asyncio.Event()
        sizes = []

        async def scale():
            try:
                await asyncio.sleep(0.05)
                for _ in range(2):
                    await engine.add_server()
                    sizes.append(len(engine.server_names()))
                    await asyncio.sleep(0.1)
                for name in ("expert-0", "expert-3", "expert-1"):
                    await engine.remove_server(name)
                    sizes.append(len(engine.server_names()))
                    await asyncio.sleep(0.1)
            finally:
                done.set()

        waves, _ = await asyncio.gather(run_waves(engine, prompts, done), scale())
        table = engine.routing.table
        stats = await engine.stats()
        counters = dict(engine.counters)
    assert sizes == [3, 4, 3, 2, 1]
    for outs in waves:
        assert [o.finish_reason for o in outs] == ["length"] * 32
        assert [o.outputs[0].token_ids for o in outs] == expected
    # one server left, and it hosts every expert of every MoE layer
    assert {s for ex in table.values() for srv in ex.values() for s in srv} == {"expert-2"}
    assert stats["expert-2"]["calls"] > 0 and counters["scale_events"] == 5
    assert counters["combine_violations"] == 0


async def test_scale_step_that_never_starts_rolls_back(tiny_dirs, reference_greedy):
    d = tiny_dirs["qwen3_moe"]
    async with AsyncEngine(_cfg(d, 2, 1)) as engine:
        before = engine.routing
        with pytest.raises(RuntimeError, match="routing stays at generation"):
            await engine.add_server(start_timeout_s=0.001)  # cannot load in a millisecond
        after = engine.routing
        events = [e["type"] for e in engine.events_bus.recent]
        outs = await _run_all(engine, [[3, 1, 4, 1, 5]])
        names = engine.server_names()
    assert after.generation == before.generation and after.table == before.table
    assert "scale_failed" in events and names == ["expert-0", "expert-1"]
    params_n = 24  # _run_all's N_TOKENS
    assert outs[0].outputs[0].token_ids == reference_greedy(d, [3, 1, 4, 1, 5], params_n)


@pytest.fixture(scope="module")
def skewed_dir(tiny_dirs, tmp_path_factory) -> str:
    """deepseek_v3 tiny checkpoint whose routers all prefer expert 0 (e_score_correction_bias)."""
    out = tmp_path_factory.mktemp("skewed") / "deepseek_v3"
    shutil.copytree(tiny_dirs["deepseek_v3"], out)
    path = out / "model.safetensors"
    tensors = load_file(path)
    for name, t in tensors.items():
        if name.endswith("e_score_correction_bias"):
            t.zero_()
            t[0] = 5.0
    save_file(tensors, path, metadata={"format": "pt"})
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v3"
    return str(out)


async def test_planner_replicates_the_hot_expert_and_imbalance_drops(skewed_dir):
    cfg = _cfg(skewed_dir, 4, 1, balance={"max_experts_per_server": 4})
    async with AsyncEngine(cfg) as engine:
        prompts = prompts_of(engine.tokenizer, 24, seed=5)
        live = engine.server_names()
        await _run_all(engine, prompts)
        before = engine.load.imbalance(live)
        hot = engine.load.expert_tokens()
        plan = await engine.rebalance()
        engine.load.reset()
        await _run_all(engine, prompts)
        after = engine.load.imbalance(live)
    layers = sorted(before)
    # every token's first choice is expert 0, so its server (expert-0) carries > half the rows
    assert all(int(hot[l].argmax()) == 0 for l in layers)
    assert all(before[l] > 0.9 for l in layers), before
    assert any(m["expert"] == 0 for m in plan["moves"])
    assert all(after[l] < 0.5 * before[l] for l in layers), (before, after)


def test_plan_table_worked_example():
    import torch

    tokens = torch.tensor([[90, 10, 10, 10]])
    table = {0: {0: ("s0",), 1: ("s1",), 2: ("s0",), 3: ("s1",)}}
    new, moves = plan_table(tokens, table, ["s0", "s1"])
    # worked example of eaas/engine/planner.py: busiest server 100 -> 65 -> 60
    assert moves == [{"layer": 0, "expert": 0, "server": "s1"},
                     {"layer": 0, "expert": 1, "server": "s0"}]
    assert new[0][0] == ("s0", "s1") and new[0][1] == ("s1", "s0") and new[0][2] == ("s0",)
    # a memory budget of 2 experts per server leaves no room: nothing moves
    assert plan_table(tokens, table, ["s0", "s1"], max_experts_per_server=2)[1] == []


def test_planner_stall_watchdog_reports_once():
    events, counters = [], {}
    progress = {"t": time.monotonic() - 100.0, "rounds": 3}
    mon = HealthMonitor(events.append, counters, planner_progress=progress, stall_timeout_s=5.0)
    mon.check_planner()
    mon.check_planner()  # still stalled: not reported twice
    assert counters["planner_stalls"] == 1
    assert [e["type"] for e in events] == ["planner_stalled"] and events[0]["rounds"] == 3
    progress["t"] = time.monotonic()  # progress again, then a new stall is a new report
    mon.check_planner()
    progress["t"] = time.monotonic() - 100.0
    mon.check_planner()
    assert counters["planner_stalls"] == 2


@pytest.mark.parametrize("mode", ["inproc", "process"])
async def test_replicate_unreplicate_and_restart_reloads_only_own_experts(tiny_dirs, mode,
                                                                          reference_greedy):
    d = tiny_dirs["qwen3_moe"]
    async with AsyncEngine(_cfg(d, 3, 1, mode)) as engine:  # one copy per expert
        layer = sorted(engine.routing.table)[0]
        hosts0 = engine.routing.table[layer][0]
        target = await engine.replicate_expert(layer, 0)
        assert engine.routing.table[layer][0] == hosts0 + (target,)
        with pytest.raises(ValueError, match="last live copy"):
            await engine.unreplicate_expert(layer, 1, engine.routing.table[layer][1][0])
        await engine.unreplicate_expert(layer, 0, hosts0[0])  # the new copy carries expert 0
        assert engine.routing.table[layer][0] == (target,)
        hosted = {s["name"]: s["experts"] for s in engine.snapshot()["servers"]}
        assert 0 in hosted[target][str(layer)] and 0 not in hosted[hosts0[0]].get(str(layer), [])
        # a restart re-loads exactly what the server hosts now: 3 tensors per expert, no more
        inc = engine.incarnation(target)
        await engine.inject_fault(target, "kill")
        await engine.wait_servers_ready(60.0, {target: inc})
        stats = (await engine.stats())[target]
        n_experts = sum(len(v) for v in hosted[target].values())
        out = await _run_all(engine, [[2, 7, 1, 8]])
    assert stats["load_stats"]["tensors_read"] == 3 * n_experts
    assert out[0].outputs[0].token_ids == reference_greedy(d, [2, 7, 1, 8], 24)


async def test_removing_the_only_home_of_experts_rehomes_them_first(tiny_dirs, reference_greedy):
    d = tiny_dirs["qwen3_moe"]
    async with AsyncEngine(_cfg(d, 3, 1)) as engine:  # every expert on exactly one server
        layer = sorted(engine.routing.table)[0]
        only_on_0 = [e for e, s in engine.routing.table[layer].items() if s == ("expert-0",)]
        prompts = prompts_of(engine.tokenizer, 8, seed=3)
        running = asyncio.gather(*(_run_all(engine, [p]) for p in prompts))
        await engine.remove_server("expert-0")
        outs = [o[0] for o in await running]
        table = engine.routing.table
    assert only_on_0 and all(len(table[layer][e]) == 1 and table[layer][e] != ("expert-0",)
                             for e in only_on_0)
    assert [o.outputs[0].token_ids for o in outs] == [reference_greedy(d, p, 24) for p in prompts]


async def test_planner_actor_rebalances_online_while_serving(skewed_dir, reference_greedy):
    cfg = _cfg(skewed_dir, 4, 1, balance={"auto": True, "interval_s": 0.2,
                                          "max_experts_per_server": 4})
    async with AsyncEngine(cfg) as engine:
        gen0 = engine.routing.generation
        prompts = prompts_of(engine.tokenizer, 16, seed=8)
        done = asyncio.Event()

        async def until_replicated():
            try:
                while engine.counters.get("rebalances", 0) == 0:
                    await asyncio.sleep(0.05)
            finally:
                done.set()

        waves, _ = await asyncio.gather(run_waves(engine, prompts, done),
                                        asyncio.wait_for(until_replicated(), 30))
        rounds = engine.planner_progress.get("rounds", 0)
        events = [e for e in engine.events_bus.recent if e["type"] == "rebalance"]
    assert engine.routing.generation > gen0 and rounds >= 1
    assert any(m["expert"] == 0 for e in events for m in e["moves"])
    assert all(o.finish_reason == "length" for outs in waves for o in outs)
    expected = [reference_greedy(skewed_dir, p, 24) for p in prompts]
    assert all([o.outputs[0].token_ids for o in outs] == expected for outs in waves)
