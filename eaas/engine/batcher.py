"""Batcher: coalesces work units arriving from many shards into one call to its expert server.

A flush happens when the pending rows of a layer reach `max_batch_tokens`, or when the oldest
pending unit has waited `max_wait_us`. While a call is out, new arrivals accumulate for the next
one, so a busy server naturally gets bigger batches. Results are split back per unit and told to
each unit's shard; a failed call tells each shard `UnitFailed` at once so it can resend.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any, Callable

import torch

from eaas.actors import Actor
from eaas.config import BatchingConfig
from eaas.engine.messages import ComputeBatch, Stats, UnitFailed, UnitResult, WorkUnit


class Batcher(Actor):
    def __init__(self, server: str, get_server: Callable[[], Any], cfg: BatchingConfig,
                 call_timeout_s: float) -> None:
        self.server = server
        self._get_server = get_server  # -> ActorRef-like with `ask` (local actor or remote process)
        self.cfg = cfg
        self.call_timeout_s = call_timeout_s
        # layer -> [(monotonic arrival time, unit)] in arrival order (unit ids are per shard)
        self._pending: dict[int, list[tuple[float, WorkUnit]]] = defaultdict(list)
        self._wake = asyncio.Event()
        self._busy = False  # a call to the server is out
        self.stats = {"flushes": 0, "rows": 0, "units": 0, "full_flushes": 0, "timer_flushes": 0,
                      "multi_shard_flushes": 0, "failed_calls": 0}

    async def on_start(self) -> None:
        self.context.create_task(self._flusher(), name=f"{self.server}-flusher")

    async def on_receive(self, msg: Any) -> Any:
        if isinstance(msg, WorkUnit):
            self._pending[msg.layer].append((time.monotonic(), msg))
            self._wake.set()
            return None
        if isinstance(msg, Stats):
            return dict(self.stats, pending_rows=self.pending_rows(), busy=int(self._busy))
        raise TypeError(f"Batcher {self.server} cannot handle {type(msg).__name__}")

    def pending_rows(self) -> int:
        return sum(int(u.x.shape[0]) for units in self._pending.values() for _, u in units)

    def _oldest_layer(self) -> tuple[int, float] | None:
        best: tuple[int, float] | None = None
        for layer, units in self._pending.items():
            if units:
                t = units[0][0]
                if best is None or t < best[1]:
                    best = (layer, t)
        return best

    async def _flusher(self) -> None:
        max_wait = self.cfg.max_wait_us / 1e6
        while True:
            oldest = self._oldest_layer()
            if oldest is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            layer, t0 = oldest
            rows = sum(int(u.x.shape[0]) for _, u in self._pending[layer])
            remaining = max_wait - (time.monotonic() - t0)
            if rows < self.cfg.max_batch_tokens and remaining > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    pass
                continue
            full = rows >= self.cfg.max_batch_tokens
            await self._flush(layer, full)

    def _take(self, layer: int) -> list[WorkUnit]:
        units, rows = self._pending[layer], 0
        taken: list[WorkUnit] = []
        limit = self.cfg.max_batch_tokens
        while units and (not taken or rows + int(units[0][1].x.shape[0]) <= limit):
            _, u = units.pop(0)
            taken.append(u)
            rows += int(u.x.shape[0])
        if not units:
            del self._pending[layer]
        return taken

    async def _flush(self, layer: int, full: bool) -> None:
        units = self._take(layer)
        s = self.stats
        s["flushes"] += 1
        s["full_flushes" if full else "timer_flushes"] += 1
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
