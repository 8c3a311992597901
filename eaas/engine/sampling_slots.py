"""Sampling slots: the per-sequence state the captured decode step's logits processors read on
the device (vLLM's persistent batch), so a request with penalties, min_tokens or logit_bias
decodes on the graph path instead of forcing its whole batch onto the eager step.

A sequence that needs state gets a slot (1..num_slots; slot 0 is a scratch row that stays zero,
for rows without one) the first time it takes a captured step; its row of the decode step's
packed ints carries the slot, like a block table. Per slot, on the device:

- `table` int32 [num_slots + 1, V], three bit fields per token: bits 0..28 how often the token
  occurs in the output so far (max_tokens <= 2**20 keeps it far below 2**29), `STOP_BIT` the
  token is a stop id (eos + stop_token_ids: min_tokens bans them), `PROMPT_BIT` it occurs in the
  prompt (repetition penalty). Filled when the slot is taken (prompt and stop ids uploaded
  once), then the step itself adds each sampled token (`table[slot, id] += 1`) inside the graph.
  Tokens a sequence got on the eager step meanwhile (a step with a prefill beside it) are
  counted when it next takes a captured step (`slot_of`).
- `bias_ids` int64 / `bias_values` float32 [num_slots + 1, MAX_LOGIT_BIAS]: logit_bias as padded
  (id, bias) pairs (pad: id 0, bias 0.0).

Memory: (num_slots + 1) x (4 V + 12 MAX_LOGIT_BIAS) bytes, allocated once with the graphs —
at Qwen3-30B-A3B's V = 151936 and num_slots = max_num_seqs = 256: 156.2 MB + 3.2 MB. A slot is
freed once its request has finished (`release_finished`, swept before each captured step); a
step still in flight on the stream with the old owner's row is ordered before the new owner's
reset, so reuse is safe.

`sample_processed` is the graph side: the same math, in the same order, as the eager step's
`eaas.engine.batch_sampling.sample_rows` (which is its reference), as batched tensor operations
with no host loop and no host read.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from eaas.engine import logits as lp_ops
from eaas.engine.params import MAX_LOGIT_BIAS, SamplingParams
from eaas.engine.sampling import sample_batch
from eaas.model.ops import upload

__all__ = ["COUNT_MASK", "PROMPT_BIT", "STOP_BIT", "SamplingSlots", "table_bytes", "uses_slot"]

PROMPT_BIT = 1 << 30
STOP_BIT = 1 << 29
COUNT_MASK = STOP_BIT - 1


def uses_slot(p: SamplingParams) -> bool:
    """Whether a request's processors read per-sequence device state (penalties, min_tokens,
    logit_bias); min_p and logprobs need only the step's own per-row scalars."""
    return (p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1
            or p.min_tokens > 0 or p.logit_bias is not None)


def table_bytes(num_slots: int, vocab_size: int, max_bias: int = MAX_LOGIT_BIAS) -> int:
    """Device bytes of the slot tables (see the module docstring)."""
    return (num_slots + 1) * (4 * vocab_size + 12 * max_bias)


