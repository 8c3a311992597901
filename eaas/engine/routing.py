"""The routing-table actor: the one owner of expert -> servers, stamped with a generation.

Routing changes only here. Every change (a server marked dead or alive, a new table from
scaling or replication) makes a new immutable `RoutingSnapshot` with generation + 1 and pushes
it to every subscriber (the attention shards).
"""

from __future__ import annotations

from typing import Any, Callable

from eaas.actors import Actor
from eaas.engine.events import stamp
from eaas.engine.messages import (RoutingUpdate, SetServerState, SetTable,
                                  Subscribe)
from eaas.engine.placement import RoutingSnapshot


class RoutingTable(Actor):
    def __init__(self, initial: RoutingSnapshot, emit: Callable[[dict], None],
                 on_change: Callable[[RoutingSnapshot], None] | None = None) -> None:
        self.snapshot = initial
        self._on_change = on_change
        self._subscribers: list[Any] = []
        self._emit = emit
        self.history: list[dict] = []

    async def on_receive(self, msg: Any) -> Any:
        if isinstance(msg, Subscribe):
            self._subscribers.append(msg.ref)
            return self.snapshot
        if isinstance(msg, SetServerState):
            dead = set(self.snapshot.dead)
            if msg.alive == (msg.name not in dead):
                return self.snapshot  # no change
            (dead.discard if msg.alive else dead.add)(msg.name)
            self._publish(RoutingSnapshot(self.snapshot.generation + 1, self.snapshot.table,
                                          frozenset(dead)),
                          f"{msg.name} {'alive' if msg.alive else 'dead'}: {msg.reason}")
            return self.snapshot
        if isinstance(msg, SetTable):
            table = {int(l): {int(e): tuple(s) for e, s in ex.items()}
                     for l, ex in msg.table.items()}
            self._publish(RoutingSnapshot(self.snapshot.generation + 1, table, self.snapshot.dead),
                          msg.reason or "new table")
            return self.snapshot
        raise TypeError(f"RoutingTable cannot handle {type(msg).__name__}")

    def _publish(self, snap: RoutingSnapshot, reason: str) -> None:
        self.snapshot = snap
        if self._on_change is not None:
            self._on_change(snap)
        event = stamp({"type": "routing_changed", "generation": snap.generation,
                       "reason": reason, "dead": sorted(snap.dead)})
        self.history.append(event)
        self._emit(event)
        for ref in self._subscribers:
            ref.tell_nowait(RoutingUpdate(snap))
