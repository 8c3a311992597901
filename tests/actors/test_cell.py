"""ActorCell on its own: a fake `CellHost` (no ActorSystem) drives one cell's whole life."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from eaas.actors import Actor, ActorState, ActorSystem, Clock, FakeClock
from eaas.actors.cell import ActorCell, CellHost
from eaas.actors.policy import ChildSpec
from eaas.errors import ActorDeadError, ActorStateError, EscalationError


class FakeHost:
    """The smallest CellHost: one TaskGroup, lists for events and dead letters."""

    def __init__(self, tg: asyncio.TaskGroup | None) -> None:
        self.name = "fake"
        self.clock: Clock = FakeClock()
        self.rng = random.Random(0)
        self.hook_timeout = 1.0
        self.start_timeout = 1.0
        self.tg = tg
        self.events: list[tuple[str, str, str | None]] = []
        self.dead: list[tuple[str, Any, str]] = []
        self.removed: list[str] = []

    @property
    def accepts_tasks(self) -> bool:
        return self.tg is not None

    def create_task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        assert self.tg is not None
        return self.tg.create_task(coro, name=name)

    def emit(self, kind: str, name: str, reason: str | None = None) -> None:
        self.events.append((kind, name, reason))

    def dead_letter(self, recipient: str, msg: Any, reason: str) -> None:
        self.dead.append((recipient, msg, reason))

    def report_escalation(self, name: str, error: EscalationError) -> None:
        raise AssertionError(f"no supervisor here, yet {name!r} escalated: {error}")

    def add_cell(self, name: str, factory: Callable[[], Actor], *, mailbox_size: int,
                 parent: ActorCell | None, spec: ChildSpec | None,
                 kind: str = "actor") -> ActorCell:
        return ActorCell(self, name, factory, mailbox_size=mailbox_size, parent=parent,
                         spec=spec, kind=kind)

    def remove_cell(self, cell: ActorCell) -> None:
        self.removed.append(cell.name)


class Echo(Actor):
    async def on_receive(self, msg: Any) -> Any:
        if msg == "boom":
            raise RuntimeError("boom")
        return ("echo", msg)


def test_both_hosts_satisfy_the_protocol() -> None:
    assert isinstance(FakeHost(None), CellHost) and isinstance(ActorSystem(), CellHost)


async def test_a_fake_host_runs_a_cell_through_its_life() -> None:
    async with asyncio.TaskGroup() as tg:
        host = FakeHost(tg)
        cell = host.add_cell("e", Echo, mailbox_size=4, parent=None, spec=None)
        await cell.start(notify_start_failure=False)
        ref = cell.ref
        assert ref.state is ActorState.RUNNING and ref.to_wire() == {"system": "fake", "name": "e"}
        assert await ref.ask(1, timeout=1.0) == ("echo", 1)
        ref.tell_nowait("boom")                 # unsupervised: a crash ends it for good
        with pytest.raises(ActorDeadError):
            await ref.ask(2, timeout=1.0)
        assert ref.state is ActorState.CRASHED
        ref.tell_nowait("late")
        await ref.stop()
    assert host.events == [("actor_started", "e", None),
                           ("actor_crashed", "e", "RuntimeError('boom')")]
    assert host.dead == [("e", 2, "crashed"), ("e", "late", "crashed")]
    assert host.removed == ["e"]


async def test_a_host_that_takes_no_tasks_refuses_the_start() -> None:
    host = FakeHost(None)
    cell = host.add_cell("e", Echo, mailbox_size=4, parent=None, spec=None)
    with pytest.raises(ActorStateError, match="'fake' is not running"):
        await cell.start(notify_start_failure=False)
    assert cell.state is ActorState.NEW and host.events == []
