"""AsyncEngine and Engine: the public entry points.

Start-up builds the supervision tree of DESIGN.md from the config, the checkpoint and the
dataflow graph:

    engine (rest_for_one)
      routing                       RoutingTable actor (expert -> servers, generation)
      experts (one_for_one)         ExpertPoolSupervisor
        server-sup-<i> (one_for_all, its own restart intensity)
          expert-<i>                ExpertServer (its experts only)
          batcher-expert-<i>        Batcher (coalesces work from every shard)
      attention (one_for_one)
        shard-<j>                   AttentionShard (requests, KV caches, dispatch/combine)

A server whose restart intensity is exceeded escalates: it is marked dead in the routing table
(a new generation), an event is emitted, and shards route around it.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import threading
from typing import Any, AsyncIterator, Sequence

import torch

from eaas.actors import ActorSystem, ChildSpec, RestartPolicy, Supervisor
from eaas.config import EngineConfig
from eaas.engine.batcher import Batcher
from eaas.engine.events import EventBus
from eaas.engine.expert_server import ExpertServer
from eaas.engine.messages import AbortRequest, AddRequest, Crash, SetServerState, Stats
from eaas.engine.outputs import RequestOutput
from eaas.engine.placement import initial_routing, server_name
from eaas.engine.request import Request
from eaas.engine.routing import RoutingTable
from eaas.engine.sampling import SamplingParams
from eaas.engine.shard import AttentionShard, ShardDeps
from eaas.errors import ActorStateError, EngineOverloadedError, RequestError


class AsyncEngine:
    """The engine on the caller's event loop. `async with AsyncEngine(cfg) as eng: ...`"""

    def __init__(self, config: EngineConfig) -> None:
        if not isinstance(config, EngineConfig):
            raise TypeError(f"AsyncEngine needs an EngineConfig, got {type(config).__name__}")
        self.config = config
        self.events_bus = EventBus()
        self.counters: dict[str, int] = {}
        self._system: ActorSystem | None = None
        self._ids = itertools.count(1)
        self._requests: dict[str, tuple[Request, Any]] = {}  # id -> (request, shard ref)
        self._shards: list[Any] = []
        self._servers: dict[str, dict] = {}  # name -> {"ref", "batcher", "sup", "assignment", ...}
        self._routing: Any = None
        self._server_change = asyncio.Event()
        self._timers: list[asyncio.TimerHandle] = []
        self._ready = False
        self._closed = False

    # ---- lifecycle -----------------------------------------------------------------------
    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        from eaas.dataflow import default_model_graph, load_model_graph
        from eaas.model import Checkpoint

        if self._system is not None:
            raise ActorStateError("AsyncEngine.start() called twice")
        cfg = self.config
        ckpt = await asyncio.to_thread(Checkpoint.open, cfg.model)
        self.checkpoint, mc = ckpt, ckpt.config
        self.model_config = mc
        self.tokenizer = ckpt.tokenizer
        self.model_name = cfg.model_name
        self.max_model_len = cfg.scheduler.max_model_len or mc.max_position_embeddings
        self.graph = load_model_graph(cfg.graph, mc) if cfg.graph else default_model_graph(mc)
        moe_layers = [i for i in range(mc.num_hidden_layers) if mc.is_moe_layer(i)]
        routing0 = initial_routing(cfg.placement, moe_layers, mc.num_experts)
        self.routing = routing0  # the routing table actor's latest snapshot (it owns changes)

        self._system = system = ActorSystem(name="eaas", on_escalation=self._on_escalation)
        await system.__aenter__()
        system.add_listener(self._on_system_event)
        fault = cfg.fault
        root = await system.spawn_supervisor("engine", RestartPolicy("rest_for_one"))
        self._routing = await root.start_child(
            ChildSpec("routing", lambda: RoutingTable(self.routing, self.events_bus.emit,
                                                      self._set_routing)))
        self._pool = await system.spawn_supervisor("experts", RestartPolicy("one_for_one"),
                                                   parent=root)
        for i in range(cfg.placement.num_expert_servers):
            name = server_name(i)
            await self._start_server(name, routing0.hosted_by(name))
        deps = ShardDeps(cfg, self.graph, self._routing, self._batcher_for, self._load_shard_model,
                         self.counters, self.events_bus.emit)
        attn = await system.spawn_supervisor("attention", RestartPolicy("one_for_one"), parent=root)
        for j in range(cfg.placement.num_attention_shards):
            name = f"shard-{j}"
            ref = await attn.start_child(
                ChildSpec(name, lambda n=name: AttentionShard(n, deps), mailbox_size=1 << 16))
            self._shards.append(ref)
        self._ready = True
        self.events_bus.emit({"type": "engine_ready", "servers": sorted(self._servers),
                              "shards": [s.name for s in self._shards]})

    async def _start_server(self, name: str, assignment: dict[int, list[int]]) -> None:
        """One server = its own supervisor (one_for_all, own restart intensity) over the server
        actor and its batcher. It is a temporary child of the pool: when its intensity is
        exceeded it escalates and stays down; routing goes around it."""
        cfg, fault = self.config, self.config.fault
        policy = RestartPolicy("one_for_all", max_restarts=fault.max_restarts,
                               within_s=fault.within_s, backoff_s=fault.backoff_s)
        sup = await self._pool.start_child(ChildSpec(
            f"server-sup-{name}", lambda: Supervisor(policy, ()), restart="temporary"))
        entry = {"name": name, "sup": sup, "assignment": assignment, "state": "starting",
                 "slot": None}
        self._servers[name] = entry
        on_ready = lambda: self._server_ready(name)  # noqa: E731
        devices = cfg.placement.server_devices or (cfg.device,)
        device = devices[int(name.rsplit("-", 1)[1]) % len(devices)]
        entry["device"] = device
        if cfg.placement.server_mode == "process":
            from eaas.engine.server_proxy import ProcessSlot, ServerProcess

            slot = entry["slot"] = ProcessSlot(name)
            factory = lambda: ServerProcess(  # noqa: E731
                slot, cfg.model, assignment, dtype=cfg.dtype, device=device,
                batch_invariant=cfg.batch_invariant, transport=cfg.placement.transport,
                call_timeout_s=fault.unit_timeout_s,
                heartbeat_interval_s=fault.heartbeat_interval_s, on_ready=on_ready)
        else:
            factory = lambda: ExpertServer(  # noqa: E731
                name, cfg.model, assignment, dtype=cfg.dtype, device=device,
                batch_invariant=cfg.batch_invariant, on_ready=on_ready)
        ref = entry["ref"] = await sup.start_child(ChildSpec(name, factory), timeout=180.0)
        entry["batcher"] = await sup.start_child(ChildSpec(
            f"batcher-{name}", lambda: Batcher(name, lambda: ref, cfg.batching,
                                               fault.unit_timeout_s), mailbox_size=1 << 16))

    def _server_ready(self, name: str) -> None:
        entry = self._servers.get(name)
        if entry is None:
            return
        entry["state"] = "alive"
        entry["incarnation"] = entry.get("incarnation", 0) + 1
        if entry["incarnation"] > 1:
            self.counters["restarts"] = self.counters.get("restarts", 0) + 1
        self._server_change.set()
        if self._routing is not None and name in self.routing.dead:
            self._routing.tell_nowait(SetServerState(name, True, "restarted and ready"))

    def _load_shard_model(self) -> tuple[Any, Any]:
        from eaas.model import Checkpoint, ReferenceModel

        cfg = self.config
        ckpt = Checkpoint.open(cfg.model)
        model = ReferenceModel.load(ckpt, dtype=getattr(torch, cfg.dtype), device=cfg.device,
                                    load_experts=False, batch_invariant=cfg.batch_invariant)
        return model, ckpt.tokenizer

    def _batcher_for(self, server: str) -> Any:
        s = self._servers.get(server)
        return s["batcher"] if s else None

    def _on_system_event(self, event: dict) -> None:
        """Actor lifecycle -> routing: a crashed server is out until it is ready again; a
        server whose supervisor gave up is out for good."""
        self.events_bus.emit(event)
        kind, name = event.get("type"), str(event.get("name", ""))
        if kind == "actor_crashed" and name in self._servers:
            self._servers[name]["state"] = "restarting"
            self._server_change.set()
            self._mark_dead(name, f"crashed: {event.get('reason')}")
        elif kind == "escalated" and name.startswith("server-sup-"):
            server = name[len("server-sup-"):]
            if server in self._servers:
                self._servers[server]["state"] = "dead"
                self._server_change.set()
                self._mark_dead(server, "restart intensity exceeded")

    def _mark_dead(self, server: str, reason: str) -> None:
        if self._routing is not None and server not in self.routing.dead:
            self._routing.tell_nowait(SetServerState(server, False, reason))

    def _on_escalation(self, event: dict) -> None:
        self.events_bus.emit(event)  # the whole engine tree gave up: not ready any more
        self._ready = False

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed, self._ready = True, False
        for t in self._timers:
            t.cancel()
        if self._system is not None:
            await self._system.stop()

    # ---- requests ------------------------------------------------------------------------
    @property
    def is_ready(self) -> bool:
        return self._ready

    def _encode(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty; give a non-empty string or token id list")
            ids = self.tokenizer.encode(prompt)
            text: str | None = prompt
        elif isinstance(prompt, (list, tuple)):
            ids, text = list(prompt), None
            V = self.model_config.vocab_size
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V for t in ids):
                raise RequestError(f"prompt token ids must be integers in [0, {V})")
        else:
            raise RequestError(f"prompt must be a string or a list of token ids, "
                               f"got {type(prompt).__name__}")
        if not ids:
            raise RequestError("prompt is empty; give a non-empty string or token id list")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt has {len(ids)} tokens; the limit is max_model_len - 1 = "
                               f"{self.max_model_len - 1}")
        return text, ids

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                       request_id: str | None = None, deadline_s: float | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Stream cumulative outputs of one request; the last one has finished=True."""
        if not self._ready:
            raise ActorStateError("the engine is not running (use `async with AsyncEngine(...)`)")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be SamplingParams, got {type(params).__name__}")
        if deadline_s is not None and not (isinstance(deadline_s, (int, float)) and deadline_s > 0):
            raise RequestError(f"deadline_s={deadline_s!r} is not allowed: a number > 0 or None")
        text, ids = self._encode(prompt)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._requests:
            raise RequestError(f"request_id {rid!r} is already running")
        waiting = sum(1 for r, _ in self._requests.values() if r.cache is None and not r.finished)
        if waiting >= self.config.scheduler.max_waiting:
            raise EngineOverloadedError(f"{waiting} requests are waiting (scheduler.max_waiting="
                                        f"{self.config.scheduler.max_waiting}); retry later")
        gen = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else self.config.seed * 1_000_003 + hash(rid)
            gen = torch.Generator().manual_seed(seed & 0xFFFF_FFFF_FFFF)
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos
                                             else set(self.checkpoint.eos_token_ids))
        req = Request(rid, text, ids, params, frozenset(stop), self.max_model_len, asyncio.Queue(),
                      gen)
        shard = min(self._shards, key=lambda s: sum(1 for _, sh in self._requests.values() if sh is s))
        self._requests[rid] = (req, shard)
        loop = asyncio.get_running_loop()
        deadline = None if deadline_s is None else loop.time() + deadline_s
        try:
            await shard.tell(AddRequest(req), timeout=5.0)
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0 and not req.finished:
                    await shard.tell(AbortRequest(rid, f"deadline of {deadline_s}s exceeded"))
                    remaining = None
                try:
                    out = await asyncio.wait_for(req.queue.get(), remaining)
                except TimeoutError:
                    continue
                yield out
                if out.finished:
                    return
        finally:
            self._requests.pop(rid, None)
            if not req.finished:  # the caller stopped iterating: free the request's resources
                shard.tell_nowait(AbortRequest(rid, "the caller stopped reading the output"))

    async def abort(self, request_id: str, reason: str = "aborted by caller") -> None:
        entry = self._requests.get(request_id)
        if entry is not None:
            await entry[1].tell(AbortRequest(request_id, reason))

    # ---- observability ---------------------------------------------------------------------
    async def check_health(self, timeout: float = 2.0) -> dict:
        """Ping every engine actor through its mailbox; healthy only if all answer in time."""
        refs = [self._routing, *self._shards]
        for s in self._servers.values():
            if s["state"] != "dead":
                refs += [s["ref"], s["batcher"]]

        async def probe(ref: Any) -> tuple[str, dict]:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            try:
                await ref.ping(timeout=timeout)
                return ref.name, {"ok": True, "latency_s": loop.time() - t0}
            except Exception as e:
                return ref.name, {"ok": False, "error": f"{type(e).__name__}: {e}"}

        results = dict(await asyncio.gather(*(probe(r) for r in refs)))
        return {"healthy": self._ready and all(v["ok"] for v in results.values()),
                "actors": results}

    async def stats(self) -> dict:
        """Per-actor counters (shards, servers, batchers), gathered through their mailboxes."""
        out: dict[str, Any] = {}
        for ref in [*self._shards] + [s[k] for s in self._servers.values() if s["state"] != "dead"
                                      for k in ("ref", "batcher")]:
            try:
                out[ref.name] = await ref.ask(Stats(), timeout=2.0)
            except Exception as e:
                out[ref.name] = {"error": f"{type(e).__name__}: {e}"}
        return out

    def snapshot(self) -> dict:
        system = self._system.snapshot() if self._system else {"actors": []}
        routing = self.routing.to_dict() if hasattr(self, "routing") else {}
        servers = []
        for name, s in sorted(self._servers.items()):
            ref = s["ref"]
            slot = s.get("slot")
            servers.append({"name": name, "pid": slot.pid if slot else None,
                            "transport": (slot.url or "") if slot else "inproc://",
                            "state": s["state"], "actor_state": ref.state.value,
                            "device": s.get("device"),
                            "restarts": slot.starts - 1 if slot else None,
                            "experts": {str(l): ids for l, ids in s["assignment"].items()}})
        c = dict(self.counters)
        c["dead_letters"] = system.get("dead_letters", 0)
        waiting = sum(1 for r, _ in self._requests.values() if r.cache is None and not r.finished)
        return {"model": self.model_name, "actors": system.get("actors", []), "servers": servers,
                "routing": routing, "counters": c, "num_running": len(self._requests) - waiting,
                "num_waiting": waiting}

    def _set_routing(self, snap: Any) -> None:
        self.routing = snap

    def events(self) -> AsyncIterator[dict]:
        return self.events_bus.subscribe()

    # ---- admin actions -------------------------------------------------------------------
    async def kill_server(self, name: str) -> None:
        """Fault injection: crash server `name` (its supervisor restarts it)."""
        await self.inject_fault(name, "kill")

    def server_names(self) -> list[str]:
        return sorted(self._servers)

    async def inject_fault(self, server: str, kind: str, *, seconds: float = 0.0) -> None:
        """Fault injection on one server: `kill` (crash it), `hang` (stop answering for
        `seconds`), `delay` (add `seconds` to every batch from now on; 0 clears it)."""
        s = self._servers.get(server)
        if s is None:
            raise ValueError(f"no expert server named {server!r}; servers: {sorted(self._servers)}")
        if kind not in ("kill", "hang", "delay"):
            raise ValueError(f"fault kind {kind!r} is not one of kill, hang, delay")
        self.events_bus.emit({"type": "fault_injected", "action": kind, "server": server,
                              "seconds": seconds})
        slot = s.get("slot")
        if kind == "kill":
            s["state"] = "restarting"  # known at once; the crash notice follows
            self._mark_dead(server, "killed by fault injection")
        if slot is not None and kind in ("kill", "hang"):  # a real OS process: real signals
            if kind == "kill":
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

    def incarnation(self, server: str) -> int:
        """How many times `server` has become ready (1 = never restarted)."""
        return int(self._servers[server].get("incarnation", 0))

    async def wait_servers_ready(self, timeout: float = 60.0,
                                 newer_than: dict[str, int] | None = None) -> None:
        """Wait until every server not dead for good is serving (after restarts); with
        `newer_than` {server: incarnation}, also until those servers have restarted."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        newer_than = newer_than or {}

        def pending() -> bool:
            return any(s["state"] not in ("alive", "dead") or
                       (n in newer_than and s["state"] != "dead" and
                        s.get("incarnation", 0) <= newer_than[n])
                       for n, s in self._servers.items())

        while pending():
            remaining = deadline - loop.time()
            if remaining <= 0:
                states = {n: s["state"] for n, s in self._servers.items()}
                raise TimeoutError(f"expert servers not ready after {timeout}s: {states}")
            self._server_change.clear()
            try:
                await asyncio.wait_for(self._server_change.wait(), remaining)
            except TimeoutError:
                pass

    async def add_server(self) -> str:
        raise NotImplementedError("adding expert servers at runtime is not implemented yet")

    async def remove_server(self, name: str) -> None:
        raise NotImplementedError("removing expert servers at runtime is not implemented yet")

    async def replicate_expert(self, layer: int, expert: int) -> None:
        raise NotImplementedError("replicating an expert at runtime is not implemented yet")

    async def rebalance(self) -> None:
        raise NotImplementedError("online rebalancing is not implemented yet")


class Engine:
    """Blocking facade: runs an AsyncEngine on its own event-loop thread."""

    def __init__(self, config: EngineConfig) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="eaas-engine",
                                        daemon=True)
        self._thread.start()
        self.engine = AsyncEngine(config)
        try:
            self._run(self.engine.start())
        except BaseException:
            self.close()
            raise

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for one prompt or a list of prompts (all run concurrently)."""
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                              and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)  # type: ignore[list-item]
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(batch)
        if len(plist) != len(batch):
            raise RequestError(f"got {len(plist)} SamplingParams for {len(batch)} prompts")

        async def one(p: Any, sp: SamplingParams | None) -> RequestOutput:
            last = None
            async for last in self.engine.generate(p, sp):
                pass
            assert last is not None
            return last

        async def run_all() -> list[RequestOutput]:
            return list(await asyncio.gather(*(one(p, sp) for p, sp in zip(batch, plist))))

        return self._run(run_all())

    def close(self) -> None:
        if self._loop.is_running():
            try:
                self._run(self.engine.aclose())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=10)
        if not self._loop.is_closed() and not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
