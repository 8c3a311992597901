"""Hedged resends (issue 18): a unit late at its server is also sent to another live replica;
the first answer is combined, the late one is dropped as stale, and every pair is combined
exactly once. A slow server costs one hedge delay, not its delay per step."""

from __future__ import annotations

import asyncio
import time

from eaas import AsyncEngine, EngineConfig, SamplingParams
from tests.engine.conftest import final, prompts_of


def _cfg(d: str, **fault) -> EngineConfig:
    return EngineConfig.from_dict({
        "model": d, "placement": {"num_expert_servers": 3, "expert_replicas": 2,
                                  "server_mode": "inproc"},
        "fault": {"unit_timeout_s": 5.0, **fault}})


async def _until(pred, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, f"not {what} after {timeout}s"
        await asyncio.sleep(0.01)


async def test_a_slow_server_is_hedged_and_its_late_answers_dropped(tiny_dirs, reference_greedy):
    d = tiny_dirs["qwen3_moe"]
    n = 8
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    async with AsyncEngine(_cfg(d, hedge_after_s=0.1)) as engine:
        prompts = prompts_of(engine.tokenizer, 6, seed=3)
        await engine.inject_fault("expert-0", "delay", seconds=1.0)  # every batch 1 s late
        t0 = time.monotonic()
        outs = await asyncio.gather(*(final(engine, p, params) for p in prompts))
        took = time.monotonic() - t0
        c = engine.counters
        await _until(lambda: c["stale_results"] >= 1, 10, "a late answer dropped")
        counters = dict(c)
    assert [o.outputs[0].token_ids for o in outs] == [reference_greedy(d, p, n) for p in prompts]
    assert counters["hedged_units"] >= 1 and counters["hedge_wins"] >= 1
    assert counters["combine_violations"] == 0 and counters["unit_timeouts"] == 0
    assert counters["units_dispatched"] == counters["units_combined"] + counters["units_retired"]
    # without hedging each step that sends expert-0 a unit waits its 1 s: >= n s in all
    assert took < 0.5 * n, f"{n} tokens took {took:.2f}s with a 1 s-slow server hedged"


async def test_hedging_off_waits_for_the_slow_server(tiny_dirs):
    """The control: with fault.hedge_after_s 0 nothing is hedged and the slow server's answers
    are the ones combined."""
    d = tiny_dirs["qwen3_moe"]
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    async with AsyncEngine(_cfg(d, hedge_after_s=0)) as engine:
        await engine.inject_fault("expert-0", "delay", seconds=0.3)
        await final(engine, [1, 2, 3, 4, 5, 6, 7, 8], params)
        counters = dict(engine.counters)
    assert counters["hedged_units"] == 0 and counters["stale_results"] == 0


class _Inbox:
    """A batcher stand-in: keeps the work units sent to one server."""

    def __init__(self) -> None:
        self.units: list = []

    def tell_nowait(self, msg) -> None:
        self.units.append(msg)


async def test_ledger_combines_each_pair_once_from_the_first_answer_that_covers_it():
    """A unit at s0 with experts 0 and 1 is hedged as two copies (expert 0 to s1, expert 1 to
    s2). s1 answers first, then s0: expert 0's pairs come from s1, expert 1's from s0, the s2
    copy is retired and its late answer counted stale; s0 (beaten) is suspect."""
    import torch

    from eaas.config import FaultConfig
    from eaas.engine.dispatch import Dispatcher
    from eaas.engine.messages import UnitResult
    from eaas.engine.placement import RoutingSnapshot

    inbox = {s: _Inbox() for s in ("s0", "s1", "s2")}
    counters: dict[str, int] = {}
    routing = RoutingSnapshot(1, {0: {0: ("s0", "s1"), 1: ("s0", "s2")}})
    d = Dispatcher(None, inbox.get, FaultConfig(hedge_after_s=0.01), counters, routing)
    d.outstanding.update(s1=100, s2=100)  # the first choice for both experts is s0
    x = torch.arange(8, dtype=torch.float32).view(2, 4)  # [T=2, H=4]
    topk_ids = torch.tensor([[0, 1], [1, 0]])  # [T, K]: pairs 0..3 -> experts 0, 1, 1, 0
    call = d.start(0, x, topk_ids, torch.full((2, 2), 0.5))
    waiting = asyncio.create_task(call.wait())
    await _until(lambda: inbox["s1"].units and inbox["s2"].units, 5, "hedged")
    (u0,), (h1,), (h2,) = (inbox[s].units for s in ("s0", "s1", "s2"))
    assert u0.expert_ids.tolist() == [0, 1, 1, 0]
    assert h1.expert_ids.tolist() == [0, 0] and h2.expert_ids.tolist() == [1, 1]

    def answer(unit, server: str, scale: float) -> UnitResult:  # row n = x row * scale
        return UnitResult(unit.unit_id, unit.attempt, server, unit.x * scale)

    d.on_result(answer(h1, "s1", 10.0))  # expert 0's pairs: from s1
    await _until(lambda: counters["units_combined"] == 1, 5, "s1's answer combined")
    d.on_result(answer(u0, "s0", 1.0))  # the rest (expert 1's pairs): from s0
    out = await asyncio.wait_for(waiting, 5)
    d.on_result(answer(h2, "s2", 100.0))  # late: dropped
    y = out.y  # [T, K, H]
    assert torch.equal(y[0, 0], x[0] * 10) and torch.equal(y[1, 1], x[1] * 10)
    assert torch.equal(y[0, 1], x[0]) and torch.equal(y[1, 0], x[1])
    assert counters["hedged_units"] == 2 and counters["hedge_wins"] == 1
    assert counters["units_combined"] == 2 and counters["units_retired"] == 1
    assert counters["stale_results"] == 1 and counters["combine_violations"] == 0
    assert "s0" in d.suspect and d.inflight() == 0
