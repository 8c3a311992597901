"""A shard's device data path to its expert-server processes (issue 17): one exchange set.

The shard is rank 0 of a set whose other ranks are the server processes it routes to (ranks
1..N, by server index): a star, so the shard waits only for its servers and the servers only
for this shard (each shard of an engine has a set of its own). Open (`DevicePath.open`):

    1. a control connection of its own to every server (its RPC listener: the protocol's
       xopen / xconnect / xrun, never queued behind host-path compute batches);
    2. xopen on every server: each allocates its arena on its GPU and replies its export and
       the wire row of each expert it hosts; the shard allocates its own (`SharedChannels`);
    3. xconnect on every server (exports: the shard's and its own) while the shard connects
       and warms up in a thread: the warm-up's rounds are the barrier;
    4. the routing: for every MoE layer an `ExpertPlacement` (expert -> server, wire row),
       one live replica per expert, spread over the replicas (`_choose`).

Each decode step then runs on the GPU: the captured step's MoE layers are `exchange` rounds
(`ShardExchange`, the executor's experts step). Per step the shard sends ONE message per
server, `announce(1)` ("run 1 step"; every step the shard launches, warm-ups and replays
included, is a round on every live server), and reads `step_flags()` ([W] int64, on the
device: per server, waits that timed out and rows it could not be sent since the last step)
with the step's token ids. A step with a flag lands in the step ledger
(`eaas.engine.step_ledger`) as REPLAY: `DeviceRouting.drop` takes the server out (its peer word
is 0 already: the channel dropped it on the timeout), re-routes its experts to the replicas
in place (the captured graphs read the placements' tensors), and the shard replays the
step (the routing table is not told: the process's supervisor decides whether it is
dead). An expert left with no live replica in the set makes `covered` False and the shard
falls back to the host path (the dispatcher, which routes around dead servers and waits for
restarts). A dropped server whose process was replaced (SIGKILL, or killed after missed
heartbeats, then restarted: a new URL) is readmitted while the set keeps serving (`readmit`:
same rank, the new arena mapped in place, the pair reset, warmed up alone) and routed to again
once ready; one dropped while its process lives on (a slow answer) stays out of this set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict
from typing import Any, Iterable, Mapping, Sequence

import torch

from eaas.engine.device_experts import (PAIRS, RESULTS, ROWS, ExchangeChannels, ExchangeFormat,
                                        ExpertPlacement, ShardExchange)
from eaas.engine.messages import (ExchangeClose, ExchangeConnect, ExchangeOpen, ExchangeRun)
from eaas.engine.protocol import SERVER_PROTOCOL
from eaas.errors import EaasError

__all__ = ["DevicePath", "DeviceRouting", "DeviceShard", "device_path_reason"]

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 600.0  # xconnect: a fresh server compiles the GEMM and the channel kernels
SERVER_WAIT_S = 30.0  # a server's bound on its waits for its shard (and the warm-up's)
READMIT_POLL_S = 0.25  # how often a shard looks for restarted servers to readmit


def device_path_reason(mode: str, shard_device: str, servers: Mapping[str, str],
                       transports: Mapping[str, str]) -> str | None:
    """Why the shard on `shard_device` does NOT take the device path to `servers` (name ->
    device; `transports`: name -> URL), or None when it does. mode: placement.data_path.

    "host" never; "device" whenever every server is a CUDA process the shard's GPU can map
    (same GPU, or peer access); "auto" only when, in addition, no server shares the shard's
    GPU: two processes on one GPU time-slice it (without MPS), so a device wait spins through
    the other's slice, and there the host path is faster (benchmarks/RESULTS.md)."""
    if mode == "host":
        return "placement.data_path is 'host'"
    if not shard_device.startswith("cuda"):
        return f"the shard runs on {shard_device}"
    if not servers:
        return "no expert-server processes"
    here = torch.device(shard_device)
    for name, dev in sorted(servers.items()):
        url = transports.get(name, "")
        if not dev.startswith("cuda"):
            return f"server {name} runs on {dev}"
        if url.startswith("nvshmem://") or url.startswith("inproc://") or not url:
            return f"server {name} listens on {url or 'no URL'} (needs its own RPC listener)"
        there = torch.device(dev)
        if there != here and not torch.cuda.can_device_access_peer(here.index or 0,
                                                                    there.index or 0):
            return f"{shard_device} has no peer access to server {name}'s {dev}"
        if mode == "auto" and there == here:
            return (f"server {name} shares the shard's GPU {dev} (two processes time-slice "
                    "one GPU; the host path is faster there: set data_path 'device' to force)")
    return None


