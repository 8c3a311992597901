"""One request's state inside its attention shard."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch

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
    generator: torch.Generator | None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.time()))
    output_ids: list[int] = field(default_factory=list)
    cache: Any = None  # the model's KVCache, created when scheduled, dropped when finished
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    degraded: bool = False

    def next_input(self) -> list[int]:
        """Token ids this step feeds: the whole prompt first, then the last sampled token."""
        return self.prompt_ids if not self.output_ids else self.output_ids[-1:]

    def snapshot(self, text: str) -> RequestOutput:
        out = CompletionOutput(0, text, list(self.output_ids), self.finish_reason,
                               self.stop_reason, self.degraded)
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_ids), [out],
                             self.finished, self.metrics, self.error)
