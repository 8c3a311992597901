"""Run one choice of an HTTP request on the engine: deltas, stop strings, metrics, aborts.

`run_choice` drives `engine.generate` for one prompt (its n sequences: one choice each) and
hands each new piece of output to a callback as a `Step`. Stop strings are applied by the
engine (`SamplingParams.stop`); a stream holds back text that might be the start of one until
it is known not to be, and a trailing U+FFFD (an incomplete UTF-8 sequence the next token may
complete). Whatever ends the call early — a client that went away (the handler task is
cancelled), an exception — the engine request is aborted, so no work outlives its request.

`InflightRequests` tracks running engine requests so that shutdown can drain them: wait a
grace period, then abort the rest with a reason the response carries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from eaas.serving.metrics import ServingMetrics
from eaas.serving.protocol import PromptPlan

log = logging.getLogger("eaas.serving")


@dataclass(slots=True)
class Step:
    """New output of one choice since its previous step."""

    index: int  # choice index
    text: str  # new text (never part of a stop string that cuts the output)
    token_ids: list[int]  # new token ids
    finish_reason: str | None = None  # set on the choice's last step
    stop_reason: int | str | None = None
    error: str | None = None  # why, when finish_reason is "error" or "abort"
    logprobs: list[Any] = field(default_factory=list)  # new tokens' {id: Logprob} (if asked)
    prompt_logprobs: list[Any] | None = None  # on a choice's first step, when asked
    text_offset: int = 0  # characters of this choice's text before `text`


@dataclass(slots=True)
class ChoiceResult:
    """A finished choice (non-streaming responses and usage)."""

    index: int
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    logprobs: list[Any] = field(default_factory=list)
    prompt_logprobs: list[Any] | None = None
    cumulative_logprob: float | None = None


class InflightRequests:
    """Engine request ids in flight, with the reason they were aborted by the server (if so)."""

    def __init__(self) -> None:
        self._ids: dict[str, str | None] = {}
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, request_id: str) -> None:
        if request_id in self._ids:
            raise ValueError(f"request id {request_id!r} is already in flight")
        self._ids[request_id] = None
        self._empty.clear()

    def discard(self, request_id: str) -> None:
        self._ids.pop(request_id, None)
        if not self._ids:
            self._empty.set()

    def abort_reason(self, request_id: str) -> str | None:
        return self._ids.get(request_id)

    async def drain(self, abort: Callable[[str], Awaitable[None]], grace_s: float,
                    reason: str) -> int:
        """Wait up to grace_s for all to finish, then abort the rest; returns how many."""
        try:
            async with asyncio.timeout(grace_s):
                await self._empty.wait()
            return 0
        except TimeoutError:
            pass
        ids = list(self._ids)
        for rid in ids:
            self._ids[rid] = reason
            try:
                async with asyncio.timeout(5.0):
                    await abort(rid)
            except Exception:
                log.exception("aborting request %s during shutdown failed", rid)
        return len(ids)


class _Seq:
    """What one sequence of the engine's output has sent so far."""

    __slots__ = ("result", "sent_chars", "num_tokens", "num_logprobs")

    def __init__(self, result: ChoiceResult) -> None:
        self.result = result
        self.sent_chars = 0  # of the engine's cumulative text
        self.num_tokens = 0
        self.num_logprobs = 0