class DeviceRouting:
    """The step ledger's `Routing` over the device set: which servers of the set are still in,
    and the placement tensors the captured graphs read (`eaas.engine.step_ledger.Routing`)."""

    def __init__(self, path: DevicePath, snapshot: Any) -> None:
        self.path, self.snapshot = path, snapshot
        self.dropped: set[str] = set()
        self._generation = 1

    @property
    def generation(self) -> int:
        return self._generation

    def drop(self, server: str) -> int:
        if server in self.dropped or server not in self.path.ranks:
            return self._generation
        self.dropped.add(server)
        self._generation += 1
        self.path.exchange.peers[self.path.ranks[server]] = 0  # (the channel did on a timeout)
        self.path.reroute()
        # the routing table is not told: whether the process is dead is its supervisor's call
        # (its exit, missed heartbeats); a slow server is only out of this set
        log.warning("device path: server %s dropped from exchange set %d (generation %d)",
                    server, self.path.set_id, self._generation)
        return self._generation

    def restore(self, server: str) -> int:
        """`server` is back in the set (a restarted process, readmitted): routed again, in a
        new generation."""
        if server in self.dropped:
            self.dropped.discard(server)
            self._generation += 1
            self.path.reroute()
        return self._generation

    def joined(self, server: str) -> int:
        """`server` (added while serving) is in the set now: routed to, in a new generation."""
        self._generation += 1
        self.path.reroute()
        return self._generation

    def live_replicas(self, expert: Any) -> tuple[str, ...]:
        layer, e = expert
        return tuple(s for s in self.snapshot.servers_for(layer, e)
                     if s in self.path.ranks and s not in self.dropped
                     and s not in self.snapshot.dead and e in self.path.rows[s].get(layer, {}))

    def experts_of(self, server: str) -> list[Any]:
        return [(l, e) for l, ids in self.snapshot.hosted_by(server).items() for e in ids]

    def update(self, snapshot: Any) -> None:
        """A newer routing table (a RoutingUpdate): re-route over it; servers dropped here stay
        out (a restarted process is not in this set)."""
        self.snapshot = snapshot
        self.path.reroute()


