"""HostDispatcher: the one table from expert-server request to `ExpertHost` operation.

Every front end of an expert server runs it: the in-process `ExpertServer` actor (messages as
dataclasses) and the server process of `eaas.engine.server_main` (tagged trees off the wire,
spawned by the engine or joined from elsewhere). The engine-side proxies of a process
(`ServerProcess`, `JoinedServer`) only encode the same dataclasses (eaas.engine.protocol).

    dispatch = HostDispatcher(host, RequestGuard.from_env(), compute_in=worker, load_in=worker)
    reply = await dispatch.handle(msg)      # ComputeBatch / Ping / Stats / ... or a tagged tree

Each request passes the front end's `RequestGuard` first (decoding, row limit, `delay` only in
fault-injection mode; refusals counted), so the policy is applied in this one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from eaas.engine.messages import (ComputeBatch, ExchangeClose, ExchangeConnect, ExchangeOpen,
                                  ExchangeRun, LoadExperts, Ping, SetDelay, Stats, UnloadExperts)
from eaas.engine.protocol import experts_reply
from eaas.errors import EaasError

if TYPE_CHECKING:
    from eaas.engine.expert_server import ExpertHost
    from eaas.engine.server_policy import RequestGuard

__all__ = ["HostDispatcher", "inline"]

Runner = Callable[..., Awaitable[Any]]  # await runner(fn, *args) -> fn(*args)


async def inline(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` on the event loop (CPU compute: no thread hand-off per batch)."""
    return fn(*args)


class HostDispatcher:
    """Runs expert-server requests on one `ExpertHost`.

    host:        the experts this server holds.
    guard:       the front end's request policy (RequestGuard.from_env() in a server process,
                 RequestGuard.in_process() in the engine's process).
    compute_in:  how a compute batch runs: `inline` (CPU), or on the process's compute worker
                 thread (GPU: a new batch size compiles kernels for seconds).
    load_in:     how loading / freeing experts runs (blocking file I/O): a worker thread.
    extra_stats: more entries of the Stats reply (a process adds "pid" and "security").
    pid:         what Ping answers with; None: {} (in-process, no process of its own).
    exchange:    the process's device-exchange sets (`eaas.engine.exchange_host.ExchangeSets`,
                 a CUDA server process); None: xopen / xconnect / xrun / xclose are refused.
    """

    def __init__(self, host: ExpertHost, guard: RequestGuard, *, compute_in: Runner = inline,
                 load_in: Runner = asyncio.to_thread,
                 extra_stats: Callable[[], dict[str, Any]] | None = None,
                 pid: int | None = None, exchange: Any = None) -> None:
        self.host = host
        self.guard = guard
        self.delay_s = 0.0  # fault injection (SetDelay): extra latency per compute batch
        self._compute_in, self._load_in = compute_in, load_in
        self._extra_stats = extra_stats
        self._pid = pid
        self._ops: dict[type, Callable[[Any], Awaitable[Any]]] = {
            ComputeBatch: self._compute, Ping: self._ping, Stats: self._stats,
            LoadExperts: self._load, UnloadExperts: self._unload, SetDelay: self._set_delay}
        self.exchange = exchange
        for cls, name in ((ExchangeOpen, "open"), (ExchangeConnect, "connect"),
                          (ExchangeRun, "run"), (ExchangeClose, "close")):
            self._ops[cls] = self._exchange_op(name)

    def _exchange_op(self, name: str) -> Callable[[Any], Awaitable[Any]]:
        async def op(msg: Any) -> Any:
            if self.exchange is None:
                raise EaasError(f"{type(msg).__name__}: this server has no device data path "
                                "(only an expert-server process on a CUDA device has one)")
            return await getattr(self.exchange, name)(msg)
        return op

    async def handle(self, msg: Any) -> Any:
        """The reply to one request (see eaas.engine.protocol for what each returns).

        Raises what the guard raises for a refused request (ValueError / PermissionError),
        and whatever the host raises (e.g. EaasError for a layer it does not host).
        """
        req = self.guard.check(msg)
        return await self._ops[type(req)](req)

    async def _compute(self, msg: ComputeBatch) -> Any:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return await self._compute_in(self.host.compute, msg.layer, msg.x, msg.expert_ids)

    async def _ping(self, msg: Ping) -> dict[str, Any]:
        return {} if self._pid is None else {"pid": self._pid}

    async def _stats(self, msg: Stats) -> dict[str, Any]:
        h = self.host
        out = {"calls": h.calls, "rows": h.rows, "experts": experts_reply(h.assignment),
               "load_stats": h.load_stats}
        if self._extra_stats is not None:
            out.update(self._extra_stats())
        if self.exchange is not None:
            out["exchange_sets"] = self.exchange.stats()
        return out

    async def _load(self, msg: LoadExperts) -> dict[str, list[int]]:
        await self._load_in(self.host.add, {int(k): v for k, v in msg.experts.items()})
        return experts_reply(self.host.assignment)

    async def _unload(self, msg: UnloadExperts) -> dict[str, list[int]]:
        await self._load_in(self.host.remove, {int(k): v for k, v in msg.experts.items()})
        return experts_reply(self.host.assignment)

    async def _set_delay(self, msg: SetDelay) -> str:
        self.delay_s = float(msg.seconds)
        return "ok"
