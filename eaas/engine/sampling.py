"""The sampler: temperature, top-k, top-p and counter-based noise over a batch of logits.

Greedy when temperature == 0. With a seed, a request's samples depend only on its own seed and
its own logits, never on which other requests share the batch. `SamplingParams` lives in
eaas/engine/params.py (re-exported here); the logits processors that run before this sampler
(penalties, min_p, logit_bias, grammar masks) and log probabilities are eaas/engine/logits.py.
"""

from __future__ import annotations

import torch

from eaas.engine.params import MAX_TOKENS_LIMIT, SamplingParams, StructuredOutputsParams

__all__ = ["MAX_TOKENS_LIMIT", "SamplingParams", "StructuredOutputsParams", "fold_seed",
           "sample", "sample_batch", "uniform_noise"]

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


_GOLDEN = 0x9E37_79B9_7F4A_7C15


def sequence_key(seed: int, index: int) -> int:
    """The noise key of sequence `index` of a request seeded `seed` (n > 1 / best_of): sequence
    0 keeps `fold_seed(seed)`, so n=1 and the first of n sample alike; the others differ."""
    return fold_seed(seed + index * _GOLDEN)
