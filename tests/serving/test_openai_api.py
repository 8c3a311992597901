"""OpenAI routes against a real in-process engine: outputs, streaming, stop strings,
overload, readiness, client disconnects and shutdown drains."""

from __future__ import annotations

import asyncio
import contextlib
import json

from eaas import SamplingParams
from eaas.serving import ENGINE, STATE
from tests.serving.conftest import engine_config, serving_client, sse_data

GREEDY = {"temperature": 0, "ignore_eos": True}


async def engine_tokens(engine, prompt, n: int) -> list[int]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    outs = [out async for out in engine.generate(prompt, params)]
    return outs[-1].outputs[0].token_ids


async def wait_until(cond, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


async def test_completion_matches_the_engine_and_returns_token_ids(tiny_dir):
    async with serving_client(engine_config(tiny_dir)) as client:
        engine = client.server.app[ENGINE]
        resp = await client.post("/v1/completions", json={
            "model": "tiny", "prompt": "The quick brown fox", "max_tokens": 6,
            "return_token_ids": True, **GREEDY})
        body = await resp.json()
        assert resp.status == 200, body
        choice = body["choices"][0]
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        assert choice["token_ids"] == await engine_tokens(engine, "The quick brown fox", 6)
        assert choice["prompt_token_ids"] == engine.tokenizer.encode("The quick brown fox")
        assert choice["text"] == engine.tokenizer.decode(choice["token_ids"])
        assert choice["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": len(choice["prompt_token_ids"]),
                                 "completion_tokens": 6,
                                 "total_tokens": len(choice["prompt_token_ids"]) + 6}


async def test_token_id_prompts_batch_into_choices(tiny_dir):
    async with serving_client(engine_config(tiny_dir)) as client:
        engine = client.server.app[ENGINE]
        prompts = [[5, 6, 7], [9, 10, 11, 12]]
        resp = await client.post("/v1/completions", json={
            "prompt": prompts, "max_tokens": 4, "return_token_ids": True, **GREEDY})
        body = await resp.json()
        assert resp.status == 200, body
        assert [c["index"] for c in body["choices"]] == [0, 1]
        for p, c in zip(prompts, body["choices"], strict=True):
            assert c["prompt_token_ids"] == p
            assert c["token_ids"] == await engine_tokens(engine, p, 4)


async def test_streaming_equals_non_streaming(tiny_dir):
    async with serving_client(engine_config(tiny_dir)) as client:
        for path, req in (("/v1/completions", {"prompt": "Hello, world"}),
                          ("/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "Hello"}]})):
            whole = await (await client.post(path, json={**req, "max_tokens": 8, **GREEDY})).json()
            resp = await client.post(path, json={**req, "max_tokens": 8, "stream": True,
                                                 "stream_options": {"include_usage": True},
                                                 "return_token_ids": True, **GREEDY})
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = sse_data(await resp.text())
            assert events[-1] == "[DONE]"
            chunks, usage = events[:-2], events[-2]
            assert usage["choices"] == [] and usage["usage"] == whole["usage"]
            if path == "/v1/chat/completions":
                assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
                text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
                assert text == whole["choices"][0]["message"]["content"]
            else:
                text = "".join(c["choices"][0]["text"] for c in chunks)
                assert text == whole["choices"][0]["text"]
            ids = [t for c in chunks for t in c["choices"][0].get("token_ids", [])]
            assert len(ids) == 8
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_stop_string_cuts_the_text_streaming_or_not(tiny_dir):
    async with serving_client(engine_config(tiny_dir)) as client:
        req = {"prompt": "Experts are stateless services", "max_tokens": 16, **GREEDY}
        full = (await (await client.post("/v1/completions", json=req)).json())["choices"][0]["text"]
        stop = full[5:7]
        assert len(stop) == 2, f"the tiny model's text is too short to test stop strings: {full!r}"
        expected = full[:full.find(stop)]
        body = await (await client.post("/v1/completions", json={**req, "stop": [stop]})).json()
        assert body["choices"][0]["text"] == expected
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["choices"][0]["stop_reason"] == stop
        resp = await client.post("/v1/completions", json={**req, "stop": stop, "stream": True})
        chunks = sse_data(await resp.text())[:-1]
        assert "".join(c["choices"][0]["text"] for c in chunks) == expected
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_echo_prepends_the_prompt(tiny_dir):
    async with serving_client(engine_config(tiny_dir)) as client:
        req = {"prompt": "Hello there", "max_tokens": 3, **GREEDY}
        plain = (await (await client.post("/v1/completions", json=req)).json())["choices"][0]
        echo = (await (await client.post("/v1/completions", json={**req, "echo": True})).json())
        assert echo["choices"][0]["text"] == "Hello there" + plain["text"]


async def test_overload_is_503_with_retry_after_and_others_still_complete(tiny_dir):
    cfg = engine_config(tiny_dir, scheduler={"max_num_seqs": 1, "max_waiting": 1})
    async with serving_client(cfg) as client:
        engine = client.server.app[ENGINE]
        for name in engine.server_names():
            await engine.inject_fault(name, "delay", seconds=0.05)
        req = {"prompt": [3, 4, 5], "max_tokens": 3, **GREEDY}
        resps = await asyncio.gather(*(client.post("/v1/completions", json=req) for _ in range(5)))
        statuses = sorted(r.status for r in resps)
        assert 200 in statuses and 503 in statuses, statuses
        for r in resps:
            if r.status == 503:
                assert r.headers["Retry-After"] == "1"
                assert (await r.json())["error"]["code"] == 503
        for name in engine.server_names():
            await engine.inject_fault(name, "delay", seconds=0.0)
        assert (await client.post("/v1/completions", json=req)).status == 200


async def test_not_ready_engine_answers_503_and_reads_still_work(tiny_dir):
    async with serving_client(engine_config(tiny_dir), start_engine=False) as client:
        assert (await client.get("/ready")).status == 503
        resp = await client.post("/v1/completions", json={"prompt": "hi"})
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        assert (await client.get("/health")).status == 503
        assert (await client.get("/metrics")).status == 200
        assert (await client.get("/admin/api/topology")).status == 200
        assert (await client.get("/v1/models")).status == 200


async def test_ready_is_503_naming_experts_without_a_live_replica(tiny_dir):
    """One copy of every expert; the server holding some of them dies past its restart
    intensity (no replacement within the test): /ready and /health say which experts."""
    cfg = engine_config(tiny_dir, fault={"max_restarts": 0, "replace_after_s": 600.0})
    cfg = cfg.replace(placement=cfg.placement.__class__(
        num_expert_servers=2, expert_replicas=1, server_mode="inproc"))
    async with serving_client(cfg) as client:
        assert (await client.get("/ready")).status == 200
        engine = client.server.app[ENGINE]
        await engine.inject_fault("expert-0", "kill")
        for _ in range(200):
            resp = await client.get("/ready")
            if resp.status == 503:
                break
            await asyncio.sleep(0.02)
        body = await resp.json()
        assert resp.status == 503 and "have no live replica" in body["reason"], body
        assert body["reasons"] and all(r.startswith("layer ") for r in body["reasons"])
        health = await client.get("/health")
        assert health.status == 503 and (await health.json())["no_live_replica"]


async def test_client_disconnect_aborts_the_engine_request(tiny_dir):
    async with serving_client(engine_config(tiny_dir)) as client:
        engine, state = client.server.app[ENGINE], client.server.app[STATE]
        for name in engine.server_names():
            await engine.inject_fault(name, "delay", seconds=0.05)
        resp = await client.post("/v1/completions", json={
            "prompt": [1, 2, 3], "max_tokens": 200, "stream": True, **GREEDY})
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")  # the first chunk: the request is running
        assert len(state.inflight) == 1
        resp.close()  # the client goes away
        await wait_until(lambda: len(state.inflight) == 0 and engine.snapshot()["num_running"] == 0)
        metrics = await (await client.get("/metrics")).text()
        aborted = 'eaas_request_success_total{finished_reason="abort",model_name="tiny"} 1.0'
        assert aborted in metrics
        # a non-streaming client that gives up: the handler is cancelled, the request aborted
        post = asyncio.ensure_future(client.post("/v1/completions", json={
            "prompt": [1, 2, 3], "max_tokens": 200, **GREEDY}))
        await wait_until(lambda: len(state.inflight) == 1)
        post.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await post
        await wait_until(lambda: len(state.inflight) == 0 and engine.snapshot()["num_running"] == 0)


async def test_shutdown_aborts_in_flight_requests_with_a_reason(tiny_dir):
    async with serving_client(engine_config(tiny_dir), drain_grace_s=0.1) as client:
        engine, state = client.server.app[ENGINE], client.server.app[STATE]
        for name in engine.server_names():
            await engine.inject_fault(name, "delay", seconds=0.05)
        req = {"prompt": [1, 2, 3], "max_tokens": 300, **GREEDY}
        plain = asyncio.ensure_future(client.post("/v1/completions", json=req))
        streamed = await client.post("/v1/completions", json={**req, "stream": True})
        await streamed.content.readuntil(b"\n\n")
        await wait_until(lambda: len(state.inflight) == 2)
        await client.server.close()  # stop accepting, drain 0.1 s, abort the rest
        resp = await plain
        assert resp.status == 503
        assert "server shutting down" in (await resp.json())["error"]["message"]
        events = sse_data(await streamed.text())
        assert events[-1] == "[DONE]"
        assert "server shutting down" in events[-2]["error"]["message"]
        assert events[-3]["choices"][0]["finish_reason"] == "abort"
        assert state.draining and len(state.inflight) == 0


async def test_health_probes_every_actor_and_a_hung_one_fails_it(tiny_dir):
    async with serving_client(engine_config(tiny_dir), health_timeout_s=0.3) as client:
        engine = client.server.app[ENGINE]
        resp = await client.get("/health")
        report = await resp.json()
        assert resp.status == 200 and report["healthy"] is True
        assert {"expert-0", "expert-1", "shard-0"} <= set(report["actors"])
        await engine.inject_fault("expert-0", "hang", seconds=1.0)
        resp = await client.get("/health")
        report = json.loads(await resp.text())
        assert resp.status == 503 and report["healthy"] is False
        assert report["actors"]["expert-0"]["ok"] is False
        assert report["actors"]["expert-1"]["ok"] is True
