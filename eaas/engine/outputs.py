"""Request outputs, named as vLLM names them (`request_id`, `outputs[i].text`, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Logprob:
    """One token's log probability at one position (vLLM's `Logprob`): log_softmax of the
    model's raw logits; rank 1 is the most likely token."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# one position's {token id: Logprob}: the sampled (or prompt) token first, then the top N
PositionLogprobs = dict[int, Logprob]


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence of a request: index i of its n (`SamplingParams.n`)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop token id or string; None for eos
    degraded: bool = False  # an expert was skipped under the `degrade` no-replica policy
    logprobs: list[PositionLogprobs] | None = None  # per token, when SamplingParams.logprobs
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs (if computed)


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock timestamps (time.time()) of a request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    """The state of one request: cumulative text and token ids so far (streamed as it grows)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when finish_reason == "error"
    extra: dict = field(default_factory=dict)
    # per prompt token (None for the first), when SamplingParams.prompt_logprobs
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason if self.outputs else None