class DevicePath:
    """One shard's exchange set with its server processes (module docstring)."""

    def __init__(self, fmt: ExchangeFormat, shared: Any, exchange: ShardExchange,
                 clients: dict[str, Any], ranks: dict[str, int],
                 rows: dict[str, dict[int, dict[int, int]]], layers: list[int],
                 num_experts: int, set_id: int) -> None:
        self.fmt, self.shared, self.exchange = fmt, shared, exchange
        self.clients, self.ranks, self.rows = clients, ranks, rows
        self.layers, self.num_experts, self.set_id = layers, num_experts, set_id
        self.routing: DeviceRouting | None = None
        self.urls: dict[str, str] = {}  # the URL of each server's process in the set
        self.readmitting: set[str] = set()
        self.free_ranks: list[int] = []  # spare server ranks no process holds yet
        self._connect: Any = None
        self._security: Any = None
        self._server_timeout_s = 30.0
        self.covered = False
        self.uncovered: list[tuple[int, int]] = []
        self._last = exchange.trouble().clone()
        self.announced = 0

    # ---- open ---------------------------------------------------------------------------------
    @classmethod
    async def open(cls, *, set_id: int, device: str, servers: Mapping[str, str], snapshot: Any,
                   layers: Sequence[int], num_experts: int, hidden: int, top_k: int,
                   dtype: torch.dtype, max_rows: int, timeout_s: float,
                   server_timeout_s: float, security: Any, connect: Any = None,
                   spare_ranks: int = 0) -> DevicePath:
        """Build the set with `servers` (name -> RPC URL; ranks 1..N in this order), and
        `spare_ranks` more server ranks, masked, for servers added while it serves (`join`)."""
        from eaas.gpu.shared_channels import SharedChannels
        from eaas.transport import RpcClient
        from eaas.transport import connect as transport_connect

        connect = connect or transport_connect
        names = list(servers)
        ranks = {n: i + 1 for i, n in enumerate(names)}
        spares = list(range(len(names) + 1, len(names) + 1 + spare_ranks))
        fmt = ExchangeFormat((0,), tuple(ranks.values()) + tuple(spares), max_rows=max_rows,
                             hidden=hidden,
                             top_k=top_k, dtype=str(dtype).removeprefix("torch."),
                             num_slots=2, ctas_per_send=8, gather_ctas=16)
        clients: dict[str, Any] = {}
        shared = None
        try:
            for n in names:
                clients[n] = RpcClient(await connect(servers[n], timeout=10.0,
                                                     security=security))
            shared = await asyncio.to_thread(SharedChannels.allocate, fmt.layouts(), 0, device)

            async def call(n: str, msg: Any, timeout: float) -> Any:
                return await clients[n].call(SERVER_PROTOCOL.encode(msg), timeout=timeout)

            wire = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(fmt).items()}
            opened = await asyncio.gather(*(call(n, ExchangeOpen(set_id, ranks[n], wire), 120.0)
                                            for n in names))
            exports: list[Any] = [shared.export()] + [o["export"] for o in opened] + \
                [None] * spare_ranks
            rows = {n: {int(l): dict(zip(o["experts"][l], o["rows"][l])) for l in o["experts"]}
                    for n, o in zip(names, opened)}
            placements = {l: ExpertPlacement.build(num_experts, {}, device) for l in layers}

            def star(rank: int) -> list[Any]:  # a server maps the shard and itself only
                return [e if r in (0, rank) else None for r, e in enumerate(exports)]

            connects = [asyncio.ensure_future(call(n, ExchangeConnect(
                set_id, star(ranks[n]), list(layers), server_timeout_s), CONNECT_TIMEOUT_S))
                for n in names]

            def mine() -> ShardExchange:
                chans = shared.connect(exports, timeout_s=timeout_s)
                ex = ShardExchange(fmt, ExchangeChannels(chans[ROWS], chans[PAIRS],
                                                         chans[RESULTS]), placements)
                ex.peers[spares] = 0  # no process there yet: masked until one joins
                shared.warm_up()  # with the servers' warm-ups: the rounds are the barrier
                torch.cuda.synchronize(device)
                return ex

            exchange = await asyncio.to_thread(mine)
            await asyncio.gather(*connects)
            shared.unlink()
        except BaseException:
            for c in clients.values():
                await _close(c)
            if shared is not None:
                shared.close()
            raise
        path = cls(fmt, shared, exchange, clients, ranks, rows, list(layers), num_experts,
                   set_id)
        path.urls, path._connect, path._security = dict(servers), connect, security
        path.free_ranks = spares
        path._server_timeout_s = server_timeout_s
        path.routing = DeviceRouting(path, snapshot)
        path.reroute()
        return path

    async def readmit(self, name: str, url: str) -> None:
        """Bring dropped server `name` back into the set as its restarted process at `url`
        (same rank, `_admit`), routed to again in a new generation. On any failure it stays
        out."""
        assert self.routing is not None and name in self.routing.dropped, name
        self.readmitting.add(name)
        try:
            await self._admit(name, url, self.ranks[name])
            self.routing.restore(name)
        finally:
            self.readmitting.discard(name)
        log.warning("device path: server %s readmitted to exchange set %d (%s)", name,
                    self.set_id, url)

    async def join(self, name: str, url: str) -> None:
        """Take server `name` (added while serving, at `url`) into the set on a spare rank
        (`_admit`), routed to in a new generation. EaasError when no spare rank is left."""
        assert self.routing is not None and name not in self.ranks, name
        if not self.free_ranks:
            raise EaasError(f"server {name}: no spare rank left in exchange set {self.set_id} "
                            "(placement.device_spare_ranks)")
        rank = self.free_ranks[0]
        self.readmitting.add(name)
        try:
            await self._admit(name, url, rank)
            self.free_ranks.remove(rank)
            self.ranks[name] = rank
            self.routing.joined(name)
        finally:
            self.readmitting.discard(name)
        log.warning("device path: server %s joined exchange set %d as rank %d (%s)", name,
                    self.set_id, rank, url)

    async def _admit(self, name: str, url: str, rank: int) -> None:
        """A server process at `url` takes `rank` of the running set: it allocates its arena
        (xopen), the shard maps it in place of whatever held the rank (`SharedChannels.readmit`:
        the pair's words reset), the process maps the shard and warms up alone (xconnect), and
        only then is the rank unmasked. The shard's steps go on meanwhile: the rank stays masked
        until the end, so no round waits for it."""
        from eaas.transport import RpcClient

        assert self.routing is not None
        old = self.clients.pop(name, None)
        if old is not None:
            await _close(old)
        client = self.clients[name] = RpcClient(await self._connect(
            url, timeout=10.0, security=self._security))
        wire = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.fmt).items()}
        opened = await client.call(SERVER_PROTOCOL.encode(
            ExchangeOpen(self.set_id, rank, wire)), timeout=120.0)
        rows = {int(l): dict(zip(opened["experts"][l], opened["rows"][l]))
                for l in opened["experts"]}
        hosted = self.routing.snapshot.hosted_by(name)
        missing = sorted((l, e) for l, ids in hosted.items() if l in self.layers
                         for e in ids if e not in rows.get(l, {}))
        if missing or not hosted:  # a process before it loaded its experts: try again later
            await client.call(SERVER_PROTOCOL.encode(ExchangeClose(self.set_id)), timeout=10.0)
            first = f" (first: layer {missing[0][0]} expert {missing[0][1]})" if missing else ""
            raise EaasError(f"server {name} does not host {len(missing)} of its "
                            f"{sum(len(v) for v in hosted.values())} experts yet{first}")
        await asyncio.to_thread(self.shared.readmit, opened["export"])
        exports: list[Any] = [None] * self.fmt.world_size
        exports[0], exports[rank] = self.shared.export(), opened["export"]
        await client.call(SERVER_PROTOCOL.encode(ExchangeConnect(
            self.set_id, exports, self.layers, self._server_timeout_s, alone=True)),
            timeout=CONNECT_TIMEOUT_S)
        self.rows[name] = rows
        self.urls[name] = url
        self.exchange.peers[rank] = 1  # stream order: launches from now on include it

    def restarted(self, urls: Mapping[str, str], dead: Iterable[str]) -> list[str]:
        """Dropped servers whose process was replaced (a new URL) and is not dead: the ones
        `readmit` can bring back now."""
        assert self.routing is not None
        dead = set(dead)
        return [n for n in sorted(self.routing.dropped)
                if n not in dead and n not in self.readmitting and urls.get(n)
                and urls[n] != self.urls.get(n)]

    def joinable(self, urls: Mapping[str, str], devices: Mapping[str, str], mode: str,
                 device: str) -> list[str]:
        """Servers added since the set opened that could join it now: listening, not dead,
        hosting experts in the current table, and on a device the path allows (`mode`:
        placement.data_path, `device`: the shard's)."""
        assert self.routing is not None
        snap = self.routing.snapshot
        return [n for n in sorted(urls) if n not in self.ranks and n not in self.readmitting
                and urls[n] and n not in snap.dead and snap.hosted_by(n)
                and device_path_reason(mode, device, {n: devices.get(n, "cpu")},
                                       {n: urls[n]}) is None]

    # ---- routing ------------------------------------------------------------------------------
    def reroute(self) -> None:
        """Copy the current choice of replica per expert into the placements (in place, stream
        ordered: steps launched after this read it). Sets `covered`."""
        assert self.routing is not None
        uncovered = []
        for l in self.layers:
            choice = {}
            for e in range(self.num_experts):
                live = self.routing.live_replicas((l, e))
                if not live:
                    uncovered.append((l, e))
                    continue
                s = _choose(live, l, e)
                choice[e] = (self.ranks[s] - 1, self.rows[s][l][e])
            place = self.exchange.placements[l]
            place.update(ExpertPlacement.build(self.num_experts, choice, place.server.device))
        self.uncovered, self.covered = uncovered, not uncovered

    def live_servers(self) -> list[str]:
        dropped = self.routing.dropped if self.routing is not None else set()
        return [n for n in self.ranks if n not in dropped]

    # ---- per step -------------------------------------------------------------------------------
    def announce(self, steps: int = 1) -> None:
        """Tell every live server of the set to run `steps` more steps: one one-way message
        each (`RpcClient.notify_start`), written to the socket NOW, before the step is
        launched. It must not wait for the event loop: the shard's host work after a launch
        may block the loop thread in a CUDA call queued behind this very step (a pageable
        copy), and the step waits on the device for servers that wait for this message. A
        dead server's failure shows as its timed-out waits, not here."""
        self.announced += steps
        note = SERVER_PROTOCOL.encode(ExchangeRun(self.set_id, steps))
        for n in self.live_servers():
            try:
                self.clients[n].notify_start(note)
            except Exception as e:  # its connection is down: it will time out on the device
                log.debug("device path: xrun to %s not sent: %r", n, e)

    def step_flags(self) -> torch.Tensor:
        """Enqueue: [W] int64 on the device, per rank what went wrong since the previous call
        (timed-out waits + rows left out for a masked server); 0 everywhere: a clean step."""
        now = self.exchange.trouble()
        delta = now - self._last
        self._last = now
        return delta

    def flagged(self, flags: Iterable[int]) -> frozenset[str]:
        """Server names whose entry of a step's host flags is not 0."""
        flags = list(flags)  # (negative after a readmission reset the rank's words)
        return frozenset(n for n, r in self.ranks.items() if flags[r] > 0)

    def set_timeout(self, timeout_s: float | None) -> None:
        """Every wait's bound from the next launch on (a graph keeps the one it was captured
        with)."""
        ch = self.exchange.channels
        for c in (ch.rows, ch.pairs, ch.results):
            c.timeout_s = timeout_s

    def describe(self) -> dict[str, Any]:
        return {"set_id": self.set_id, "servers": {n: ("dropped" if self.routing and
                                                       n in self.routing.dropped else "in")
                                                   for n in self.ranks},
                "covered": self.covered, "announced": self.announced,
                "spare_ranks": len(self.free_ranks),
                "max_rows": self.fmt.max_rows}

    async def aclose(self) -> None:
        for n, c in self.clients.items():
            try:
                await c.call(SERVER_PROTOCOL.encode(ExchangeClose(self.set_id)), timeout=5.0)
            except Exception:
                pass
            await _close(c)
        self.shared.close()


