"""The eager step's sampling of a batch: requests' parameters -> tensors -> `eaas.engine.logits`
-> `sample_batch` -> token ids (and log probabilities), one pass over the whole batch.

The host builds a few small per-row tensors from the requests (their parameters, token
histories padded to one length, grammar bitmasks filled by xgrammar's matchers) and uploads
them; everything after that runs on the logits' device as batched tensor ops with no
per-request loop. The captured decode step does the same math on the device
(`eaas.engine.sampling_slots.SamplingSlots.sample_processed`, equal to `sample_rows` over the
same logits, grammar bitmasks included); a step that also holds a prefill chunk brings its
decode rows here. A request without processors is sampled
the same either way (rows are independent and the noise is counter-based).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from eaas.engine import logits as lp_ops
from eaas.engine.outputs import Logprob, PositionLogprobs
from eaas.engine.sampling import sample_batch
from eaas.engine.structured import GrammarCompiler
from eaas.model.ops import upload

__all__ = ["SampledRows", "needs_batched_sampling", "position_logprobs", "prompt_logprob_rows",
           "sample_rows"]


def needs_batched_sampling(reqs: Sequence[Any]) -> bool:
    """Whether the eager step must sample `reqs` with `sample_rows` rather than the plain
    sampler: some request has a processor or wants log probabilities
    (`SamplingParams.needs_processors`)."""
    return any(r.params.needs_processors for r in reqs)


@dataclass(slots=True)
class SampledRows:
    """Device tensors of one sampling pass over B rows (download them together).

    ids: int64 [B]. logprobs: None, or (logprob [B], rank [B], top_logprobs [B, N],
    top_ids [B, N]) from `logits.compute_logprobs` over the raw logits, N the largest
    `params.logprobs` of the batch.
    """

    ids: torch.Tensor
    logprobs: tuple[torch.Tensor, ...] | None

    def tensors(self) -> list[torch.Tensor]:
        return [self.ids, *(self.logprobs or ())]


def _padded(rows: list[list[int]], pad: int, device: Any) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    flat = [t for r in rows for t in (*r, *([pad] * (width - len(r))))]
    return upload(flat, device).view(len(rows), width)


def sample_rows(logits: torch.Tensor, reqs: Sequence[Any], rows: Sequence[int]) -> SampledRows:
    """One token for each request of `reqs`, from row rows[i] of `logits` (rows may repeat:
    the sequences forked from one prompt sample from its one logits row).

    logits: float32 [N, V], the LM head's raw output. reqs: eaas.engine.request.Request,
    each with its params, output so far, noise key and grammar matcher (if any).
    """
    dev = logits.device
    b, v = len(reqs), logits.shape[-1]
    f32 = torch.float32
    raw = logits[upload(list(rows), dev)]  # [B, V]
    x = raw
    ps = [r.params for r in reqs]
    if any(r.grammar is not None for r in reqs):
        mask = torch.full((b, GrammarCompiler.bitmask_words(v)), -1, dtype=torch.int32)
        for i, r in enumerate(reqs):
            if r.grammar is not None and not r.grammar.terminated:
                r.grammar.fill(mask, i)
        x = lp_ops.apply_token_bitmask(x, upload(mask, dev))
    active = [len(r.output_ids) < p.min_tokens for r, p in zip(reqs, ps)]
    if any(active):
        stops = _padded([sorted(r.stop_ids) for r in reqs], v, dev)
        x = lp_ops.apply_min_tokens(x, stops, upload(active, dev, torch.bool))
    if any(p.logit_bias for p in ps):
        ids = _padded([list(p.logit_bias or ()) for p in ps], 0, dev)
        vals = [list((p.logit_bias or {}).values()) for p in ps]
        width = ids.shape[1]
        vals_t = upload([row + [0.0] * (width - len(row)) for row in vals], dev, f32)
        x = lp_ops.apply_logit_bias(x, ids, vals_t)
    if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1 for p in ps):
        prompt = lp_ops.token_counts(_padded([r.prompt_ids for r in reqs], v, dev), v)
        output = lp_ops.token_counts(_padded([r.output_ids for r in reqs], v, dev), v)
        x = lp_ops.apply_penalties(x, prompt, output,
                                   upload([p.presence_penalty for p in ps], dev, f32),
                                   upload([p.frequency_penalty for p in ps], dev, f32),
                                   upload([p.repetition_penalty for p in ps], dev, f32))
    temperature = upload([float(p.temperature) for p in ps], dev, f32)
    if any(p.min_p > 0 for p in ps):
        x = lp_ops.apply_min_p(x, temperature, upload([p.min_p for p in ps], dev, f32))
    ints = upload([t for r, p in zip(reqs, ps)
                   for t in (p.top_k, r.noise_key, len(r.output_ids))], dev).view(b, 3)
    top_p = upload([float(p.top_p) for p in ps], dev, f32)
    ids = sample_batch(x, temperature, ints[:, 0], top_p, ints[:, 1], ints[:, 2])
    want = [p.logprobs for p in ps if p.logprobs is not None or p.num_sequences > p.n]
    logprobs = None
    if want:
        num_top = min(v, max((n or 0) for n in want))
        logprobs = lp_ops.compute_logprobs(raw, ids, num_top)
    return SampledRows(ids, logprobs)


def position_logprobs(token: int, logprob: float, rank: int, top_lp: Sequence[float],
                      top_ids: Sequence[int], num_top: int, decode: Any) -> PositionLogprobs:
    """One position's {token id: Logprob}: the chosen token first, then the top `num_top`
    (vLLM's shape; the chosen token appears once even when it is among the top)."""
    out: PositionLogprobs = {token: Logprob(logprob, rank, decode(token))}
    for j in range(num_top):
        t = int(top_ids[j])
        if t not in out:
            out[t] = Logprob(float(top_lp[j]), j + 1, decode(t))
    return out


def prompt_logprob_rows(hidden_rows: list[tuple[Any, int, int, int]]
                        ) -> tuple[list[int], list[int]]:
    """For prompt logprobs: (hidden-state row indices, the prompt token each predicts).

    hidden_rows: (request, first hidden row of its chunk, first prompt position of the chunk,
    chunk length) for each request of the step that wants prompt logprobs; positions p of the
    chunk whose next token p + 1 is still in the prompt are scored.
    """
    idx, targets = [], []
    for r, row0, pos0, n in hidden_rows:
        for j in range(n):
            p = pos0 + j
            if p + 1 < len(r.prompt_ids):
                idx.append(row0 + j)
                targets.append(r.prompt_ids[p + 1])
    return idx, targets
