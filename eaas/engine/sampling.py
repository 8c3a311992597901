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
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or \
                not -1 <= self.top_k < 1 << 31:
            raise bad("top_k", self.top_k, "-1 or 0 (off) or an integer 1 <= top_k < 2**31 "
                      "(values above the vocabulary size mean off)")
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


_MASK32 = 0xFFFF_FFFF
_MUL = 0x45D9F3B  # < 2**27: products of 32-bit values stay inside int64 (no overflow anywhere)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (int64 tensors holding values in [0, 2**32)), elementwise."""
    x = ((x ^ (x >> 16)) * _MUL) & _MASK32
    x = ((x ^ (x >> 16)) * _MUL) & _MASK32
    return x ^ (x >> 16)


def fold_seed(seed: int) -> int:
    """A request seed (any int) -> the 32-bit key the sampler's noise is drawn from."""
    s = seed & 0xFFFF_FFFF_FFFF_FFFF
    return (s ^ (s >> 32)) & _MASK32


def uniform_noise(keys: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor
                  ) -> torch.Tensor:
    """Counter-based random numbers in (0, 1), float32: one per (row, token), a pure function of
    (the row's 32-bit key, its step, the token id) — the same on every device and whatever else
    is in the batch, with no generator state (capturable in a CUDA graph).

    keys, steps: int64 [B]; token_ids: int64 [B, N] (any order). Returns [B, N].
    """
    x = _mix32(keys[:, None] ^ _mix32(steps[:, None] & _MASK32))  # [B, 1]
    x = _mix32(x ^ (token_ids & _MASK32))  # [B, N]
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample_batch(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One token per row, on the logits' device, reading no device value on the host.

    logits: float32 [B, V]. temperature: float32 [B] (0: greedy). top_k: int64 [B] (<= 0: off).
    top_p: float32 [B] in (0, 1]. keys: int64 [B] per-request noise keys (`fold_seed`). steps:
    int64 [B] each request's sample index (its output length), so each draw gets fresh noise.
    Returns int64 [B]. Rows are independent of each other: top-k and top-p filter each row's
    sorted logits, then the exponential race (argmax of p / E with E ~ Exp(1) from
    `uniform_noise`) picks a token with probability p among those kept.
    """
    greedy = logits.argmax(dim=-1)  # [B]
    v = logits.shape[-1]
    t = temperature.clamp_min(1e-6)[:, None]  # [B, 1]
    vals, ids = (logits / t).sort(dim=-1, descending=True)  # [B, V] each
    rank = torch.arange(v, device=logits.device)[None, :]  # [1, V]
    k = torch.where(top_k > 0, top_k.clamp_max(v), v)[:, None]  # [B, 1]
    vals = vals.masked_fill(rank >= k, float("-inf"))
    probs = torch.softmax(vals, dim=-1)  # [B, V]
    before = probs.cumsum(dim=-1) - probs  # mass of the better-ranked tokens
    probs = probs.masked_fill((before >= top_p[:, None]) & (rank > 0), 0.0)
    race = probs / -torch.log(uniform_noise(keys, steps, ids))  # [B, V]
    picked = ids.gather(1, race.argmax(dim=-1, keepdim=True))[:, 0]  # [B]
    return torch.where(temperature > 0, picked, greedy)


def sample(logits: torch.Tensor, params: SamplingParams, key: int, step: int) -> int:
    """One token from logits [V] (float32) under params: `sample_batch` of one row (so the
    host path and a captured step draw the same token). key: `fold_seed(seed)`; step: the
    request's output length so far."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    one = torch.tensor
    row = sample_batch(logits.float()[None], one([float(params.temperature)]),
                       one([params.top_k]), one([float(params.top_p)]), one([key]), one([step]))
    return int(row[0])
