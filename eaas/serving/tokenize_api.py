"""Tokenizer and identity routes, as vLLM serves them: `POST /tokenize`, `POST /detokenize`,
`GET /version`, `GET /v1/models/{model_id}`.

`/tokenize` takes `{"prompt": str, "add_special_tokens": true}` or chat
`{"messages": [...], "add_generation_prompt": true}` and answers
`{"count", "max_model_len", "tokens"}` (plus `"token_strs"` with `"return_token_strs": true`);
`/detokenize` takes `{"tokens": [ids]}` and answers `{"prompt": str}`.
"""

from __future__ import annotations

from importlib import metadata

from aiohttp import web

from eaas.serving.api_errors import ApiError
from eaas.serving.fields import Fields
from eaas.serving.jsonbody import json_type, parse_json_body
from eaas.serving.protocol import _messages, _model, _token_ids
from eaas.serving.state import STATE

routes = web.RouteTableDef()


def _version() -> str:
    try:
        return metadata.version("eaas")
    except metadata.PackageNotFoundError:
        return "unknown"


@routes.get("/version")
async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": _version()})


def model_card(state: object) -> dict:
    name = state.model_name  # type: ignore[attr-defined]
    return {"id": name, "object": "model", "created": int(state.started_at),  # type: ignore
            "owned_by": "eaas", "root": name, "parent": None,
            "max_model_len": getattr(state.engine, "max_model_len", None)}  # type: ignore


@routes.get("/v1/models/{model_id:.+}")
async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    model_id = request.match_info["model_id"]
    if model_id != state.model_name:
        raise ApiError(404, f"the model '{model_id[:200]}' does not exist; this server serves "
                       f"'{state.model_name}'", param="model")
    return web.json_response(model_card(state))


@routes.post("/tokenize")
async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = parse_json_body(await request.read())
    state.check_accepting()
    f = Fields(body)
    _model(f, state.model_name)
    tok = state.engine.tokenizer
    if "messages" in body:
        if "prompt" in body:
            raise ApiError(400, "give prompt or messages, not both", param="messages")
        gen = f.bool_("add_generation_prompt", True)
        try:
            text = tok.apply_chat_template(_messages(body["messages"]), add_generation_prompt=gen)
        except (ValueError, TypeError, KeyError) as e:
            raise ApiError(400, f"messages cannot be rendered by the chat template: {e}",
                           param="messages") from None
        ids = tok.encode(text, add_special_tokens=f.bool_("add_special_tokens", False))
    elif isinstance(body.get("prompt"), str):
        ids = tok.encode(body["prompt"], add_special_tokens=f.bool_("add_special_tokens", True))
    else:
        raise ApiError(400, "prompt must be a string (or send messages), got "
                       f"{json_type(body.get('prompt'))}", param="prompt")
    out: dict = {"count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids}
    if f.bool_("return_token_strs", False):
        out["token_strs"] = [tok.decode([t], skip_special_tokens=False) for t in ids]
    return web.json_response(out)


@routes.post("/detokenize")
async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = parse_json_body(await request.read())
    state.check_accepting()
    _model(Fields(body), state.model_name)
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise ApiError(400, f"tokens must be a list of token ids, got {json_type(tokens)}",
                       param="tokens")
    ids = _token_ids(tokens, state.engine.tokenizer, "tokens")
    return web.json_response({"prompt": state.engine.tokenizer.decode(ids)})
