"""The `Supervisor` actor (OTP semantics); its config, `RestartPolicy` / `ChildSpec`, is policy.py.

On a child's exit the supervisor decides, one notice at a time (its mailbox serializes
decisions):
- `temporary` children are never restarted; `transient` ones only after a crash;
  `permanent` ones always. A child not restarted is stopped for good and forgotten.
- Otherwise the exit counts toward the restart intensity: more than `max_restarts`
  restarts within `within_s` seconds (on the system clock) is a breach. On a breach the
  supervisor stops all its children, emits an "escalated" event and crashes itself with
  `EscalationError`, so its own supervisor applies its policy. A top-level supervisor's
  breach is reported through the events API and the system's `on_escalation` callback.
- The strategy picks the set to restart (`restart_set`): one_for_one = the child;
  one_for_all = every child; rest_for_one = the child and those started after it. The
  others in the set are stopped in reverse start order, then the set is started again in
  start order, after a backoff of `backoff_s * 2**(n-1)` (n = restarts in the window),
  capped at `max_backoff_s`, times a random factor in [1 - jitter, 1 + jitter].
A restarted supervisor restarts all its children (static and dynamically added) in order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any, ClassVar

from eaas.actors.actor import Actor, ActorState
from eaas.actors.cell import ActorCell
from eaas.actors.control import ChildExited, RestartDue, StartChild, TerminateChild
from eaas.actors.policy import RESTART_TYPES, STRATEGIES, ChildSpec, RestartPolicy, restart_set
from eaas.actors.ref import ActorRef, cell_of
from eaas.errors import EscalationError

# Config and protocol names are re-exported: they lived here before policy.py and control.py.
__all__ = ["Supervisor", "RestartPolicy", "ChildSpec", "restart_set", "STRATEGIES",
           "RESTART_TYPES", "StartChild", "TerminateChild"]

S = ActorState
_RESTARTABLE = (S.NEW, S.RESTARTING, S.STOPPED, S.CRASHED)


class Supervisor(Actor):
    """An actor whose job is its children. Built by `ActorSystem.spawn_supervisor`."""

    supervises: ClassVar[bool] = True

    def __init__(self, policy: RestartPolicy, specs: Sequence[ChildSpec] = ()) -> None:
        self.policy = policy
        self.specs = tuple(specs)
        self.pending_restarts = 0
        self._history: deque[float] = deque()   # times of restarts within the window

    @property
    def _cell(self) -> ActorCell:
        return cell_of(self.context.self_ref)

    async def on_start(self) -> None:
        cell = self._cell
        known = {c.name for c in cell.children}
        for spec in self.specs:
            if spec.name not in known:
                cell.host.add_cell(spec.name, spec.factory, mailbox_size=spec.mailbox_size,
                                   parent=cell, spec=spec)
        for child in list(cell.children):
            if child.state is not S.RUNNING:
                await child.start(notify_start_failure=False)

    async def on_receive(self, msg: Any) -> Any:
        kind = type(msg)
        if kind is ChildExited:
            await self._child_exited(msg)
        elif kind is RestartDue:
            self.pending_restarts -= 1
            await self._restart(msg.tokens)
        elif kind is StartChild:
            return await self._start_child(msg.spec)
        elif kind is TerminateChild:
            await self._terminate_child(msg.name)
        else:
            raise TypeError(f"supervisor {self.context.name!r} got unexpected message {msg!r}")
        return None

    # --- child management ----------------------------------------------------------------
    async def _start_child(self, spec: ChildSpec) -> ActorRef:
        if not isinstance(spec, ChildSpec):
            raise TypeError(f"start_child needs a ChildSpec, got {type(spec).__name__}")
        cell = self._cell
        child = cell.host.add_cell(spec.name, spec.factory, mailbox_size=spec.mailbox_size,
                                   parent=cell, spec=spec)
        try:
            await child.start(notify_start_failure=False)
        except BaseException:
            await self._forget(child, S.CRASHED, child.last_reason or "start failed")
            raise
        return child.ref

    async def _terminate_child(self, name: str) -> None:
        child = self._child(name)
        if child is not None:
            await child.stop(timeout=self._cell.host.hook_timeout)
            await self._forget(child, S.STOPPED, "stopped")

    async def _forget(self, child: ActorCell, state: ActorState, reason: str) -> None:
        if child.state.is_alive or child.state is S.NEW:
            await child.finalize(state, reason)
        self._cell.host.remove_cell(child)

    def _child(self, name: str) -> ActorCell | None:
        for c in self._cell.children:
            if c.name == name:
                return c
        return None

    # --- the policy ----------------------------------------------------------------------
    async def _child_exited(self, msg: ChildExited) -> None:
        child = self._child(msg.name)
        if child is None or child.incarnation != msg.incarnation or child.state is not S.RESTARTING:
            return                                          # stale notice
        spec = child.spec
        assert spec is not None
        crashed = msg.reason is not None
        if spec.restart == "temporary" or (spec.restart == "transient" and not crashed):
            await self._forget(child, S.CRASHED if crashed else S.STOPPED,
                               child.last_reason if crashed else "stopped")
            return
        policy, host = self.policy, self._cell.host
        now = host.clock.now()
        hist = self._history
        hist.append(now)
        while hist and hist[0] <= now - policy.within_s:
            hist.popleft()
        if len(hist) > policy.max_restarts:
            await self._escalate(child, msg.reason)
        order = [c.name for c in self._cell.children]
        names = restart_set(policy.strategy, order, child.name)
        group = [c for c in self._cell.children if c.name in names]
        for c in reversed(group):
            if c is not child:
                await c.stop(timeout=host.hook_timeout, mode="restart")
        tokens = []
        for c in group:
            if c.spec is not None and c.spec.restart == "temporary" and c is not child:
                await self._forget(c, S.STOPPED, "stopped")
                continue
            c.restart_token += 1
            tokens.append((c.name, c.restart_token))
        delay = policy.backoff(len(hist), host.rng.random()) if policy.backoff_s > 0 else 0.0
        if delay <= 0:
            await self._restart(tuple(tokens))
        else:
            self.pending_restarts += 1
            self.context.create_task(self._restart_later(delay, tuple(tokens)),
                                     name=f"supervisor:{self.context.name}:backoff")

    async def _restart_later(self, delay: float, tokens: tuple[tuple[str, int], ...]) -> None:
        await self._cell.host.clock.sleep(delay)
        self._cell.mailbox.put_system(RestartDue(tokens))

    async def _restart(self, tokens: tuple[tuple[str, int], ...]) -> None:
        wanted = dict(tokens)
        for c in list(self._cell.children):
            if wanted.get(c.name) == c.restart_token and c.state in _RESTARTABLE:
                try:
                    await c.start(notify_start_failure=True)
                except Exception:
                    pass           # reported to us as ChildExited; intensity decides

    async def _escalate(self, child: ActorCell, reason: BaseException | None) -> None:
        cell = self._cell
        timeout = cell.host.hook_timeout
        for c in reversed(cell.children):
            await c.stop(timeout=timeout, mode="restart")
        p = self.policy
        text = (f"supervisor {cell.name!r}: more than {p.max_restarts} restarts within "
                f"{p.within_s}s (last: {child.name!r} exited with {reason!r})")
        cell.host.emit("escalated", cell.name, text)
        raise EscalationError(text)