async def run_choice(engine: Any, plan: PromptPlan, *, index: int, request_id: str,
                     stop: tuple[str, ...], metrics: ServingMetrics, inflight: InflightRequests,
                     on_step: Callable[[Step], Awaitable[None]],
                     arrival: float | None = None) -> list[ChoiceResult]:
    """Generate one prompt's n choices (indices index .. index + n - 1), calling `on_step` for
    each new piece of each; returns the finished choices in index order.

    Raises what `engine.generate` raises before producing output (RequestError,
    EngineOverloadedError, ...). Cancellation aborts the engine request and propagates.
    Stop strings are the engine's (SamplingParams.stop); `stop` here only says how much text
    a stream holds back while it may still turn out to start one.
    """
    arrival = time.monotonic() if arrival is None else arrival
    n = plan.params.n
    seqs = [_Seq(ChoiceResult(index=index + i, prompt_token_ids=plan.prompt_token_ids))
            for i in range(n)]
    keep = plan.params.include_stop_str_in_output
    holdback = 0 if keep else max((len(s) for s in stop), default=1) - 1
    first_at: float | None = None
    last_at: float | None = None
    engine_done = False
    open_ = n  # choices not finished yet
    inflight.add(request_id)
    agen = engine.generate(plan.prompt, plan.params, request_id=request_id)
    try:
        async for out in agen:
            now = time.monotonic()
            new_total = sum(len(c.token_ids) - seqs[c.index].num_tokens for c in out.outputs)
            metrics.observe_tokens(new_total, now, first_at, last_at, arrival)
            if new_total:
                first_at = first_at if first_at is not None else now
                last_at = now
            for comp in out.outputs:
                seq = seqs[comp.index]
                res = seq.result
                if res.finish_reason is not None:
                    continue
                res.prompt_token_ids = list(out.prompt_token_ids or plan.prompt_token_ids)
                step = Step(index=res.index, text="", token_ids=comp.token_ids[seq.num_tokens:],
                            text_offset=seq.sent_chars)
                seq.num_tokens = len(comp.token_ids)
                if comp.logprobs is not None:
                    step.logprobs = comp.logprobs[seq.num_logprobs:]
                    seq.num_logprobs = len(comp.logprobs)
                if res.prompt_logprobs is None and out.prompt_logprobs is not None:
                    res.prompt_logprobs = step.prompt_logprobs = out.prompt_logprobs
                text = comp.text
                if comp.finish_reason is not None:
                    step.text = text[seq.sent_chars:]
                    step.finish_reason, step.stop_reason = comp.finish_reason, comp.stop_reason
                    res.cumulative_logprob = comp.cumulative_logprob
                    if comp.finish_reason in ("error", "abort"):
                        step.error = (inflight.abort_reason(request_id) or out.error
                                      or f"request finished with {comp.finish_reason}")
                else:
                    end = len(text) - holdback
                    while end > seq.sent_chars and text[end - 1] == "\ufffd":
                        end -= 1  # an incomplete UTF-8 sequence may still become a character
                    step.text = text[seq.sent_chars:max(seq.sent_chars, end)]
                seq.sent_chars += len(step.text)
                res.text += step.text
                res.token_ids.extend(step.token_ids)
                res.logprobs.extend(step.logprobs)
                if step.finish_reason is not None:
                    open_ -= 1
                    res.finish_reason, res.stop_reason = step.finish_reason, step.stop_reason
                    res.error = step.error
                    metrics.observe_finished(step.finish_reason, len(res.prompt_token_ids),
                                             time.monotonic(), arrival)
                if step.text or step.token_ids or step.finish_reason is not None:
                    await on_step(step)
            if out.finished:
                engine_done = True
            if open_ == 0 or out.finished:
                break
        for seq in seqs:
            res = seq.result
            if res.finish_reason is None:  # the engine's stream ended without finishing it
                res.finish_reason = "error"
                res.error = (inflight.abort_reason(request_id)
                             or "the engine ended the request early")
                metrics.observe_finished("error", len(res.prompt_token_ids), time.monotonic(),
                                         arrival)
                await on_step(Step(index=res.index, text="", token_ids=[],
                                   finish_reason="error", error=res.error))
    finally:
        inflight.discard(request_id)
        for seq in seqs:
            res = seq.result
            if res.finish_reason is None and first_at is not None:  # cancelled mid-generation
                metrics.observe_finished("abort", len(res.prompt_token_ids), time.monotonic(),
                                         arrival)
        if not engine_done:
            await _abort_quietly(engine, request_id)
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            await aclose()
    return [seq.result for seq in seqs]


async def _abort_quietly(engine: Any, request_id: str) -> None:
    try:
        async with asyncio.timeout(5.0):
            await engine.abort(request_id)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("engine.abort(%r) failed", request_id)
