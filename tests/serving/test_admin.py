"""Admin API against the real engine: topology, load, the event stream, bearer auth, kill
(fault injection) with requests completing through it, and 501 for engine actions that are
not implemented yet."""

from __future__ import annotations

import asyncio
import json

from tests.serving.conftest import admin_headers, engine_config, serving_client


async def read_events(resp, until, timeout: float = 10.0) -> list[dict]:
    """SSE events (with their ids) from resp until until(events) is true."""
    events: list[dict] = []
    async with asyncio.timeout(timeout):
        while not until(events):
            block = (await resp.content.readuntil(b"\n\n")).decode()
            fields = dict(line.split(": ", 1) for line in block.strip().split("\n")
                          if ": " in line and not line.startswith(":"))
            if "data" in fields:
                events.append({**json.loads(fields["data"]), "_id": fields.get("id")})
    return events


async def test_dashboard_page_and_read_routes_are_public(tiny_dir):
    async with serving_client(engine_config(tiny_dir)) as client:
        page = await client.get("/admin")
        html = await page.text()
        assert page.status == 200 and page.content_type == "text/html"
        for anchor in ('id="servers"', 'id="tree"', 'id="heat"', 'id="log"', 'id="chart-tput"'):
            assert anchor in html
        topo = await (await client.get("/admin/api/topology")).json()
        assert [s["name"] for s in topo["servers"]] == ["expert-0", "expert-1"]
        assert all(s["up"] and s["restarts"] == 0 for s in topo["servers"])
        by_name = {a["name"]: a for a in topo["actors"]}
        assert by_name["expert-0"]["parent"] == "server-sup-expert-0"
        assert "expert-0" in by_name["server-sup-expert-0"]["children"]
        for a in topo["actors"]:
            assert {"name", "parent", "state", "restarts", "mailbox_depth", "children"} <= set(a)
        assert topo["model"] == "tiny" and topo["ready"] is True
        load = await (await client.get("/admin/api/load")).json()
        assert {"tokens", "num_layers", "num_experts", "series", "counters"} <= set(load)
        assert len(load["series"]) == 120


async def test_kill_restarts_the_server_while_requests_complete(tiny_dir):
    async with serving_client(engine_config(tiny_dir)) as client:
        events = await client.get("/admin/api/events")
        await read_events(events, lambda evs: any(e["type"] == "engine_ready" for e in evs))
        req = {"prompt": [7, 8, 9], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        expected = (await (await client.post("/v1/completions", json=req)).json())["choices"][0]

        async def traffic() -> list[int]:
            return [(await client.post("/v1/completions", json=req)).status for _ in range(6)]

        load = asyncio.ensure_future(traffic())
        resp = await client.post("/admin/api/servers/expert-0/kill", headers=admin_headers())
        assert resp.status == 202, await resp.text()
        assert await load == [200] * 6
        seen = await read_events(events, lambda evs: any(
            e["type"] == "actor_restarted" and e.get("name") == "expert-0" for e in evs))
        types = [e["type"] for e in seen]
        assert "admin.kill_server" in types and "fault_injected" in types
        assert all(isinstance(e["time"], float) and e["time"] > 1e9 for e in seen)  # wall clock
        topo = await (await client.get("/admin/api/topology")).json()
        server = next(s for s in topo["servers"] if s["name"] == "expert-0")
        assert server["restarts"] >= 1
        after = (await (await client.post("/v1/completions", json=req)).json())["choices"][0]
        assert after["text"] == expected["text"]
        events.close()


async def test_event_stream_resumes_after_last_event_id(tiny_dir):
    async with serving_client(engine_config(tiny_dir)) as client:
        first = await client.get("/admin/api/events")
        evs = await read_events(first, lambda e: len(e) >= 3)
        first.close()
        again = await client.get("/admin/api/events", headers={"Last-Event-ID": evs[1]["_id"]})
        resumed = await read_events(again, lambda e: len(e) >= 1)
        again.close()
        assert resumed[0]["_id"] == evs[2]["_id"]


async def test_admin_actions_need_the_token(tiny_dir):
    async with serving_client(engine_config(tiny_dir)) as client:
        actions = [("POST", "/admin/api/servers", None),
                   ("DELETE", "/admin/api/servers/expert-1", None),
                   ("POST", "/admin/api/servers/expert-1/kill", None),
                   ("POST", "/admin/api/experts/replicate", {"layer": 0, "expert": 1}),
                   ("POST", "/admin/api/rebalance", None)]
        for method, path, body in actions:
            resp = await client.request(method, path, json=body)
            assert resp.status == 401, (path, await resp.text())
        topo = await (await client.get("/admin/api/topology")).json()
        assert [s["name"] for s in topo["servers"]] == ["expert-0", "expert-1"]  # untouched


async def test_add_replicate_rebalance_remove(tiny_dir):
    cfg = engine_config(tiny_dir, placement={"expert_replicas": 1})
    async with serving_client(cfg) as client:
        h = admin_headers()

        async def topology() -> dict:
            return await (await client.get("/admin/api/topology")).json()

        table = (await topology())["routing"]["table"]
        layer = sorted(table, key=int)[0]
        expert = next(e for e, hosts in table[layer].items() if len(hosts) == 1)
        resp = await client.post("/admin/api/experts/replicate", headers=h,
                                 json={"layer": int(layer), "expert": int(expert)})
        assert resp.status == 200, await resp.text()
        assert len((await topology())["routing"]["table"][layer][expert]) == 2

        resp = await client.post("/admin/api/servers", headers=h)
        assert resp.status == 201, await resp.text()
        added = (await resp.json())["name"]
        assert added in [s["name"] for s in (await topology())["servers"]]

        resp = await client.post("/admin/api/rebalance", headers=h)
        assert resp.status == 200, await resp.text()

        resp = await client.delete(f"/admin/api/servers/{added}", headers=h)
        assert resp.status == 200, await resp.text()
        assert added not in [s["name"] for s in (await topology())["servers"]]
        req = {"prompt": [7, 8, 9], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        assert (await client.post("/v1/completions", json=req)).status == 200

        resp = await client.delete("/admin/api/servers/no-such-server", headers=h)
        assert resp.status == 404 and (await resp.json())["error"]["param"] == "name"
