"""`ActorSystem`: spawns actors, names them, watches the tree, shuts it all down.

Every actor incarnation runs as a task of the system's TaskGroup; `stop()` stops the
top-level actors in reverse start order (each stops its children first, in reverse start
order), cancels whatever outlives its timeout, and closes the group, so no task survives
shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any

from eaas.actors.actor import Actor, ActorState
from eaas.actors.cell import ActorCell
from eaas.actors.clock import Clock, RealClock
from eaas.actors.messages import DeadLetter
from eaas.actors.policy import ChildSpec, RestartPolicy
from eaas.actors.ref import ActorRef, SupervisorRef, cell_of
from eaas.actors.supervisor import Supervisor
from eaas.errors import ActorDeadError, ActorStateError, EscalationError

__all__ = ["ActorSystem", "DeadLetters"]

log = logging.getLogger("eaas.actors")
Event = dict[str, Any]


class DeadLetters:
    """Messages that reached no actor: a total `count` and the most `recent` ones."""

    __slots__ = ("count", "recent")

    def __init__(self, keep: int = 1000) -> None:
        self.count = 0
        self.recent: deque[DeadLetter] = deque(maxlen=keep)

    def add(self, recipient: str, msg: Any, reason: str) -> None:
        self.count += 1
        self.recent.append(DeadLetter(recipient, msg, reason))


class ActorSystem:
    """Owner of a tree of actors. Use as `async with ActorSystem() as system:`.

    It is the `CellHost` of every cell it spawns (see cell.py): the methods under "host
    interface" are what the runtime's cells, refs and supervisors use, and all they use.

    clock: governs restart backoff, intensity windows and event times (FakeClock in tests).
    on_escalation: called with the "escalated" event when a top-level supervisor gives up.
    hook_timeout: seconds allowed to each child stop during restarts and to `on_stop` of a
        crashed instance.
    start_timeout: seconds allowed to each `on_start`; past it the start counts as a crash
        and `spawn`/`start_child` raise `StartTimeoutError`.
    seed: seeds the jitter of restart backoff.
    """

    def __init__(self, clock: Clock | None = None, name: str = "eaas", *,
                 on_escalation: Callable[[Event], None] | None = None,
                 hook_timeout: float = 5.0, start_timeout: float = 30.0,
                 seed: int | None = None,
                 keep_events: int = 1000) -> None:
        self.clock: Clock = clock if clock is not None else RealClock()
        self.name = name
        self.on_escalation = on_escalation
        self.hook_timeout = hook_timeout
        self.start_timeout = start_timeout
        self.rng = random.Random(seed)
        self.dead_letters = DeadLetters()
        self.events: deque[Event] = deque(maxlen=keep_events)
        self.state = "new"                    # new | running | stopping | stopped
        self._tg: asyncio.TaskGroup | None = None
        self._group: asyncio.TaskGroup | None = None
        self._cells: dict[str, ActorCell] = {}
        self._top: list[ActorCell] = []       # top-level cells, start order
        self._listeners: list[Callable[[Event], None]] = []
        self._queues: list[asyncio.Queue[Event]] = []
        self._stopping: asyncio.Future[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> ActorSystem:
        if self.state != "new":
            raise ActorStateError(f"actor system {self.name!r} is {self.state}; "
                                  "a system starts once")
        group = asyncio.TaskGroup()
        await group.__aenter__()
        self._group = self._tg = group
        self.state = "running"
        return self

    async def __aenter__(self) -> ActorSystem:
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop every actor (reverse start order, `timeout` seconds each), then close.

        Idempotent; concurrent callers wait for the same shutdown.
        """
        if self.state == "new":
            self.state = "stopped"
            return
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
            return
        me = asyncio.current_task()
        if any(c.task is me for c in self._cells.values()):
            raise ActorStateError(f"actor system {self.name!r}: stop() must be called from "
                                  "outside the actor tree (an actor cannot await its own end)")
        self._stopping = asyncio.get_running_loop().create_future()
        self.state = "stopping"
        try:
            for cell in reversed(list(self._top)):
                await cell.stop(timeout=timeout)
            # Anything still running (a stuck child, a racing restart): cancel and wait.
            for cell in list(self._cells.values()):
                task = cell.task
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.wait({task}, timeout=timeout)
            self._tg = None
            group, self._group = self._group, None
            if group is not None:
                await group.__aexit__(None, None, None)
        finally:
            self.state = "stopped"
            self._stopping.set_result(None)

    aclose = stop

    # --- spawning ------------------------------------------------------------------------
    async def spawn(self, factory: Callable[[], Actor], name: str, *, mailbox_size: int = 1024,
                    parent: ActorRef | None = None) -> ActorRef:
        """Start an actor and return its ref once `on_start` finished (raises its error).

        With no parent it is an unsupervised top-level actor: a crash stops it for good.
        Under a supervisor's ref it becomes a permanent child of that supervisor; under any
        other ref it is stopped together with that actor (but not restarted).
        """
        if isinstance(parent, SupervisorRef):
            spec = ChildSpec(name, factory, mailbox_size=mailbox_size)
            return await parent.start_child(spec, timeout=self.hook_timeout)
        if parent is not None and not parent.is_alive:
            raise ActorDeadError(f"cannot spawn {name!r} under {parent.name!r}: it is "
                                 f"{parent.state.value}")
        cell = self.add_cell(name, factory, mailbox_size=mailbox_size,
                             parent=None if parent is None else cell_of(parent), spec=None)
        return await self._start_unsupervised(cell)

    async def spawn_supervisor(self, name: str, policy: RestartPolicy,
                               children: Sequence[ChildSpec] = (), *,
                               parent: ActorRef | None = None) -> SupervisorRef:
        """Start a supervisor and its `children` (in order); returns once all are running."""
        if not isinstance(policy, RestartPolicy):
            raise TypeError(f"policy must be a RestartPolicy, got {type(policy).__name__}")
        specs = tuple(children)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"supervisor {name!r}: duplicate child names in {names}")

        def factory() -> Supervisor:
            return Supervisor(policy, specs)

        if isinstance(parent, SupervisorRef):
            spec = ChildSpec(name, factory)
            ref = await parent.start_child(spec, timeout=self.hook_timeout)
        else:
            cell = self.add_cell(name, factory, mailbox_size=1024,
                                 parent=None if parent is None else cell_of(parent), spec=None,
                                 kind="supervisor")
            ref = await self._start_unsupervised(cell)
        assert isinstance(ref, SupervisorRef)
        return ref

    async def _start_unsupervised(self, cell: ActorCell) -> ActorRef:
        try:
            await cell.start(notify_start_failure=False)
        except BaseException:
            if cell.state.is_alive:
                await cell.finalize(ActorState.CRASHED, cell.last_reason or "start failed")
            self.remove_cell(cell)
            raise
        return cell.ref

    # --- lookup, snapshot, idleness ----------------------------------------------------------
    def lookup(self, name: str) -> ActorRef | None:
        cell = self._cells.get(name)
        return None if cell is None else cell.ref

    def snapshot(self) -> dict[str, Any]:
        """The actor tree as plain dicts (JSON/msgpack-ready), for dashboards and health."""

        def node(cell: ActorCell) -> dict[str, Any]:
            return {
                "name": cell.name,
                "parent": None if cell.parent is None else cell.parent.name,
                "kind": cell.kind,
                "state": cell.state.value,
                "restarts": cell.restarts,
                "mailbox_depth": len(cell.mailbox),
                "mailbox_size": cell.mailbox.maxsize,
                "restart_type": None if cell.spec is None else cell.spec.restart,
                "last_reason": cell.last_reason,
                "children": [node(c) for c in cell.children],
            }

        return {"system": self.name, "state": self.state, "time": self.clock.now(),
                "actors": [node(c) for c in self._top],
                "dead_letters": self.dead_letters.count,
                "num_actors": len(self._cells)}

    async def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until no actor has work: empty mailboxes, no handler running, no restart due.

        For tests and orderly hand-offs. A pending backoff on a FakeClock never becomes idle
        until the clock is advanced. Raises TimeoutError after `timeout` (loop time).
        """
        async with asyncio.timeout(timeout):
            calm = 0
            while calm < 3:
                await asyncio.sleep(0)
                calm = calm + 1 if all(c.idle for c in self._cells.values()) else 0

    # --- events ----------------------------------------------------------------------------
    def add_listener(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call `callback(event)` for every event; returns a function that unsubscribes."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def subscribe_events(self, maxsize: int = 1000) -> asyncio.Queue[Event]:
        """A queue that receives every later event (oldest dropped when it is full)."""
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self._queues.append(queue)
        return queue

    # --- host interface (CellHost) ------------------------------------------------------
    @property
    def accepts_tasks(self) -> bool:
        """True from `start()` until `stop()` closes the TaskGroup."""
        return self._tg is not None

    def create_task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run `coro` (an actor incarnation) in the system's TaskGroup."""
        tg = self._tg
        if tg is None:
            coro.close()
            raise ActorStateError(f"actor system {self.name!r} is not running")
        return tg.create_task(coro, name=name)

    def dead_letter(self, recipient: str, msg: Any, reason: str) -> None:
        self.dead_letters.add(recipient, msg, reason)

    def add_cell(self, name: str, factory: Callable[[], Actor], *, mailbox_size: int,
                 parent: ActorCell | None, spec: ChildSpec | None,
                 kind: str = "actor") -> ActorCell:
        """Create a cell (not started) and register it under `name`, under `parent`."""
        if self.state != "running":
            raise ActorStateError(f"actor system {self.name!r} is {self.state}; cannot spawn "
                                  f"{name!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"actor name must be a non-empty str, got {name!r}")
        if not callable(factory):
            raise TypeError(f"factory for actor {name!r} must be callable, got {factory!r}")
        if name in self._cells:
            raise ValueError(f"actor name {name!r} is already taken")
        cell = ActorCell(self, name, factory, mailbox_size=mailbox_size, parent=parent,
                         spec=spec, kind=kind)
        self._cells[name] = cell
        (parent.children if parent is not None else self._top).append(cell)
        return cell

    def remove_cell(self, cell: ActorCell) -> None:
        """Drop a finished actor from the registry and its parent (its name is free again)."""
        if self._cells.get(cell.name) is cell:
            del self._cells[cell.name]
        siblings = cell.parent.children if cell.parent is not None else self._top
        if cell in siblings:
            siblings.remove(cell)
        for child in list(cell.children):
            self.remove_cell(child)

    def emit(self, kind: str, name: str, reason: str | None = None) -> None:
        """Publish an event to `events`, the subscribed queues and the listeners."""
        event: Event = {"type": kind, "name": name, "reason": reason, **self._stamp()}
        self.events.append(event)
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)
        for callback in list(self._listeners):
            try:
                callback(event)
            except Exception:
                log.exception("actor event listener %r failed", callback)

    def _stamp(self) -> dict[str, float]:
        """An event's times: `time` wall-clock (for humans), `mono` the clock's monotonic now."""
        return {"time": self.clock.wall(), "mono": self.clock.now()}

    def report_escalation(self, name: str, error: EscalationError) -> None:
        """A top-level supervisor gave up: log it and call `on_escalation`."""
        event: Event = {"type": "escalated", "name": name, "reason": str(error),
                        **self._stamp(), "top_level": True}
        log.error("top-level supervisor %r gave up: %s", name, error)
        if self.on_escalation is not None:
            try:
                self.on_escalation(event)
            except Exception:
                log.exception("on_escalation callback failed")

