"""Bad input never hurts the server: every case gets its 4xx with an OpenAI-style error body,
and the server keeps serving (a good request after all of them works)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.conftest import admin_headers, engine_config, serving_client

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_MODEL_LEN = 512  # the tiny checkpoint's max_position_embeddings (asserted below)
AUTH = admin_headers()
MSG = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    body: Any = None  # dict -> JSON; bytes -> sent raw
    path: str = "/v1/completions"
    method: str = "POST"
    param: str | None = None  # the field the error must name
    headers: dict = field(default_factory=dict)


def cmpl(**kw: Any) -> dict:
    return {"model": "tiny", "prompt": "hello", "max_tokens": 4, **kw}


def chat(**kw: Any) -> dict:
    return {"model": "tiny", "messages": MSG, "max_tokens": 4, **kw}


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


CASES = [
    # --- body framing
    Case("malformed json", 400, b'{"prompt": '),
    Case("json array body", 400, b"[1, 2]"),
    Case("empty body", 400, b""),
    Case("invalid utf-8", 400, b'{"prompt": "\xff\xfe"}'),
    Case("json null body", 400, b"null"),
    # --- prompt
    Case("prompt missing", 400, without(cmpl(), "prompt"), param="prompt"),
    Case("prompt is a number", 400, cmpl(prompt=5), param="prompt"),
    Case("prompt empty string", 400, cmpl(prompt=""), param="prompt"),
    Case("prompt empty list", 400, cmpl(prompt=[]), param="prompt"),
    Case("prompt token id beyond vocab", 400, cmpl(prompt=[1, 10**9]), param="prompt"),
    Case("prompt negative token id", 400, cmpl(prompt=[-1]), param="prompt"),
    Case("prompt mixed list", 400, cmpl(prompt=[1, "a"]), param="prompt"),
    Case("prompt list with empty list", 400, cmpl(prompt=[[]]), param="prompt"),
    Case("prompt bool ids", 400, cmpl(prompt=[True, False]), param="prompt"),
    Case("prompt too many ids", 400, cmpl(prompt=[5] * (MAX_MODEL_LEN + 10)), param="prompt"),
    Case("prompt too long text", 400, cmpl(prompt="hello world " * 2000), param="prompt"),
    Case("too many prompts", 400, cmpl(prompt=["a"] * 65), param="prompt"),
    # --- max_tokens
    Case("max_tokens zero", 400, cmpl(max_tokens=0), param="max_tokens"),
    Case("max_tokens negative", 400, cmpl(max_tokens=-5), param="max_tokens"),
    Case("max_tokens string", 400, cmpl(max_tokens="10"), param="max_tokens"),
    Case("max_tokens float", 400, cmpl(max_tokens=1.5), param="max_tokens"),
    Case("max_tokens bool", 400, cmpl(max_tokens=True), param="max_tokens"),
    Case("max_tokens beyond context", 400, cmpl(max_tokens=MAX_MODEL_LEN), param="max_tokens"),
    Case("max_tokens huge", 400, cmpl(max_tokens=10**12), param="max_tokens"),
    # --- sampling
    Case("temperature negative", 400, cmpl(temperature=-0.1), param="temperature"),
    Case("temperature string", 400, cmpl(temperature="hot"), param="temperature"),
    Case("top_p zero", 400, cmpl(top_p=0), param="top_p"),
    Case("top_p above one", 400, cmpl(top_p=1.5), param="top_p"),
    Case("top_k below -1", 400, cmpl(top_k=-2), param="top_k"),
    Case("top_k float", 400, cmpl(top_k=1.5), param="top_k"),
    Case("seed string", 400, cmpl(seed="abc"), param="seed"),
    Case("seed beyond int64", 400, cmpl(seed=2**70), param="seed"),
    Case("stop not a string", 400, cmpl(stop=123), param="stop"),
    Case("stop empty string", 400, cmpl(stop=[""]), param="stop"),
    Case("stop_token_ids negative", 400, cmpl(stop_token_ids=[-1]), param="stop_token_ids"),
    Case("stream not bool", 400, cmpl(stream="yes"), param="stream"),
    Case("stream_options without stream", 400, cmpl(stream_options={"include_usage": True}),
         param="stream_options"),
    # --- unsupported features (refused where eaas cannot honour them)
    Case("n above one", 400, cmpl(n=2), param="n"),
    Case("best_of above one", 400, cmpl(best_of=3), param="best_of"),
    Case("logprobs", 400, cmpl(logprobs=5), param="logprobs"),
    Case("suffix", 400, cmpl(suffix="x"), param="suffix"),
    Case("presence_penalty", 400, cmpl(presence_penalty=0.5), param="presence_penalty"),
    Case("logit_bias", 400, cmpl(logit_bias={"1": 5}), param="logit_bias"),
    # --- model
    Case("unknown model", 404, cmpl(model="gpt-9"), param="model"),
    Case("model not a string", 400, cmpl(model=123), param="model"),
    # --- chat
    Case("chat messages missing", 400, without(chat(), "messages"), "/v1/chat/completions",
         param="messages"),
    Case("chat messages empty", 400, chat(messages=[]), "/v1/chat/completions", param="messages"),
    Case("chat messages not a list", 400, chat(messages="hi"), "/v1/chat/completions",
         param="messages"),
    Case("chat bad role", 400, chat(messages=[{"role": "robot", "content": "x"}]),
         "/v1/chat/completions", param="messages"),
    Case("chat content number", 400, chat(messages=[{"role": "user", "content": 7}]),
         "/v1/chat/completions", param="messages"),
    Case("chat image part", 400, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
         "/v1/chat/completions", param="messages"),
    Case("chat tools", 400, chat(tools=[{"type": "function", "function": {"name": "f"}}]),
         "/v1/chat/completions", param="tools"),
    Case("chat max_completion_tokens zero", 400, chat(max_completion_tokens=0),
         "/v1/chat/completions", param="max_completion_tokens"),
    Case("chat response_format json", 400, chat(response_format={"type": "json_object"}),
         "/v1/chat/completions", param="response_format"),
    Case("chat n=3", 400, chat(n=3), "/v1/chat/completions", param="n"),
    Case("chat logprobs", 400, chat(logprobs=True), "/v1/chat/completions", param="logprobs"),
    Case("chat unknown model", 404, chat(model="nope"), "/v1/chat/completions", param="model"),
    # --- routes, methods, sizes
    Case("unknown route", 404, None, "/v1/nothing", "GET"),
    Case("wrong method on completions", 405, None, "/v1/completions", "GET"),
    Case("wrong method on models", 405, None, "/v1/models", "DELETE"),
    Case("oversized body", 413, cmpl(prompt="x" * (2 << 20))),
    # --- admin
    Case("admin action without token", 401, None, "/admin/api/rebalance"),
    Case("admin action wrong token", 401, None, "/admin/api/servers/expert-0/kill",
         headers={"Authorization": "Bearer wrong-token"}),
    Case("admin action basic auth", 401, None, "/admin/api/servers",
         headers={"Authorization": "Basic dXNlcjpwYXNz"}),
    Case("replicate negative layer", 400, {"layer": -1, "expert": 0},
         "/admin/api/experts/replicate", headers=AUTH, param="layer"),
    Case("replicate malformed json", 400, b"{layer", "/admin/api/experts/replicate", headers=AUTH),
    Case("kill unknown server", 404, None, "/admin/api/servers/no-such-server/kill", headers=AUTH,
         param="name"),
]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(tiny_dir):
    async with serving_client(engine_config(tiny_dir)) as c:
        yield c


async def test_table_is_big_enough():
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_bad_input_gets_its_4xx(client, case: Case):
    kwargs: dict[str, Any] = {"headers": dict(case.headers)}
    if isinstance(case.body, bytes):
        kwargs["data"] = case.body
        kwargs["headers"]["Content-Type"] = "application/json"
    elif case.body is not None:
        kwargs["json"] = case.body
    resp = await client.request(case.method, case.path, **kwargs)
    text = await resp.text()
    assert resp.status == case.status, text
    assert resp.content_type == "application/json"
    err = json.loads(text)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == case.status and err["type"].endswith("Error") and err["message"]
    if case.param is not None:
        assert err["param"] == case.param, err
    if case.status == 401:
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    if case.status == 405:
        assert "Allow" in resp.headers


async def test_server_still_serves_after_the_bad_inputs(client):
    assert (await client.get("/v1/models")).status == 200
    models = await (await client.get("/v1/models")).json()
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    resp = await client.post("/v1/completions", json=cmpl(max_tokens=3, temperature=0))
    body = await resp.json()
    assert resp.status == 200, body
    assert body["usage"]["completion_tokens"] == 3
    assert (await client.get("/health")).status == 200
    metrics = await (await client.get("/metrics")).text()
    refused = sum(s.value for fam in text_string_to_metric_families(metrics)
                  if fam.name == "eaas_http_requests" for s in fam.samples
                  if s.name.endswith("_total") and s.labels["status"].startswith("4"))
    assert refused >= len(CASES)
