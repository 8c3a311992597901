"""Message envelopes, the cell's own system messages (`Stop`, `Ping`), `Terminated`, dead letters.

Data messages travel in an `Envelope` (the message plus, for an ask, the reply future).
System messages are small frozen types that ride the mailbox's priority lane and overtake
data. Everything that may one day cross a process boundary has a `to_wire()` form made of
msgpack-friendly plain values (str, int, float, bool, None, list, dict), so an `ActorRef` can
later point into another process without changing its callers. The supervision protocol
(`ChildExited`, `StartChild`, ...) lives in control.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Envelope",
    "SystemMessage",
    "Stop",
    "Ping",
    "Terminated",
    "DeadLetter",
    "STOP",
]


class Envelope:
    """A data message on its way to an actor. `reply` is the caller's future for an ask."""

    __slots__ = ("msg", "reply")

    def __init__(self, msg: Any, reply: asyncio.Future[Any] | None = None) -> None:
        self.msg = msg
        self.reply = reply

    def to_wire(self, recipient: str, ask_id: int | None = None) -> dict[str, Any]:
        """Plain-dict form for a remote transport; the reply future becomes an `ask_id`."""
        return {"to": recipient, "msg": self.msg, "ask_id": ask_id}

    @staticmethod
    def from_wire(wire: dict[str, Any]) -> tuple[str, Any, int | None]:
        """Inverse of `to_wire`: (recipient, msg, ask_id)."""
        return wire["to"], wire["msg"], wire.get("ask_id")


class SystemMessage:
    """Base of messages that take the priority lane."""

    __slots__ = ()


class Stop(SystemMessage):
    """Ask the actor loop to finish after the current message (use the `STOP` singleton)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "STOP"


STOP = Stop()


class Ping(SystemMessage):
    """Liveness probe answered by the runtime itself (not `on_receive`) with a status dict."""

    __slots__ = ("reply",)

    def __init__(self, reply: asyncio.Future[dict[str, Any]]) -> None:
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Terminated(SystemMessage):
    """Delivered to `on_receive` of every watcher when the watched actor stops or dies for good.

    `reason` is "stopped" for a normal stop, else the repr of the error that killed it.
    """

    name: str
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": "terminated", "name": self.name, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be delivered: who it was for, what it was, and why."""

    recipient: str
    msg: Any
    reason: str
