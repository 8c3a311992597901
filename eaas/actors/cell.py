"""`ActorCell`: the runtime behind one actor name — mailbox, lifecycle, incarnations.

A cell outlives its actor instances: a restart replaces the instance (a fresh
`factory()` result) but keeps the cell, its mailbox and its `ActorRef`. Each incarnation
runs as one task owned by the TaskGroup of the cell's host (the system, a `CellHost`), and
the tasks the actor creates belong to that incarnation's own TaskGroup (cancelled when it ends).

What happens to messages when an incarnation ends:
- the ask being handled and every ask still queued fail with `ActorDeadError` at once;
- if the actor will (possibly) be restarted (state RESTARTING), queued and newly sent tells
  wait in the mailbox for the new instance, and new asks wait too;
- if it ends for good (STOPPED / CRASHED), the mailbox closes and everything in it, and
  everything sent later, goes to dead letters (asks fail with `ActorDeadError`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, runtime_checkable

from eaas.actors.actor import Actor, ActorContext, ActorState
from eaas.actors.clock import Clock
from eaas.actors.control import ChildExited
from eaas.actors.mailbox import Mailbox
from eaas.actors.messages import STOP, Envelope, Ping, Stop, Terminated
from eaas.actors.policy import ChildSpec
from eaas.actors.ref import ActorRef, SupervisorRef, cell_of
from eaas.errors import (ActorDeadError, ActorStateError, EscalationError, InjectedFault,
                         MailboxClosedError,
                         StartTimeoutError)

__all__ = ["ActorCell", "CellHost"]

log = logging.getLogger("eaas.actors")
S = ActorState
_TERMINAL = (S.STOPPED, S.CRASHED)


@runtime_checkable
class CellHost(Protocol):
    """What a cell, its ref and a supervisor working through it need from the system.

    `ActorSystem` implements it; a test may drive a cell with a small fake instead.
    """

    name: str                 # the system's name (errors, wire addresses)
    clock: Clock              # supervision timing, event times
    rng: random.Random        # restart-backoff jitter
    hook_timeout: float       # each child stop in a restart; on_stop after a crash
    start_timeout: float      # each on_start

    @property
    def accepts_tasks(self) -> bool: ...      # the TaskGroup below is open

    def create_task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run an incarnation in the host's TaskGroup (the owner of every incarnation)."""

    def emit(self, kind: str, name: str, reason: str | None = None) -> None:
        """Publish a lifecycle event ("actor_started", "actor_crashed", "escalated", ...)."""

    def dead_letter(self, recipient: str, msg: Any, reason: str) -> None:
        """Count a message that reached no actor."""

    def report_escalation(self, name: str, error: EscalationError) -> None:
        """A top-level supervisor gave up (it had no supervisor to escalate to)."""

    def add_cell(self, name: str, factory: Callable[[], Actor], *, mailbox_size: int,
                 parent: ActorCell | None, spec: ChildSpec | None,
                 kind: str = "actor") -> ActorCell:
        """Create a cell and register it under `name` (unique in the host), under `parent`."""

    def remove_cell(self, cell: ActorCell) -> None:
        """Unregister a finished cell and its subtree; its name is free again."""


