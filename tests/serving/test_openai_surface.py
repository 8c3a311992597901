"""The official `openai` client against one live `eaas serve` (an API key set): n, best_of,
logprobs (equal to the reference model's log_softmax), penalties, min_p, logit_bias, stop
strings, JSON-schema output for 20 seeds, json_object, a tool call round trip, the API key,
tokenizer routes, the access log, /metrics without `_created`, streams without empty chunks.

The server runs its expert servers in-process (`--server-mode inproc`) to keep the module
fast; the multi-process path is what test_live_server.py covers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest
import torch

from eaas import SamplingParams
from eaas.model import Checkpoint, DecoderModel
from tests.engine.test_sampling_features import _ref_processed_greedy

TOKEN = "surface-admin-token-0123456789"
KEY = "surface-api-key-9876543210"
PROMPT = "Experts are stateless services"
QUICK = "The quick brown"  # its greedy text starts with plain characters (stop strings)
MESSAGES = [{"role": "user", "content": "Hello!"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, data: dict | None = None, headers: dict | None = None,
          method: str | None = None) -> tuple[int, dict | str]:
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read().decode(), e.code
    except OSError:
        return 0, ""
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


@pytest.fixture(scope="module")
def live(tiny_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("surface") / "serve.log"
    eaas_bin = Path(sys.executable).parent / "eaas"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(eaas_bin), "serve", tiny_dir, "--port", str(port),
                                 "--server-mode", "inproc", "--num-expert-servers", "2"],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "EAAS_ADMIN_TOKEN": TOKEN,
                                     "EAAS_API_KEY": KEY})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while _http(url + "/ready")[0] != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"eaas serve did not become ready:\n{log.read_text()}")
        time.sleep(0.1)
    yield url, log
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def ref(tiny_dir):
    return DecoderModel.load(Checkpoint.open(tiny_dir), torch.float32, batch_invariant=True)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Checkpoint.open(tiny_dir).tokenizer


def _client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _lsm(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(ref.forward(torch.tensor(ids), ref.new_cache(len(ids) + 1))
                                 .double(), dim=-1)


# ---- API key ----------------------------------------------------------------------------------
def test_v1_needs_the_api_key_and_the_admin_token_is_not_one(live):
    url, _ = live
    for key in (None, "wrong-key-000000", TOKEN):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        status, body = _http(url + "/v1/models", headers=headers)
        assert status == 401 and body["error"]["type"] == "AuthenticationError", key
    with pytest.raises(openai.AuthenticationError):
        _client(url, "wrong-key-000000").models.list()
    assert [m.id for m in _client(url).models.list().data] == ["tiny"]
    # the API key does not open the admin's mutating routes
    status, _ = _http(url + "/admin/api/rebalance", {}, {"Authorization": f"Bearer {KEY}"})
    assert status == 401
    assert _http(url + "/health")[0] == 200  # ops routes stay open


# ---- n, best_of, logprobs -------------------------------------------------------------------
def test_completion_logprobs_equal_reference_log_softmax(live, ref, tok):
    url, _ = live
    r = _client(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=6,
                                        temperature=0, logprobs=3,
                                        extra_body={"ignore_eos": True, "return_token_ids": True})
    c = r.choices[0]
    ids = c.model_extra["token_ids"]
    lsm = _lsm(ref, tok.encode(PROMPT) + ids[:-1])
    p0 = len(tok.encode(PROMPT)) - 1
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for k, t in enumerate(ids):
        assert abs(lp.token_logprobs[k] - float(lsm[p0 + k, t])) < 1e-4
        # {token text: logprob}, the sampled token first then the top 3 (two ids with one
        # text share a key, in the OpenAI shape as in vLLM's)
        want = {}
        for j in [t, *lsm[p0 + k].argsort(descending=True)[:3].tolist()]:
            want[tok.decode([j], skip_special_tokens=False)] = float(lsm[p0 + k, j])
        got = lp.top_logprobs[k]
        assert got.keys() == want.keys()
        assert max(abs(got[key] - want[key]) for key in want) < 1e-4
    assert lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_equal_reference_and_stream_alike(live, ref, tok):
    url, _ = live
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True,
              top_logprobs=2, extra_body={"ignore_eos": True, "return_token_ids": True})
    r = _client(url).chat.completions.create(**kw)
    ids = r.choices[0].model_extra["token_ids"]
    prompt = tok.encode(tok.apply_chat_template(MESSAGES))
    lsm = _lsm(ref, prompt + ids[:-1])
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for k, (t, item) in enumerate(zip(ids, content)):
        assert abs(item.logprob - float(lsm[len(prompt) - 1 + k, t])) < 1e-4
        assert len(item.top_logprobs) == 2 and item.bytes == list(item.token.encode())
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
    chunks = list(_client(url).chat.completions.create(stream=True, **kw))
    streamed = [i for c in chunks if c.choices and c.choices[0].logprobs
                for i in c.choices[0].logprobs.content]
    assert [i.logprob for i in streamed] == [i.logprob for i in content]
    for c in chunks[1:]:  # after the role chunk: every chunk carries something
        ch = c.choices[0]
        assert ch.delta.content or ch.finish_reason or ch.logprobs or \
            ch.model_extra.get("token_ids"), c


def test_n_choices_and_best_of(live, tok):
    url, _ = live
    client = _client(url)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, n=3, seed=7,
                                  temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) == 3
    assert r.usage.completion_tokens == 15
    assert r.usage.prompt_tokens == len(tok.encode(PROMPT))  # counted once, not per choice
    one = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, seed=7,
                                    temperature=1.0, extra_body={"ignore_eos": True})
    assert one.choices[0].text == r.choices[0].text  # choice 0 is the n=1 sequence
    best = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, n=2, best_of=4,
                                     seed=7, temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.index for c in best.choices] == [0, 1]
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, n=2,
                                          seed=1, temperature=1.0, stream=True,
                                          extra_body={"ignore_eos": True})
    texts: dict[int, str] = {}
    for c in chat:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
    assert sorted(texts) == [0, 1]


def test_penalties_and_logit_bias_equal_the_reference_decode(live, ref, tok):
    url, _ = live
    kw = dict(presence_penalty=1.5, frequency_penalty=0.7)
    extra = {"repetition_penalty": 1.7, "min_p": 0.2, "ignore_eos": True,
             "return_token_ids": True}
    r = _client(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=6,
                                        temperature=0, logit_bias={"9": 2.5, "64": -3},
                                        extra_body=extra, **kw)
    want = _ref_processed_greedy(ref, tok.encode(PROMPT), 6, SamplingParams(
        repetition_penalty=1.7, logit_bias={9: 2.5, 64: -3.0}, **kw))
    assert r.choices[0].model_extra["token_ids"] == want


def test_stop_strings_and_min_tokens(live):
    url, _ = live
    client = _client(url)
    extra = {"ignore_eos": True}
    full = client.completions.create(model="tiny", prompt=QUICK, max_tokens=10,
                                    temperature=0,
                                     extra_body=extra).choices[0].text
    at = next(i for i in range(1, len(full) - 1) if full.find(full[i]) == i
              and "\ufffd" not in full[:i + 1])
    stop = full[at]
    cut = client.completions.create(model="tiny", prompt=QUICK, max_tokens=10,
                                    temperature=0,
                                    stop=[stop], extra_body=extra).choices[0]
    assert cut.text == full[:at] and cut.finish_reason == "stop"
    assert cut.model_extra["stop_reason"] == stop
    kept = client.completions.create(model="tiny", prompt=QUICK, max_tokens=10,
                                    temperature=0,
                                     stop=[stop], stream=True,
                                     extra_body={**extra, "include_stop_str_in_output": True})
    assert "".join(c.choices[0].text for c in kept) == full[:at + 1]
    eos_first = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6,
                                          temperature=0, logit_bias={"0": 100},
                                          extra_body={"min_tokens": 2})
    c = eos_first.choices[0]
    assert c.finish_reason == "stop" and c.model_extra["stop_reason"] is None  # eos: null
    assert eos_first.usage.completion_tokens == 3


# ---- structured output and tools ----------------------------------------------------------
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
    "ok": {"type": "boolean"},
    "size": {"enum": ["s", "m", "l"]}},
    "required": ["name", "ok", "size"], "additionalProperties": False}


def test_json_schema_output_validates_for_20_seeds(live):
    url, _ = live
    client = _client(url)

    def one(seed: int) -> tuple[str, str]:
        r = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=60, temperature=1.0, seed=seed,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "thing", "schema": SCHEMA}})
        return r.choices[0].message.content, r.choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(20)))
    for text, finish in results:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({t for t, _ in results}) > 1  # the seeds differ; the grammar holds for each


def test_json_object_and_regex_outputs(live):
    url, _ = live
    client = _client(url)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"structured_outputs": {"regex": "(yes|no)-[0-9]"}})
    import re

    assert re.fullmatch("(yes|no)-[0-9]", r.choices[0].text) and \
        r.choices[0].finish_reason == "stop"
    j = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=200,
                                       temperature=0, response_format={"type": "json_object"})
    c = j.choices[0]
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict)
    else:  # cut at max_tokens: the text is a prefix of a JSON object
        assert c.finish_reason == "length" and c.message.content.startswith("{")


TOOLS = [{"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_time", "parameters": {"type": "object", "properties": {
            "tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"], "additionalProperties": False}}}]


def test_a_tool_call_round_trip(live):
    url, _ = live
    client = _client(url)
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(
        model="tiny", messages=msgs, tools=TOOLS, max_tokens=40, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    msg = r.choices[0].message
    assert msg.content is None and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, TOOLS[0]["function"]["parameters"])
    msgs += [msg.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    # the result goes back (without tools: the tiny model's context is 512 tokens)
    follow = client.chat.completions.create(model="tiny", messages=msgs,
                                            max_tokens=4, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert follow.choices[0].finish_reason == "length"
    assert isinstance(follow.choices[0].message.content, str)
    # "required": a call to one of the tools (greedy: deterministic), as tool_calls
    req = client.chat.completions.create(model="tiny", messages=msgs[:1], tools=TOOLS,
                                         tool_choice="required", max_tokens=60, temperature=0)
    assert req.choices[0].finish_reason == "tool_calls"
    for call in req.choices[0].message.tool_calls:
        schema = next(t["function"]["parameters"] for t in TOOLS
                      if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), schema)
    # streamed: the calls arrive in OpenAI's delta shape
    chunks = list(client.chat.completions.create(
        model="tiny", messages=msgs[:1], tools=TOOLS, max_tokens=40, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_time"}}))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].function.name == "get_time"
    jsonschema.validate(json.loads(deltas[0].function.arguments),
                        TOOLS[1]["function"]["parameters"])


# ---- tokenizer routes, metrics, access log -----------------------------------------------
def test_tokenize_detokenize_version_and_model_routes(live, tok):
    url, _ = live
    status, body = _http(url + "/tokenize", {"prompt": PROMPT})
    assert status == 200 and body["tokens"] == tok.encode(PROMPT)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] > 0
    status, chat = _http(url + "/tokenize", {"messages": MESSAGES})
    assert chat["tokens"] == tok.encode(tok.apply_chat_template(MESSAGES),
                                        add_special_tokens=False)
    status, back = _http(url + "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["prompt"] == PROMPT
    assert _http(url + "/detokenize", {"tokens": [10 ** 9]})[0] == 400
    status, v = _http(url + "/version")
    assert status == 200 and v["version"]
    assert _client(url).models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        _client(url).models.retrieve("other")


def test_metrics_have_no_created_series(live):
    url, _ = live
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "eaas_" in text and "_created" not in text


def test_access_log_has_one_line_per_request_without_prompts(live):
    url, log = live
    status, _ = _http(url + "/v1/completions", {"prompt": "zebra-secret-words", "max_tokens": 2},
                      {"Authorization": f"Bearer {KEY}", "X-Request-Id": "trace-me-42"})
    assert status == 200
    deadline = time.monotonic() + 10
    while "trace-me-42" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [ln for ln in log.read_text().splitlines() if "trace-me-42" in ln]
    assert len(lines) == 1 and "eaas.access POST /v1/completions 200" in lines[0]
    assert "ms request_id=trace-me-42" in lines[0]
    assert "zebra-secret-words" not in log.read_text() and KEY not in log.read_text()