class DeviceShard:
    """The device data path of an `AttentionShard` (a mixin): whether to take it and open it
    (`_open_device_path`), whether decode steps take it now (`_device_ready`), and the
    readmission of restarted servers (`_watch_device_path`)."""

    name: str
    device: str
    deps: Any
    model: Any
    graphs: Any
    context: Any
    device_path: DevicePath | None
    device_path_reason: str
    ledger: Any
    _capture: Any

    def _device_ready(self) -> bool:
        """Decode steps take the device path: it is open, captured, and every expert has a
        live replica in its set."""
        path, g = getattr(self, "device_path", None), getattr(self, "graphs", None)
        return path is not None and path.covered and g is not None and g.experts is path.exchange

    async def _open_device_path(self, snap: Any) -> None:
        """Take the device data path to the server processes if placement.data_path and the
        servers' devices and transports allow it (`device_path_reason`), and capture the
        decode graphs over it; else the dispatcher's host path, with the reason kept."""
        from eaas.engine.decode_graph import buckets_for
        from eaas.engine.server_process import server_security
        from eaas.engine.step_ledger import StepLedger

        cfg = self.deps.config
        if cfg.placement.server_mode != "process":
            self.device_path_reason = "in-process expert servers"
            return
        servers = {n: d for n, d in self.deps.server_devices().items() if n not in snap.dead}
        urls = self.deps.server_urls()
        reason = device_path_reason(cfg.placement.data_path, self.device, servers, urls)
        if reason is None and cfg.enforce_eager:
            reason = "enforce_eager (the device path runs in captured decode steps)"
        if reason is not None:
            self.device_path_reason = reason
            return
        mc = self.model.config
        names = sorted(servers, key=lambda n: (len(n), n))
        try:
            self.device_path = await DevicePath.open(
                set_id=abs(hash((self.name, time.time_ns()))) % (1 << 31), device=self.device,
                servers={n: urls[n] for n in names}, snapshot=snap,
                layers=[layer.layer_idx for layer in self.model.layers if layer.is_moe],
                num_experts=mc.num_experts, hidden=mc.hidden_size, top_k=mc.num_experts_per_tok,
                dtype=self.model.dtype, max_rows=buckets_for(cfg.scheduler.max_num_seqs)[-1],
                timeout_s=cfg.fault.device_timeout_s, server_timeout_s=SERVER_WAIT_S,
                security=server_security(), spare_ranks=cfg.placement.device_spare_ranks)
        except Exception as e:  # a server that cannot take part: the host path, said why
            self.device_path_reason = f"the device path did not open: {type(e).__name__}: {e}"
            log.warning("%s: %s", self.name, self.device_path_reason)
            return
        self.ledger = StepLedger(self.device_path.routing,
                                 max_replays=cfg.fault.max_step_replays, max_in_flight=2,
                                 counters=self.deps.counters)
        self.device_path_reason = ""
        # the capture's warm-up steps are rounds on every server: announced here, in the loop
        self.device_path.announce(3 * len(buckets_for(cfg.scheduler.max_num_seqs)))
        await asyncio.to_thread(self._capture, self.device_path)
        self.context.create_task(self._watch_device_path(), name=f"{self.name}-readmit")

    async def _watch_device_path(self) -> None:
        """Readmit dropped servers of the device path whose process was restarted (a new
        URL), and take servers added while serving into spare ranks, one at a time; a failed
        admission is retried at the next look."""
        path = self.device_path
        while path is not None and path is self.device_path:
            await asyncio.sleep(READMIT_POLL_S)
            assert path.routing is not None
            urls, cfg = self.deps.server_urls(), self.deps.config
            todo = [(n, path.readmit, "readmitted") for n in path.restarted(
                urls, path.routing.snapshot.dead)]
            if path.free_ranks:
                todo += [(n, path.join, "joined") for n in path.joinable(
                    urls, self.deps.server_devices(), cfg.placement.data_path, self.device)]
            for name, admit, what in todo:
                try:
                    await admit(name, urls[name])
                    self.deps.emit({"type": f"device_path_{what}", "shard": self.name,
                                    "server": name, "time": time.time()})
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self.deps.emit({"type": "device_path_admit_failed", "shard": self.name,
                                    "server": name, "error": repr(e), "time": time.time()})


def _choose(live: Sequence[str], layer: int, expert: int) -> str:
    """One replica per (layer, expert), spread over the replicas (deterministic)."""
    return live[(layer + expert) % len(live)]


async def _close(client: Any) -> None:
    try:
        await client.aclose()
    except Exception:
        pass
