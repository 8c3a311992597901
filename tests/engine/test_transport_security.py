"""The engine with its server processes behind TLS + the cluster secret, compute batches split
to transport.max_rows (1 row), fault injection off: tokens equal the reference; while local peers
without the secret knock on a server's port and an unauthorised `delay` is asked for, every
refusal is counted and the engine keeps serving the same tokens."""

from __future__ import annotations

import os
import shutil

import pytest

from eaas import AsyncEngine, EngineConfig, SamplingParams
from eaas.errors import RemoteError, TransportError
from eaas.transport import RpcClient, TransportSecurity, connect
from eaas.transport.auth import SECRET_ENV, SETTINGS_ENV

from ..transport.raw_peer import closed_by_peer, raw_open, self_signed
from .conftest import final

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")]


async def test_engine_over_tls_keeps_serving_through_refused_peers(
        tiny_dirs, reference_greedy, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)  # the engine makes one; restored afterwards
    monkeypatch.delenv(SETTINGS_ENV, raising=False)
    tls = self_signed(tmp_path, "eaas-cluster")
    model = tiny_dirs["qwen3_moe"]
    cfg = EngineConfig.from_dict({
        "model": model, "placement": {"num_expert_servers": 2, "expert_replicas": 1},
        "fault": {"warm_spares": 0},
        "transport": {"tls_cert": tls.cert, "tls_key": tls.key, "max_rows": 1,
                      "fault_injection": False}})
    prompt, params = [5, 17, 42, 7], SamplingParams(max_tokens=6, temperature=0)
    want = reference_greedy(model, prompt, 6)
    async with AsyncEngine(cfg) as engine:
        assert (await final(engine, prompt, params)).outputs[0].token_ids == want
        server = engine.snapshot()["servers"][0]
        url = server["transport"]
        assert url.startswith("tcp://127.0.0.1:")  # transport.listen_host, no wildcard
        with pytest.raises(TransportError):  # a local process without certificate or secret
            async with RpcClient(await connect(url)) as plain:
                await plain.call({"op": "unload", "experts": {"0": [0]}}, timeout=5)
        reader, writer = await raw_open(url)
        writer.write(os.urandom(2048))
        assert await closed_by_peer(reader)
        writer.close()
        with pytest.raises(RemoteError, match="fault-injection"):
            await engine.inject_fault(server["name"], "delay", seconds=1e9)
        assert (await final(engine, prompt, params)).outputs[0].token_ids == want
        async with RpcClient(await connect(url, security=TransportSecurity.from_env())) as c:
            stats = await c.call({"op": "stats"}, timeout=10)
        assert stats["security"]["refused_by"]["tls"] == 2
        assert stats["security"]["refused_requests"] == 1
        assert stats["calls"] == stats["rows"]  # every batch was split into 1-row calls
        assert all(s["state"] == "alive" for s in engine.snapshot()["servers"])
