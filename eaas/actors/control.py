"""The supervision protocol: the messages a supervisor and the runtime exchange.

Users never build these: `SupervisorRef.start_child` / `terminate_child` send `StartChild` /
`TerminateChild` as asks; a supervised child's cell sends `ChildExited` to its supervisor's
priority lane when an incarnation ends on its own; a supervisor sends itself `RestartDue`
when a restart backoff has elapsed. (messages.py holds what users see: envelopes, `Terminated`,
dead letters, and the cell's own `Stop` / `Ping`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eaas.actors.messages import SystemMessage
from eaas.actors.policy import ChildSpec

__all__ = ["ChildExited", "RestartDue", "StartChild", "TerminateChild"]


@dataclass(frozen=True, slots=True)
class StartChild:
    """Ask a supervisor to add and start a child; the reply is the child's `ActorRef`."""

    spec: ChildSpec


@dataclass(frozen=True, slots=True)
class TerminateChild:
    """Ask a supervisor to stop a child for good and forget it (unknown names are ignored)."""

    name: str


@dataclass(frozen=True, slots=True)
class ChildExited(SystemMessage):
    """Sent by a supervised child's runtime to its supervisor when an incarnation ends on its own.

    `reason` is None for a normal exit (the child stopped itself), else the error.
    `incarnation` lets the supervisor ignore stale notices.
    """

    name: str
    incarnation: int
    reason: BaseException | None

    def to_wire(self) -> dict[str, Any]:
        reason = None if self.reason is None else repr(self.reason)
        return {"type": "child_exited", "name": self.name, "incarnation": self.incarnation,
                "reason": reason}


@dataclass(frozen=True, slots=True)
class RestartDue(SystemMessage):
    """A supervisor's own reminder that a backoff elapsed: restart these (name, token) pairs.

    A token that no longer matches the child's `restart_token` (a newer plan superseded it)
    is skipped.
    """

    tokens: tuple[tuple[str, int], ...]
