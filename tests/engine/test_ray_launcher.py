"""placement.launcher ray on a local Ray cluster started by the test (real worker processes):
3 expert servers as Ray actors give the reference tokens, and a SIGKILLed server worker is
survived (requests complete from replicas; the engine's supervisor starts a new Ray actor)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from eaas import AsyncEngine, EngineConfig, SamplingParams
from tests.engine.conftest import final

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


async def test_ray_servers_give_reference_tokens_and_survive_a_killed_worker(
        ray_cluster, tiny_dirs, reference_greedy):
    model = tiny_dirs["qwen3_moe"]
    cfg = EngineConfig.from_dict({"model": model, "placement": {
        "launcher": "ray", "num_expert_servers": 3, "expert_replicas": 2,
        "ray_num_cpus": 1, "ray_placement_strategy": "SPREAD"}, "fault": {"warm_spares": 0}})
    prompts = [[3 + i, 17, 5 * i + 1, 9] for i in range(6)]
    want = [reference_greedy(model, p, 6) for p in prompts]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    async with AsyncEngine(cfg) as engine:
        servers = engine.snapshot()["servers"]
        assert [s["origin"] for s in servers] == ["ray"] * 3
        pids = {s["name"]: s["pid"] for s in servers}
        assert len(set(pids.values())) == 3 and os.getpid() not in pids.values()
        outs = await asyncio.gather(*(final(engine, p, params) for p in prompts))
        assert [o.outputs[0].token_ids for o in outs] == want

        before = engine.incarnation("expert-1")
        run = [asyncio.ensure_future(final(engine, p, params)) for p in prompts]
        await asyncio.sleep(0)
        os.kill(pids["expert-1"], signal.SIGKILL)  # the Ray worker process of one server
        outs = await asyncio.gather(*run)
        assert [o.finish_reason for o in outs] == ["length"] * len(prompts)
        assert [o.outputs[0].token_ids for o in outs] == want
        await engine.wait_servers_ready(timeout=90, newer_than={"expert-1": before})
        after = {s["name"]: s for s in engine.snapshot()["servers"]}
        assert after["expert-1"]["pid"] != pids["expert-1"]  # a fresh Ray actor
        assert not engine.routing.dead
        outs = await asyncio.gather(*(final(engine, p, params) for p in prompts))
        assert [o.outputs[0].token_ids for o in outs] == want
