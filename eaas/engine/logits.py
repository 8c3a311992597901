"""Batched logits processors and log probabilities: the math between the LM head and the sampler.

Every function here is a pure function of tensors over a batch of rows (B sequences, V
vocabulary entries): no host loop over requests, no read of a device value on the host, no
shape that depends on a value, so a captured decode step can call them as they are. Padding
conventions make ragged per-row inputs rectangular: token-id lists pad with `V` (one past the
vocabulary; counted into a scratch column that is dropped), bias lists pad with (id 0, bias 0).

Order, as vLLM applies it: grammar bitmask -> min_tokens -> logit_bias -> penalties (all on the
raw logits, so greedy sees them too) -> `eaas.engine.sampling.sample_batch` with min_p applied
after temperature (`apply_min_p`). Log probabilities are of the raw logits (vLLM's default
`raw_logprobs`): `compute_logprobs`.
"""

from __future__ import annotations

import math

import torch

__all__ = ["apply_logit_bias", "apply_min_p", "apply_min_tokens", "apply_penalties",
           "apply_token_bitmask", "compute_logprobs", "token_counts"]

_NEG_INF = float("-inf")


def token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each token occurs in each row.

    token_ids: int64 [B, L], padded with `vocab_size`. Returns int32 [B, V].
    Example (V = 4): [[1, 1, 3, 4]] -> [[0, 2, 0, 1]] (4 is padding).
    """
    b = token_ids.shape[0]
    counts = torch.zeros((b, vocab_size + 1), dtype=torch.int32, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.int32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, prompt_counts: torch.Tensor,
                    output_counts: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """vLLM's penalties; returns new logits [B, V] (float32).

    logits: float32 [B, V]. prompt_counts, output_counts: int32 [B, V] (`token_counts` of the
    prompt and of the output so far). presence, frequency: float32 [B] (0: off); repetition:
    float32 [B] (1: off, > 0). For a token seen in the prompt or the output, repetition
    divides a positive logit and multiplies a negative one; then
    logit -= frequency * output_count + presence * (output_count > 0).
    """
    seen = (prompt_counts > 0) | (output_counts > 0)  # [B, V]
    rep = repetition[:, None]  # [B, 1]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    out = output_counts.to(logits.dtype)
    return logits - frequency[:, None] * out - presence[:, None] * (out > 0).to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, bias_ids: torch.Tensor,
                     bias_values: torch.Tensor) -> torch.Tensor:
    """logits[b, bias_ids[b, j]] += bias_values[b, j]; returns new logits [B, V].

    bias_ids: int64 [B, M] (pad with 0), bias_values: float32 [B, M] (pad with 0.0).
    """
    return logits.scatter_add(1, bias_ids, bias_values.to(logits.dtype))


def apply_min_tokens(logits: torch.Tensor, stop_ids: torch.Tensor,
                     active: torch.Tensor) -> torch.Tensor:
    """Rows still short of their min_tokens cannot pick a stop token; returns new logits.

    stop_ids: int64 [B, S] each row's stop token ids (eos + stop_token_ids), padded with V.
    active: bool [B], True while the row's output is shorter than its min_tokens.
    """
    b, v = logits.shape
    banned = torch.zeros((b, v + 1), dtype=torch.bool, device=logits.device)
    banned.scatter_(1, stop_ids, True)
    banned = banned[:, :v] & active[:, None]  # [B, V]
    return logits.masked_fill(banned, _NEG_INF)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Mask tokens a grammar forbids; returns new logits [B, V].

    bitmask: int32 [B, ceil(V / 32)] in xgrammar's layout: token j is allowed in row b iff bit
    (j % 32) of word bitmask[b, j // 32] is 1 (a row of all -1 allows everything).
    Example: V = 3, word 0b101 = 5 -> tokens 0 and 2 allowed, token 1 masked.
    """
    b, v = logits.shape
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)  # [32]
    bits = (bitmask[:, :, None] >> shifts) & 1  # [B, W, 32]
    allowed = bits.reshape(b, -1)[:, :v].bool()  # [B, V]
    return logits.masked_fill(~allowed, _NEG_INF)


def apply_min_p(logits: torch.Tensor, temperature: torch.Tensor,
                min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability (after temperature) is below min_p x the top token's.

    logits: float32 [B, V] (before temperature). temperature: float32 [B] (0: greedy, left
    alone: the top token is always kept). min_p: float32 [B] in [0, 1] (0: off).
    p_j < min_p * p_max  <=>  logit_j / t < logit_max / t + log(min_p), so the filter is a
    threshold on the logits and needs no softmax.
    """
    t = temperature.clamp_min(1e-6)
    log_min_p = torch.where(min_p > 0, min_p.clamp_min(1e-30).log(),
                            torch.full_like(min_p, -math.inf))
    threshold = logits.max(dim=-1).values + t * log_min_p  # [B]
    drop = (logits < threshold[:, None]) & (temperature > 0)[:, None]
    return logits.masked_fill(drop, _NEG_INF)


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log probabilities of the chosen tokens and the top alternatives.

    logits: float32 [B, V] (raw). token_ids: int64 [B] the token chosen in each row.
    num_top: alternatives per row (the batch's largest request; 0..V).
    Returns (logprob [B] of token_ids, rank [B] int64 = 1 + tokens with a strictly higher
    log probability, top_logprobs [B, num_top] descending, top_ids [B, num_top] int64).
    """
    lp = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    chosen = lp.gather(1, token_ids[:, None])  # [B, 1]
    rank = (lp > chosen).sum(dim=-1) + 1  # [B]
    top_lp, top_ids = lp.topk(num_top, dim=-1)  # [B, N] each
    return chosen[:, 0], rank, top_lp, top_ids
