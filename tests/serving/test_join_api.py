"""The join protocol's admin routes refuse what they must (no process joins here; the served
join is tests/serving/test_join.py): no token, bad fields, a name the engine spawned, a stale
ticket, an unknown server; status tells a process whether it is still wanted."""

from __future__ import annotations

from tests.serving.conftest import admin_headers, engine_config, serving_client


async def test_join_routes_check_their_callers(tiny_dir):
    async with serving_client(engine_config(tiny_dir)) as client:
        r = await client.post("/admin/api/join", json={})
        assert r.status == 401
        r = await client.post("/admin/api/join", json={"name": "bad name!"},
                              headers=admin_headers())
        assert r.status == 400 and "name=" in (await r.json())["error"]["message"]
        r = await client.post("/admin/api/join", json={"device": "tpu"}, headers=admin_headers())
        assert r.status == 400 and "device=" in (await r.json())["error"]["message"]
        r = await client.post("/admin/api/join", json={"name": "expert-0"},
                              headers=admin_headers())
        assert r.status == 400 and "started itself" in (await r.json())["error"]["message"]

        r = await client.post("/admin/api/join", json={"name": "gpu-7", "host": "h"},
                              headers=admin_headers())
        assert r.status == 201
        ticket = await r.json()
        assert ticket["name"] == "gpu-7" and ticket["incarnation"] == 1
        table = (await (await client.get("/admin/api/topology")).json())["routing"]["table"]
        assert ticket["assignment"] == {l: sorted(map(int, ex)) for l, ex in table.items()}
        r = await client.post("/admin/api/join", json={"name": "gpu-7"}, headers=admin_headers())
        assert (await r.json())["incarnation"] == 2  # a second process of the name
        st = await client.get("/admin/api/join/gpu-7?incarnation=1", headers=admin_headers())
        assert (await st.json())["current"] is False  # the newer ticket wins
        st = await client.get("/admin/api/join/gpu-7?incarnation=2", headers=admin_headers())
        assert (await st.json())["current"] is True
        r = await client.post("/admin/api/join/gpu-7/ready", headers=admin_headers(),
                              json={"incarnation": 1, "url": "tcp://127.0.0.1:9"})
        assert r.status == 409 and "stale" in (await r.json())["error"]["message"]
        r = await client.post("/admin/api/join/gpu-7/ready", headers=admin_headers(),
                              json={"incarnation": 2, "url": "tcp://127.0.0.1:9"})
        assert r.status == 503  # nobody listens there: not routed
        table = (await (await client.get("/admin/api/topology")).json())["routing"]["table"]
        assert all("gpu-7" not in srv for ex in table.values() for srv in ex.values())
        r = await client.post("/admin/api/join/gpu-7/leave", headers=admin_headers(),
                              json={"incarnation": 0})
        assert r.status == 400
        st = await client.get("/admin/api/join/nobody?incarnation=1", headers=admin_headers())
        assert (await st.json()) == {"current": False, "state": "removed",
                                     "reason": "nobody was removed"}
