"""Supervised asyncio actors: the runtime every eaas component (expert server, attention
shard, batcher, health monitor) runs on. See DESIGN.md, "Supervision tree"."""

from __future__ import annotations

from eaas.actors.actor import Actor, ActorContext, ActorState
from eaas.actors.clock import Clock, FakeClock, RealClock
from eaas.actors.mailbox import Mailbox
from eaas.actors.messages import DeadLetter, Envelope, Terminated
from eaas.actors.ref import ActorRef, SupervisorRef
from eaas.actors.supervisor import ChildSpec, RestartPolicy, Supervisor, restart_set
from eaas.actors.system import ActorSystem, DeadLetters

__all__ = [
    "Actor",
    "ActorContext",
    "ActorRef",
    "ActorState",
    "ActorSystem",
    "ChildSpec",
    "Clock",
    "DeadLetter",
    "DeadLetters",
    "Envelope",
    "FakeClock",
    "Mailbox",
    "RealClock",
    "RestartPolicy",
    "Supervisor",
    "SupervisorRef",
    "Terminated",
    "restart_set",
]
