"""Supervised asyncio actors: the runtime every eaas component (expert server, attention
shard, batcher, health monitor) runs on. See DESIGN.md, "Supervision tree".

    async with ActorSystem() as system:
        sup = await system.spawn_supervisor("pool", RestartPolicy("one_for_one"),
                                            [ChildSpec("expert-0", ExpertServer)])
        reply = await system.lookup("expert-0").ask(work, timeout=1.0)

Delivery across a restart (the ref stays the same; a new instance comes from the factory):
asks pending when an incarnation ends fail at once with `ActorDeadError`; tells queued then,
and tells and asks sent while the actor is RESTARTING, are kept and handled by the new
instance. Messages to an actor that is STOPPED or CRASHED for good go to dead letters (asks
raise `ActorDeadError`). Supervision timing (backoff, intensity) and event times follow the
system's clock; message deadlines follow the event loop's timer.
"""

from __future__ import annotations

from eaas.actors.actor import Actor, ActorContext, ActorState
from eaas.actors.clock import Clock, FakeClock, RealClock
from eaas.actors.mailbox import Mailbox
from eaas.actors.messages import DeadLetter, Envelope, Terminated
from eaas.actors.policy import ChildSpec, RestartPolicy, restart_set
from eaas.actors.ref import ActorRef, SupervisorRef
from eaas.actors.supervisor import Supervisor
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
