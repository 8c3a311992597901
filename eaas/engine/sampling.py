"""Sampling parameters (vLLM's names) and the sampler.

Greedy when temperature == 0. With a seed, a request's samples depend only on its own seed and
its own logits, never on which other requests share the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from eaas.errors import RequestError

MAX_TOKENS_LIMIT = 1 << 20


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens for one request.

    max_tokens: new tokens to generate (>= 1). temperature: 0 = greedy. top_p in (0, 1].
    top_k: -1 or 0 = off, else >= 1. seed: per-request generator seed (None: derived from
    the engine seed and the request id).
    stop_token_ids: extra ids that end the request (the model's eos ids always do unless
    ignore_eos). The stop token is included in token_ids, as vLLM does.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, value: object, allowed: str) -> RequestError:
            return RequestError(f"SamplingParams.{name}={value!r} is not allowed: {allowed}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
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
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", self.top_k, "-1 or 0 (off) or an integer >= 1")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise bad("seed", self.seed, "None or an integer")
        ids = tuple(self.stop_token_ids)
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            raise bad("stop_token_ids", self.stop_token_ids, "a sequence of integers >= 0")
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick one token id from logits [V] (float32) under params; deterministic given generator."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    logits = logits.float() / params.temperature  # [V]
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [V]
    if params.top_p < 1.0:
        sorted_probs, sorted_ids = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(0, sorted_ids, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())
