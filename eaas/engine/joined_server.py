"""JoinedServer: the supervised actor that stands for an expert server the engine did not spawn.

The process behind it joined from elsewhere (`eaas expert-server --join`, eaas/engine/joiner.py)
or was placed by a launcher (a Ray actor, eaas/engine/ray_launcher.py); either way it runs the
same server code (eaas/engine/server_main.py) and the engine only knows its transport URL.
The actor connects to that URL, forwards work like `ServerProcess` (whose RPC forwarding and
heartbeat it inherits), and crashes when the process stops answering, so routing goes around it
(the pool marks it dead) and its supervisor restarts the actor:

- launched (a `launch` callable, e.g. Ray): the restarted actor launches a fresh process and
  connects to it — restarts go through the engine's supervisor, never the launcher's own;
- joined by hand: the restarted actor is *detached* — alive, out of routing — until a process
  with the same name joins again (`Attach`); the dropped process learns from the engine's join
  status that it is no longer current and exits.

Lifecycle of a slot's process as the engine sees it: joining (a ticket is issued, the process
loads its experts) -> ready (it listens; the actor attaches and pings it) -> routed (the pool
puts it into the table) -> lost (missed heartbeats, a crash) or left (drained and removed).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from eaas.engine.messages import Crash, Ping
from eaas.engine.protocol import SERVER_PROTOCOL
from eaas.engine.server_process import ServerProcess
from eaas.errors import EaasError, InjectedFault

__all__ = ["Attach", "JoinSlot", "JoinedServer"]

log = logging.getLogger("eaas.engine")


@dataclass(frozen=True, slots=True)
class Attach:
    """JoinedServer command: the slot's current process listens at `slot.url`; connect to it
    (closing any older connection) and report ready."""


@dataclass(slots=True)
class JoinSlot:
    """The process behind one joined (or launched) server name; outlives actor restarts.

    origin: "join" (`eaas expert-server --join`) or "ray" (placed by the Ray launcher);
    host: where the process runs, as it said; issued: the newest join ticket under this name;
    incarnation: the ticket of the process attached now; url / pid: that process, once ready.
    launch: () -> {"url", "pid"} starts a fresh process (launchers only); stop: stops it.
    """

    name: str
    origin: str
    device: str
    host: str = ""
    model: str = ""
    incarnation: int = 0  # the process attached now (or last)
    issued: int = 0  # the newest join ticket under this name
    lost: bool = False  # the attached process was dropped (it should exit)
    url: str | None = None
    pid: int | None = None
    starts: int = 0
    log_path: str = ""
    planned_kill: bool = False
    roll: dict | None = None  # a rolling upgrade asked of the process: {"model": path | None}
    launch: Callable[[], Awaitable[dict]] | None = None
    stop: Callable[[], Awaitable[None]] | None = None
    attached: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def proc(self) -> None:  # the ProcessSlot interface: no local process handle
        return None

    def set_process(self, info: dict, incarnation: int | None = None) -> None:
        """The slot's current process (join ticket `incarnation`) listens at info["url"]."""
        self.url, self.pid = str(info["url"]), int(info.get("pid") or 0) or None
        if incarnation is not None:
            self.incarnation = incarnation
        self.lost = False
        self.starts += 1

    def detach(self) -> None:
        """The current process is lost to the engine (it will not be connected again)."""
        self.url = None
        self.lost = True
        self.attached.clear()

    def is_current(self, incarnation: int) -> bool:
        """Whether the process holding join ticket `incarnation` is still wanted: it is the
        attached one (not lost), or the newest ticket, still loading."""
        if incarnation == self.incarnation and not self.lost:
            return True
        return incarnation == self.issued and incarnation > self.incarnation

    def kill(self) -> None:
        """Called by the inherited heartbeat when the process stopped answering."""
        self.detach()

    @property
    def can_signal(self) -> bool:
        """The process is on this host and its pid is known: real signals reach it."""
        return self.pid is not None and self.host in ("", os.uname().nodename)

    def signal(self, sig: int) -> None:
        if self.can_signal:
            try:
                os.kill(self.pid, sig)  # type: ignore[arg-type]
            except (ProcessLookupError, PermissionError):
                pass


