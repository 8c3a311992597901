"""Parse and validate OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`).

Accepts what vLLM accepts: n / best_of, logprobs (completions: a count; chat: logprobs +
top_logprobs), prompt_logprobs, penalties, min_p, min_tokens, logit_bias, stop strings,
seed, structured output (response_format, structured_outputs, guided_*), tools with
tool_choice; refuses with a 400 that names the field what it cannot honour (suffix, beam
search). Unknown fields are ignored, as vLLM ignores them. The result is a `GenerationPlan`:
one `PromptPlan` per prompt (each gives n choices), each with its token ids (for length
checks and usage) and its own `SamplingParams`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from eaas.engine.params import MAX_LOGPROBS
from eaas.engine.sampling import MAX_TOKENS_LIMIT, SamplingParams, StructuredOutputsParams
from eaas.errors import RequestError
from eaas.serving.api_errors import ApiError
from eaas.serving.fields import Fields, is_int, short
from eaas.serving.jsonbody import json_type as _json_type
from eaas.serving.request_params import sampling_kwargs, structured_outputs
from eaas.serving.tools import ToolSpec, parse_tools, render_tool_messages

MAX_PROMPTS = 64  # prompts per completions request (each becomes one choice)
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
    stop: tuple[str, ...]  # stop strings (the engine applies them; streams hold text back)
    stream: bool
    include_usage: bool  # stream_options.include_usage: a final usage chunk
    echo: bool  # completions: prepend the prompt to the text
    return_token_ids: bool
    n: int = 1  # choices per prompt (choice index = prompt index * n + sequence index)
    logprobs: int | None = None  # top alternatives per token in the response (None: no logprobs)
    tools: ToolSpec | None = None  # chat: tools and how tool_choice treats the output


def parse_completion(body: dict[str, Any], *, model_name: str, tokenizer: Tokenizer,
                     max_model_len: int) -> GenerationPlan:
    f = Fields(body)
    model = _model(f, model_name)
    if "prompt" not in body:
        raise ApiError(400, "field 'prompt' is required", param="prompt")
    prompts = _prompts(body["prompt"], tokenizer)
    f.reject_set("suffix", "suffix is not supported")
    echo = f.bool_("echo", False)
    logprobs = f.int_("logprobs", None, 0, MAX_LOGPROBS)
    max_tokens = f.int_("max_tokens", 16, 1, MAX_TOKENS_LIMIT)
    return _plan("completion", f, model, prompts, max_tokens, tokenizer, max_model_len, echo,
                 logprobs, structured_outputs(body), None)


def parse_chat(body: dict[str, Any], *, model_name: str, tokenizer: Tokenizer,
               max_model_len: int) -> GenerationPlan:
    f = Fields(body)
    model = _model(f, model_name)
    messages = _messages(body.get("messages"))
    tools = parse_tools(body)
    so = structured_outputs(body)
    if tools is not None and tools.structured_outputs() is not None:
        if so is not None:
            raise ApiError(400, "tool_choice 'required' or a named function forces the output's "
                           "shape; it cannot be combined with response_format",
                           param="tool_choice")
        so = tools.structured_outputs()
    if any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls"))
           for m in body["messages"]) or tools is not None:
        messages = render_tool_messages(messages, body["messages"], tools)
    top = f.int_("top_logprobs", None, 0, MAX_LOGPROBS)
    logprobs = (top or 0) if f.bool_("logprobs", False) else None
    if top is not None and logprobs is None:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
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
    return _plan("chat", f, model, prompts, max_tokens, tokenizer, max_model_len, False,
                 logprobs, so, tools)


# ---- shared pieces --------------------------------------------------------------------------
def _plan(kind: Literal["completion", "chat"], f: Fields, model: str,
          prompts: list[tuple[str | list[int], list[int]]], max_tokens: int | None,
          tokenizer: Tokenizer, max_model_len: int, echo: bool, logprobs: int | None,
          structured: StructuredOutputsParams | None, tools: ToolSpec | None) -> GenerationPlan:
    extra = sampling_kwargs(f, tokenizer.vocab_size)
    temperature = f.num("temperature", 1.0, lo=0.0)
    top_p = f.num("top_p", 1.0, lo=0.0, lo_open=True, hi=1.0)
    top_k_given = f.int_("top_k", None, -1, None, allowed="-1 or 0 (off) or an integer >= 1")
    # above the vocabulary, top-k keeps every token: the same as off, and never a huge int
    # in the sampler's int64 tensor
    top_k = -1 if top_k_given is None else min(top_k_given, tokenizer.vocab_size)
    seed = f.int_("seed", None, -_INT64, _INT64 - 1)
    if f.get("use_beam_search"):
        raise ApiError(400, "beam search is not supported by eaas", param="use_beam_search")
    stop_ids = _stop_token_ids(f.get("stop_token_ids"), tokenizer.vocab_size)
    ignore_eos = f.bool_("ignore_eos", False)
    stream = f.bool_("stream", False)
    so = f.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    if so is not None and not stream:
        raise ApiError(400, "stream_options can only be set when stream is true",
                       param="stream_options")
    include_usage = so is not None and Fields(so).bool_("include_usage", False,
                                                         param="stream_options")
    if stream and extra["best_of"] is not None:
        raise ApiError(400, f"best_of={extra['best_of']} cannot stream: the best n of best_of "
                       "sequences are known only at the end; send stream: false or best_of = n",
                       param="best_of")
    if echo and logprobs is not None and extra["prompt_logprobs"] is None:
        extra["prompt_logprobs"] = logprobs  # echo's prompt tokens carry logprobs too
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
            if extra["min_tokens"] > want:
                raise ApiError(400, f"min_tokens={extra['min_tokens']} is not allowed: at most "
                               f"max_tokens ({want})", param="min_tokens")
            params = SamplingParams(max_tokens=want, temperature=temperature, top_p=top_p,
                                    top_k=top_k, seed=seed, stop_token_ids=stop_ids,
                                    ignore_eos=ignore_eos, logprobs=logprobs,
                                    structured_outputs=structured, **extra)
        except ApiError:
            raise
        except RequestError as e:  # a bound the engine checks that we did not
            raise ApiError(400, str(e)) from None
        plans.append(PromptPlan(prompt=prompt, prompt_token_ids=ids, params=params))
    return GenerationPlan(kind=kind, model=model, prompts=plans, stop=extra["stop"],
                          stream=stream, include_usage=include_usage, echo=echo,
                          return_token_ids=return_token_ids, n=extra["n"], logprobs=logprobs,
                          tools=tools)


def _model(f: Fields, model_name: str) -> str:
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
    if is_int(prompt[0]):  # a list of token ids (a batch starts with a string or a list)
        return [(prompt, _token_ids(prompt, tokenizer, "prompt"))]
    if len(prompt) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}",
                       param="prompt")
    out: list[tuple[str | list[int], list[int]]] = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out.append((p, tokenizer.encode(p) if p else []))
        elif isinstance(p, list) and p and is_int(p[0]):
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
        if not is_int(t) or not 0 <= t < vocab:
            got = f"{_json_type(t)} {short(t)}"
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


def _stop_token_ids(ids: Any, vocab: int) -> tuple[int, ...]:
    if ids is None:
        return ()
    allowed = f"a list of token ids (integers with 0 <= id < {vocab})"
    if not isinstance(ids, list):
        raise ApiError(400, f"stop_token_ids must be {allowed}, got {_json_type(ids)}",
                       param="stop_token_ids")
    for j, t in enumerate(ids):
        if not (is_int(t) and 0 <= t < vocab):
            raise ApiError(400, f"stop_token_ids[{j}] is not a token id: {allowed}, got "
                           f"{_json_type(t)} {short(t)}", param="stop_token_ids")
    return tuple(ids)
