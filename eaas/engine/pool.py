"""ExpertPool: the expert servers — start, supervise, fault-inject, and scale them while serving.

Each server is its own supervisor (one_for_all, its own restart intensity) over the server actor
and its batcher, a temporary child of the pool supervisor: when its intensity is exceeded it
escalates and stays down, routing goes around it, and after `fault.replace_after_s` the pool
starts a replacement under a fresh name hosting the same experts (escalation is an event, not an
outage): the replacement is put into the table in place of the dead server once it is ready.

Routing changes only through the routing-table actor. Scaling while serving (add, remove,
replicate, apply a table) is the `Scaling` mixin in eaas/engine/scaling.py; where the server
processes live (run directory, warm spares) is eaas/engine/process_home.py.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
from typing import TYPE_CHECKING, Any, Callable

from eaas.actors import Actor, ChildSpec, RestartPolicy, Supervisor
from eaas.config import EngineConfig
from eaas.engine.batcher import Batcher
from eaas.engine.expert_server import ExpertServer
from eaas.engine.expert_store import ExpertStore
from eaas.engine.join import Joining
from eaas.engine.joined_server import JoinedServer, JoinSlot
from eaas.engine.process_home import ProcessHome
from eaas.engine.scaling import Scaling
from eaas.engine.messages import Crash, Hang, SetDelay, SetServerState
from eaas.engine.placement import RoutingSnapshot, server_name
from eaas.errors import EaasError

if TYPE_CHECKING:
    from eaas.transport.fabric_seat import FabricSeat


class ExpertPool(Scaling, Joining):
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
        self.home = ProcessHome(config)  # the server processes' run directory and warm spares
        self._lock = asyncio.Lock()  # one scaling step at a time
        self._next_index = itertools.count(config.placement.num_expert_servers)
        self._joining: dict[str, tuple[JoinSlot, dict[int, list[int]]]] = {}  # not ready yet
        self.launcher: Any = None  # placement.launcher ray: the RayLauncher (engine sets it)
        # in-process servers share one copy of each layer's experts per device
        self.store = ExpertStore(config.model, dtype=config.dtype,
                                 batch_invariant=config.batch_invariant,
                                 load_format=config.load_format)

    # ---- start / readiness -----------------------------------------------------------------
    async def start_server(self, name: str, assignment: dict[int, list[int]], *,
                           timeout: float = 180.0, device: str | None = None,
                           fabric: FabricSeat | None = None,
                           fabric_joined: asyncio.Event | None = None,
                           slot: JoinSlot | None = None, model: str | None = None) -> None:
        """Start server `name` hosting `assignment` and wait until it has started.

        slot: a server that joined (its process listens at slot.url); with placement.launcher
        ray every other server gets a slot from the launcher (a Ray actor per process). model:
        the checkpoint its process loads (default: the engine's; a rolling upgrade's new one).

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
            device = devices[_index(name) % len(devices)]
        model = model or cfg.model
        if slot is None and self.launcher is not None:
            slot = self.launcher.slot(name, assignment, device=device, model=model)
            device = slot.device
        # `assignment` is shared with the factories and mutated in place when the server
        # loads more experts, so a restart re-loads exactly what the server hosts now.
        entry = {"name": name, "sup": sup, "assignment": assignment, "state": "starting",
                 "slot": slot, "device": device, "incarnation": 0, "ref": None, "batcher": None,
                 "model": model}
        self.servers[name] = entry
        on_ready = lambda: self._ready(name)  # noqa: E731
        factory: Callable[[], Actor]
        if slot is not None:
            factory = lambda: JoinedServer(  # noqa: E731
                slot, call_timeout_s=fault.unit_timeout_s,
                heartbeat_interval_s=fault.heartbeat_interval_s / 2, heartbeat_misses=3,
                start_timeout_s=timeout, on_ready=on_ready)
        elif cfg.placement.server_mode == "process":
            from eaas.engine.server_process import ProcessSlot, ServerProcess

            pslot = entry["slot"] = ProcessSlot(name, log_path=self.home.log_path(name))
            # a spare has the engine's checkpoint open: not for a server on another one
            spares = self.home.spares_for(device) if model == cfg.model else None
            factory = lambda: ServerProcess(  # noqa: E731
                pslot, model, assignment, dtype=cfg.dtype, device=device,
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
                name, model, assignment, dtype=cfg.dtype, device=device,
                batch_invariant=cfg.batch_invariant, on_ready=on_ready,
                store=self.store if model == cfg.model else None,
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

        from eaas.transport.fabric_seat import join_fabric_in_thread

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
                slot = self.servers[server]["slot"]
                if isinstance(slot, JoinSlot) and slot.origin == "join":
                    return  # the engine cannot start it again: it may rejoin by name
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
        for name, s in sorted(self.servers.items(), key=lambda kv: (_index(kv[0]), kv[0])):
            slot = s.get("slot")
            joined = isinstance(slot, JoinSlot)
            out.append({"name": name, "pid": slot.pid if slot else None,
                        "transport": (slot.url or "") if slot else "inproc://",
                        "origin": slot.origin if joined else "local",
                        "host": slot.host if joined else "",
                        "model": s.get("model") or self.config.model,
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
        if isinstance(slot, JoinSlot) and not slot.can_signal:  # on another host
            if kind == "hang":
                raise ValueError(f"fault 'hang' needs a process on this host; {server} runs "
                                 f"on {slot.host or 'another host'}")
            slot = None  # 'kill' drops its process (the actor crashes), 'delay' is an RPC
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
            await s["ref"].tell(Hang(seconds))
        else:
            await s["ref"].ask(SetDelay(seconds), timeout=5.0)

    def _get(self, server: str) -> dict:
        s = self.servers.get(server)
        if s is None:
            raise ValueError(f"no expert server named {server!r}; servers: "
                             f"{sorted(self.servers)}")
        return s

    # ---- elastic scaling -------------------------------------------------------------------
    def close(self) -> None:
        for t in self._timers:
            t.cancel()
        for task in list(self._tasks):
            task.cancel()

    def close_logs(self) -> None:
        """At a clean close: the run directory goes, unless a server process failed (restarted
        or replaced) — then it is kept and named."""
        self.home.close_logs([n for n, s in self.servers.items()
                              if s.get("slot") is not None and s["slot"].starts > 1]
                             + self.replaced)

    async def aclose(self) -> None:
        """Cancel the timers and the replacements in progress, wait for them to end, and stop
        the warm spares."""
        tasks = list(self._tasks)
        self.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.home.aclose()

    def unserved(self) -> dict[int, list[int]]:
        """{layer: expert ids} that have no live replica right now (all their servers dead)."""
        routing = self._routing()
        out: dict[int, list[int]] = {}
        for l, ex in routing.table.items():
            ids = [e for e, srv in ex.items() if all(s in routing.dead for s in srv)]
            if ids:
                out[l] = sorted(ids)
        return out


def _index(name: str) -> int:
    """The number a server name ends with (`expert-7` -> 7); -1 for a joined name without."""
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1
