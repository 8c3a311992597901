"""`serve()` in-process: prints the URLs and a generated admin token that works, writes the
ready file, and stops cleanly on SIGINT (the ready file is removed)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal

import aiohttp

from eaas.serving import serve
from tests.serving.conftest import engine_config


async def test_serve_generates_a_token_and_stops_on_sigint(tiny_dir, tmp_path, capsys,
                                                           monkeypatch):
    monkeypatch.delenv("EAAS_ADMIN_TOKEN", raising=False)
    ready = tmp_path / "ready.json"
    task = asyncio.ensure_future(serve(engine_config(tiny_dir), port=0, ready_file=str(ready)))
    async with asyncio.timeout(60):
        while not ready.exists():
            assert not task.done(), task.exception()
            await asyncio.sleep(0.05)
    url = json.loads(ready.read_text())["url"]
    out = capsys.readouterr().out
    for path in ("/v1", "/admin", "/metrics"):
        assert f"{url}{path}" in out
    token = re.search(r"admin token (\S+)", out).group(1)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/admin/api/rebalance",
                             headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200, await r.text()
        async with http.post(f"{url}/admin/api/rebalance",
                             headers={"Authorization": f"Bearer {token}x"}) as r:
            assert r.status == 401
        async with http.get(f"{url}/ready") as r:
            assert r.status == 200
    os.kill(os.getpid(), signal.SIGINT)  # serve() handles it: drain, stop the engine, return
    await asyncio.wait_for(task, 30)
    assert "eaas: stopped" in capsys.readouterr().out
    assert not ready.exists()
