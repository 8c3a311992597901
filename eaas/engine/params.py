"""SamplingParams: how to pick tokens for one request, with vLLM's field names and semantics.

Checked when built: a wrong type or range is a `RequestError` (HTTP 400) naming the field, the
value and what is allowed. Bounds that need the model (token ids below the vocabulary size,
`n` within `scheduler.max_num_seqs`) are checked by the engine when the request arrives.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from eaas.errors import RequestError

MAX_TOKENS_LIMIT = 1 << 20
MAX_LOGPROBS = 20  # top alternatives per position (OpenAI's top_logprobs limit, vLLM's default)
MAX_N = 128  # sequences per request (n, best_of); the engine also bounds them by max_num_seqs
MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS = 1024  # entries in logit_bias


def _bad(name: str, value: object, allowed: str) -> RequestError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:40] + "..."
    return RequestError(f"SamplingParams.{name}={shown} is not allowed: {allowed}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    """A grammar the output must follow (vLLM's `StructuredOutputsParams`); exactly one of:

    json: a JSON schema (dict or JSON text); json_object: any JSON object; regex: a regular
    expression; choice: one of these strings; grammar: an EBNF grammar (xgrammar's dialect,
    `root ::= ...`). Tokens the grammar cannot accept next are masked at sampling; a request
    whose grammar is complete ends with finish_reason "stop".
    """

    json: str | None = None  # canonical JSON text of the schema
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        def bad(name: str, value: object, allowed: str) -> RequestError:
            return RequestError(f"StructuredOutputsParams.{name}={value!r:.60} is not allowed: "
                                f"{allowed}")

        if self.json is not None:
            schema: Any = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise bad("json", self.json, f"a JSON schema (the text is not JSON: {e})")
            if not isinstance(schema, (dict, bool)):
                raise bad("json", self.json, "a JSON schema: an object (or true/false)")
            object.__setattr__(self, "json", json.dumps(schema, sort_keys=True))
        if not isinstance(self.json_object, bool):
            raise bad("json_object", self.json_object, "a boolean")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, str) and v):
                raise bad(name, v, "a non-empty string")
        if self.choice is not None:
            c = tuple(self.choice) if isinstance(self.choice, (list, tuple)) else None
            if not c or not all(isinstance(s, str) and s for s in c):
                raise bad("choice", self.choice, "a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", c)
        given = [n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise RequestError("StructuredOutputsParams needs exactly one of json, json_object, "
                               f"regex, choice, grammar; got {given or 'none'}")

    @property
    def schema(self) -> Any:
        return None if self.json is None else json.loads(self.json)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens for one request (vLLM's `SamplingParams` names and meaning).

    Length: max_tokens new tokens (>= 1); min_tokens (0..max_tokens): no stop token id (eos or
    stop_token_ids) can be sampled and no stop string ends the request before that many.
    Choosing: temperature 0 = greedy; top_p in (0, 1]; top_k -1 or 0 = off; min_p in [0, 1]
    (drop tokens below min_p x the top token's probability); seed: the request's noise seed
    (None: derived from the engine seed and the request id); sequence i > 0 of n uses its own
    seed derived from it. Penalties (applied to the logits before sampling, greedy included):
    presence_penalty and frequency_penalty in [-2, 2] (minus the penalty once / per occurrence
    of a token in the output so far), repetition_penalty > 0 (tokens of the prompt or output:
    positive logits divided by it, negative multiplied); logit_bias {token id: bias in
    [-100, 100]} added to the logits.
    Sequences: n returned; best_of >= n generated, the n with the highest cumulative log
    probability returned (default n).
    Ending: stop_token_ids end the request (the model's eos ids too unless ignore_eos; the
    token is kept in token_ids); stop strings end it when its text contains one (the text is
    cut before it unless include_stop_str_in_output); stop_reason is the stop token id or
    string, None for eos (as vLLM).
    Log probabilities (of the model's raw logits, log_softmax): logprobs = N returns the
    sampled token's and the top N tokens' per position; prompt_logprobs = N the same for every
    prompt token (None for the first). N in 0..20.
    structured_outputs: a grammar the output follows (JSON schema, regex, ...).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False
    n: int = 1
    best_of: int | None = None
    min_p: float = 0.0
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    stop: tuple[str, ...] = field(default=())
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        bad = _bad
        if not _is_int(self.max_tokens):
            raise bad("max_tokens", self.max_tokens, "an integer >= 1")
        if not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise bad("max_tokens", self.max_tokens, f"1 <= max_tokens <= {MAX_TOKENS_LIMIT}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise bad("temperature", self.temperature, "a number >= 0")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", self.temperature, "a finite number >= 0 (0 = greedy)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise bad("top_p", self.top_p, "a number in (0, 1]")
        if not (0 < self.top_p <= 1):
            raise bad("top_p", self.top_p, "a number in (0, 1]")
        if not _is_int(self.top_k) or not -1 <= self.top_k < 1 << 31:
            raise bad("top_k", self.top_k, "-1 or 0 (off) or an integer 1 <= top_k < 2**31 "
                      "(values above the vocabulary size mean off)")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", self.seed, "None or an integer")
        ids = tuple(self.stop_token_ids)
        if any(not _is_int(t) or t < 0 for t in ids):
            raise bad("stop_token_ids", self.stop_token_ids, "a sequence of integers >= 0")
        object.__setattr__(self, "stop_token_ids", ids)
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", self.ignore_eos, "a boolean")
        self._check_sequences()
        self._check_processors()
        self._check_outputs()

    def _check_sequences(self) -> None:
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise _bad("n", self.n, f"an integer 1 <= n <= {MAX_N}")
        if self.best_of is not None:
            if not _is_int(self.best_of) or not self.n <= self.best_of <= MAX_N:
                raise _bad("best_of", self.best_of, f"None or an integer n <= best_of <= {MAX_N} "
                           f"(n={self.n})")

    def _check_processors(self) -> None:
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise _bad("min_p", self.min_p, "a number in [0, 1] (0 = off)")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise _bad("min_tokens", self.min_tokens,
                       f"an integer 0 <= min_tokens <= max_tokens ({self.max_tokens})")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2 <= v <= 2:
                raise _bad(name, v, "a number in [-2, 2] (0 = off)")
        if not _is_num(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise _bad("repetition_penalty", self.repetition_penalty, "a number > 0 (1 = off)")
        if self.repetition_penalty > 1e6:
            raise _bad("repetition_penalty", self.repetition_penalty, "a number in (0, 1e6]")
        lb = self.logit_bias
        if lb is not None:
            allowed = (f"None or a dict of at most {MAX_LOGIT_BIAS} {{token id (int >= 0): bias "
                       "(number in [-100, 100])}")
            if not isinstance(lb, dict) or len(lb) > MAX_LOGIT_BIAS:
                raise _bad("logit_bias", lb, allowed)
            for k, v in lb.items():
                if not _is_int(k) or k < 0 or not _is_num(v) or not -100 <= v <= 100:
                    raise _bad("logit_bias", {k: v}, allowed)
            object.__setattr__(self, "logit_bias", {int(k): float(v) for k, v in lb.items()}
                               or None)

    def _check_outputs(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
            raise _bad("stop", self.stop, f"a string or a list of at most {MAX_STOP_STRINGS} "
                       "non-empty strings")
        object.__setattr__(self, "stop", stop)
        if not isinstance(self.include_stop_str_in_output, bool):
            raise _bad("include_stop_str_in_output", self.include_stop_str_in_output, "a boolean")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise _bad(name, v, f"None or an integer 0 <= {name} <= {MAX_LOGPROBS}")
        so = self.structured_outputs
        if so is not None and not isinstance(so, StructuredOutputsParams):
            raise _bad("structured_outputs", so, "None or a StructuredOutputsParams")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def num_sequences(self) -> int:
        """Sequences generated: best_of if given, else n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def needs_processors(self) -> bool:
        """Whether picking this request's tokens needs more than temperature, top-k, top-p and
        a seed: penalties, min_p, min_tokens, logit_bias, log probabilities (best_of ranks by
        them) or a grammar — the batched processors of `eaas.engine.logits`."""
        return (self.min_p > 0 or self.min_tokens > 0 or self.presence_penalty != 0
                or self.frequency_penalty != 0 or self.repetition_penalty != 1
                or self.logit_bias is not None or self.logprobs is not None
                or self.num_sequences > self.n or self.structured_outputs is not None)
