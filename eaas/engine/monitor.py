"""HealthMonitor: watchdogs that turn silent trouble into events and counters.

- event-loop lag: how late a periodic timer fires (a handler that blocks the loop shows here);
- planner progress: a planner round that has not finished within `stall_timeout_s`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from eaas.actors import Actor


class HealthMonitor(Actor):
    def __init__(self, emit: Callable[[dict], None], counters: dict[str, int], *,
                 interval_s: float = 0.5, lag_warn_s: float = 0.25,
                 planner_progress: dict | None = None, stall_timeout_s: float = 60.0) -> None:
        self._emit = emit
        self.counters = counters
        self.interval_s, self.lag_warn_s = interval_s, lag_warn_s
        self.planner_progress = planner_progress
        self.stall_timeout_s = stall_timeout_s
        self.max_lag_s = 0.0
        self.last_lag_s = 0.0
        self._stalled = False

    async def on_start(self) -> None:
        self.context.create_task(self._watch(), name="health-watch")

    async def _watch(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, time.monotonic() - t0 - self.interval_s)
            self.last_lag_s, self.max_lag_s = lag, max(self.max_lag_s, lag)
            if lag > self.lag_warn_s:
                self.counters["loop_lag_events"] = self.counters.get("loop_lag_events", 0) + 1
                self._emit({"type": "loop_lag", "lag_s": lag})
            self.check_planner()

    def check_planner(self) -> None:
        p = self.planner_progress
        if p is None or "t" not in p:
            return
        stalled = time.monotonic() - p["t"] > self.stall_timeout_s
        if stalled and not self._stalled:
            self.counters["planner_stalls"] = self.counters.get("planner_stalls", 0) + 1
            self._emit({"type": "planner_stalled", "since_s": time.monotonic() - p["t"],
                        "rounds": p.get("rounds", 0)})
        self._stalled = stalled

    async def on_receive(self, msg: Any) -> Any:
        if msg == "stats":
            return {"loop_lag_s": self.last_lag_s, "max_loop_lag_s": self.max_lag_s,
                    "planner_stalled": self._stalled}
        raise TypeError(f"HealthMonitor cannot handle {msg!r}")
