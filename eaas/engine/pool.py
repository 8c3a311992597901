"""ExpertPool: the expert servers — start, supervise, fault-inject, and scale them while serving.

Each server is its own supervisor (one_for_all, its own restart intensity) over the server actor
and its batcher, a temporary child of the pool supervisor: when its intensity is exceeded it
escalates and stays down, routing goes around it, and after `fault.replace_after_s` the pool
starts a replacement under a fresh name hosting the same experts (escalation is an event, not an
outage): the replacement is put into the table in place of the dead server once it is ready.

Routing changes only through the routing-table actor. Scaling follows one rule: a server is put
into the table only after it reports ready with the experts it will be asked for, and taken out
of the table before it is drained and stopped. A step that fails never reaches the table, so
the last good table stays in force (the rollback).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import shutil
import signal
import tempfile
from typing import TYPE_CHECKING, Any, Callable

from eaas.actors import Actor, ChildSpec, RestartPolicy, Supervisor
from eaas.config import EngineConfig
from eaas.engine.batcher import Batcher
from eaas.engine.expert_server import ExpertServer
from eaas.engine.expert_store import ExpertStore
from eaas.engine.messages import (Crash, LoadExperts, SetServerState, SetTable, Stats,
                                  UnloadExperts)
from eaas.engine.placement import RoutingSnapshot, server_name
from eaas.errors import EaasError

log = logging.getLogger("eaas.engine")

if TYPE_CHECKING:
    from eaas.engine.server_proxy import FabricSeat


class ExpertPool:
    def __init__(self, config: EngineConfig, pool_sup: Any, routing_ref: Any,
                 get_routing: Callable[[], RoutingSnapshot], emit: Callable[[dict], None],
                 counters: dict[str, int]) -> None:
        self.config = config
        self._sup = pool_sup
        self._routing_ref = routing_ref
        self._routing = get_routing
        self._emit = emit
        self.counters = counters
        self.servers: dict[str, dict] = {}  # name -> {"ref","batcher","sup","assignment",...}
        self._change = asyncio.Event()
        self._timers: list[asyncio.TimerHandle] = []
        self._tasks: set[asyncio.Task] = set()  # replacements of escalated servers (aclose ends)
        self.replaced: list[str] = []  # servers given up and replaced under a fresh name
        self.log_dir: str | None = None  # the server processes' logs (one run directory)
        self.spares: dict[str, Any] = {}  # device -> SpareProcesses (server_mode process)
        self._lock = asyncio.Lock()  # one scaling step at a time
        self._next_index = itertools.count(config.placement.num_expert_servers)
        # in-process servers share one copy of each layer's experts per device
        self.store = ExpertStore(config.model, dtype=config.dtype,
                                 batch_invariant=config.batch_invariant,
                                 load_format=config.load_format)

    # ---- start / readiness -----------------------------------------------------------------
    async def start_server(self, name: str, assignment: dict[int, list[int]], *,
                           timeout: float = 180.0, device: str | None = None,
                           fabric: FabricSeat | None = None,
                           fabric_joined: asyncio.Event | None = None) -> None:
        """Start server `name` hosting `assignment` and wait until it has started.

        fabric: its FabricSeat in the engine's NVSHMEM job (transport nvshmem, start-up servers
        only); the server's first process then joins the job, which returns only once every
        rank joins, so start-up servers must be started concurrently. fabric_joined: set when
        the engine's own join has returned (its nvshmem:// connect waits for it). Without a
        seat an nvshmem engine's server connects over cudaipc://.
        """
        cfg, fault = self.config, self.config.fault
        policy = RestartPolicy("one_for_all", max_restarts=fault.max_restarts,
                               within_s=fault.within_s, backoff_s=fault.backoff_s)
        sup = await self._sup.start_child(ChildSpec(
            f"server-sup-{name}", lambda: Supervisor(policy, ()), restart="temporary"))
        if device is None:  # server i on server_devices[i % len] (or the engine's device)
            devices = cfg.placement.server_devices or (cfg.device,)
            device = devices[int(name.rsplit("-", 1)[1]) % len(devices)]
        # `assignment` is shared with the factories and mutated in place when the server
        # loads more experts, so a restart re-loads exactly what the server hosts now.
        entry = {"name": name, "sup": sup, "assignment": assignment, "state": "starting",
                 "slot": None, "device": device, "incarnation": 0, "ref": None, "batcher": None}
        self.servers[name] = entry
        on_ready = lambda: self._ready(name)  # noqa: E731
        factory: Callable[[], Actor]
        if cfg.placement.server_mode == "process":
            from eaas.engine.server_proxy import ProcessSlot, ServerProcess

            slot = entry["slot"] = ProcessSlot(name, log_path=self._log_path(name))
            spares = self._spares_for(device)
            factory = lambda: ServerProcess(  # noqa: E731
                slot, cfg.model, assignment, dtype=cfg.dtype, device=device,
                batch_invariant=cfg.batch_invariant, transport=cfg.placement.transport,
                load_format=cfg.load_format, spares=spares,
                call_timeout_s=fault.unit_timeout_s,
                # a ping every half interval, each with a half-interval deadline: a server that
                # stays silent (hung, SIGSTOPped) is declared dead after 3 heartbeat intervals
                heartbeat_interval_s=fault.heartbeat_interval_s / 2, heartbeat_misses=3,
                on_ready=on_ready,
                fabric=fabric, fabric_joined=fabric_joined)
        else:
            factory = lambda: ExpertServer(  # noqa: E731
                name, cfg.model, assignment, dtype=cfg.dtype, device=device,
                batch_invariant=cfg.batch_invariant, on_ready=on_ready, store=self.store,
                load_format=cfg.load_format)
        ref = entry["ref"] = await sup.start_child(ChildSpec(name, factory), timeout=timeout)
        entry["batcher"] = await sup.start_child(ChildSpec(
            f"batcher-{name}", lambda: Batcher(name, lambda: ref, cfg.batching,
                                               fault.unit_timeout_s), mailbox_size=1 << 16))

    async def start_with_fabric(self, seat: FabricSeat, device: str,
                                hosted_by: Callable[[str], dict[int, list[int]]]) -> None:
        """Transport nvshmem: join the NVSHMEM job as rank 0 (`seat`, on `device`) while
        start-up server i (hosting `hosted_by(name)`) starts as rank i + 1.

        All at once: each join returns only when every rank has joined, and a server's ready
        line comes after its join, so one after the other would deadlock. Any failure (a join
        timing out after seat.timeout_s, a server exiting) cancels the rest and raises one
        EaasError; the engine's start then stops every server process.
        """
        import torch.distributed as dist

        from eaas.engine.server_proxy import join_fabric_in_thread

        if dist.is_available() and dist.is_initialized():
            raise EaasError("placement.transport 'nvshmem': torch.distributed is already "
                            "initialised in this process (an earlier nvshmem engine?); NVSHMEM "
                            "admits a process once, so run one nvshmem engine per process")
        n, joined = seat.world_size - 1, asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(join_fabric_in_thread(seat, device, joined), name="fabric-join")
                for i in range(n):
                    name = server_name(i)
                    tg.create_task(self.start_server(name, hosted_by(name),
                                                     fabric=seat.for_rank(i + 1),
                                                     fabric_joined=joined), name=f"start-{name}")
        except ExceptionGroup as eg:
            reasons = "; ".join(f"{type(e).__name__}: {e}" for e in eg.exceptions)
            raise EaasError(f"placement.transport 'nvshmem': forming the NVSHMEM job of "
                            f"{seat.world_size} ranks (engine on {device} + {n} expert servers, "
                            f"rendezvous {seat.store}, timeout {seat.timeout_s}s) failed: "
                            f"{reasons}") from eg

    def _ready(self, name: str) -> None:
        entry = self.servers.get(name)
        if entry is None:
            return
        entry["state"] = "alive"
        entry["incarnation"] += 1
        if entry["incarnation"] > 1:
            self.counters["restarts"] = self.counters.get("restarts", 0) + 1
        self._change.set()
        if name in self._routing().dead:
            self._routing_ref.tell_nowait(SetServerState(name, True, "restarted and ready"))

    def on_system_event(self, event: dict) -> None:
        """Actor lifecycle -> routing: a crashed server is out until it is ready again; a
        server whose supervisor gave up is out for good."""
        kind, name = event.get("type"), str(event.get("name", ""))
        if kind == "actor_crashed" and name in self.servers:
            self.servers[name]["state"] = "restarting"
            self._change.set()
            self.mark_dead(name, f"crashed: {event.get('reason')}")
        elif kind == "escalated" and name.startswith("server-sup-"):
            server = name[len("server-sup-"):]
            if server in self.servers and self.servers[server]["state"] != "dead":
                self.servers[server]["state"] = "dead"
                self._change.set()
                self.mark_dead(server, "restart intensity exceeded")
                task = asyncio.get_running_loop().create_task(self._replace(server),
                                                              name=f"replace-{server}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _replace(self, old: str) -> None:
        """Keep capacity: after the cool-down, start a server under a fresh name hosting what
        `old` hosted, and route to it in `old`'s place. A start that fails is retried after a
        doubled cool-down (at most 60 s)."""
        delay = self.config.fault.replace_after_s
        for attempt in itertools.count():
            await asyncio.sleep(delay)
            async with self._lock:
                entry = self.servers.get(old)
                if entry is None or entry["state"] != "dead":
                    return  # removed meanwhile
                assignment = {l: list(ids) for l, ids in entry["assignment"].items()}
                name = server_name(next(self._next_index))
                self._emit({"type": "replace_started", "server": name, "replaces": old,
                            "attempt": attempt, "after_s": delay})
                try:
                    await asyncio.wait_for(self.start_server(name, assignment,
                                                             device=entry["device"]), 120.0)
                except asyncio.CancelledError:
                    await self._discard(name)
                    raise
                except Exception as e:
                    await self._discard(name)
                    self.counters["replace_failures"] = \
                        self.counters.get("replace_failures", 0) + 1
                    self._emit({"type": "replace_failed", "server": name, "replaces": old,
                                "reason": f"{type(e).__name__}: {e}"})
                    delay = min(60.0, max(delay, 0.5) * 2)
                    continue
                table = {l: {e: tuple(name if s == old else s for s in srv)
                             for e, srv in ex.items()} for l, ex in self._routing().table.items()}
                await self._set_table(table, f"{name} replaces {old} (restart intensity exceeded)")
                self.servers.pop(old, None)
                self.replaced.append(old)
                self._change.set()
                self.counters["replacements"] = self.counters.get("replacements", 0) + 1
                self._emit({"type": "server_replaced", "server": name, "replaces": old})
                return

    def mark_dead(self, server: str, reason: str) -> None:
        if server not in self._routing().dead:
            self._routing_ref.tell_nowait(SetServerState(server, False, reason))

    def batcher_for(self, server: str) -> Any:
        s = self.servers.get(server)
        return s["batcher"] if s else None

    def live_refs(self) -> list[Any]:
        return [s[k] for s in self.servers.values() if s["state"] != "dead"
                for k in ("ref", "batcher") if s[k] is not None]

    def incarnation(self, server: str) -> int:
        """How many times `server` has become ready (1 = never restarted)."""
        return int(self.servers[server]["incarnation"])

    async def wait_ready(self, timeout: float = 60.0,
                         newer_than: dict[str, int] | None = None) -> None:
        """Wait until every server not dead for good is serving (after restarts); with
        `newer_than` {server: incarnation}, also until those servers have restarted."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        newer_than = newer_than or {}

        def pending() -> bool:
            return any(s["state"] not in ("alive", "dead") or
                       (n in newer_than and s["state"] != "dead" and
                        s["incarnation"] <= newer_than[n])
                       for n, s in self.servers.items())

        while pending():
            remaining = deadline - loop.time()
            if remaining <= 0:
                states = {n: s["state"] for n, s in self.servers.items()}
                raise TimeoutError(f"expert servers not ready after {timeout}s: {states}")
            self._change.clear()
            try:
                await asyncio.wait_for(self._change.wait(), remaining)
            except TimeoutError:
                pass

    def snapshot(self) -> list[dict]:
        out = []
        for name, s in sorted(self.servers.items(), key=lambda kv: int(kv[0].rsplit("-", 1)[1])):
            slot = s.get("slot")
            out.append({"name": name, "pid": slot.pid if slot else None,
                        "transport": (slot.url or "") if slot else "inproc://",
                        "state": s["state"],
                        "actor_state": s["ref"].state.value if s["ref"] else "starting",
                        "device": s["device"], "restarts": max(0, s["incarnation"] - 1),
                        "experts": {str(l): sorted(ids) for l, ids in s["assignment"].items()}})
        return out

    # ---- fault injection -------------------------------------------------------------------
    async def inject_fault(self, server: str, kind: str, *, seconds: float = 0.0) -> None:
        """`kill` (crash it; a process gets SIGKILL), `hang` (stop answering for `seconds`; a
        process gets SIGSTOP then SIGCONT), `delay` (add `seconds` to every batch; 0 clears)."""
        s = self._get(server)
        if kind not in ("kill", "hang", "delay"):
            raise ValueError(f"fault kind {kind!r} is not one of kill, hang, delay")
        if not isinstance(seconds, (int, float)) or seconds < 0:
            raise ValueError(f"fault seconds={seconds!r}: must be a number >= 0")
        self._emit({"type": "fault_injected", "action": kind, "server": server,
                    "seconds": seconds})
        if kind == "kill":
            s["state"] = "restarting"  # known at once; the crash notice follows
            self.mark_dead(server, "killed by fault injection")
        slot = s.get("slot")
        if slot is not None and kind in ("kill", "hang"):  # a real OS process: real signals
            if kind == "kill":
                slot.planned_kill = True
                slot.signal(signal.SIGKILL)
            else:
                pid = slot.pid
                slot.signal(signal.SIGSTOP)
                # SIGCONT later unless the heartbeat has replaced the process by then
                self._timers.append(asyncio.get_running_loop().call_later(
                    seconds, lambda: slot.pid == pid and slot.signal(signal.SIGCONT)))
        elif kind == "kill":
            await s["ref"].tell(Crash("killed by fault injection"))
        elif kind == "hang":
            await s["ref"].tell({"op": "hang", "seconds": seconds})
        else:
            await s["ref"].ask({"op": "delay", "seconds": seconds}, timeout=5.0)

    def _get(self, server: str) -> dict:
        s = self.servers.get(server)
        if s is None:
            raise ValueError(f"no expert server named {server!r}; servers: "
                             f"{sorted(self.servers)}")
        return s

    # ---- elastic scaling -------------------------------------------------------------------
    async def add_server(self, experts: dict[int, list[int]] | None = None, *,
                         start_timeout_s: float = 120.0, device: str | None = None) -> str:
        """Start a new server hosting `experts` ({layer: ids}; default: every expert), and
        route to it once it is ready, in a new generation. If it does not become ready within
        start_timeout_s it is stopped and the routing table is left as it was."""
        async with self._lock:
            routing = self._routing()
            if experts is None:
                experts = {l: sorted(ex) for l, ex in routing.table.items()}
            assignment = self._check_experts(experts, routing)
            name = server_name(next(self._next_index))
            self._emit({"type": "scale_started", "action": "add", "server": name})
            try:
                await asyncio.wait_for(self.start_server(name, assignment, device=device,
                                                         timeout=start_timeout_s),
                                       start_timeout_s)
            except Exception as e:
                await self._discard(name)
                self.counters["scale_failures"] = self.counters.get("scale_failures", 0) + 1
                self._emit({"type": "scale_failed", "action": "add", "server": name,
                            "reason": f"{type(e).__name__}: {e}", "rolled_back_to":
                            routing.generation})
                raise RuntimeError(f"adding expert server {name} failed ({type(e).__name__}: "
                                   f"{e}); routing stays at generation {routing.generation}"
                                   ) from e
            table = _with_server(self._routing().table, name, assignment)
            await self._set_table(table, f"added {name}")
            self.counters["scale_events"] = self.counters.get("scale_events", 0) + 1
            self._emit({"type": "scale_done", "action": "add", "server": name})
            return name

    async def remove_server(self, name: str, *, drain_timeout_s: float = 30.0) -> None:
        """Take `name` out of routing (a new generation), copy experts only it hosted to the
        remaining servers first, let in-flight work finish (or be resent), then stop it."""
        async with self._lock:
            self._get(name)
            live = [n for n, s in self.servers.items() if n != name and s["state"] != "dead"]
            if not live:
                raise ValueError(f"cannot remove {name}: it is the last live expert server")
            self._emit({"type": "scale_started", "action": "remove", "server": name})
            table = {l: {e: tuple(s for s in srv if s != name) for e, srv in ex.items()}
                     for l, ex in self._routing().table.items()}
            orphans: dict[int, list[int]] = {}
            for l, ex in table.items():
                for e, srv in ex.items():
                    if not [s for s in srv if s in live]:
                        orphans.setdefault(l, []).append(e)
            # re-home experts only `name` hosted: plan on the least-loaded servers, then one
            # load per target server
            hosted = {n: sum(map(len, self.servers[n]["assignment"].values())) for n in live}
            plan: dict[str, dict[int, list[int]]] = {}
            for l, ids in orphans.items():
                for e in ids:
                    target = min(live, key=lambda n: (hosted[n], n))
                    hosted[target] += 1
                    plan.setdefault(target, {}).setdefault(l, []).append(e)
                    table[l][e] = table[l][e] + (target,)
            for target, experts in plan.items():
                await self._load(target, experts)
            await self._set_table(table, f"removing {name}")
            await self._drain(name, drain_timeout_s)
            await self._discard(name)
            self.counters["scale_events"] = self.counters.get("scale_events", 0) + 1
            self._emit({"type": "scale_done", "action": "remove", "server": name})

    async def replicate_expert(self, layer: int, expert: int, server: str | None = None) -> str:
        """Add a copy of (layer, expert) on `server` (default: the least-loaded live server
        that lacks it); routing uses it in a new generation once the weights are loaded."""
        async with self._lock:
            routing = self._routing()
            if layer not in routing.table or expert not in routing.table[layer]:
                raise ValueError(f"no MoE expert ({layer}, {expert}); MoE layers "
                                 f"{sorted(routing.table)}, experts 0.."
                                 f"{len(next(iter(routing.table.values()))) - 1}")
            hosts = routing.table[layer][expert]
            if server is None:
                free = [n for n, s in self.servers.items()
                        if s["state"] == "alive" and n not in hosts]
                if not free:
                    raise ValueError(f"expert ({layer}, {expert}) is already on every live server")
                server = min(free, key=lambda n: (sum(map(len, self.servers[n]["assignment"]
                                                          .values())), n))
            elif server in hosts:
                raise ValueError(f"{server} already hosts expert ({layer}, {expert})")
            await self._load(server, {layer: [expert]})
            table = {l: dict(ex) for l, ex in routing.table.items()}
            table[layer][expert] = hosts + (server,)
            await self._set_table(table, f"replicated ({layer}, {expert}) on {server}")
            return server

    async def unreplicate_expert(self, layer: int, expert: int, server: str) -> None:
        """Drop `server`'s copy of (layer, expert): out of routing first (a new generation),
        then, once the server's queue is drained, its weights are freed. The last live copy
        cannot be dropped."""
        async with self._lock:
            routing = self._routing()
            hosts = routing.table.get(layer, {}).get(expert)
            if hosts is None:
                raise ValueError(f"no MoE expert ({layer}, {expert})")
            if server not in hosts:
                raise ValueError(f"{server} does not host expert ({layer}, {expert}); "
                                 f"hosts: {list(hosts)}")
            live = [s for s in hosts if s != server and s not in routing.dead]
            if not live:
                raise ValueError(f"{server} holds the last live copy of expert "
                                 f"({layer}, {expert}); replicate it elsewhere first")
            table = {l: dict(ex) for l, ex in routing.table.items()}
            table[layer][expert] = tuple(s for s in hosts if s != server)
            await self._set_table(table, f"unreplicated ({layer}, {expert}) from {server}")
            await self._drain(server, 30.0)
            s = self._get(server)
            await s["ref"].ask(UnloadExperts({layer: [expert]}), timeout=120.0)
            left = [e for e in s["assignment"].get(layer, []) if e != expert]
            if left:
                s["assignment"][layer] = left
            else:
                s["assignment"].pop(layer, None)

    async def apply_table(self, table: dict[int, dict[int, tuple[str, ...]]], reason: str) -> None:
        """Install a planned table: load whatever each server newly hosts, then route."""
        async with self._lock:
            for name, s in self.servers.items():
                need: dict[int, list[int]] = {}
                for l, ex in table.items():
                    have = set(s["assignment"].get(l, ()))
                    ids = [e for e, srv in ex.items() if name in srv and e not in have]
                    if ids:
                        need[l] = ids
                if need:
                    await self._load(name, need)
            await self._set_table(table, reason)

    # ---- helpers ---------------------------------------------------------------------------
    def _check_experts(self, experts: dict[int, list[int]], routing: RoutingSnapshot
                       ) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for l, ids in experts.items():
            l = int(l)
            if l not in routing.table:
                raise ValueError(f"layer {l} is not a MoE layer; MoE layers: "
                                 f"{sorted(routing.table)}")
            bad = [e for e in ids if int(e) not in routing.table[l]]
            if bad:
                raise ValueError(f"layer {l} has no experts {bad}")
            out[l] = sorted({int(e) for e in ids})
        if not out:
            raise ValueError("a new server must host at least one expert")
        return out

    async def _load(self, name: str, experts: dict[int, list[int]]) -> None:
        s = self._get(name)
        await s["ref"].ask(LoadExperts(experts), timeout=120.0)
        for l, ids in experts.items():  # in place: restarts re-load what it hosts now
            s["assignment"][l] = sorted(set(s["assignment"].get(l, [])) | set(ids))

    async def _set_table(self, table: dict, reason: str) -> None:
        await self._routing_ref.ask(SetTable(table, reason), timeout=10.0)

    async def _drain(self, name: str, timeout: float) -> None:
        """Wait until the server's batcher holds no work (shards stopped sending when the
        new table reached them; anything still failing is resent by the shards)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        batcher = self.servers[name]["batcher"]
        while loop.time() < deadline:
            try:
                st = await batcher.ask(Stats(), timeout=2.0)
            except Exception:
                return  # it is gone already
            if st["pending_rows"] == 0 and st.get("busy", 0) == 0:
                return
            await asyncio.sleep(0.01)

    async def _discard(self, name: str) -> None:
        entry = self.servers.pop(name, None)
        if entry is None:
            return
        entry["state"] = "dead"
        try:
            await self._sup.terminate_child(entry["sup"].name)
        except Exception:
            pass
        self._change.set()

    def close(self) -> None:
        for t in self._timers:
            t.cancel()
        for task in list(self._tasks):
            task.cancel()

    def _spares_for(self, device: str) -> Any:
        """The warm spare server processes of `device` (started on first use), or None."""
        from eaas.engine.server_proxy import SpareProcesses, restart_transport, server_argv

        cfg = self.config
        if cfg.fault.warm_spares == 0:
            return None
        spares = self.spares.get(device)
        if spares is None:
            argv = functools.partial(
                server_argv, cfg.model, {}, dtype=cfg.dtype, device=device,
                load_format=cfg.load_format, batch_invariant=cfg.batch_invariant,
                transport=restart_transport(cfg.placement.transport))
            spares = self.spares[device] = SpareProcesses(
                argv, self._log_path, count=cfg.fault.warm_spares, start_timeout_s=180.0)
            spares.fill()
        return spares

    def _log_path(self, name: str) -> str:
        """Server `name`'s log file, in this engine's run directory (made on first use)."""
        if self.log_dir is None:
            self.log_dir = tempfile.mkdtemp(prefix=f"eaas-{os.getpid()}-")
            log.info("expert-server logs: %s", self.log_dir)
        return os.path.join(self.log_dir, f"{name}.log")

    def close_logs(self) -> None:
        """At a clean close: remove the run directory, unless a server process failed during
        the run (restarted or replaced): then keep it and say where it is."""
        if self.log_dir is None:
            return
        failed = sorted(n for n, s in self.servers.items()
                        if s.get("slot") is not None and s["slot"].starts > 1) + \
            sorted(self.replaced)
        if failed:
            log.warning("expert-server logs kept in %s (servers that failed: %s)",
                        self.log_dir, ", ".join(failed))
        else:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        self.log_dir = None

    async def aclose(self) -> None:
        """Cancel the timers and the replacements in progress, wait for them to end, and stop
        the warm spares."""
        tasks = list(self._tasks)
        self.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        for spares in self.spares.values():
            await spares.aclose()

    def unserved(self) -> dict[int, list[int]]:
        """{layer: expert ids} that have no live replica right now (all their servers dead)."""
        routing = self._routing()
        out: dict[int, list[int]] = {}
        for l, ex in routing.table.items():
            ids = [e for e, srv in ex.items() if all(s in routing.dead for s in srv)]
            if ids:
                out[l] = sorted(ids)
        return out


def _with_server(table: Any, name: str, assignment: dict[int, list[int]]) -> dict:
    out = {l: dict(ex) for l, ex in table.items()}
    for l, ids in assignment.items():
        for e in ids:
            out[l][e] = tuple(out[l][e]) + (name,)
    return out
