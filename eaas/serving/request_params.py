"""The sampling fields of an OpenAI request (with vLLM's extras) -> `SamplingParams` arguments.

Shared by `/v1/completions` and `/v1/chat/completions`; the fields that differ between them
(logprobs as a count vs. logprobs + top_logprobs, response_format, tools) are read by
protocol.py and passed in. Every error is a 400 naming the field and what is allowed.
"""

from __future__ import annotations

import json
from typing import Any

from eaas.engine.params import (MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_N, MAX_STOP_STRINGS,
                                StructuredOutputsParams)
from eaas.errors import RequestError
from eaas.serving.api_errors import ApiError
from eaas.serving.fields import Fields, short
from eaas.serving.jsonbody import json_type

__all__ = ["sampling_kwargs", "structured_outputs"]


def sampling_kwargs(f: Fields, vocab_size: int) -> dict[str, Any]:
    """n, best_of, penalties, min_p, min_tokens, logit_bias, stop strings, prompt_logprobs."""
    n = f.int_("n", 1, 1, MAX_N)
    best_of = f.int_("best_of", None, n, MAX_N, allowed=f"null or an integer n <= best_of <= "
                     f"{MAX_N} (n={n})")
    return {
        "n": n, "best_of": best_of if best_of != n else None,
        "presence_penalty": f.num("presence_penalty", 0.0, lo=-2.0, hi=2.0),
        "frequency_penalty": f.num("frequency_penalty", 0.0, lo=-2.0, hi=2.0),
        "repetition_penalty": f.num("repetition_penalty", 1.0, lo=0.0, lo_open=True, hi=1e6),
        "min_p": f.num("min_p", 0.0, lo=0.0, hi=1.0),
        "min_tokens": f.int_("min_tokens", 0, 0, None),
        "logit_bias": _logit_bias(f.get("logit_bias"), vocab_size),
        "stop": _stop(f.get("stop")),
        "include_stop_str_in_output": f.bool_("include_stop_str_in_output", False),
        "prompt_logprobs": f.int_("prompt_logprobs", None, 0, MAX_LOGPROBS),
    }


def _logit_bias(lb: Any, vocab: int) -> dict[int, float] | None:
    if lb is None:
        return None
    allowed = (f"an object of at most {MAX_LOGIT_BIAS} entries {{token id (0 <= id < {vocab}, "
               "as a string): bias (a number in [-100, 100])}")
    if not isinstance(lb, dict) or len(lb) > MAX_LOGIT_BIAS:
        raise ApiError(400, f"logit_bias must be {allowed}, got {json_type(lb)}",
                       param="logit_bias")
    out: dict[int, float] = {}
    for k, v in lb.items():
        try:
            t = int(k)
        except ValueError:
            t = -1
        if not 0 <= t < vocab:
            raise ApiError(400, f"logit_bias key {short(k)} is not a token id: {allowed}",
                           param="logit_bias")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise ApiError(400, f"logit_bias[{k!r}]={short(v)} is not allowed: {allowed}",
                           param="logit_bias")
        out[t] = float(v)
    return out or None


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    allowed = f"a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings"
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list):
        raise ApiError(400, f"stop must be {allowed}, got {json_type(stop)}", param="stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop has {len(stop)} strings; allowed: {allowed}", param="stop")
    for j, s in enumerate(stop):
        if not (isinstance(s, str) and s):
            got = "an empty string" if s == "" else f"{json_type(s)} {short(s)}"
            raise ApiError(400, f"stop[{j}] must be a non-empty string, got {got}", param="stop")
    return tuple(stop)


def structured_outputs(body: dict[str, Any]) -> StructuredOutputsParams | None:
    """`response_format` (text | json_object | json_schema), vLLM's `structured_outputs`
    object, or its older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`;
    at most one of them."""
    found: list[tuple[str, dict]] = []
    rf = body.get("response_format")
    if rf is not None:
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            schema = js.get("schema") if isinstance(js, dict) else None
            if not isinstance(schema, dict):
                raise ApiError(400, "response_format.json_schema.schema must be a JSON schema "
                               "object", param="response_format")
            found.append(("response_format", {"json": schema}))
        elif kind != "text":
            raise ApiError(400, "response_format must be {'type': 'text' | 'json_object' | "
                           "'json_schema', ...}", param="response_format")
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise ApiError(400, "structured_outputs must be an object with one of json, "
                           "json_object, regex, choice, grammar", param="structured_outputs")
        keys = {k: so[k] for k in ("json", "json_object", "regex", "choice", "grammar")
                if so.get(k) is not None}
        found.append(("structured_outputs", keys))
    for key in ("json", "regex", "choice", "grammar"):
        v = body.get(f"guided_{key}")
        if v is not None:
            found.append((f"guided_{key}", {key: v}))
    if not found:
        return None
    if len(found) > 1:
        raise ApiError(400, f"give one structured-output field, got {[n for n, _ in found]}",
                       param=found[1][0])
    name, kwargs = found[0]
    if isinstance(kwargs.get("json"), str):
        try:
            kwargs["json"] = json.loads(kwargs["json"])
        except ValueError as e:
            raise ApiError(400, f"{name}: the JSON schema is not JSON: {e}", param=name) from None
    try:
        return StructuredOutputsParams(**kwargs)
    except (RequestError, TypeError) as e:
        raise ApiError(400, f"{name}: {e}", param=name) from None
