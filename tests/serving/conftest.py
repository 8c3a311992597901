"""Serving tests run against the real engine on a tiny checkpoint (CPU).

`serving_client(cfg)` starts a real in-process AsyncEngine behind the real app in aiohttp's
TestServer and yields a TestClient; nothing is faked.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from eaas import AsyncEngine, EngineConfig
from eaas.model import make_tiny
from eaas.serving import create_app
from eaas.serving.guards import server_kwargs

ADMIN_TOKEN = "test-admin-token-0123456789"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny(tmp_path_factory.mktemp("serving-tiny") / "tiny", "qwen3_moe", seed=3))


def engine_config(model_dir: str, **sections: Any) -> EngineConfig:
    """2 in-process expert servers, every expert on both (a killed one leaves a replica)."""
    data: dict[str, Any] = {"model": model_dir, "placement": {
        "num_expert_servers": 2, "expert_replicas": 2, "server_mode": "inproc"}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return EngineConfig.from_dict(data)


@contextlib.asynccontextmanager
async def serving_client(cfg: EngineConfig, *, start_engine: bool = True,
                         **app_kwargs: Any) -> AsyncIterator[TestClient]:
    engine = AsyncEngine(cfg)
    if start_engine:
        await engine.start()
    try:
        app = create_app(engine, admin_token=ADMIN_TOKEN, model_name=cfg.model_name, **app_kwargs)
        server = TestServer(app)  # cancels a handler whose client left, as serve() does
        await server.start_server(**server_kwargs(app))
        async with TestClient(server) as client:
            yield client
    finally:
        await engine.aclose()


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def sse_data(raw: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded where they are JSON."""
    out = []
    for block in raw.split("\n\n"):
        lines = [ln[len("data: "):] for ln in block.split("\n") if ln.startswith("data: ")]
        if lines:
            text = "\n".join(lines)
            out.append(text if text == "[DONE]" else json.loads(text))
    return out


def post_json(url: str, body: dict, timeout: float = 120.0) -> tuple[int, dict]:
    """POST `body` as JSON to a live server -> (status, decoded reply); HTTP errors returned."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def status_of(url: str) -> int:
    """GET `url` -> its HTTP status; 0 while nothing answers (a server still starting)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0
