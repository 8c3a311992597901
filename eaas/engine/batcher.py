"""Batcher: coalesces work units arriving from many shards into one call to its expert server.

A layer's pending units are flushed as one call when the first of these happens:
- full: their rows reach `max_batch_tokens`;
- complete: every unit that can come this round is here. Each unit says how many units of its
  layer may arrive this round at most (`WorkUnit.round_units`: the lanes running a step in the
  whole engine, its own included). A lone decode request (round_units=1) is flushed at once:
  nothing else can join it, so waiting would only add latency;
- timer: the oldest unit has waited `max_wait_us`.
While a call is out, new arrivals accumulate for the next one, so a busy server naturally gets
bigger batches. Results are split back per unit and told to each unit's shard; a failed call
tells each shard `UnitFailed` at once so it can resend.

Timer precision: asyncio's epoll selector rounds every timeout up to whole milliseconds, so a
200 us window slept on a timer lasts ~1 ms. The last `_SPIN_S` of a window is therefore waited
by yielding to the loop (other tasks run meanwhile), which keeps `max_wait_us` honest.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import torch

from eaas.actors import Actor
from eaas.config import BatchingConfig
from eaas.engine.messages import ComputeBatch, Stats, UnitFailed, UnitResult, WorkUnit

_SPIN_S = 1e-3  # epoll's timer resolution: closer deadlines are polled, not slept


class _Pending:
    """The units of one layer waiting for a flush, in arrival order."""

    __slots__ = ("units", "arrived", "rows", "round_units")

    def __init__(self) -> None:
        self.units: list[WorkUnit] = []
        self.arrived: list[float] = []  # monotonic arrival time of each unit
        self.rows = 0
        self.round_units = 0  # max hint over the units here; 0: unknown

    def add(self, u: WorkUnit, now: float) -> None:
        self.units.append(u)
        self.arrived.append(now)
        self.rows += int(u.x.shape[0])
        self.round_units = max(self.round_units, u.round_units)

    @property
    def since(self) -> float:
        return self.arrived[0]

    @property
    def complete(self) -> bool:
        return 0 < self.round_units <= len(self.units)


class Batcher(Actor):
    def __init__(self, server: str, get_server: Callable[[], Any], cfg: BatchingConfig,
                 call_timeout_s: float) -> None:
        self.server = server
        self._get_server = get_server  # -> ActorRef-like with `ask` (local actor or remote process)
        self.cfg = cfg
        self.call_timeout_s = call_timeout_s
        self._pending: dict[int, _Pending] = {}  # layer -> its waiting units (unit ids per shard)
        self._wake = asyncio.Event()
        self._busy = False  # a call to the server is out
        self.stats = {"flushes": 0, "rows": 0, "units": 0, "full_flushes": 0, "timer_flushes": 0,
                      "complete_flushes": 0, "multi_shard_flushes": 0, "failed_calls": 0}

    async def on_start(self) -> None:
        self.context.create_task(self._flusher(), name=f"{self.server}-flusher")

    async def on_receive(self, msg: Any) -> Any:
        if isinstance(msg, WorkUnit):
            p = self._pending.get(msg.layer)
            if p is None:
                p = self._pending[msg.layer] = _Pending()
            p.add(msg, time.monotonic())
            self._wake.set()
            return None
        if isinstance(msg, Stats):
            return dict(self.stats, pending_rows=self.pending_rows(), busy=int(self._busy))
        raise TypeError(f"Batcher {self.server} cannot handle {type(msg).__name__}")

    def pending_rows(self) -> int:
        return sum(p.rows for p in self._pending.values())

    def _next(self, now: float) -> tuple[int | None, str, float]:
        """(layer to flush now | None, why, seconds until the oldest window closes).

        A full or complete layer goes first (oldest first), then an expired one."""
        max_wait = self.cfg.max_wait_us / 1e6
        ready: tuple[float, int, str] | None = None
        remaining = float("inf")
        for layer, p in self._pending.items():
            why = ("full" if p.rows >= self.cfg.max_batch_tokens else
                   "complete" if p.complete else
                   "timer" if now - p.since >= max_wait else "")
            if why and (ready is None or p.since < ready[0]):
                ready = (p.since, layer, why)
            remaining = min(remaining, max_wait - (now - p.since))
        if ready is None:
            return None, "", remaining
        return ready[1], ready[2], 0.0

    async def _flusher(self) -> None:
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            layer, why, remaining = self._next(time.monotonic())
            if layer is not None:
                await self._flush(layer, why)
                continue
            if remaining <= _SPIN_S:
                await asyncio.sleep(0)  # poll: a timer would fire up to 1 ms late
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining - _SPIN_S)
            except TimeoutError:
                pass

    def _take(self, layer: int) -> list[WorkUnit]:
        p = self._pending[layer]
        limit = self.cfg.max_batch_tokens
        taken: list[WorkUnit] = []
        rows = 0
        for u in p.units:
            n = int(u.x.shape[0])
            if taken and rows + n > limit:
                break
            taken.append(u)
            rows += n
        rest = p.units[len(taken):]
        if not rest:
            del self._pending[layer]
        else:
            left = self._pending[layer] = _Pending()
            for u, t in zip(rest, p.arrived[len(taken):]):
                left.add(u, t)
        return taken

    async def _flush(self, layer: int, why: str) -> None:
        units = self._take(layer)
        s = self.stats
        s["flushes"] += 1
        s[f"{why}_flushes"] += 1
        s["units"] += len(units)
        if len({id(u.reply_to) for u in units}) > 1:
            s["multi_shard_flushes"] += 1
        x = torch.cat([u.x for u in units]) if len(units) > 1 else units[0].x  # [N, H]
        ids = torch.cat([u.expert_ids for u in units]) if len(units) > 1 else units[0].expert_ids
        s["rows"] += int(x.shape[0])
        self._busy = True
        try:
            y = await self._get_server().ask(ComputeBatch(layer, x, ids),
                                             timeout=self.call_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the server died, hung or refused: each unit goes back to its shard
            s["failed_calls"] += 1
            reason = f"{type(e).__name__}: {e}"
            for u in units:
                u.reply_to.tell_nowait(UnitFailed(u.unit_id, u.attempt, self.server, reason))
            return
        finally:
            self._busy = False
        start = 0
        for u in units:
            n = int(u.x.shape[0])
            y_u = y[start:start + n]
            u.reply_to.tell_nowait(UnitResult(u.unit_id, u.attempt, self.server, y_u))
            start += n
