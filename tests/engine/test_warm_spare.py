"""A restarted expert server adopts a warm spare process (started ahead, no experts): it is back
in routing in a fraction of a process start-up, hosts exactly its experts, and a new spare is
started behind it. Closing the engine stops the spares."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from eaas import AsyncEngine, EngineConfig, SamplingParams
from eaas.engine.process_home import may_unnice
from tests.engine.conftest import final


def _cfg(d: str, spares: int) -> EngineConfig:
    return EngineConfig.from_dict({"model": d, "placement": {"num_expert_servers": 2,
                                                             "expert_replicas": 1},
                                   "fault": {"warm_spares": spares}})


async def _spares_ready(engine: AsyncEngine, n: int, timeout: float = 60.0) -> list:
    spares = next(iter(engine.pool.home.spares.values()))
    deadline = time.monotonic() + timeout
    while len(spares._ready) < n:
        assert time.monotonic() < deadline, "the warm spare did not start"
        await asyncio.sleep(0.05)
    return [s.proc.pid for s in spares._ready]


async def _back_after_kill(engine: AsyncEngine, server: str) -> float:
    pid = {s["name"]: s["pid"] for s in engine.snapshot()["servers"]}[server]
    inc = engine.incarnation(server)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    await engine.wait_servers_ready(60.0, {server: inc})
    while server in engine.routing.dead or not engine.readiness()[0]:
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


def _niceness(pid: int) -> set[int]:
    """The niceness of every thread of process pid."""
    return {os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{pid}/task")}


async def test_a_killed_server_adopts_the_warm_spare(tiny_dirs, reference_greedy):
    d = tiny_dirs["qwen3_moe"]
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    async with AsyncEngine(_cfg(d, 1)) as engine:
        (spare_pid,) = await _spares_ready(engine, 1)
        # a spare starts fault.spare_nice nicer (its start-up takes only idle CPU) where the
        # priority can be given back, and has it back once adopted
        nice = engine.config.fault.spare_nice if may_unnice(mine) else 0
        assert _niceness(spare_pid) == {min(19, mine + nice)}
        hosted = {s["name"]: s["experts"] for s in engine.snapshot()["servers"]}
        took = await _back_after_kill(engine, "expert-0")
        after = {s["name"]: s for s in engine.snapshot()["servers"]}
        assert after["expert-0"]["pid"] == spare_pid  # the spare became expert-0
        assert _niceness(spare_pid) == {mine}
        assert after["expert-0"]["experts"] == hosted["expert-0"]
        out = await final(engine, [2, 7, 1, 8], SamplingParams(max_tokens=8, temperature=0,
                                                               ignore_eos=True))
        stats = (await engine.stats())["expert-0"]
        assert stats["experts"] == hosted["expert-0"]  # the process loaded exactly those
        (next_spare,) = await _spares_ready(engine, 1)  # a new one started behind it
        assert next_spare != spare_pid
    assert out.outputs[0].token_ids == reference_greedy(d, [2, 7, 1, 8], 8)
    assert took < 1.5, f"back in routing after {took:.2f} s with a warm spare"
    for pid in (next_spare,):  # the engine's close stopped its spare
        try:
            os.kill(pid, 0)
            raise AssertionError(f"spare {pid} still runs after close")
        except ProcessLookupError:
            pass
