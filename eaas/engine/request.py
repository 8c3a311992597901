"""One request's state inside its attention shard; a group of sequences for n > 1 / best_of."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from eaas.engine.outputs import (CompletionOutput, PositionLogprobs, RequestMetrics,
                                 RequestOutput)
from eaas.engine.sampling import SamplingParams


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]  # eos ids (unless ignore_eos) + params.stop_token_ids
    max_len: int  # prompt + output tokens allowed (max_model_len)
    queue: asyncio.Queue  # RequestOutput snapshots for the caller
    noise_key: int  # sampler noise key (eaas.engine.sampling.fold_seed of its seed)
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.time()))
    output_ids: list[int] = field(default_factory=list)
    blocks: Any = None  # its eaas.engine.blocks.BlockTable while it holds KV blocks
    num_computed: int = 0  # positions in the KV cache (prompt chunks done + tokens fed back)
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    degraded: bool = False
    eos_ids: frozenset[int] = frozenset()  # the model's eos ids among stop_ids (stop_reason None)
    index: int = 0  # this sequence's index among its group's (0 without a group)
    group: SeqGroup | None = None  # n > 1 or best_of: the sequences sharing this prompt
    text: str = ""  # the output text so far (cut before a stop string)
    detok: Any = None  # eaas.model.TextStream of output_ids, once the first token is settled
    logprobs: list[PositionLogprobs] | None = None  # when params.logprobs is not None
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # when params.prompt_logprobs
    grammar: Any = None  # eaas.engine.structured.Matcher when params.structured_outputs

    @property
    def prefilled(self) -> bool:
        """The whole prompt is in the KV cache: each step now feeds the last sampled token."""
        return self.num_computed >= len(self.prompt_ids)

    def max_positions(self) -> int:
        """KV positions it may ever hold: prompt + max_tokens - 1 (the last sampled token is
        never fed back), within max_len."""
        return min(len(self.prompt_ids) + self.params.max_tokens - 1, self.max_len)

    def completion(self, index: int | None = None) -> CompletionOutput:
        track = self.logprobs is not None or self.params.num_sequences > self.params.n
        return CompletionOutput(self.index if index is None else index, self.text,
                                list(self.output_ids), self.finish_reason, self.stop_reason,
                                self.degraded,
                                None if self.logprobs is None else list(self.logprobs),
                                self.cumulative_logprob if track else None)

    def snapshot(self) -> RequestOutput:
        if self.group is not None:
            return self.group.snapshot()
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_ids),
                             [self.completion()], self.finished, self.metrics, self.error,
                             prompt_logprobs=self.prompt_logprobs)

    def publish(self) -> None:
        """Hand the caller the current state (a group's once per change of any sequence;
        with best_of > n only the final one, since the best n are known only at the end)."""
        g = self.group
        if g is not None and g.best_of > g.n and not g.finished:
            return
        self.queue.put_nowait(self.snapshot())


@dataclass(slots=True, eq=False)
class SeqGroup:
    """The sequences of one request that share its prompt: members[0] (the leader) runs the
    prefill; the others are forked from it when its prompt is in the KV cache — they share its
    full prompt blocks and sample their first token from the same logits row.

    n: sequences returned; best_of: sequences generated (the n with the highest cumulative
    log probability are returned, re-indexed 0..n-1).
    """

    members: list[Request]
    n: int
    best_of: int
    forked: bool = False  # the followers have been forked from the leader

    @property
    def leader(self) -> Request:
        return self.members[0]

    @property
    def followers(self) -> list[Request]:
        return self.members[1:]

    @property
    def finished(self) -> bool:
        return all(m.finished for m in self.members)

    def snapshot(self) -> RequestOutput:
        lead = self.leader
        members = self.members
        if self.best_of > self.n and self.finished:
            members = sorted(members, key=lambda m: -m.cumulative_logprob)[:self.n]
        outs = [m.completion(i) for i, m in enumerate(members)]
        error = next((m.error for m in self.members if m.error), None)
        return RequestOutput(lead.request_id, lead.prompt, list(lead.prompt_ids), outs,
                             self.finished, lead.metrics, error,
                             prompt_logprobs=lead.prompt_logprobs)
