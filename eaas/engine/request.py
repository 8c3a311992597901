"""One request's state inside its attention shard."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any


from eaas.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
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

    @property
    def prefilled(self) -> bool:
        """The whole prompt is in the KV cache: each step now feeds the last sampled token."""
        return self.num_computed >= len(self.prompt_ids)

    def max_positions(self) -> int:
        """KV positions it may ever hold: prompt + max_tokens - 1 (the last sampled token is
        never fed back), within max_len."""
        return min(len(self.prompt_ids) + self.params.max_tokens - 1, self.max_len)

    def snapshot(self, text: str) -> RequestOutput:
        out = CompletionOutput(0, text, list(self.output_ids), self.finish_reason,
                               self.stop_reason, self.degraded)
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_ids), [out],
                             self.finished, self.metrics, self.error)
