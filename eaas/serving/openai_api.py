"""OpenAI-compatible routes, shaped as vLLM serves them.

`POST /v1/completions`, `POST /v1/chat/completions` (SSE when `stream: true`),
`GET /v1/models`. A completions prompt may be a string, a list of token ids, or a list of
those (one choice each). `return_token_ids: true` adds `token_ids` to each choice and the
prompt's ids (`prompt_token_ids`: on each choice for completions, top level for chat).
Errors before the first streamed byte are JSON with their status; errors after it are an SSE
`data: {"error": ...}` message, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from typing import Any

from aiohttp import web

from eaas.serving.api_errors import CLIENT_CLOSED_REQUEST, client_gone, error_body, error_response
from eaas.serving.events import sse_bytes
from eaas.serving.generation import ChoiceResult, Step, run_choice
from eaas.serving.jsonbody import parse_json_body
from eaas.serving.logprobs_format import chat_logprobs, completion_logprobs
from eaas.serving.protocol import GenerationPlan, parse_chat, parse_completion
from eaas.serving.state import STATE, ServingState
from eaas.serving.tokenize_api import model_card
from eaas.serving.tools import extract_tool_calls

log = logging.getLogger("eaas.serving")

routes = web.RouteTableDef()

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [model_card(request.app[STATE])]})


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = parse_json_body(await request.read())
    state.check_accepting()
    engine = state.engine
    plan = parse_completion(body, model_name=state.model_name, tokenizer=engine.tokenizer,
                            max_model_len=engine.max_model_len)
    return await _serve(request, state, plan, _request_id(request, "cmpl"))


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = parse_json_body(await request.read())
    state.check_accepting()
    engine = state.engine
    plan = parse_chat(body, model_name=state.model_name, tokenizer=engine.tokenizer,
                      max_model_len=engine.max_model_len)
    return await _serve(request, state, plan, _request_id(request, "chatcmpl"))


def _request_id(request: web.Request, prefix: str) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if _REQUEST_ID_OK.match(given) else f"{prefix}-{uuid.uuid4().hex}"


async def _run_all(state: ServingState, plan: GenerationPlan, request_id: str,
                   on_step: Any) -> list[ChoiceResult]:
    """Run every prompt concurrently (n choices each); the first failure cancels (and aborts)
    the others. Returns the choices in index order."""
    arrival = time.monotonic()
    unique = uuid.uuid4().hex[:8]  # engine ids stay unique even if a client reuses X-Request-Id

    def run(i: int) -> Any:
        return run_choice(state.engine, plan.prompts[i], index=i * plan.n,
                          request_id=f"{request_id}-{unique}-{i}", stop=plan.stop,
                          metrics=state.metrics, inflight=state.inflight, on_step=on_step,
                          arrival=arrival)

    if len(plan.prompts) == 1:
        return await run(0)
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(run(i)) for i in range(len(plan.prompts))]
    except BaseExceptionGroup as eg:
        raise _first_cause(eg) from None
    return [r for t in tasks for r in t.result()]


def _first_cause(eg: BaseExceptionGroup) -> BaseException:
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            return _first_cause(e)
        if not isinstance(e, asyncio.CancelledError):
            return e
    return eg.exceptions[0]


def _completion_logprobs(plan: GenerationPlan, r: ChoiceResult, tok: Any) -> dict | None:
    if plan.logprobs is None:
        return None
    entries: list = list(r.logprobs)
    prompt_ids: list[int] = []
    if plan.echo:  # the prompt's tokens come first, the first one without a logprob
        entries = list(r.prompt_logprobs or [None] * len(r.prompt_token_ids)) + entries
        prompt_ids = r.prompt_token_ids
    return completion_logprobs(entries, plan.logprobs, 0, prompt_ids,
                               lambda t: tok.decode([t], skip_special_tokens=False))


def _chat_message(plan: GenerationPlan, r: ChoiceResult) -> tuple[dict, str | None]:
    """The assistant message of a finished choice and its finish_reason (tool calls parsed)."""
    content, calls = extract_tool_calls(r.text, plan.tools)
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    finish = r.finish_reason
    if calls:
        msg["tool_calls"] = calls
        if plan.tools is not None and plan.tools.choice != "named" and finish == "stop":
            finish = "tool_calls"
    return msg, finish


async def _serve(request: web.Request, state: ServingState, plan: GenerationPlan,
                 request_id: str) -> web.StreamResponse:
    if plan.stream:
        return await _serve_stream(request, state, plan, request_id)

    async def ignore(step: Step) -> None:
        return None

    results = await _run_all(state, plan, request_id, ignore)
    failed = [r for r in results if r.finish_reason in ("error", "abort")]
    if failed:
        return error_response(503, f"request {request_id} did not complete: {failed[0].error}",
                              headers={"X-Request-Id": request_id})
    created = int(time.time())
    usage = _usage(plan, results)
    tok = state.engine.tokenizer
    if plan.kind == "completion":
        choices = []
        for r in results:
            prompt = plan.prompts[r.index // plan.n].prompt
            text = _prompt_text(prompt, tok) + r.text if plan.echo else r.text
            choice: dict[str, Any] = {"index": r.index, "text": text,
                                      "logprobs": _completion_logprobs(plan, r, tok),
                                      "finish_reason": r.finish_reason,
                                      "stop_reason": r.stop_reason}
            if r.prompt_logprobs is not None:
                choice["prompt_logprobs"] = _prompt_logprobs_json(r.prompt_logprobs)
            if plan.return_token_ids:
                choice["prompt_token_ids"] = r.prompt_token_ids
                choice["token_ids"] = r.token_ids
            choices.append(choice)
        body: dict[str, Any] = {"id": request_id, "object": "text_completion", "created": created,
                                "model": plan.model, "choices": choices, "usage": usage}
    else:
        choices = []
        for r in results:
            msg, finish = _chat_message(plan, r)
            choice = {"index": r.index, "message": msg,
                      "logprobs": None if plan.logprobs is None else
                      chat_logprobs(r.logprobs, plan.logprobs),
                      "finish_reason": finish, "stop_reason": r.stop_reason}
            if plan.return_token_ids:
                choice["token_ids"] = r.token_ids
            choices.append(choice)
        body = {"id": request_id, "object": "chat.completion", "created": created,
                "model": plan.model, "choices": choices, "usage": usage}
        if results[0].prompt_logprobs is not None:
            body["prompt_logprobs"] = _prompt_logprobs_json(results[0].prompt_logprobs)
        if plan.return_token_ids:
            body["prompt_token_ids"] = results[0].prompt_token_ids
    return web.json_response(body, headers={"X-Request-Id": request_id})


def _prompt_logprobs_json(entries: list) -> list:
    """vLLM's `prompt_logprobs`: per prompt token None or {token id: {logprob, rank,
    decoded_token}}."""
    return [None if e is None else
            {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
             for t, lp in e.items()} for e in entries]


def _usage(plan: GenerationPlan, results: list[ChoiceResult]) -> dict[str, int]:
    p = sum(len(r.prompt_token_ids) for r in results if r.index % plan.n == 0)  # once a prompt
    c = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _serve_stream(request: web.Request, state: ServingState, plan: GenerationPlan,
                        request_id: str) -> web.StreamResponse:
    """SSE: headers go out with the first chunk, so errors before it are plain JSON errors.
    A chunk is sent only when it carries something: text, a finish, logprobs, token ids. With
    tools parsed out of the output (tool_choice other than none), a choice's message is sent
    whole with its finish, as content or as tool_calls."""
    created = int(time.time())
    chat = plan.kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"
    lock = asyncio.Lock()
    resp: web.StreamResponse | None = None
    started: set[int] = set()
    tok = state.engine.tokenizer
    parse_tools = chat and plan.tools is not None and plan.tools.choice != "none"
    held: dict[int, str] = {}  # choice -> text held for the tool-call parser

    def chunk(choice: dict[str, Any]) -> dict[str, Any]:
        c: dict[str, Any] = {"id": request_id, "object": obj, "created": created,
                             "model": plan.model, "choices": [choice]}
        if plan.include_usage:
            c["usage"] = None
        return c

    async def send(data: Any) -> None:
        nonlocal resp
        if resp is None:
            resp = web.StreamResponse(status=200, headers={"X-Request-Id": request_id})
            resp.headers.update({"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                 "X-Accel-Buffering": "no"})
            await resp.prepare(request)
        await resp.write(sse_bytes(data))

    async def on_step(step: Step) -> None:
        async with lock:
            first = step.index not in started
            started.add(step.index)
            pp = plan.prompts[step.index // plan.n]
            has_lp = plan.logprobs is not None and bool(step.logprobs)
            finish: str | None = step.finish_reason
            if chat:
                if first:
                    head: dict[str, Any] = {"index": step.index, "logprobs": None,
                                            "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}
                    data = chunk(head)
                    if plan.return_token_ids:
                        data["prompt_token_ids"] = pp.prompt_token_ids
                    await send(data)
                delta: dict[str, Any] = {"content": step.text} if step.text else {}
                if parse_tools:
                    held[step.index] = held.get(step.index, "") + step.text
                    delta = {}
                    if finish is not None:
                        r = ChoiceResult(step.index, [], text=held.pop(step.index),
                                         finish_reason=finish)
                        msg, finish = _chat_message(plan, r)
                        calls = msg.get("tool_calls")
                        delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]} \
                            if calls else ({"content": msg["content"]} if msg["content"] else {})
                choice: dict[str, Any] = {"index": step.index, "delta": delta,
                                          "logprobs": chat_logprobs(step.logprobs, plan.logprobs)
                                          if has_lp else None,
                                          "finish_reason": finish}
                empty = not delta
            else:
                text = step.text
                lps: list = list(step.logprobs)
                ids: list[int] = []
                if first and plan.echo:
                    text = _prompt_text(pp.prompt, tok) + text
                    lps = list(step.prompt_logprobs or [None] * len(pp.prompt_token_ids)) + lps
                    ids = pp.prompt_token_ids
                choice = {"index": step.index, "text": text,
                          "logprobs": completion_logprobs(
                              lps, plan.logprobs, step.text_offset, ids,
                              lambda t: tok.decode([t], skip_special_tokens=False))
                          if plan.logprobs is not None and lps else None,
                          "finish_reason": finish}
                if first and plan.return_token_ids:
                    choice["prompt_token_ids"] = pp.prompt_token_ids
                empty = not text
            if finish is not None:
                choice["stop_reason"] = step.stop_reason
            if plan.return_token_ids:
                choice["token_ids"] = step.token_ids
            if not (empty and finish is None and not has_lp
                    and not (plan.return_token_ids and step.token_ids)):
                await send(chunk(choice))
            if step.error is not None:
                await send(error_body(503, f"request {request_id} did not complete: {step.error}"))

    try:
        results = await _run_all(state, plan, request_id, on_step)
    except asyncio.CancelledError:  # handler cancellation: the client's connection closed
        if client_gone(request):
            log.info("stream %s: the client left; its engine request(s) were aborted", request_id)
        raise
    except Exception as e:
        if isinstance(e, ConnectionResetError) and client_gone(request):
            # a write found the socket closed; run_choice aborted the engine requests
            log.info("stream %s: the client left; its engine request(s) were aborted", request_id)
            return resp if resp is not None else web.Response(status=CLIENT_CLOSED_REQUEST)
        if resp is None:
            raise  # nothing sent yet: the error middleware answers with a JSON error
        await _send_quietly(resp, sse_bytes(error_body(500, f"stream failed: {e}")))
        await _send_quietly(resp, b"data: [DONE]\n\n")
        return resp
    assert resp is not None  # every choice sends at least its finishing step
    if plan.include_usage:
        await _send_quietly(resp, sse_bytes({"id": request_id, "object": obj, "created": created,
                                             "model": plan.model, "choices": [],
                                             "usage": _usage(plan, results)}))
    await _send_quietly(resp, b"data: [DONE]\n\n")
    return resp


async def _send_quietly(resp: web.StreamResponse, data: bytes) -> None:
    with contextlib.suppress(ConnectionError):
        await resp.write(data)


def _prompt_text(prompt: str | list[int], tokenizer: Any) -> str:
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
