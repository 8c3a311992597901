"""The batcher coalesces work from several shards into one expert call, and flushes on its three
triggers (rows reach max_batch_tokens; every unit of the round is there; the oldest unit waited
max_wait_us)."""

from __future__ import annotations

import asyncio
import time

import torch

from eaas.actors import Actor, ActorSystem
from eaas.config import BatchingConfig
from eaas.engine.batcher import Batcher
from eaas.engine.expert_server import ExpertHost, ExpertServer
from eaas.engine.messages import Stats, UnitResult, WorkUnit
from eaas.model import Checkpoint


class Collector(Actor):
    """Stands where a shard stands: receives UnitResults."""

    def __init__(self, sink: asyncio.Queue) -> None:
        self.sink = sink

    async def on_receive(self, msg):
        self.sink.put_nowait((self.context.name, msg))


async def _setup(system, model_dir, batching):
    mc = Checkpoint.open(model_dir).config
    layer = next(i for i in range(mc.num_hidden_layers) if mc.is_moe_layer(i))
    assignment = {layer: list(range(mc.num_experts))}
    server = await system.spawn(lambda: ExpertServer("expert-0", model_dir, assignment,
                                                     dtype="float32", device="cpu",
                                                     batch_invariant=True), name="expert-0")
    batcher = await system.spawn(lambda: Batcher("expert-0", lambda: server, batching, 5.0),
                                 name="batcher-0")
    sink: asyncio.Queue = asyncio.Queue()
    shards = [await system.spawn(lambda: Collector(sink), name=f"shard-{i}") for i in range(2)]
    host = ExpertHost(model_dir, assignment, dtype="float32")
    return mc, layer, server, batcher, sink, shards, host


def _unit(uid, layer, mc, n, reply_to, g, round_units=0):
    x = torch.randn(n, mc.hidden_size, generator=g)
    ids = torch.randint(0, mc.num_experts, (n,), generator=g)
    return WorkUnit(uid, 0, 1, layer, x, ids, reply_to, round_units)


async def test_coalesces_units_from_two_shards_into_one_call(tiny_dirs):
    async with ActorSystem() as system:
        mc, layer, server, batcher, sink, shards, host = await _setup(
            system, tiny_dirs["qwen3_moe"], BatchingConfig(max_batch_tokens=8, max_wait_us=10**7))
        g = torch.Generator().manual_seed(0)
        units = [_unit(i, layer, mc, 2, shards[i % 2], g) for i in range(4)]  # 4 x 2 rows = 8
        for u in units:
            await batcher.tell(u)
        results = [await asyncio.wait_for(sink.get(), 5) for _ in units]
        server_stats = await server.ask(Stats(), timeout=5)
        batch_stats = await batcher.ask(Stats(), timeout=5)
    assert server_stats["calls"] == 1 and server_stats["rows"] == 8
    assert batch_stats["full_flushes"] == 1 and batch_stats["multi_shard_flushes"] == 1
    by_id = {u.unit_id: u for u in units}
    assert {who for who, _ in results} == {"shard-0", "shard-1"}
    for who, msg in results:
        assert isinstance(msg, UnitResult)
        u = by_id[msg.unit_id]
        assert who == u.reply_to.name
        torch.testing.assert_close(msg.y, host.compute(layer, u.x, u.expert_ids), rtol=0, atol=0)


async def test_timer_flushes_a_lone_unit_after_max_wait(tiny_dirs):
    wait_us = 30_000
    async with ActorSystem() as system:
        mc, layer, server, batcher, sink, shards, _ = await _setup(
            system, tiny_dirs["qwen3_moe"], BatchingConfig(max_batch_tokens=10**6,
                                                           max_wait_us=wait_us))
        g = torch.Generator().manual_seed(1)
        t0 = time.monotonic()
        await batcher.tell(_unit(1, layer, mc, 3, shards[0], g))
        _, msg = await asyncio.wait_for(sink.get(), 5)
        elapsed = time.monotonic() - t0
        stats = await batcher.ask(Stats(), timeout=5)
    assert isinstance(msg, UnitResult) and msg.y.shape == (3, mc.hidden_size)
    assert stats["timer_flushes"] == 1 and stats["full_flushes"] == 0
    assert elapsed >= wait_us / 1e6  # it waited for company before flushing


