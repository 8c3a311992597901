"""Parse and validate OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`).

Accepts what vLLM accepts where eaas can honour it, and refuses with a 400 that names the
field where it cannot (n > 1, logprobs, penalties, tools, ...). Unknown fields are ignored,
as vLLM ignores them. The result is a `GenerationPlan`: one `PromptPlan` per choice, each
with its token ids (for length checks and usage) and its own `SamplingParams`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from eaas.engine.sampling import MAX_TOKENS_LIMIT, SamplingParams
from eaas.errors import RequestError
from eaas.serving.api_errors import ApiError
from eaas.serving.jsonbody import json_type as _json_type

MAX_PROMPTS = 64  # prompts per completions request (each becomes one choice)
MAX_STOP_STRINGS = 16
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
_INT64 = 1 << 63


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict]) -> str: ...


@dataclass(frozen=True, slots=True)
class PromptPlan:
    """One choice: what goes to `engine.generate` and how."""

    prompt: str | list[int]  # passed to the engine as the client gave it
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class GenerationPlan:
    kind: Literal["completion", "chat"]
    model: str
    prompts: list[PromptPlan]
    stop: tuple[str, ...]  # stop strings, applied by the serving layer
    stream: bool
    include_usage: bool  # stream_options.include_usage: a final usage chunk
    echo: bool  # completions: prepend the prompt to the text
    return_token_ids: bool


def parse_completion(body: dict[str, Any], *, model_name: str, tokenizer: Tokenizer,
                     max_model_len: int) -> GenerationPlan:
    f = _Fields(body)
    model = _model(f, model_name)
    if "prompt" not in body:
        raise ApiError(400, "field 'prompt' is required", param="prompt")
    prompts = _prompts(body["prompt"], tokenizer)
    f.reject_set("suffix", "suffix is not supported")
    echo = f.bool_("echo", False)
    f.int_("best_of", None, 1, 1, allowed="null or 1 (eaas returns one sequence)")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        raise ApiError(400, "logprobs are not supported by eaas; send null", param="logprobs")
    max_tokens = f.int_("max_tokens", 16, 1, MAX_TOKENS_LIMIT)
    return _plan("completion", f, model, prompts, max_tokens, tokenizer, max_model_len, echo)


def parse_chat(body: dict[str, Any], *, model_name: str, tokenizer: Tokenizer,
               max_model_len: int) -> GenerationPlan:
    f = _Fields(body)
    model = _model(f, model_name)
    messages = _messages(body.get("messages"))
    for name in ("tools", "functions"):
        if body.get(name):
            raise ApiError(400, f"{name} are not supported by eaas", param=name)
    if body.get("tool_choice") not in (None, "none"):
        raise ApiError(400, "tool_choice is not supported by eaas; send 'none' or omit it",
                       param="tool_choice")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise ApiError(400, "response_format other than {'type': 'text'} is not supported",
                       param="response_format")
    if f.bool_("logprobs", False):
        raise ApiError(400, "logprobs are not supported by eaas; send false", param="logprobs")
    if body.get("top_logprobs") not in (None, 0):
        raise ApiError(400, "top_logprobs is not supported by eaas", param="top_logprobs")
    max_tokens = f.int_("max_completion_tokens", None, 1, MAX_TOKENS_LIMIT)
    if max_tokens is None:
        max_tokens = f.int_("max_tokens", None, 1, MAX_TOKENS_LIMIT)
    try:
        text = tokenizer.apply_chat_template(messages)
    except Exception as e:  # the model's template refusing these messages is the client's 400
        if not (isinstance(e, (ValueError, TypeError, KeyError))
                or type(e).__module__.startswith("jinja2")):
            raise
        raise ApiError(400, f"messages cannot be rendered by the chat template: {e}",
                       param="messages") from None
    prompts: list[tuple[str | list[int], list[int]]] = [(text, tokenizer.encode(text))]
    return _plan("chat", f, model, prompts, max_tokens, tokenizer, max_model_len, False)


# ---- shared pieces --------------------------------------------------------------------------
def _plan(kind: Literal["completion", "chat"], f: _Fields, model: str,
          prompts: list[tuple[str | list[int], list[int]]], max_tokens: int | None,
          tokenizer: Tokenizer, max_model_len: int, echo: bool) -> GenerationPlan:
    f.int_("n", 1, 1, 1, allowed="1 (eaas returns one sequence per prompt)")
    temperature = f.num("temperature", 1.0, lo=0.0)
    top_p = f.num("top_p", 1.0, lo=0.0, lo_open=True, hi=1.0)
    top_k_given = f.int_("top_k", None, -1, None, allowed="-1 or 0 (off) or an integer >= 1")
    # above the vocabulary, top-k keeps every token: the same as off, and never a huge int
    # in the sampler's int64 tensor
    top_k = -1 if top_k_given is None else min(top_k_given, tokenizer.vocab_size)
    seed = f.int_("seed", None, -_INT64, _INT64 - 1)
    for name, neutral in (("presence_penalty", 0), ("frequency_penalty", 0),
                          ("repetition_penalty", 1), ("min_p", 0), ("min_tokens", 0)):
        value = f.num(name, float(neutral), lo=-math.inf)
        if value != neutral:
            raise ApiError(400, f"{name}={value!r} is not supported by eaas; send {neutral} or "
                           "omit it", param=name)
    if f.get("logit_bias"):
        raise ApiError(400, "logit_bias is not supported by eaas", param="logit_bias")
    if f.get("use_beam_search"):
        raise ApiError(400, "beam search is not supported by eaas", param="use_beam_search")
    stop = _stop(f.get("stop"))
    stop_ids = _stop_token_ids(f.get("stop_token_ids"), tokenizer.vocab_size)
    ignore_eos = f.bool_("ignore_eos", False)
    stream = f.bool_("stream", False)
    so = f.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    if so is not None and not stream:
        raise ApiError(400, "stream_options can only be set when stream is true",
                       param="stream_options")
    include_usage = so is not None and _Fields(so).bool_("include_usage", False,
                                                          param="stream_options")
    return_token_ids = f.bool_("return_token_ids", False)
    f.bool_("skip_special_tokens", True)  # type-checked; eaas always skips them

    plans: list[PromptPlan] = []
    for i, (prompt, ids) in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if kind == "chat":
            param = "messages"
        if not ids:
            raise ApiError(400, f"{param} is empty after tokenization", param=param)
        if len(ids) >= max_model_len:
            raise ApiError(400, f"{param} has {len(ids)} tokens; this model's maximum context "
                           f"length is {max_model_len} tokens (prompt must leave room for at "
                           "least one generated token)", param=param)
        want = max_tokens if max_tokens is not None else max_model_len - len(ids)
        if len(ids) + want > max_model_len:
            raise ApiError(400, f"this model's maximum context length is {max_model_len} tokens; "
                           f"you requested {len(ids) + want} tokens ({len(ids)} in the prompt, "
                           f"{want} in the completion); reduce the prompt or max_tokens",
                           param="max_tokens")
        try:
            params = SamplingParams(max_tokens=want, temperature=temperature, top_p=top_p,
                                    top_k=top_k, seed=seed, stop_token_ids=stop_ids,
                                    ignore_eos=ignore_eos)
        except RequestError as e:  # a bound the engine checks that we did not
            raise ApiError(400, str(e)) from None
        plans.append(PromptPlan(prompt=prompt, prompt_token_ids=ids, params=params))
    return GenerationPlan(kind=kind, model=model, prompts=plans, stop=stop, stream=stream,
                          include_usage=include_usage, echo=echo,
                          return_token_ids=return_token_ids)


def _model(f: _Fields, model_name: str) -> str:
    model = f.get("model")
    if model is None:
        return model_name
    if not isinstance(model, str):
        raise ApiError(400, f"model must be a string, got {_json_type(model)}", param="model")
    if model != model_name:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves "
                       f"'{model_name}'", param="model")
    return model


def _prompts(prompt: Any, tokenizer: Tokenizer) -> list[tuple[str | list[int], list[int]]]:
    """Accept str, list[int], list[str] and list[list[int]] (a batch: one choice each)."""
    if isinstance(prompt, str):
        return [(prompt, tokenizer.encode(prompt) if prompt else [])]
    if not isinstance(prompt, list):
        raise ApiError(400, "prompt must be a string, a list of token ids, or a list of those; "
                       f"got {_json_type(prompt)}", param="prompt")
    if not prompt:
        raise ApiError(400, "prompt is an empty list", param="prompt")
    if _is_int(prompt[0]):  # a list of token ids (a batch starts with a string or a list)
        return [(prompt, _token_ids(prompt, tokenizer, "prompt"))]
    if len(prompt) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}",
                       param="prompt")
    out: list[tuple[str | list[int], list[int]]] = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out.append((p, tokenizer.encode(p) if p else []))
        elif isinstance(p, list) and p and _is_int(p[0]):
            out.append((p, _token_ids(p, tokenizer, f"prompt[{i}]")))
        else:
            raise ApiError(400, f"prompt[{i}] must be a non-empty string or a non-empty list of "
                           f"token ids (a batch holds one kind), got {_json_type(p)}",
                           param="prompt")
    return out


def _token_ids(ids: list[Any], tokenizer: Tokenizer, param: str) -> list[int]:
    """`ids` checked element by element; an error names the first bad index."""
    vocab = tokenizer.vocab_size
    for j, t in enumerate(ids):
        if not _is_int(t) or not 0 <= t < vocab:
            got = f"{_json_type(t)} {_short(t)}"
            raise ApiError(400, f"{param}[{j}] is not a token id: token ids are integers with "
                           f"0 <= id < {vocab} (a list of token ids holds only those), got {got}",
                           param="prompt")
    return list(ids)


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects",
                       param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param="messages")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise ApiError(400, f"messages[{i}].role={role!r} is not allowed: one of "
                           f"{CHAT_ROLES}", param="messages")
        if isinstance(content, list):  # content parts: only text parts are supported
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise ApiError(400, f"messages[{i}].content[{j}]: only text parts "
                                   "({'type': 'text', 'text': <string>}) are supported, got "
                                   f"{_json_type(part)}", param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts, "
                           f"got {_json_type(content)}", param="messages")
        out.append({"role": role, "content": content})
    return out


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    allowed = f"a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings"
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list):
        raise ApiError(400, f"stop must be {allowed}, got {_json_type(stop)}", param="stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop has {len(stop)} strings; allowed: {allowed}", param="stop")
    for j, s in enumerate(stop):
        if not (isinstance(s, str) and s):
            got = "an empty string" if s == "" else f"{_json_type(s)} {_short(s)}"
            raise ApiError(400, f"stop[{j}] must be a non-empty string, got {got}", param="stop")
    return tuple(stop)


def _stop_token_ids(ids: Any, vocab: int) -> tuple[int, ...]:
    if ids is None:
        return ()
    allowed = f"a list of token ids (integers with 0 <= id < {vocab})"
    if not isinstance(ids, list):
        raise ApiError(400, f"stop_token_ids must be {allowed}, got {_json_type(ids)}",
                       param="stop_token_ids")
    for j, t in enumerate(ids):
        if not (_is_int(t) and 0 <= t < vocab):
            raise ApiError(400, f"stop_token_ids[{j}] is not a token id: {allowed}, got "
                           f"{_json_type(t)} {_short(t)}", param="stop_token_ids")
    return tuple(ids)


def _short(v: object) -> str:
    """repr(v), cut to a readable length (a 4000-digit integer is legal JSON)."""
    text = repr(v)
    return text if len(text) <= 40 else f"{text[:24]}...({len(text)} characters)"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Fields:
    """Typed reads of optional body fields; a wrong type or range is a 400 naming the field."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def get(self, name: str) -> Any:
        return self.body.get(name)

    def bool_(self, name: str, default: bool, *, param: str | None = None) -> bool:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            where = f"{param}.{name}" if param else name
            raise ApiError(400, f"{where} must be a boolean, got {_json_type(v)}",
                           param=param or name)
        return v

    def int_(self, name: str, default: int | None, lo: int, hi: int | None, *,
             allowed: str | None = None) -> int | None:
        v = self.body.get(name)
        if v is None:
            return default
        rng = allowed or (f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
        if not _is_int(v):
            raise ApiError(400, f"{name} must be {rng}, got {_json_type(v)} {_short(v)}",
                           param=name)
        if v < lo or (hi is not None and v > hi):
            raise ApiError(400, f"{name}={_short(v)} is not allowed: {rng}", param=name)
        return v

    def num(self, name: str, default: float, *, lo: float, hi: float | None = None,
            lo_open: bool = False) -> float:
        v = self.body.get(name)
        if v is None:
            return default
        lo_s = "(" if lo_open else "["
        rng = (f"a number in {lo_s}{lo}, {hi}]" if hi is not None
               else f"a number >= {lo}" if lo > -math.inf else "a number")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ApiError(400, f"{name} must be {rng}, got {_json_type(v)} {_short(v)}",
                           param=name)
        try:
            x = float(v)
        except OverflowError:  # a JSON integer beyond float range (no JSON float is)
            x = math.inf
        if not math.isfinite(x):
            raise ApiError(400, f"{name}={_short(v)} is not allowed: {rng} (finite)", param=name)
        if x < lo or (lo_open and x == lo) or (hi is not None and x > hi):
            raise ApiError(400, f"{name}={_short(v)} is not allowed: {rng}", param=name)
        return x

    def reject_set(self, name: str, message: str) -> None:
        if self.body.get(name):
            raise ApiError(400, message, param=name)
