"""The official `openai` client against a live `eaas serve` subprocess on a tiny model:
completions, chat and streaming give the Python API's greedy output; SIGTERM exits 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from eaas import Engine, EngineConfig, SamplingParams
from tests.serving.conftest import status_of

TOKEN = "live-admin-token-0123456789"
PROMPT = "Experts are stateless services"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
N = 8
EXTRA = {"ignore_eos": True, "return_token_ids": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



@pytest.fixture(scope="module")
def live(tiny_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("live") / "serve.log"
    eaas_bin = Path(sys.executable).parent / "eaas"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(eaas_bin), "serve", tiny_dir, "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "EAAS_ADMIN_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while status_of(url + "/ready") != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"eaas serve did not become ready:\n{log.read_text()}")
        time.sleep(0.1)
    yield proc, url, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def python_api(tiny_dir):
    """Greedy outputs of the same prompts through `eaas.Engine` (the Python API)."""
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    with Engine(EngineConfig(model=tiny_dir)) as engine:
        chat_prompt = engine.tokenizer.apply_chat_template(MESSAGES)
        plain, chat = engine.generate([PROMPT, chat_prompt], params)
    return plain.outputs[0], chat.outputs[0]


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(live):
    _, url, _ = live
    assert [m.id for m in _client(url).models.list().data] == ["tiny"]


def test_completion_equals_python_api(live, python_api):
    _, url, _ = live
    r = _client(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=N, temperature=0,
                                        extra_body=EXTRA)
    choice = r.choices[0]
    assert choice.text == python_api[0].text
    assert choice.model_extra["token_ids"] == python_api[0].token_ids
    assert r.usage.completion_tokens == N


def test_chat_equals_python_api(live, python_api):
    _, url, _ = live
    r = _client(url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=N,
                                             temperature=0, extra_body=EXTRA)
    assert r.choices[0].message.content == python_api[1].text
    assert r.choices[0].model_extra["token_ids"] == python_api[1].token_ids
    assert r.choices[0].finish_reason == "length"


def test_streaming_equals_python_api(live, python_api):
    _, url, _ = live
    client = _client(url)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=N,
                                            temperature=0, stream=True, extra_body=EXTRA))
    assert "".join(c.choices[0].text for c in chunks) == python_api[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    chat = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=N,
                                               temperature=0, stream=True, extra_body=EXTRA,
                                               stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    assert text == python_api[1].text
    assert chat[-1].usage.completion_tokens == N


def test_bad_request_raises_the_openai_error(live):
    _, url, _ = live
    with pytest.raises(openai.BadRequestError) as e:
        _client(url).completions.create(model="tiny", prompt="x", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        _client(url).completions.create(model="nope", prompt="x", max_tokens=1)


def test_sigterm_stops_cleanly_with_exit_status_0(live):
    proc, url, log = live
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()
    text = log.read_text()
    assert f"{url}/admin" in text and f"{url}/metrics" in text and "eaas: stopped" in text
    assert TOKEN not in text  # a token given through the environment is never printed
