"""Abort and deadline free the request's KV cache and its in-flight work units."""

from __future__ import annotations

import asyncio

import pytest

from eaas import AsyncEngine, EngineConfig, SamplingParams
from tests.engine.conftest import final


def _cfg(model_dir: str) -> EngineConfig:
    return EngineConfig.from_dict({"model": model_dir, "placement": {
        "num_attention_shards": 1, "num_expert_servers": 2, "expert_replicas": 1,
        "server_mode": "inproc"},
        "fault": {"unit_timeout_s": 30.0}})


async def _slow_servers(engine: AsyncEngine, seconds: float) -> None:
    for name in engine.server_names():
        await engine.inject_fault(name, "delay", seconds=seconds)


async def _shard_stats(engine: AsyncEngine) -> dict:
    return (await engine.stats())["shard-0"]


async def test_abort_frees_kv_cache_and_inflight_units(tiny_dirs):
    async with AsyncEngine(_cfg(tiny_dirs["qwen3_moe"])) as engine:
        await _slow_servers(engine, 0.3)
        params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
        outs = []

        async def consume():
            async for out in engine.generate([5, 6, 7, 8], params, request_id="victim"):
                outs.append(out)

        task = asyncio.create_task(consume())
        while (await _shard_stats(engine))["inflight_units"] == 0:
            await asyncio.sleep(0.01)
        busy = await _shard_stats(engine)
        assert busy["kv_caches"] == 1
        await engine.abort("victim")
        await asyncio.wait_for(task, 5)
        idle = await _shard_stats(engine)
        counters = dict(engine.counters)
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert idle["kv_caches"] == 0 and idle["kv_tokens"] == 0 and idle["inflight_units"] == 0
    assert busy["kv_blocks_used"] > 0 and idle["kv_blocks_used"] == 0
    assert idle["running"] == 0 and counters["units_retired"] >= 1


async def test_deadline_aborts_and_frees(tiny_dirs):
    async with AsyncEngine(_cfg(tiny_dirs["qwen3_moe"])) as engine:
        await _slow_servers(engine, 0.2)
        params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
        last = await final(engine, [1, 2, 3], params, deadline_s=0.5)
        await asyncio.sleep(0)  # let the shard process the abort's cleanup
        idle = await _shard_stats(engine)
    assert last.finished and last.finish_reason == "abort" and "deadline" in last.error
    assert len(last.outputs[0].token_ids) < 500
    assert idle["kv_caches"] == 0 and idle["inflight_units"] == 0 and idle["running"] == 0
    assert idle["kv_blocks_used"] == 0


async def test_other_requests_unaffected_by_an_abort(tiny_dirs, reference_greedy):
    d = tiny_dirs["qwen3_moe"]
    async with AsyncEngine(_cfg(d)) as engine:
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

        async def run(p, rid):
            last = None
            async for last in engine.generate(p, params, request_id=rid):  # abort mid-stream
                if rid == "a" and len(last.outputs[0].token_ids) == 2:
                    await engine.abort("a")
            return last

        a, b = await asyncio.gather(run([3, 4, 5], "a"), run([9, 10], "b"))
    assert a.finish_reason == "abort"
    assert b.finish_reason == "length" and b.outputs[0].token_ids == reference_greedy(d, [9, 10], 8)


async def test_a_crashed_shard_ends_its_requests_and_restarts(tiny_dirs, reference_greedy):
    """Shards are stateful: a crash cannot save their requests, but it must end them at once with
    a reason (no caller hangs), and the restarted shard serves new requests."""
    from eaas.engine.messages import Crash

    d = tiny_dirs["qwen3_moe"]
    async with AsyncEngine(_cfg(d)) as engine:
        await _slow_servers(engine, 0.05)
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

        task = asyncio.create_task(final(engine, [7, 7, 7], params))
        while (await _shard_stats(engine))["running"] == 0:
            await asyncio.sleep(0.01)
        await engine._shards[0].tell(Crash("test"))
        lost = await asyncio.wait_for(task, 10)
        await _slow_servers(engine, 0.0)
        fresh = await final(engine, [9, 10], SamplingParams(max_tokens=5, temperature=0,
                                                               ignore_eos=True))
    assert lost.finished and lost.finish_reason == "abort" and "shard-0 stopped" in lost.error
    assert fresh.outputs[0].token_ids == reference_greedy(d, [9, 10], 5)