async def test_full_batch_flushes_without_waiting_for_the_timer(tiny_dirs):
    async with ActorSystem() as system:
        mc, layer, server, batcher, sink, shards, _ = await _setup(
            system, tiny_dirs["qwen3_moe"], BatchingConfig(max_batch_tokens=4, max_wait_us=10**8))
        g = torch.Generator().manual_seed(2)
        await batcher.tell(_unit(1, layer, mc, 4, shards[0], g))
        _, msg = await asyncio.wait_for(sink.get(), 5)  # a 100 s timer would time this out
        stats = await batcher.ask(Stats(), timeout=5)
    assert isinstance(msg, UnitResult) and stats["full_flushes"] == 1


async def test_lone_unit_of_its_round_flushes_at_once(tiny_dirs):
    # round_units=1: nothing else can join, so a 100 s window must not be waited out
    async with ActorSystem() as system:
        mc, layer, server, batcher, sink, shards, host = await _setup(
            system, tiny_dirs["qwen3_moe"], BatchingConfig(max_batch_tokens=10**6,
                                                           max_wait_us=10**8))
        g = torch.Generator().manual_seed(3)
        u = _unit(1, layer, mc, 3, shards[0], g, round_units=1)
        await batcher.tell(u)
        _, msg = await asyncio.wait_for(sink.get(), 5)
        stats = await batcher.ask(Stats(), timeout=5)
    assert isinstance(msg, UnitResult) and stats["complete_flushes"] == 1
    assert stats["timer_flushes"] == 0 and stats["full_flushes"] == 0
    torch.testing.assert_close(msg.y, host.compute(layer, u.x, u.expert_ids), rtol=0, atol=0)


async def test_round_of_two_waits_for_the_second_unit_then_flushes_both(tiny_dirs):
    async with ActorSystem() as system:
        mc, layer, server, batcher, sink, shards, _ = await _setup(
            system, tiny_dirs["qwen3_moe"], BatchingConfig(max_batch_tokens=10**6,
                                                           max_wait_us=10**8))
        g = torch.Generator().manual_seed(4)
        await batcher.tell(_unit(1, layer, mc, 2, shards[0], g, round_units=2))
        await batcher.tell(_unit(2, layer, mc, 3, shards[1], g, round_units=2))
        results = [await asyncio.wait_for(sink.get(), 5) for _ in range(2)]
        server_stats = await server.ask(Stats(), timeout=5)
        stats = await batcher.ask(Stats(), timeout=5)
    assert {who for who, _ in results} == {"shard-0", "shard-1"}
    assert server_stats["calls"] == 1 and server_stats["rows"] == 5  # one call: it waited
    assert stats["complete_flushes"] == 1 and stats["multi_shard_flushes"] == 1


async def test_units_of_another_layer_do_not_complete_a_round(tiny_dirs):
    async with ActorSystem() as system:
        mc, layer, server, batcher, sink, shards, _ = await _setup(
            system, tiny_dirs["qwen3_moe"], BatchingConfig(max_batch_tokens=10**6,
                                                           max_wait_us=30_000))
        g = torch.Generator().manual_seed(5)
        await batcher.tell(_unit(1, layer, mc, 2, shards[0], g, round_units=2))
        await batcher.tell(_unit(2, layer + 1, mc, 2, shards[1], g, round_units=2))
        results = [await asyncio.wait_for(sink.get(), 5) for _ in range(2)]
        stats = await batcher.ask(Stats(), timeout=5)
    # layer+1 is not hosted: that call fails, which is fine; neither round was complete
    assert len(results) == 2 and stats["complete_flushes"] == 0 and stats["timer_flushes"] == 2
