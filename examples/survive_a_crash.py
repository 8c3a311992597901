"""Expert servers in their own processes; one is SIGKILLed mid-generation and the engine keeps
serving: every request finishes with exactly the tokens of an undisturbed run."""

from __future__ import annotations

import asyncio
import tempfile

from eaas import AsyncEngine, EngineConfig, SamplingParams
from eaas.model import make_tiny


async def run(engine: AsyncEngine, prompts, kill: str | None = None) -> list[list[int]]:
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    async def one(p):
        async for out in engine.generate(p, params):
            if kill and len(out.outputs[0].token_ids) == 4 and engine.incarnation(kill) == 1:
                await engine.inject_fault(kill, "kill")  # a real SIGKILL of that process
        return out.outputs[0].token_ids

    return await asyncio.gather(*(one(p) for p in prompts))


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = EngineConfig.from_dict({
            "model": str(make_tiny(f"{tmp}/m", "qwen2_moe")),
            "placement": {"num_expert_servers": 3, "expert_replicas": 2,
                          "server_mode": "process"}})
        prompts = [[i, i + 1, i + 2] for i in range(1, 40, 3)]
        async with AsyncEngine(cfg) as engine:
            calm = await run(engine, prompts)
            stormy = await run(engine, prompts, kill="expert-1")
            await engine.wait_servers_ready()
            c = engine.counters
            print(f"outputs identical after a kill: {calm == stormy}; restarts={c.get('restarts')}"
                  f", resent units={c.get('resent_units')}, reroutes={c.get('reroutes')}")
            print("servers:", [(s["name"], s["pid"], s["state"]) for s in
                               engine.snapshot()["servers"]])
        assert calm == stormy


if __name__ == "__main__":
    asyncio.run(main())