class SamplingSlots:
    """The slot tables of one decode-graph owner (one shard), and which request holds which.

    num_slots: sequences that can hold a slot at once (the scheduler's max_num_seqs: every
    running sequence may need one). vocab_size: V, the LM head's rows.
    """

    def __init__(self, num_slots: int, vocab_size: int, device: Any,
                 max_bias: int = MAX_LOGIT_BIAS) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} is not allowed: an integer >= 1")
        self.num_slots, self.vocab_size, self.device = num_slots, vocab_size, device
        rows = num_slots + 1
        self.table = torch.zeros(rows, vocab_size, dtype=torch.int32, device=device)  # [S+1, V]
        self.bias_ids = torch.zeros(rows, max_bias, dtype=torch.long, device=device)  # [S+1, M]
        self.bias_values = torch.zeros(rows, max_bias, dtype=torch.float32, device=device)
        self._free = list(range(num_slots, 0, -1))  # pop() hands out 1, 2, ...
        self._held: dict[int, tuple[Any, int]] = {}  # id(request) -> (request, slot)
        self._counted = [0] * rows  # output tokens already in each slot's counts

    @property
    def num_held(self) -> int:
        return len(self._held)

    def release_finished(self) -> None:
        """Free the slots of finished requests (before a step takes new ones)."""
        for key, (r, s) in list(self._held.items()):
            if r.finished:
                del self._held[key]
                self._free.append(s)

    def forget(self, r: Any) -> None:
        """Give r's slot back now: its next step takes a fresh one, filled from r's prompt and
        the output tokens on the host. For a step that is replayed: its sampled tokens were
        counted on the device but never taken (the refill is queued after them, so it wipes
        them)."""
        held = self._held.pop(id(r), None)
        if held is not None:
            self._free.append(held[1])

    def slot_of(self, r: Any, pending: int = 0) -> int:
        """r's slot for the step about to run (0 if r needs none), taken and filled on first use;
        tokens r got off the graph since its last captured step are counted now. The step then
        counts the token it samples for r (`sample_processed`), so call this only for a step that
        runs. pending: r's tokens sampled on the graph (so counted) but not yet on the host (a
        step still in flight). r: eaas.engine.request.Request (params, prompt_ids, output_ids,
        stop_ids, finished)."""
        if not uses_slot(r.params):
            return 0
        held = self._held.get(id(r))
        s = held[1] if held is not None else self._take(r)
        n = len(r.output_ids)
        if self._counted[s] < n:
            tail = upload(r.output_ids[self._counted[s]:], self.device)
            self.table[s].index_add_(0, tail, torch.ones_like(tail, dtype=torch.int32))
        self._counted[s] = n + pending + 1  # the pending tokens were counted by their step
        return s

    def _take(self, r: Any) -> int:
        if not self._free:  # every running sequence fits (num_slots >= max_num_seqs)
            raise RuntimeError(f"all {self.num_slots} sampling slots are held: more running "
                               "sequences than the decode graphs were built for")
        s = self._free.pop()
        self._held[id(r)] = (r, s)
        row, dev = self.table[s], self.device
        row.zero_()
        if r.prompt_ids:
            row.index_fill_(0, upload(r.prompt_ids, dev), PROMPT_BIT)
        if r.stop_ids:  # a set: no duplicates, so adding sets the bit
            stops = upload(sorted(r.stop_ids), dev)
            row.index_add_(0, stops, torch.full_like(stops, STOP_BIT, dtype=torch.int32))
        self._counted[s] = 0
        self.bias_ids[s].zero_()
        self.bias_values[s].zero_()
        lb = r.params.logit_bias
        if lb:
            m = len(lb)
            self.bias_ids[s, :m] = upload(list(lb), dev)
            self.bias_values[s, :m] = upload(list(lb.values()), dev, torch.float32)
        return s

    def sample_processed(self, logits: torch.Tensor, temperature: torch.Tensor,
                         top_k: torch.Tensor, top_p: torch.Tensor, keys: torch.Tensor,
                         steps: torch.Tensor, slots: torch.Tensor, min_tokens: torch.Tensor,
                         penalties: Sequence[torch.Tensor], min_p: torch.Tensor,
                         grammar: tuple[torch.Tensor, torch.Tensor], num_top: int
                         ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One token per row after the logits processors, and its log probabilities; counts the
        token into each row's slot. Capturable: no host read, no value-dependent shape.

        logits: float32 [B, V] raw. temperature, top_p: float32 [B]; top_k, keys, steps (each
        row's output length): int64 [B], as `sample_batch`. slots: int64 [B] (0: none).
        min_tokens: int64 [B] (stop ids banned while steps < min_tokens). penalties: (presence,
        frequency, repetition) float32 [B] each (0, 0, 1: off). min_p: float32 [B] (0: off).
        grammar: (bitmask int32 [B, ceil(V / 32)] in xgrammar's layout, bool [B] the rows it
        constrains).
        num_top: top alternatives per row (<= V). Returns (ids int64 [B], (logprob [B], rank
        [B], top_logprobs [B, num_top], top_ids [B, num_top])) as `logits.compute_logprobs`.

        Rows with neither a slot, min_p nor a grammar get exactly `sample_batch` of their raw
        logits (the final `where`), so they sample as on the plain sampling graph.
        """
        table = self.table[slots]  # [B, V] int32 (slot 0: zeros)
        bitmask, constrained = grammar
        x = torch.where(constrained[:, None], lp_ops.apply_token_bitmask(logits, bitmask),
                        logits)  # first, as in `sample_rows`
        active = (steps < min_tokens)[:, None]  # [B, 1]
        x = x.masked_fill(((table & STOP_BIT) != 0) & active, -math.inf)
        x = lp_ops.apply_logit_bias(x, self.bias_ids[slots], self.bias_values[slots])
        presence, frequency, repetition = penalties
        x = lp_ops.apply_penalties(x, table & PROMPT_BIT, table & COUNT_MASK, presence,
                                   frequency, repetition)
        x = lp_ops.apply_min_p(x, temperature, min_p)
        x = torch.where(((slots > 0) | (min_p > 0) | constrained)[:, None], x, logits)
        ids = sample_batch(x, temperature, top_k, top_p, keys, steps)  # [B]
        lp = lp_ops.compute_logprobs(logits, ids, num_top)
        # the sampled token joins its slot's output counts (slot 0 rows add nothing)
        self.table.view(-1).scatter_add_(0, slots * self.vocab_size + ids,
                                         (slots > 0).to(torch.int32))
        return ids, lp
