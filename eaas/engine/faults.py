"""Seeded fault injection: kill, hang or delay expert servers at given times or at random.

    plan = FaultPlan.random(seed=3, count=5, kinds=("kill",), every_s=2.0)
    report = await FaultInjector(engine, plan).run()

With `wait_recovered=True` (default) each fault waits until every server that is not dead for
good is serving again, so faults exercise failover one at a time (as a chaos test wants) rather
than taking down every replica of an expert at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

KINDS = ("kill", "hang", "delay")


@dataclass(frozen=True, slots=True)
class FaultEvent:
    at_s: float  # seconds after the injector starts
    kind: str  # kill | hang | delay
    server: str | None = None  # None: a random live server (seeded)
    seconds: float = 0.0  # hang / delay duration

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"FaultEvent.kind={self.kind!r} is not one of {KINDS}")
        if self.at_s < 0 or self.seconds < 0:
            raise ValueError("FaultEvent.at_s and .seconds must be >= 0")


@dataclass(frozen=True, slots=True)
class FaultPlan:
    events: tuple[FaultEvent, ...]
    seed: int = 0
    wait_recovered: bool = True

    @classmethod
    def random(cls, *, seed: int, count: int, kinds: tuple[str, ...] = ("kill",),
               every_s: float = 1.0, seconds: float = 1.0, wait_recovered: bool = True
               ) -> FaultPlan:
        rng = random.Random(seed)
        events = tuple(FaultEvent(at_s=every_s * (i + 1), kind=rng.choice(kinds),
                                  seconds=seconds) for i in range(count))
        return cls(events, seed, wait_recovered)


@dataclass(slots=True)
class FaultInjector:
    engine: Any  # AsyncEngine
    plan: FaultPlan
    recover_timeout_s: float = 60.0
    done: list[dict] = field(default_factory=list)

    async def run(self) -> list[dict]:
        rng = random.Random(self.plan.seed)
        t0 = time.monotonic()
        for ev in sorted(self.plan.events, key=lambda e: e.at_s):
            await asyncio.sleep(max(0.0, t0 + ev.at_s - time.monotonic()))
            if self.plan.wait_recovered:
                await self.engine.wait_servers_ready(timeout=self.recover_timeout_s)
            live = [s["name"] for s in self.engine.snapshot()["servers"] if s["state"] == "alive"]
            server = ev.server or rng.choice(sorted(live))
            before = self.engine.incarnation(server)
            await self.engine.inject_fault(server, ev.kind, seconds=ev.seconds)
            self.done.append({"t": time.monotonic() - t0, "kind": ev.kind, "server": server,
                              "seconds": ev.seconds})
            if self.plan.wait_recovered and ev.kind in ("kill", "hang") and \
                    self.engine.config.placement.server_mode == "process":
                # one fault at a time: the next waits for this server's replacement
                await self.engine.wait_servers_ready(self.recover_timeout_s, {server: before})
        if self.plan.wait_recovered:
            await self.engine.wait_servers_ready(timeout=self.recover_timeout_s)
        return self.done
