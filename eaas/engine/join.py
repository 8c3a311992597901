"""Joining: expert servers that start elsewhere and join a running engine.

The engine's side of `eaas expert-server --join` (the process side is eaas/engine/joiner.py),
as a mixin of `ExpertPool`. Three calls, each answered over the admin API:

    join(name?, device, host)     -> a ticket: the name, its incarnation, the experts to load
                                     (as add_server decides: every expert, or what the name
                                     hosted before), the model path, dtype, cluster secret
    ready(name, incarnation, url) -> the pool connects (JoinedServer), pings, and routes to it
                                     in a new generation; a rejoin (same name) takes the place
                                     of the lost process, a takeover that of a live one
    leave(name, incarnation)      -> drain: out of routing first (experts only it hosted move
                                     elsewhere), its in-flight work finishes, then it is removed
    status(name, incarnation)     -> whether that process is still wanted (polled by it)

A joined server is supervised by heartbeat like a spawned one: one that stops answering is
routed around, and its actor waits, detached, for a process with the same name to join again.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

from eaas.engine.joined_server import Attach, JoinSlot
from eaas.engine.placement import server_name

__all__ = ["Joining", "CLUSTER_SECRET_ENV", "SETTINGS_ENV", "cluster_secret",
           "transport_settings"]

CLUSTER_SECRET_ENV = "EAAS_CLUSTER_SECRET"  # eaas.transport.auth's names
SETTINGS_ENV = "EAAS_TRANSPORT"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
JOIN_DEVICE_RE = re.compile(r"cpu|cuda(:\d+)?")
JOIN_TRANSPORTS = ("tcp", "shm", "cudaipc")


def cluster_secret() -> str | None:
    """The engine's cluster secret (EAAS_CLUSTER_SECRET, set at engine start by
    eaas.transport.auth.ensure_cluster_secret) for a join ticket; None when there is none."""
    try:
        from eaas.transport.auth import cluster_secret as read
    except ImportError:  # a transport layer without authentication
        return os.environ.get(CLUSTER_SECRET_ENV) or None
    try:
        value = read()
    except Exception:  # noqa: BLE001 - unset: the servers then run without one
        return None
    return value.decode() if isinstance(value, bytes) else (value or None)


def transport_settings() -> dict:
    """The transport settings the engine exports to its server processes (EAAS_TRANSPORT:
    TLS files, request policy; eaas.transport.auth), for a join ticket; {} when none."""
    try:
        from eaas.transport.auth import exported_settings
    except ImportError:
        return {}
    return dict(exported_settings())


class StaleJoinError(ValueError):
    """A call from a process whose join ticket is no longer the newest under its name."""


class Joining:
    """join / ready / leave / status for servers that join from elsewhere."""

    config: Any
    servers: dict[str, dict]
    _lock: asyncio.Lock
    _next_index: Any
    _routing: Any
    _emit: Any
    counters: dict[str, int]
    _joining: dict[str, tuple[JoinSlot, dict[int, list[int]]]]

    # ---- the calls ---------------------------------------------------------------------------
    def join(self, name: str | None = None, *, device: str = "cpu", host: str = "",
             transport: str = "tcp") -> dict:
        """Issue a join ticket (see the module docstring). ValueError names a bad field."""
        if name is not None and (not isinstance(name, str) or not NAME_RE.fullmatch(name)):
            raise ValueError(f"name={name!r} is not allowed: 1-63 characters of letters, "
                             "digits, '_', '.', '-', starting with a letter or digit")
        if not isinstance(device, str) or not JOIN_DEVICE_RE.fullmatch(device):
            raise ValueError(f"device={device!r} is not allowed: 'cpu' or 'cuda[:N]'")
        if transport not in JOIN_TRANSPORTS:
            raise ValueError(f"transport={transport!r} is not allowed: one of {JOIN_TRANSPORTS}")
        if not isinstance(host, str) or len(host) > 255:
            raise ValueError("host must be a string of at most 255 characters")
        if name is None:
            name = server_name(next(self._next_index))
            while name in self.servers or name in self._joining:
                name = server_name(next(self._next_index))
        entry = self.servers.get(name)
        if entry is not None and not isinstance(entry.get("slot"), JoinSlot):
            raise ValueError(f"{name} is a server the engine started itself; join under "
                             "another name (or none: the engine picks one)")
        if entry is not None and entry["slot"].origin != "join":
            raise ValueError(f"{name} is placed by the {entry['slot'].origin} launcher; join "
                             "under another name")
        if entry is not None:
            slot, assignment = entry["slot"], entry["assignment"]
        elif name in self._joining:
            slot, assignment = self._joining[name]
        else:
            routing = self._routing()
            assignment = {l: sorted(ex) for l, ex in routing.table.items()}  # as add_server
            slot = JoinSlot(name, "join", device, model=self.config.model)
        slot.issued += 1
        slot.host, slot.device = host, device
        if entry is None:
            self._joining[name] = (slot, assignment)
        cfg = self.config
        self._emit({"type": "join_started", "server": name, "incarnation": slot.issued,
                    "host": host, "device": device})
        return {"name": name, "incarnation": slot.issued,
                "assignment": {str(l): list(ids) for l, ids in assignment.items()},
                "model": slot.model or cfg.model, "dtype": cfg.dtype,
                "batch_invariant": cfg.batch_invariant, "load_format": cfg.load_format,
                "cluster_secret": cluster_secret(), "transport_settings": transport_settings(),
                "status_interval_s": max(0.2, cfg.fault.heartbeat_interval_s)}

    async def ready(self, name: str, incarnation: int, url: str, pid: int | None = None,
                    *, timeout_s: float = 60.0) -> dict:
        """The process holding ticket `incarnation` listens at `url`: connect, ping, route.
        Returns {"name", "generation"} once it is in routing."""
        if not isinstance(url, str) or "://" not in url:
            raise ValueError(f"url={url!r} is not a transport URL")
        async with self._lock:
            slot = self._slot(name)
            if incarnation != slot.issued:
                raise StaleJoinError(f"{name}: join ticket {incarnation} is stale (the newest "
                                     f"is {slot.issued})")
            info = {"url": url, "pid": pid}
            entry = self.servers.get(name)
            if entry is not None and entry["state"] == "dead":  # its supervisor gave up:
                assignment = entry["assignment"]                # start its actor afresh
                await self._discard(name)  # type: ignore[attr-defined]
                entry = None
            elif entry is None:
                assignment = self._joining[name][1]
            if entry is None:
                slot.set_process(info, incarnation)
                try:
                    await asyncio.wait_for(self.start_server(  # type: ignore[attr-defined]
                        name, assignment, device=slot.device, slot=slot), timeout_s)
                except Exception:
                    await self._discard(name)  # type: ignore[attr-defined]
                    slot.detach()
                    raise
                self._joining.pop(name, None)
                await self._set_table(_with_name(self._routing().table, name, assignment),
                                      f"{name} joined from {slot.host or 'elsewhere'}")
                self.counters["joins"] = self.counters.get("joins", 0) + 1
            else:  # a rejoin (its old process was lost) or a takeover (of a live process)
                was_dead = name in self._routing().dead
                slot.set_process(info, incarnation)
                await self._attach(entry, timeout_s)
                if was_dead:  # wait until the routing table has it back
                    await self._until(lambda: name not in self._routing().dead, timeout_s,
                                      f"{name} back in routing")
                self.counters["rejoins"] = self.counters.get("rejoins", 0) + 1
            entry = self.servers[name]
            entry["device"] = slot.device
        generation = self._routing().generation
        self._emit({"type": "joined", "server": name, "incarnation": incarnation, "url": url,
                    "host": slot.host, "generation": generation})
        return {"name": name, "generation": generation}

    async def leave(self, name: str, incarnation: int, *, drain_timeout_s: float = 30.0
                    ) -> dict:
        """Drain and remove `name` if ticket `incarnation` is its current process; a stale
        process leaving changes nothing (its successor stays)."""
        slot = self._slot(name)
        if not slot.is_current(incarnation):
            return {"left": False, "reason": "not the current process of this name"}
        if name in self._joining and name not in self.servers:  # left before it was ready
            self._joining.pop(name, None)
            return {"left": True, "reason": "left before it was ready"}
        await self.remove_server(name, drain_timeout_s=drain_timeout_s)  # type: ignore
        self._emit({"type": "left", "server": name, "incarnation": incarnation})
        return {"left": True}

    def status(self, name: str, incarnation: int) -> dict:
        """{"current": bool, "state", "reason"} for the process holding ticket `incarnation`."""
        try:
            slot = self._slot(name)
        except ValueError:
            return {"current": False, "state": "removed", "reason": f"{name} was removed"}
        entry = self.servers.get(name)
        current = slot.is_current(incarnation)
        state = entry["state"] if entry is not None else "joining"
        reason = "" if current else (
            "superseded by a newer process of this name" if incarnation < slot.incarnation
            or incarnation < slot.issued else "lost: the engine routed around it")
        out = {"current": current, "state": state, "reason": reason,
               "incarnation": slot.incarnation}
        if current and slot.roll is not None and incarnation == slot.incarnation:
            out["roll"] = slot.roll  # start a successor (a rolling upgrade)
        return out

    async def _roll_joined(self, name: str, model: str | None, timeout_s: float) -> str:
        """Rolling upgrade of a hand-joined server: its process is asked (through its status
        polls) to start a successor on its host (`model`, or the one it runs); the successor
        joins under the same name and takes over once ready (no routing gap); the old process
        then exits. Returns the name."""
        slot = self._slot(name)
        before = slot.incarnation
        slot.roll = {"model": model}
        self._emit({"type": "scale_started", "action": "replace", "server": name,
                    "replaces": name, "model": model, "by": "its own host"})
        try:
            await self._until(lambda: slot.incarnation > before and slot.attached.is_set()
                              and name not in self._routing().dead, timeout_s,
                              f"{name}: a successor process taking over")
        except TimeoutError as e:
            raise RuntimeError(f"replacing joined expert server {name} failed: {e} (is its "
                               "`eaas expert-server` process polling the engine?); routing "
                               "is unchanged") from None
        finally:
            slot.roll = None
        if model is not None:
            self.servers[name]["model"] = slot.model = model
        self.counters["rollouts"] = self.counters.get("rollouts", 0) + 1
        self._emit({"type": "scale_done", "action": "replace", "server": name, "replaces": name})
        return name

    # ---- helpers ----------------------------------------------------------------------------
    def _slot(self, name: str) -> JoinSlot:
        entry = self.servers.get(name)
        if entry is not None and isinstance(entry.get("slot"), JoinSlot):
            return entry["slot"]
        if name in self._joining:
            return self._joining[name][0]
        raise ValueError(f"no joined expert server named {name!r}")

    async def _attach(self, entry: dict, timeout_s: float) -> None:
        """Hand the entry's actor its slot's new process; the actor may be restarting (after
        the old process was lost), so try until it answers or `timeout_s` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                await entry["ref"].ask(Attach(), timeout=max(0.1, deadline - loop.time()))
                return
            except Exception as e:
                if loop.time() >= deadline or "cannot reach" in str(e):
                    raise
                await asyncio.sleep(0.05)

    async def _until(self, cond: Any, timeout_s: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not cond():
            if loop.time() >= deadline:
                raise TimeoutError(f"{what}: not within {timeout_s}s")
            await asyncio.sleep(0.01)


def _with_name(table: Any, name: str, assignment: dict[int, list[int]]) -> dict:
    """`table` with `name` added as a host of every expert in `assignment` (once)."""
    out = {l: dict(ex) for l, ex in table.items()}
    for l, ids in assignment.items():
        for e in ids:
            if name not in out[l][e]:
                out[l][e] = tuple(out[l][e]) + (name,)
    return out
