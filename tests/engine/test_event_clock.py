"""Every engine event carries the same two clocks (issue 18): `time` wall-clock seconds, `mono`
monotonic seconds, whether the actor system emitted it (actor_crashed, actor_restarted) or the
routing table (routing_changed). Events of both sources sorted by either clock are in the order
they happened, in engine.events() and in the admin SSE stream."""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp.test_utils import TestClient, TestServer

from eaas import AsyncEngine, EngineConfig
from eaas.serving import create_app
from eaas.serving.guards import server_kwargs


def _back(name: str):
    """True once `name` crashed and routing took it out and back in."""
    def done(events: list[dict]) -> bool:
        kinds = [(e["type"], e.get("name"), tuple(e.get("dead", ()))) for e in events]
        out = next((i for i, k in enumerate(kinds) if k[0] == "routing_changed" and name in k[2]),
                   None)
        return out is not None and any(k[0] == "routing_changed" and name not in k[2]
                                       for k in kinds[out + 1:])
    return done


async def _sse(resp, until, timeout: float = 20.0) -> list[dict]:
    events: list[dict] = []
    async with asyncio.timeout(timeout):
        while not until(events):
            block = (await resp.content.readuntil(b"\n\n")).decode()
            for line in block.split("\n"):
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    return events


def _check_clocks(events: list[dict], wall: tuple[float, float], mono: tuple[float, float],
                  where: str) -> None:
    for clock, (lo, hi) in (("time", wall), ("mono", mono)):
        stamps = [e[clock] for e in events]
        assert all(lo <= t <= hi for t in stamps), f"{where}: {clock} outside [{lo}, {hi}]: " \
            f"{[(e['type'], e[clock]) for e in events]}"
        assert stamps == sorted(stamps), f"{where}: {clock} out of order: " \
            f"{[(e['type'], e.get('name'), e[clock]) for e in events]}"
    # the two sources interleave (the order checks span them): an actor event after a
    # routing change, and a routing change after an actor event
    src = ["routing" if e["type"] == "routing_changed" else
           "actor" if e["type"].startswith("actor_") else "other" for e in events]
    routing = [i for i, x in enumerate(src) if x == "routing"]
    actor = [i for i, x in enumerate(src) if x == "actor"]
    assert routing and actor and actor[-1] > routing[0] and routing[-1] > actor[0], \
        f"{where}: {[e['type'] for e in events]}"


async def test_actor_and_routing_events_share_one_clock(tiny_dirs):
    cfg = EngineConfig.from_dict({"model": tiny_dirs["qwen3_moe"], "placement": {
        "num_expert_servers": 2, "expert_replicas": 2, "server_mode": "inproc"}})
    wall0, mono0 = time.time(), time.monotonic()
    engine = AsyncEngine(cfg)
    await engine.start()
    try:
        app = create_app(engine, admin_token="t" * 32, model_name=cfg.model_name)
        server = TestServer(app)
        await server.start_server(**server_kwargs(app))
        async with TestClient(server) as client:
            sse = await client.get("/admin/api/events")
            stream = engine.events()
            await engine.inject_fault("expert-0", "kill")
            seen: list[dict] = []
            async with asyncio.timeout(20):
                async for ev in stream:
                    seen.append(ev)
                    if _back("expert-0")(seen):
                        break
            served = await _sse(sse, _back("expert-0"))
            sse.close()
    finally:
        await engine.aclose()
    wall, mono = (wall0, time.time()), (mono0, time.monotonic())
    _check_clocks(seen, wall, mono, "engine.events()")
    # the hub adds its own events (admin actions) without `mono`; the engine's all have both
    engine_evs = [e for e in served if "mono" in e]
    assert {e["type"] for e in engine_evs} >= {"actor_crashed", "routing_changed"}
    _check_clocks(engine_evs, wall, mono, "/admin/api/events")
    assert all(wall[0] <= e["time"] <= wall[1] for e in served)