class JoinedServer(ServerProcess):
    """The engine's proxy for a joined or launched server (see the module docstring)."""

    def __init__(self, slot: JoinSlot, *, call_timeout_s: float, heartbeat_interval_s: float,
                 heartbeat_misses: int = 3, start_timeout_s: float = 120.0,
                 on_ready: Callable[[], None] | None = None) -> None:
        super().__init__(slot, slot.model, {}, dtype="", device=slot.device,  # type: ignore
                         batch_invariant=True, transport="tcp", call_timeout_s=call_timeout_s,
                         heartbeat_interval_s=heartbeat_interval_s,
                         heartbeat_misses=heartbeat_misses, start_timeout_s=start_timeout_s,
                         on_ready=on_ready)
        self.jslot = slot
        self._heartbeat_task: asyncio.Task | None = None

    async def on_start(self) -> None:
        slot = self.jslot
        if slot.launch is not None and slot.url is None:  # a launcher's: start a fresh process
            try:
                slot.set_process(await asyncio.wait_for(slot.launch(), self.start_timeout_s))
            except BaseException:
                await self._stop_process()
                raise
        if slot.url is not None:
            await self._attach()
        # else detached: alive but out of routing until a process with this name joins again

    async def _attach(self) -> None:
        from eaas.transport import RpcClient, TransportSecurity, connect

        slot = self.jslot
        assert slot.url is not None
        old, self.rpc = self.rpc, None
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            self._heartbeat_task = None
        if old is not None:
            await _close_quietly(old)
        try:
            rpc = RpcClient(await connect(slot.url, timeout=10.0,
                                          security=TransportSecurity.from_env()))
            await rpc.call(SERVER_PROTOCOL.encode(Ping()), timeout=10.0)
        except Exception as e:
            slot.detach()
            raise EaasError(f"expert server {slot.name}: cannot reach its process at "
                            f"{slot.url!r} ({type(e).__name__}: {e})") from e
        self.rpc = rpc
        slot.attached.set()
        self._heartbeat_task = self.context.create_task(self._heartbeat(),
                                                        name=f"{slot.name}-heartbeat")
        if self._on_ready is not None:
            self._on_ready()

    async def _heartbeat(self) -> None:
        try:
            await super()._heartbeat()
        except EaasError as e:
            if self.jslot.planned_kill:  # the pool's inject_fault("kill") sent that SIGKILL
                self.jslot.planned_kill = False
                raise InjectedFault(f"{e} (killed by fault injection)") from None
            raise

    async def on_receive(self, msg: Any) -> Any:
        if isinstance(msg, Attach):
            await self._attach()
            return None
        if isinstance(msg, Crash):  # a process out of reach of signals: drop it
            self.jslot.detach()
            raise InjectedFault(f"{self.jslot.name}: {msg.reason}")
        if self.rpc is None:
            raise EaasError(f"expert server {self.jslot.name} has no process (it left or was "
                            "lost; waiting for it to join again)")
        return await super().on_receive(msg)

    async def on_stop(self) -> None:
        self._stopping = True
        if self.rpc is not None:
            await _close_quietly(self.rpc)
            self.rpc = None
        await self._stop_process()

    async def _stop_process(self) -> None:
        slot = self.jslot
        slot.detach()
        if slot.stop is not None:  # a launcher's process: it goes with its actor
            try:
                await asyncio.wait_for(slot.stop(), 10.0)
            except Exception as e:  # already gone, or the cluster is: nothing left to stop
                log.debug("stopping %s's process: %r", slot.name, e)

    async def _reap_old(self) -> None:  # no local process to reap
        return None


async def _close_quietly(rpc: Any) -> None:
    try:
        await rpc.aclose()
    except Exception:
        pass