class ActorCell:
    """Runtime state of one actor name. Internal: users hold `ActorRef`s."""

    def __init__(self, host: CellHost, name: str, factory: Callable[[], Actor], *,
                 mailbox_size: int, parent: ActorCell | None, spec: ChildSpec | None,
                 kind: str) -> None:
        self.host = host
        self.name = name
        self.factory = factory
        self.parent = parent
        self.spec = spec                  # set when supervised: restart type, factory
        self.kind = kind                  # "actor" | "supervisor"
        self.mailbox = Mailbox(mailbox_size)
        self.state = S.NEW
        self.children: list[ActorCell] = []     # start order
        self.watchers: set[ActorCell] = set()
        self.watching: set[ActorCell] = set()
        self.incarnation = 0
        self.restarts = 0
        self.restart_token = 0            # bumped by the supervisor when it plans a restart
        self.last_reason: str | None = None
        self.instance: Actor | None = None
        self._task: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._owned: set[asyncio.Task[Any]] = set()
        self._current: asyncio.Future[Any] | None = None
        self._stop_mode: str | None = None     # None | "final" | "restart" | "self"
        self._waiting = False
        self.ref: ActorRef = (SupervisorRef if kind == "supervisor" else ActorRef)(self)

    def __repr__(self) -> str:
        return f"<ActorCell {self.name} {self.state.value}>"

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The task of the current (or last) incarnation."""
        return self._task

    @property
    def supervised(self) -> bool:
        return self.spec is not None

    @property
    def idle(self) -> bool:
        """No work pending here: waiting on an empty mailbox, or not running at all."""
        st = self.state
        if st in _TERMINAL or st is S.NEW:
            return True
        if st is not S.RUNNING or not self._waiting or len(self.mailbox):
            return False
        pending = getattr(self.instance, "pending_restarts", 0)
        return not pending

    # --- starting ----------------------------------------------------------------------
    async def start(self, *, notify_start_failure: bool) -> None:
        """Create a fresh instance, run `on_start`, return once it is RUNNING.

        If `on_start` (or the factory) fails, raises that error; the cell is left
        RESTARTING (and, if `notify_start_failure`, its supervisor is told, as for a crash).
        """
        if self.state not in (S.NEW, S.RESTARTING, S.STOPPED, S.CRASHED):
            raise ActorStateError(f"actor {self.name!r} cannot start while {self.state.value}")
        host = self.host
        if not host.accepts_tasks:
            raise ActorStateError(f"actor system {host.name!r} is not running")
        instance = self.factory()
        if not isinstance(instance, Actor):
            raise TypeError(f"factory for actor {self.name!r} must return an Actor, "
                            f"got {type(instance).__name__}")
        if self.kind != "supervisor" and instance.supervises:
            self.kind = "supervisor"          # a ChildSpec may build a Supervisor directly
            self.ref.__class__ = SupervisorRef
        self.mailbox.reopen()
        self.incarnation += 1
        first = self.incarnation == 1
        if not first:
            self.restarts += 1
        instance.context = ActorContext(self)
        self.instance = instance
        self._stop_mode = None
        self.state = S.STARTING
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = task = host.create_task(
            self._run(instance, started, notify_start_failure), name=f"actor:{self.name}")
        host.emit("actor_started" if first else "actor_restarted", self.name)
        try:
            async with asyncio.timeout(host.start_timeout):
                await asyncio.shield(started)
        except TimeoutError:
            if started.done() and started.exception() is None:
                return
            task.cancel()                       # counts as a crash while starting
            await asyncio.wait({task})
            if started.done():
                started.exception()
            raise StartTimeoutError(f"on_start of actor {self.name!r} did not finish within "
                                    f"{host.start_timeout}s") from None

    async def _run(self, instance: Actor, started: asyncio.Future[None],
                   notify_start_failure: bool) -> None:
        reason: BaseException | None = None
        cancelled = False
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                await instance.on_start()
                self.state = S.RUNNING
                started.set_result(None)
                await self._loop(instance)
                self.state = S.STOPPING
                await self._stop_children(final=self._ends_for_good(None))
                await instance.on_stop()
                for task in list(self._owned):
                    task.cancel()
        except asyncio.CancelledError:
            cancelled = True
            reason = ActorDeadError(f"actor {self.name!r} was cancelled")
            me = asyncio.current_task()
            if me is not None:
                me.uncancel()
        except BaseExceptionGroup as group:
            reason = _first_leaf(group)
        except Exception as exc:
            reason = exc
        finally:
            self._tg = None
            self._owned.clear()
        await self._after_run(instance, reason, cancelled, started, notify_start_failure)

    async def _loop(self, actor: Actor) -> None:
        """Process messages one at a time until STOP. Hot path: keep it lean."""
        mb = self.mailbox
        pop = mb.pop
        on_receive = actor.on_receive
        while True:
            item = pop()
            if item is None:
                self._waiting = True
                await mb.wait()
                self._waiting = False
                continue
            if type(item) is Envelope:
                reply = item.reply
                if reply is None:
                    await on_receive(item.msg)
                elif not reply.done():      # a timed-out or cancelled ask is skipped
                    self._current = reply
                    try:
                        result = await on_receive(item.msg)
                    except Exception as exc:
                        if not reply.done():
                            reply.set_exception(exc)
                    else:
                        if not reply.done():
                            reply.set_result(result)
                    self._current = None
            elif type(item) is Stop:
                return
            elif type(item) is Ping:
                if not item.reply.done():
                    item.reply.set_result(self.status())
            else:                            # Terminated, ChildExited, ...: like a tell
                await on_receive(item)

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state.value, "restarts": self.restarts,
                "mailbox_depth": len(self.mailbox), "incarnation": self.incarnation}

    # --- ending ------------------------------------------------------------------------
    def _ends_for_good(self, reason: BaseException | None) -> bool:
        """Whether the incarnation now ending leaves the actor STOPPED/CRASHED for good."""
        mode = self._stop_mode
        if mode == "final":
            return True
        if mode == "restart":
            return False
        return not self.supervised           # own exit (crash or self-stop)

    async def _after_run(self, instance: Actor, reason: BaseException | None, cancelled: bool,
                         started: asyncio.Future[None], notify_start_failure: bool) -> None:
        host = self.host
        start_failed = not started.done()
        final = self._ends_for_good(reason)
        crashed = reason is not None and not (cancelled and self._stop_mode is not None)
        if crashed:
            self.last_reason = repr(reason)
            host.emit("actor_crashed", self.name, self.last_reason)
            if not start_failed:
                planned = isinstance(reason, InjectedFault)  # one line, no traceback
                log.warning("actor %r crashed: %r", self.name, reason,
                            exc_info=None if planned else reason)
        self._fail_current(reason)
        if reason is not None:
            # The normal path already stopped children and ran on_stop inside the group.
            await self._stop_children(final=final)
            if not start_failed and not cancelled:
                try:
                    async with asyncio.timeout(host.hook_timeout):
                        await instance.on_stop()
                except Exception as exc:
                    log.warning("on_stop of crashed actor %r failed: %r", self.name, exc)
        for stale in self.mailbox.remove_if(lambda m: type(m) in (Stop, Ping), system=True):
            if type(stale) is Ping and not stale.reply.done():
                stale.reply.set_exception(ActorDeadError(
                    f"actor {self.name!r} ended its incarnation before answering the ping"))
        if final:
            await self.finalize(S.CRASHED if crashed else S.STOPPED,
                                self.last_reason if crashed else "stopped")
            if crashed and isinstance(reason, EscalationError) and self.kind == "supervisor":
                host.report_escalation(self.name, reason)
        else:
            self.state = S.RESTARTING
            self._fail_queued_asks(reason)
            own_exit = self._stop_mode != "restart"
            if own_exit and (notify_start_failure or not start_failed):
                parent = self.parent
                assert parent is not None
                try:
                    parent.mailbox.put_system(ChildExited(self.name, self.incarnation, reason))
                except MailboxClosedError:
                    await self.finalize(S.CRASHED if crashed else S.STOPPED,
                                        self.last_reason or "stopped")
        if start_failed:
            err = reason if reason is not None else ActorDeadError(f"{self.name!r} never started")
            started.set_exception(err)
            if not notify_start_failure:
                started.exception()  # the caller of start() reads it; avoid a "never retrieved"

    def _fail_current(self, reason: BaseException | None) -> None:
        cur, self._current = self._current, None
        if cur is not None and not cur.done():
            cur.set_exception(ActorDeadError(f"actor {self.name!r} died while handling this "
                                             f"ask: {reason!r}"))

    def _fail_queued_asks(self, reason: BaseException | None) -> None:
        asks = self.mailbox.remove_if(lambda e: type(e) is Envelope and e.reply is not None)
        if asks:
            err = f"actor {self.name!r} restarted before handling this ask ({reason!r})"
            for env in asks:
                if not env.reply.done():
                    env.reply.set_exception(ActorDeadError(err))

    async def finalize(self, state: ActorState, reason: str) -> None:
        """End for good: close the mailbox, dead-letter its contents, notify watchers."""
        assert state in _TERMINAL
        await self._stop_children(final=True)
        self.state = state
        self.last_reason = reason
        host = self.host
        for item in self.mailbox.close():
            if type(item) is Envelope:
                if item.reply is not None and not item.reply.done():
                    item.reply.set_exception(
                        ActorDeadError(f"actor {self.name!r} is {state.value}"))
                host.dead_letter(self.name, item.msg, state.value)
            elif type(item) is Terminated:
                host.dead_letter(self.name, item, state.value)
        for target in self.watching:
            target.watchers.discard(self)
        self.watching.clear()
        notice = Terminated(self.name, reason)
        for watcher in self.watchers:
            watcher.watching.discard(self)
            try:
                watcher.mailbox.put_system(notice)
            except MailboxClosedError:
                pass
        self.watchers.clear()
        if state is S.STOPPED:
            host.emit("actor_stopped", self.name, reason)

    # --- stopping ----------------------------------------------------------------------
    async def stop(self, *, timeout: float, mode: str = "final") -> None:
        """Stop the running incarnation (after its current message); idempotent.

        mode "final": end for good. mode "restart": end this incarnation only (the
        supervisor will start a new one). Past `timeout` the incarnation's task is cancelled.
        """
        st = self.state
        if st in _TERMINAL or (st is S.NEW and mode == "restart"):
            return
        if st in (S.NEW, S.RESTARTING):
            if mode == "final":
                await self.finalize(S.STOPPED, "stopped")
            return
        task = self._task
        assert task is not None
        if mode == "final" or self._stop_mode in (None, "self"):
            self._stop_mode = mode             # "final" wins over "restart" and "self"
        try:
            self.mailbox.put_system(STOP)
        except MailboxClosedError:
            pass
        if task is asyncio.current_task():
            return
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            log.warning("actor %r did not stop within %ss; cancelling it", self.name, timeout)
            task.cancel()
            await asyncio.wait({task}, timeout=timeout)

    def request_self_stop(self) -> None:
        if self._stop_mode is None:
            self._stop_mode = "self"
        self.mailbox.put_system(STOP)

    async def _stop_children(self, *, final: bool) -> None:
        timeout = self.host.hook_timeout
        for child in reversed(self.children):
            await child.stop(timeout=timeout, mode="final" if final else "restart")

    # --- owned tasks, death-watch ------------------------------------------------------
    def create_task(self, coro: Coroutine[Any, Any, Any], name: str | None) -> asyncio.Task[Any]:
        tg = self._tg
        if tg is None or self.state not in (S.STARTING, S.RUNNING):
            coro.close()
            raise ActorStateError(
                f"actor {self.name!r} cannot create tasks while {self.state.value}")
        task = tg.create_task(coro, name=name or f"actor:{self.name}:task")
        self._owned.add(task)
        task.add_done_callback(self._owned.discard)
        return task

    def watch(self, ref: ActorRef) -> None:
        target = cell_of(ref)
        if target is self:
            raise ValueError(f"actor {self.name!r} cannot watch itself")
        if target.state in _TERMINAL:
            self.mailbox.put_system(Terminated(target.name, target.last_reason or "stopped"))
            return
        target.watchers.add(self)
        self.watching.add(target)

    def unwatch(self, ref: ActorRef) -> None:
        target = cell_of(ref)
        target.watchers.discard(self)
        self.watching.discard(target)


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
