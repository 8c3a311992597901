"""Rolling upgrade (`replace_server`): every server replaced one at a time under load — onto a
copy of the checkpoint at a new path — fails no request and changes no token; a checkpoint of
another shape is refused before anything starts."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from eaas import AsyncEngine, EngineConfig, SamplingParams
from eaas.model import make_tiny
from tests.engine.conftest import final


async def test_rollout_of_every_server_under_load(tiny_dirs, reference_greedy, tmp_path):
    model = tiny_dirs["qwen3_moe"]
    upgraded = shutil.copytree(model, tmp_path / "v2")
    cfg = EngineConfig.from_dict({"model": model, "placement": {
        "num_expert_servers": 3, "expert_replicas": 2, "server_mode": "inproc"}})
    prompts = [[3 + i, 17, 5 * i + 1, 9] for i in range(6)]
    want = [reference_greedy(model, p, 5) for p in prompts]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    async with AsyncEngine(cfg) as engine:
        results: list = []
        stop = asyncio.Event()

        async def client(c: int) -> None:
            i = c
            while not stop.is_set():
                k = i % len(prompts)
                results.append((k, await final(engine, prompts[k], params)))
                i += 1

        clients = [asyncio.ensure_future(client(c)) for c in range(3)]
        old = engine.server_names()
        new = []
        for name in old:
            n = len(results)
            new.append(await engine.replace_server(name, model=str(upgraded)))
            while len(results) < n + 2:  # serving goes on between replacements
                await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*clients)
        assert set(engine.server_names()) == set(new) and not set(new) & set(old)
        assert all(s["model"] == str(upgraded) for s in engine.snapshot()["servers"])
        assert not engine.routing.dead
        assert {o.finish_reason for _, o in results} == {"length"}
        assert all(o.outputs[0].token_ids == want[k] for k, o in results)
        assert engine.counters["rollouts"] == 3


async def test_replace_refuses_a_checkpoint_of_another_shape(tiny_dirs, tmp_path):
    other = make_tiny(tmp_path / "mixtral", "mixtral", seed=1)
    cfg = EngineConfig.from_dict({"model": tiny_dirs["qwen3_moe"], "placement": {
        "num_expert_servers": 2, "expert_replicas": 1, "server_mode": "inproc"}})
    async with AsyncEngine(cfg) as engine:
        generation = engine.routing.generation
        with pytest.raises(ValueError, match="does not fit the served model"):
            await engine.replace_server("expert-0", model=str(other))
        with pytest.raises(ValueError, match="no expert server named"):
            await engine.replace_server("expert-9")
        assert engine.server_names() == ["expert-0", "expert-1"]
        assert engine.routing.generation == generation
