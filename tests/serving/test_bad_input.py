"""Bad input never hurts the server: every case gets its 4xx with an OpenAI-style error body,
and the server keeps serving (a good request after all of them works)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from eaas.serving import STATE
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
    says: str | None = None  # a piece of text the error message must contain


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
    Case("utf-16 body", 400, '{"prompt": "hi"}'.encode("utf-16"), says="not valid UTF-8"),
    Case("raw surrogate bytes", 400, b'{"prompt": "a\xed\xa0\x80b"}', says="not valid UTF-8"),
    Case("NaN literal", 400, b'{"prompt": "hi", "temperature": NaN}', says="NaN is not a JSON"),
    Case("Infinity in an ignored field", 400, b'{"prompt": "hi", "x": -Infinity}',
         says="-Infinity is not a JSON"),
    Case("5000-digit integer", 400, b'{"prompt": "hi", "seed": 1' + b"0" * 5000 + b"}",
         says="more than 4300 digits"),
    Case("deeply nested arrays", 400, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
         says="not valid JSON"),
    # --- text that is not Unicode (a lone surrogate escape is legal JSON)
    Case("lone surrogate in prompt", 400, b'{"prompt": "a\\ud800b"}', param="prompt",
         says="prompt contains a lone surrogate (U+D800) at index 1"),
    Case("lone surrogate in batch prompt", 400, b'{"prompt": ["ok", "\\udfff"]}',
         param="prompt", says="prompt[1] contains a lone surrogate (U+DFFF) at index 0"),
    Case("lone surrogate in chat content", 400,
         b'{"messages": [{"role": "user", "content": "hi \\udc00"}]}', "/v1/chat/completions",
         param="messages",
         says="messages[0].content contains a lone surrogate (U+DC00) at index 3"),
    Case("lone surrogate in chat text part", 400,
         b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
         "/v1/chat/completions", param="messages", says="messages[0].content[0].text contains"),
    Case("lone surrogate in stop", 400, b'{"prompt": "hi", "stop": ["\\ud800"]}', param="stop",
         says="stop[0] contains a lone surrogate"),
    Case("lone surrogate in a field name", 400, b'{"prompt": "hi", "\\ud800": 1}',
         says="a field name contains a lone surrogate"),
    # --- content type (a text/plain or form POST is a cross-site "simple request")
    Case("text/plain body", 415, b'{"prompt": "hi"}', headers={"Content-Type": "text/plain"},
         says="Content-Type must be application/json"),
    Case("form body", 415, b"prompt=hi", "/v1/chat/completions",
         headers={"Content-Type": "application/x-www-form-urlencoded"}),
    Case("octet-stream body", 415, b'{"prompt": "hi"}',
         headers={"Content-Type": "application/octet-stream"}),
    Case("json in latin-1", 415, b'{"prompt": "hi"}',
         headers={"Content-Type": "application/json; charset=latin-1"}),
    # --- prompt
    Case("prompt missing", 400, without(cmpl(), "prompt"), param="prompt"),
    Case("prompt is a number", 400, cmpl(prompt=5), param="prompt"),
    Case("prompt empty string", 400, cmpl(prompt=""), param="prompt"),
    Case("prompt empty list", 400, cmpl(prompt=[]), param="prompt"),
    Case("prompt token id beyond vocab", 400, cmpl(prompt=[1, 10**9]), param="prompt"),
    Case("prompt negative token id", 400, cmpl(prompt=[-1]), param="prompt"),
    Case("prompt mixed list", 400, cmpl(prompt=[1, "a"]), param="prompt", says="prompt[1]"),
    Case("prompt float token id", 400, cmpl(prompt=[1, 2.5]), param="prompt",
         says="prompt[1] is not a token id: token ids are integers with 0 <= id < "),
    Case("prompt batch float token id", 400, cmpl(prompt=[[1, 2], [3, 4.5]]), param="prompt",
         says="prompt[1][1] is not a token id"),
    Case("prompt batch with a number", 400, cmpl(prompt=["a", 7]), param="prompt",
         says="prompt[1] must be a non-empty string"),
    Case("prompt nested too deep", 400, cmpl(prompt=[[[1]]]), param="prompt", says="prompt[0]"),
    Case("prompt huge token id", 400, cmpl(prompt=[1, 10**30]), param="prompt",
         says="prompt[1] is not a token id"),
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
    Case("max_tokens 10**30", 400, cmpl(max_tokens=10**30), param="max_tokens"),
    # --- sampling
    Case("temperature negative", 400, cmpl(temperature=-0.1), param="temperature"),
    Case("temperature string", 400, cmpl(temperature="hot"), param="temperature"),
    Case("top_p zero", 400, cmpl(top_p=0), param="top_p"),
    Case("top_p above one", 400, cmpl(top_p=1.5), param="top_p"),
    Case("top_k below -1", 400, cmpl(top_k=-2), param="top_k"),
    Case("top_k float", 400, cmpl(top_k=1.5), param="top_k"),
    Case("seed string", 400, cmpl(seed="abc"), param="seed"),
    Case("seed beyond int64", 400, cmpl(seed=2**70), param="seed"),
    Case("seed 10**30", 400, cmpl(seed=10**30), param="seed"),
    Case("temperature beyond float", 400, cmpl(temperature=10**400), param="temperature"),
    Case("top_p beyond float", 400, cmpl(top_p=10**400), param="top_p"),
    Case("penalty beyond float", 400, cmpl(frequency_penalty=-(10**400)),
         param="frequency_penalty"),
    Case("stop not a string", 400, cmpl(stop=123), param="stop"),
    Case("stop empty string", 400, cmpl(stop=["ok", ""]), param="stop",
         says="stop[1] must be a non-empty string"),
    Case("stop list with a number", 400, cmpl(stop=["ok", 5]), param="stop", says="stop[1]"),
    Case("stop too many", 400, cmpl(stop=["x"] * 17), param="stop"),
    Case("stop_token_ids negative", 400, cmpl(stop_token_ids=[-1]), param="stop_token_ids"),
    Case("stop_token_ids float", 400, cmpl(stop_token_ids=[2, 3.5]), param="stop_token_ids",
         says="stop_token_ids[1]"),
    Case("stop_token_ids huge", 400, cmpl(stop_token_ids=[10**30]), param="stop_token_ids"),
    Case("stop_token_ids not a list", 400, cmpl(stop_token_ids=3), param="stop_token_ids"),
    Case("stream_options include_usage not bool", 400,
         cmpl(stream=True, stream_options={"include_usage": "yes"}), param="stream_options"),
    Case("stream not bool", 400, cmpl(stream="yes"), param="stream"),
    Case("stream_options without stream", 400, cmpl(stream_options={"include_usage": True}),
         param="stream_options"),
    # --- sampling features: out-of-range values name their field
    Case("n zero", 400, cmpl(n=0), param="n"),
    Case("n above max_num_seqs", 400, cmpl(n=100), says="max_num_seqs"),
    Case("best_of below n", 400, cmpl(n=3, best_of=2), param="best_of"),
    Case("best_of streamed", 400, cmpl(n=1, best_of=2, stream=True), param="best_of"),
    Case("logprobs above 20", 400, cmpl(logprobs=21), param="logprobs"),
    Case("logprobs negative", 400, cmpl(logprobs=-1), param="logprobs"),
    Case("suffix", 400, cmpl(suffix="x"), param="suffix"),
    Case("presence_penalty above 2", 400, cmpl(presence_penalty=2.5), param="presence_penalty"),
    Case("repetition_penalty zero", 400, cmpl(repetition_penalty=0), param="repetition_penalty"),
    Case("min_p above one", 400, cmpl(min_p=1.5), param="min_p"),
    Case("min_tokens above max_tokens", 400, cmpl(min_tokens=9), param="min_tokens"),
    Case("logit_bias key not a token", 400, cmpl(logit_bias={"x": 5}), param="logit_bias"),
    Case("logit_bias token beyond vocab", 400, cmpl(logit_bias={"99999": 5}),
         param="logit_bias"),
    Case("logit_bias value beyond 100", 400, cmpl(logit_bias={"1": 101}), param="logit_bias"),
    Case("response_format unknown type", 400, cmpl(response_format={"type": "yaml"}),
         param="response_format"),
    Case("json_schema without schema", 400, cmpl(response_format={"type": "json_schema"}),
         param="response_format"),
    Case("regex that does not compile", 400, cmpl(structured_outputs={"regex": "(a"}),
         says="regex"),
    Case("two structured-output fields", 400, cmpl(guided_regex="a+",
                                                   response_format={"type": "json_object"}),
         param="guided_regex"),
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
    Case("chat user content null", 400, chat(messages=[{"role": "user", "content": None}]),
         "/v1/chat/completions", param="messages", says="messages[0].content"),
    Case("chat message not an object", 400, chat(messages=[MSG[0], "hi"]),
         "/v1/chat/completions", param="messages", says="messages[1]"),
    Case("chat bad second part", 400, chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": 5}]}]),
         "/v1/chat/completions", param="messages", says="messages[0].content[1]"),
    Case("chat image part", 400, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
         "/v1/chat/completions", param="messages"),
    Case("chat tools not a list", 400, chat(tools={"type": "function"}),
         "/v1/chat/completions", param="tools"),
    Case("chat tool without a name", 400, chat(tools=[{"type": "function", "function": {}}]),
         "/v1/chat/completions", param="tools"),
    Case("chat tool_choice unknown function", 400, chat(
        tools=[{"type": "function", "function": {"name": "f"}}],
        tool_choice={"type": "function", "function": {"name": "g"}}),
         "/v1/chat/completions", param="tool_choice"),
    Case("chat tool_choice without tools", 400, chat(tool_choice="required"),
         "/v1/chat/completions", param="tool_choice"),
    Case("chat max_completion_tokens zero", 400, chat(max_completion_tokens=0),
         "/v1/chat/completions", param="max_completion_tokens"),
    Case("chat response_format not an object", 400, chat(response_format="json"),
         "/v1/chat/completions", param="response_format"),
    Case("chat top_logprobs without logprobs", 400, chat(top_logprobs=3),
         "/v1/chat/completions", param="top_logprobs"),
    Case("chat logprobs not bool", 400, chat(logprobs=3), "/v1/chat/completions",
         param="logprobs"),
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
        kwargs["headers"].setdefault("Content-Type", "application/json")
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
    if case.says is not None:
        assert case.says in err["message"], err
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


# Odd input that is valid: served (200), never a 4xx or a 500.
ODD_BUT_VALID = [
    ("surrogate pair escape", b'{"prompt": "smile \\ud83d\\ude00", "max_tokens": 2}', {}),
    ("NUL character", b'{"prompt": "a\\u0000b", "max_tokens": 2}', {}),
    ("json with charset", b'{"prompt": "hi", "max_tokens": 2}',
     {"Content-Type": "application/json; charset=utf-8"}),
    ("json content type in capitals", b'{"prompt": "hi", "max_tokens": 2}',
     {"Content-Type": "Application/JSON; charset=UTF-8"}),
    ("top_k beyond the vocabulary", b'{"prompt": "hi", "max_tokens": 2, "top_k": 1'
     + b"0" * 30 + b"}", {}),
    ("unknown fields", b'{"prompt": "hi", "max_tokens": 2, "user": "u", "extra": [1, {}]}', {}),
]


@pytest.mark.parametrize("body,headers", [c[1:] for c in ODD_BUT_VALID],
                         ids=[c[0] for c in ODD_BUT_VALID])
async def test_odd_but_valid_input_is_served(client, body: bytes, headers: dict):
    resp = await client.post("/v1/completions", data=body,
                             headers=headers or {"Content-Type": "application/json"})
    assert resp.status == 200, await resp.text()
    assert len((await resp.json())["choices"][0]["text"]) >= 0


# Last-Event-ID is resent by EventSource on every reconnect: an id this server cannot have
# sent is ignored (the history is replayed from its start), never a 500 or a 400 the browser
# would retry forever.
BAD_EVENT_IDS = {"5000 digits": "9" * 5000, "not a number": "abc", "negative": "-5",
                 "unicode digit": "\u00b2", "ahead of the newest event": "123456789",
                 "empty": ""}


@pytest.mark.parametrize("last_id", list(BAD_EVENT_IDS.values()), ids=list(BAD_EVENT_IDS))
async def test_bad_last_event_id_replays_the_history(client, last_id: str):
    resp = await client.get("/admin/api/events", headers={"Last-Event-ID": last_id})
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    async with asyncio.timeout(10):
        while True:
            block = (await resp.content.readuntil(b"\n\n")).decode()
            if block.startswith("id: "):
                break
    resp.close()
    first = client.server.app[STATE].events.history()[0]["id"]
    assert block.startswith(f"id: {first}\n"), block  # the oldest event the server holds
