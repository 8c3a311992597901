"""What one step of a shard's lane holds (`StepPlanning`, a mixin of `AttentionShard`,
eaas/engine/shard.py): each request's prefill chunk under the step's token budget, and — on the
co-located captured path, fast mode — which prompts run as rows of the decode graph
(`DecodeGraphs.rows_of(..., chunks)`) and which step runs eagerly."""

from __future__ import annotations

from typing import Any

from eaas.engine.decode_graph import DecodeGraphs
from eaas.engine.request import Request

__all__ = ["StepPlanning"]


class StepPlanning:
    """_chunks / _rows_prefill / _plan over the shard's config, model and DecodeGraphs."""

    deps: Any
    model: Any
    graphs: DecodeGraphs | None
    _forking: Any

    def _chunks(self, reqs: list[Request]) -> list[list[int]]:
        """Each request's tokens this step: the next prefill chunk (prompts share the step's
        budget of scheduler.max_num_batched_tokens; a prompt over it is split across steps, so a
        long prompt never stalls the decodes beside it) or its last sampled token."""
        budget = self.deps.config.scheduler.max_num_batched_tokens
        budget -= sum(1 for r in reqs if r.prefilled)  # decodes first: one token each
        chunks = []
        for r in reqs:
            if r.prefilled:
                chunks.append(r.output_ids[-1:])
                continue
            n = max(1, min(len(r.prompt_ids) - r.num_computed, budget))
            budget -= n
            chunks.append(r.prompt_ids[r.num_computed:r.num_computed + n])
        return chunks

    def _rows_prefill(self, r: Request) -> bool:
        """Whether r's prompt is prefilled as rows of the captured step (`DecodeGraphs.rows_of`)
        rather than by an eager step: decided by the request alone — its prompt fits the
        largest bucket and it needs nothing of the eager step (prompt logprobs, a group forking
        its sequences)."""
        assert self.graphs is not None
        return (len(r.prompt_ids) <= self.graphs.buckets[-1] and r.params.prompt_logprobs is None
                and not self._forking(r))

    def _plan(self, reqs: list[Request]) -> tuple[list[Request], list[list[int] | None] | None]:
        """This step's requests and, for a step on the captured path, their prompt chunks (None
        for a decode row, [] for a prompt that waits for the next step: the bucket is full).
        A step with a prompt that needs the eager path runs eagerly (chunks None), without the
        prompts that go as rows: they wait for the next captured step.

        Fast mode only: in batch-invariant mode every prompt is prefilled by the eager step, as
        on the dispatch path, so the co-located engine's tokens equal the dispatch path's and
        the eager step's bit for bit (rows and the eager step's attention round differently)."""
        reqs = [r for r in reqs if not r.finished]
        prompts = [r for r in reqs if not r.prefilled]
        if not prompts or self.model.batch_invariant:
            return reqs, None
        rows_ok = {id(r) for r in prompts if self._rows_prefill(r)}
        if len(rows_ok) < len(prompts):
            return [r for r in reqs if id(r) not in rows_ok], None
        assert self.graphs is not None
        room = self.graphs.buckets[-1] - (len(reqs) - len(prompts))
        chunks: list[list[int] | None] = []
        for r, c in zip(reqs, self._chunks(reqs)):
            if r.prefilled:
                chunks.append(None)
                continue
            c = c[:max(room, 0)]
            room -= len(c)
            chunks.append(c)
        return reqs, chunks
