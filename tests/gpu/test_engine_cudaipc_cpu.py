"""The engine's process mode over cudaipc:// on CPU: the scheme plugs into expert-server
processes like tcp:// (CPU rows travel inline) and gives the in-process engine's tokens."""

from __future__ import annotations

import asyncio

import pytest

from eaas import AsyncEngine, EngineConfig, SamplingParams
from tests.engine.conftest import prompts_of

pytestmark = pytest.mark.timeout(120)


async def test_process_servers_over_cudaipc_equal_inproc(tiny_dirs):
    model = tiny_dirs["qwen3_moe"]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def run(mode: str) -> tuple[list[list[int]], list[str]]:
        cfg = EngineConfig.from_dict({"model": model, "placement": {
            "num_expert_servers": 2, "server_mode": mode, "transport": "cudaipc"}})
        async with AsyncEngine(cfg) as engine:
            prompts = prompts_of(engine.tokenizer, 4, seed=1)

            async def one(p):
                last = None
                async for last in engine.generate(p, params):
                    pass
                return last.outputs[0].token_ids

            tokens = await asyncio.gather(*(one(p) for p in prompts))
            return list(tokens), [s["transport"] for s in engine.snapshot()["servers"]]

    want, _ = await run("inproc")
    got, urls = await run("process")
    assert got == want
    assert len(urls) == 2 and all(u.startswith("cudaipc:///") for u in urls)