async def test_failed_start_cleans_up_and_names_the_problem(tiny_dirs, tmp_path):
    from eaas.errors import CheckpointError, GraphError

    before = len(asyncio.all_tasks())
    with pytest.raises(CheckpointError, match="does not exist"):
        await AsyncEngine(_cfg(str(tmp_path / "nope"))).start()
    bad_graph = tmp_path / "graph.yaml"
    bad_graph.write_text("layers:\n  - range: [0, 2]\n    graph: g\ngraphs:\n  g:\n    nodes:\n"
                         "      a: {kind: attention}\n      x: {kind: teleport}\n")
    cfg = _cfg(tiny_dirs["qwen3_moe"]).replace(graph=str(bad_graph))
    with pytest.raises(GraphError, match="teleport"):
        async with AsyncEngine(cfg):
            pass
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before  # nothing left running


async def test_start_failure_inside_a_server_stops_everything(tiny_dirs):
    """A server process that cannot start (its device does not exist here) fails start() after
    the actor system is up: every actor is stopped, no task is left, the error says why."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine where cuda:0 does not exist")
    cfg = _cfg(tiny_dirs["qwen3_moe"]).replace(**{"placement.server_mode": "process",
                                                  "placement.server_devices": ["cuda:0"]})
    before = len(asyncio.all_tasks())
    engine = AsyncEngine(cfg)
    with pytest.raises(Exception, match="did not become ready"):
        await engine.start()
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before
    assert not engine.is_ready
    assert all(a["state"] in ("stopped", "crashed") for a in engine.snapshot()["actors"])


async def test_experts_node_timeout_param_is_this_layers_unit_deadline(tiny_dirs, tmp_path,
                                                                       reference_greedy):
    """`experts: {params: {timeout_s: 0.3}}` in the graph: a server hung for 3 s has its units
    timed out and resent (with the fault config's 30 s none would time out), and the request
    keeps its tokens."""
    from eaas.dataflow import LayerSpan, ModelGraph, moe_graph
    from eaas.dataflow.graph import LayerGraph, Node
    from eaas.model import Checkpoint

    d = tiny_dirs["mixtral"]
    mc = Checkpoint.open(d).config
    g = moe_graph(shared_expert=False)
    nodes = [Node(n.name, n.kind, {"timeout_s": 0.3} if n.name == "experts" else n.params)
             for n in g.order]
    graph = ModelGraph({"moe": LayerGraph("moe", nodes, g.edges)},
                       [LayerSpan(0, mc.num_hidden_layers - 1, "moe")])
    path = tmp_path / "graph.yaml"
    path.write_text(graph.to_yaml())
    cfg = EngineConfig.from_dict({"model": d, "graph": str(path), "placement": {
        "num_expert_servers": 2, "expert_replicas": 2, "server_mode": "inproc"},
        "fault": {"unit_timeout_s": 30.0, "hedge_after_s": 0}})  # no hedge before the timeout
    async with AsyncEngine(cfg) as engine:
        assert engine.graph.layer(0).nodes["experts"].params == {"timeout_s": 0.3}
        await final(engine, [1, 2], SamplingParams(max_tokens=2, temperature=0))  # warm
        hang = asyncio.create_task(engine.inject_fault("expert-0", "hang", seconds=3.0))
        await asyncio.sleep(0.05)
        out = await final(engine, [9, 8, 7], SamplingParams(max_tokens=6, temperature=0,
                                                           ignore_eos=True))
        timeouts = engine.counters["unit_timeouts"]
        await hang
    assert out.outputs[0].token_ids == reference_greedy(d, [9, 8, 7], 6)
    assert timeouts >= 1
