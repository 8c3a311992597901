"""Run one choice of an HTTP request on the engine: deltas, stop strings, metrics, aborts.

`run_choice` drives `engine.generate` for one prompt and hands each new piece of output to a
callback as a `Step`. Stop strings are applied here (the engine knows only stop token ids):
text that might be the start of a stop string is held back until it is known not to be, and
so is a trailing U+FFFD (an incomplete UTF-8 sequence the next token may complete).
Whatever ends the call early — a stop string, a client that went away (the handler task is
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
    text: str  # new text (never contains a stop string)
    token_ids: list[int]  # new token ids
    finish_reason: str | None = None  # set on the choice's last step
    stop_reason: int | str | None = None
    error: str | None = None  # why, when finish_reason is "error" or "abort"


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


async def run_choice(engine: Any, plan: PromptPlan, *, index: int, request_id: str,
                     stop: tuple[str, ...], metrics: ServingMetrics, inflight: InflightRequests,
                     on_step: Callable[[Step], Awaitable[None]],
                     arrival: float | None = None) -> ChoiceResult:
    """Generate one choice, calling `on_step` for each new piece; returns the whole choice.

    Raises what `engine.generate` raises before producing output (RequestError,
    EngineOverloadedError, ...). Cancellation aborts the engine request and propagates.
    """
    arrival = time.monotonic() if arrival is None else arrival
    result = ChoiceResult(index=index, prompt_token_ids=plan.prompt_token_ids)
    holdback = max((len(s) for s in stop), default=1) - 1
    sent_chars = 0  # of the engine's cumulative text
    num_tokens = 0
    first_at: float | None = None
    last_at: float | None = None
    engine_done = False
    inflight.add(request_id)
    agen = engine.generate(plan.prompt, plan.params, request_id=request_id)
    try:
        async for out in agen:
            now = time.monotonic()
            comp = out.outputs[0]
            new_ids = comp.token_ids[num_tokens:]
            metrics.observe_tokens(len(new_ids), now, first_at, last_at, arrival)
            if new_ids:
                first_at = first_at if first_at is not None else now
                last_at = now
            num_tokens = len(comp.token_ids)
            result.prompt_token_ids = list(out.prompt_token_ids or plan.prompt_token_ids)
            text = comp.text
            cut = _find_stop(text, stop, max(0, sent_chars - holdback))
            step = Step(index=index, text="", token_ids=list(new_ids))
            if cut is not None:
                end, matched = cut
                step.text = text[sent_chars:end]
                step.finish_reason, step.stop_reason = "stop", matched
            elif out.finished:
                engine_done = True
                step.text = text[sent_chars:]
                step.finish_reason, step.stop_reason = comp.finish_reason, comp.stop_reason
                if comp.finish_reason in ("error", "abort"):
                    step.error = (inflight.abort_reason(request_id) or out.error
                                  or f"request finished with {comp.finish_reason}")
            else:
                end = len(text) - holdback
                while end > sent_chars and text[end - 1] == "\ufffd":
                    end -= 1  # an incomplete UTF-8 sequence may still become a character
                step.text = text[sent_chars:max(sent_chars, end)]
            sent_chars += len(step.text)
            result.text += step.text
            result.token_ids.extend(step.token_ids)
            if step.finish_reason is not None:
                result.finish_reason, result.stop_reason = step.finish_reason, step.stop_reason
                result.error = step.error
                metrics.observe_finished(step.finish_reason, len(result.prompt_token_ids),
                                         time.monotonic(), arrival)
            if step.text or step.token_ids or step.finish_reason is not None:
                await on_step(step)
            if step.finish_reason is not None:
                break
        if result.finish_reason is None:  # the engine's stream ended without a finished output
            result.finish_reason = "error"
            result.error = inflight.abort_reason(request_id) or "the engine ended the request early"
            metrics.observe_finished("error", len(result.prompt_token_ids), time.monotonic(),
                                     arrival)
            await on_step(Step(index=index, text="", token_ids=[], finish_reason="error",
                               error=result.error))
    finally:
        inflight.discard(request_id)
        if result.finish_reason is None and first_at is not None:  # cancelled mid-generation
            metrics.observe_finished("abort", len(result.prompt_token_ids), time.monotonic(),
                                     arrival)
        if not engine_done:
            await _abort_quietly(engine, request_id)
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            await aclose()
    return result


async def _abort_quietly(engine: Any, request_id: str) -> None:
    try:
        async with asyncio.timeout(5.0):
            await engine.abort(request_id)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("engine.abort(%r) failed", request_id)


def _find_stop(text: str, stop: tuple[str, ...], start: int) -> tuple[int, str] | None:
    """The earliest stop string in text[start:], as (its start index, the string)."""
    best: tuple[int, str] | None = None
    for s in stop:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best
