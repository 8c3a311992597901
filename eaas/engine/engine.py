"""AsyncEngine: the public entry point on the caller's event loop (the blocking facade `Engine` is
eaas/engine/blocking.py).

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
      planner                       replication planner (balance.auto only)
      health                        watchdogs: event-loop lag, planner progress
      gpu-health                    NVML sampler (when a device is CUDA)

A server whose restart intensity is exceeded escalates: it is marked dead in the routing table
(a new generation), an event is emitted, shards route around it, and after
`fault.replace_after_s` a replacement under a fresh name takes its experts. `readiness()` is
false, naming the experts, while any expert has no live replica.

Transport nvshmem: the engine process (rank 0, on `config.device`) and the start-up expert
server processes (ranks 1..N) form one NVSHMEM job. Joining is collective and a server reports
ready only after its join, so the engine joins on a thread while all start-up servers start at
once (one after the other would deadlock). Restarted and added servers use cudaipc://. The
job cannot be re-formed in one process: one nvshmem engine per process, and since NVSHMEM's
finalize is collective, a process whose peer died should leave with `os._exit`.
"""

from __future__ import annotations

import asyncio
import itertools
import zlib
from typing import Any, AsyncIterator, Sequence

import torch

from eaas.actors import ActorSystem, ChildSpec, RestartPolicy
from eaas.config import EngineConfig
from eaas.engine.events import EventBus
from eaas.engine.load import LoadTracker
from eaas.engine.messages import AbortRequest, AddRequest, Stats
from eaas.engine.monitor import HealthMonitor
from eaas.engine.pool import ExpertPool
from eaas.engine.pool_actions import PoolActions
from eaas.engine.outputs import RequestOutput
from eaas.engine.placement import initial_routing, server_name
from eaas.engine.request import Request, SeqGroup
from eaas.engine.routing import RoutingTable
from eaas.engine.sampling import SamplingParams, sequence_key
from eaas.engine.shard import AttentionShard, ShardDeps
from eaas.engine.server_process import prepare_server_env
from eaas.errors import ActorStateError, EngineOverloadedError, RequestError
from eaas.transport.fabric_seat import FabricSeat, plan_fabric


SHARD_START_TIMEOUT_S = 900.0  # on a GPU: weights + KV pool + every bucket's decode graphs
RAY_START_TIMEOUT_S = 180.0  # placement.launcher ray: a worker process starts, imports, loads


class AsyncEngine(PoolActions):
    """The engine on the caller's event loop. `async with AsyncEngine(cfg) as eng: ...`"""

    def __init__(self, config: EngineConfig) -> None:
        if not isinstance(config, EngineConfig):
            raise TypeError(f"AsyncEngine needs an EngineConfig, got {type(config).__name__}")
        self.config = config
        self.events_bus = EventBus()
        # present (at 0) from the start: a Prometheus counter appears before its first event
        self.counters: dict[str, int] = dict.fromkeys(
            ("restarts", "replacements", "replace_failures", "tokens_generated",
             "degraded_requests"), 0)
        self._system: ActorSystem | None = None
        self._ids = itertools.count(1)
        self._requests: dict[str, tuple[Request, Any]] = {}  # id -> (request, shard ref)
        self._shards: list[Any] = []
        self.pool: ExpertPool | None = None
        self.load: LoadTracker | None = None
        self._gpu_monitor: Any = None  # eaas.gpu.health.HealthMonitor when devices are CUDA
        self._routing: Any = None
        self._fabric_seat: FabricSeat | None = None  # transport nvshmem: the engine's rank 0
        self._shard_deps: ShardDeps | None = None
        self._ready = False
        self._closed = False
        self._grammar_compiler: Any = None  # eaas.engine.structured.GrammarCompiler

    # ---- lifecycle -----------------------------------------------------------------------
    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Build and start everything; on any failure, stop what was started and re-raise."""
        if self._system is not None:
            raise ActorStateError("AsyncEngine.start() called twice")
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise

    async def _start(self) -> None:
        from eaas.dataflow import default_model_graph, load_model_graph
        from eaas.model import Checkpoint

        cfg = self.config
        prepare_server_env(cfg)  # transport.secret_file, TLS files, request policy
        ckpt = await asyncio.to_thread(Checkpoint.open, cfg.model, cfg.load_format)
        self.checkpoint, mc = ckpt, ckpt.config
        self.model_config = mc
        self.tokenizer = ckpt.tokenizer
        self.model_name = cfg.model_name
        self.max_model_len = cfg.scheduler.max_model_len or mc.max_position_embeddings
        self.graph = load_model_graph(cfg.graph, mc) if cfg.graph else default_model_graph(mc)
        moe_layers = [i for i in range(mc.num_hidden_layers) if mc.is_moe_layer(i)]
        routing0 = initial_routing(cfg.placement, moe_layers, mc.num_experts)
        self.routing = routing0  # the routing table actor's latest snapshot (it owns changes)

        seat = self._fabric_seat = plan_fabric(cfg)
        # a start-up server's on_start includes its fabric join (bounded by seat.timeout_s); a
        # shard on a GPU loads its weights and captures its decode graphs in on_start
        devices = {cfg.device, *(cfg.placement.server_devices or ()),
                   *(cfg.placement.shard_devices or ())}
        start_s = SHARD_START_TIMEOUT_S if any(d.startswith("cuda") for d in devices) else 30.0
        if seat is not None:
            start_s = max(start_s, seat.timeout_s + 60.0)
        if cfg.placement.launcher == "ray":  # a Ray actor's worker process starts, then loads
            start_s = max(start_s, RAY_START_TIMEOUT_S)
        self._system = system = ActorSystem(
            name="eaas", on_escalation=self._on_escalation, start_timeout=start_s)
        await system.__aenter__()
        system.add_listener(self._on_system_event)
        root = await system.spawn_supervisor("engine", RestartPolicy("rest_for_one"))
        self._routing = await root.start_child(
            ChildSpec("routing", lambda: RoutingTable(self.routing, self.events_bus.emit,
                                                      self._set_routing)))
        pool_sup = await system.spawn_supervisor("experts", RestartPolicy("one_for_one"),
                                                 parent=root)
        self.pool = ExpertPool(cfg, pool_sup, self._routing, lambda: self.routing,
                               self.events_bus.emit, self.counters)
        if cfg.placement.launcher == "ray":
            from eaas.engine.ray_launcher import RayLauncher

            self.pool.launcher = RayLauncher(cfg)
            await self.pool.launcher.start()
            self.events_bus.emit({"type": "ray_connected", **self.pool.launcher.describe()})
        if seat is None:
            for i in range(cfg.placement.num_expert_servers):
                name = server_name(i)
                await self.pool.start_server(name, routing0.hosted_by(name))
        else:
            await self.pool.start_with_fabric(seat, cfg.device, routing0.hosted_by)
            self.events_bus.emit({"type": "fabric_joined", "world_size": seat.world_size,
                                  "store": seat.store, "device": cfg.device})
        self.load = LoadTracker(mc.num_hidden_layers, mc.num_experts,
                                window_s=cfg.balance.window_s)
        shard_devices = cfg.placement.shard_devices or (cfg.device,)
        on_device = [shard_devices[j % len(shard_devices)]
                     for j in range(cfg.placement.num_attention_shards)]
        deps = ShardDeps(cfg, self.graph, self._routing, self.pool.batcher_for,
                         self._load_shard_model, self.counters, self.events_bus.emit, self.load,
                         pools_on=on_device.count, store=self.pool.store,
                         server_devices=lambda: {n: s["device"]
                                                 for n, s in self.pool.servers.items()},
                         server_urls=lambda: {n: getattr(s.get("slot"), "url", None) or ""
                                              for n, s in self.pool.servers.items()})
        self._shard_deps = deps
        attn = await system.spawn_supervisor("attention", RestartPolicy("one_for_one"), parent=root)
        for j in range(cfg.placement.num_attention_shards):
            name, device = f"shard-{j}", shard_devices[j % len(shard_devices)]
            ref = await attn.start_child(ChildSpec(
                name, lambda n=name, d=device: AttentionShard(n, deps, d), mailbox_size=1 << 16),
                timeout=start_s + 5.0)
            self._shards.append(ref)
        self.planner_progress: dict = {}
        bal = cfg.balance
        if bal.auto:
            from eaas.engine.planner import Planner

            await root.start_child(ChildSpec("planner", lambda: Planner(
                self.rebalance, bal.interval_s, self.planner_progress)))
        self._monitor = await root.start_child(ChildSpec("health", lambda: HealthMonitor(
            self.events_bus.emit, self.counters, planner_progress=self.planner_progress,
            stall_timeout_s=bal.stall_timeout_s)))
        if any(d.startswith("cuda") for d in devices):
            await root.start_child(ChildSpec("gpu-health", self._new_gpu_monitor))
        self._ready = True
        self.events_bus.emit({"type": "engine_ready", "servers": sorted(self.pool.servers),
                              "shards": [s.name for s in self._shards]})

    def _load_shard_model(self, device: str) -> tuple[Any, Any]:
        from eaas.model import Checkpoint, DecoderModel

        cfg = self.config
        ckpt = Checkpoint.open(cfg.model, cfg.load_format)
        model = DecoderModel.load(ckpt, dtype=getattr(torch, cfg.dtype), device=device,
                                  load_experts=False, batch_invariant=cfg.batch_invariant,
                                  graph=self.graph)
        return model, ckpt.tokenizer

    def _on_system_event(self, event: dict) -> None:
        self.events_bus.emit(event)
        if self.pool is not None:
            self.pool.on_system_event(event)

    def _on_escalation(self, event: dict) -> None:
        self.events_bus.emit(event)  # the whole engine tree gave up: not ready any more
        self._ready = False

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed, self._ready = True, False
        if self.pool is not None:
            await self.pool.aclose()
        if self._system is not None:
            await self._system.stop()
        if self.pool is not None:  # the actors are gone: let the experts' GPU memory go
            self.pool.store.clear()
            self.pool.close_logs()
            if self.pool.launcher is not None:
                await self.pool.launcher.aclose()
        if self._shard_deps is not None:
            self._shard_deps.shards.clear()
        if self._fabric_seat is not None:
            from eaas.transport.fabric import close_fabric

            # local only; the process group stays: destroying it could wait on a dead peer
            close_fabric()

    def _pool(self) -> ExpertPool:
        if self.pool is None:
            raise ActorStateError("the engine is not started (use `async with AsyncEngine(...)`)")
        return self.pool

    # ---- requests ------------------------------------------------------------------------
    @property
    def is_ready(self) -> bool:
        return self._ready

    def readiness(self) -> tuple[bool, list[str]]:
        """(ready, reasons): ready to serve every request right now. Not ready before start,
        after close or a whole-tree escalation, and while any expert has no live replica (its
        servers restarting or being replaced); reasons name them, e.g.
        "layer 1: experts [0, 5] have no live replica"."""
        if not self._ready:
            return False, ["the engine is not running"]
        reasons = [f"layer {l}: experts {ids} have no live replica"
                   for l, ids in sorted(self._pool().unserved().items())]
        return not reasons, reasons

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
        waiting = sum(1 for r, _ in self._requests.values() if r.blocks is None and not r.finished)
        if waiting >= self.config.scheduler.max_waiting:
            raise EngineOverloadedError(f"{waiting} requests are waiting (scheduler.max_waiting="
                                        f"{self.config.scheduler.max_waiting}); retry later")
        seed = params.seed
        if seed is None:  # stable across processes (str hash() is salted per process)
            seed = self.config.seed * 1_000_003 + zlib.crc32(rid.encode())
        req = await self._new_request(rid, text, ids, params, seed)
        if rid in self._requests:  # taken while the grammar compiled
            raise RequestError(f"request_id {rid!r} is already running")
        shard = min(self._shards,
                    key=lambda s: sum(1 for _, sh in self._requests.values() if sh is s))
        self._requests[rid] = (req, shard)
        loop = asyncio.get_running_loop()
        deadline = None if deadline_s is None else loop.time() + deadline_s
        try:
            await shard.tell(AddRequest(req), timeout=5.0)
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0 and not (
                        req.group.finished if req.group is not None else req.finished):
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
            done = req.group.finished if req.group is not None else req.finished
            if not done:  # the caller stopped iterating: free the request's resources
                shard.tell_nowait(AbortRequest(rid, "the caller stopped reading the output"))

    async def _new_request(self, rid: str, text: str | None, ids: list[int],
                           params: SamplingParams, seed: int) -> Request:
        """The shard-side state of one request: one Request, or a SeqGroup of
        params.num_sequences sequences (ids rid, rid#1, ...) sharing one output queue."""
        vocab = self.model_config.vocab_size
        bad = [t for t in (*params.stop_token_ids, *(params.logit_bias or ())) if t >= vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} (in stop_token_ids or logit_bias) is not "
                               f"allowed: token ids are integers in [0, {vocab})")
        k = params.num_sequences
        seats = self.config.scheduler.max_num_seqs
        if k > seats:
            raise RequestError(f"n={params.n}, best_of={params.best_of} asks for {k} sequences; "
                               f"a request may run at most scheduler.max_num_seqs={seats}")
        grammar = None
        if params.structured_outputs is not None:
            grammar = await asyncio.to_thread(self._grammars().compile, params.structured_outputs)
        eos = frozenset(() if params.ignore_eos else self.checkpoint.eos_token_ids)
        stop = frozenset(params.stop_token_ids) | eos
        queue: asyncio.Queue = asyncio.Queue()
        members = []
        for i in range(k):
            r = Request(rid if i == 0 else f"{rid}#{i}", text, ids, params, stop,
                        self.max_model_len, queue, sequence_key(seed, i), eos_ids=eos, index=i,
                        logprobs=[] if params.logprobs is not None else None)
            if grammar is not None:
                r.grammar = self._grammars().matcher(grammar)
            members.append(r)
        if k > 1:
            group = SeqGroup(members, params.n, k)
            for m in members:
                m.group = group
        req = members[0]
        if self._shard_deps is not None:  # larger than a whole KV pool: refuse it now
            for shard in self._shard_deps.shards.values():
                shard.blocks.check_fits(req.max_positions(), forks=k - 1,
                                        num_shared=len(ids) // shard.blocks.block_size)
        return req

    def _grammars(self) -> Any:
        """The structured-output compiler for this model's tokenizer (made on first use)."""
        if self._grammar_compiler is None:
            from eaas.engine.structured import GrammarCompiler

            self._grammar_compiler = GrammarCompiler(self.tokenizer, self.model_config.vocab_size,
                                                     self.checkpoint.eos_token_ids)
        return self._grammar_compiler

    async def abort(self, request_id: str, reason: str = "aborted by caller") -> None:
        entry = self._requests.get(request_id)
        if entry is not None:
            await entry[1].tell(AbortRequest(request_id, reason))

    # ---- observability ---------------------------------------------------------------------
    async def check_health(self, timeout: float = 2.0) -> dict:
        """Ping every engine actor through its mailbox; healthy only if all answer in time and
        every expert has a live replica (`no_live_replica` lists {layer, experts} otherwise)."""
        refs = [self._routing, *self._shards, *self._pool().live_refs()]

        async def probe(ref: Any) -> tuple[str, dict]:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            try:
                await ref.ping(timeout=timeout)
                return ref.name, {"ok": True, "latency_s": loop.time() - t0}
            except Exception as e:
                return ref.name, {"ok": False, "error": f"{type(e).__name__}: {e}"}

        results = dict(await asyncio.gather(*(probe(r) for r in refs)))
        unserved = self._pool().unserved()
        return {"healthy": self._ready and not unserved and all(v["ok"] for v in results.values()),
                "actors": results,
                "no_live_replica": [{"layer": l, "experts": ids}
                                    for l, ids in sorted(unserved.items())]}

    async def stats(self) -> dict:
        """Per-actor counters (shards, servers, batchers), gathered through their mailboxes."""
        out: dict[str, Any] = {}
        for ref in [*self._shards, *self._pool().live_refs()]:
            try:
                out[ref.name] = await ref.ask(Stats(), timeout=2.0)
            except Exception as e:
                out[ref.name] = {"error": f"{type(e).__name__}: {e}"}
        return out

    def snapshot(self) -> dict:
        system = self._system.snapshot() if self._system else {"actors": []}
        routing = self.routing.to_dict() if hasattr(self, "routing") else {}
        servers = self._pool().snapshot() if self.pool else []
        for srv in servers:
            srv["inflight_tokens"] = self.load.inflight.get(srv["name"], 0) if self.load else 0
        c = dict(self.counters)
        c["dead_letters"] = system.get("dead_letters", 0)
        waiting = sum(1 for r, _ in self._requests.values() if r.blocks is None and not r.finished)
        deps = self._shard_deps
        shards = [] if deps is None else \
            [{"name": n, **s.stats()} for n, s in sorted(deps.shards.items())]
        for srv in servers:  # per server: which path each shard's decode steps take to it
            srv["data_path"] = {sh["name"]: _server_path(sh, srv["name"]) for sh in shards}
        return {"model": self.model_name, "actors": system.get("actors", []), "servers": servers,
                "shards": shards,
                "routing": routing, "counters": c, "num_running": len(self._requests) - waiting,
                "num_waiting": waiting, "load": self.load_snapshot(),
                "gpu": self._gpu_monitor.snapshot() if self._gpu_monitor is not None else
                {"available": False, "reason": "the engine runs on CPU"}}

    def load_snapshot(self) -> dict:
        """Routed tokens per (layer, expert) and per server over the window, and imbalance."""
        if self.load is None or self.pool is None:
            return {"tokens": [], "window_s": 0.0, "imbalance": {}, "server_tokens": {}}
        live = [n for n, s in self._pool().servers.items() if s["state"] != "dead"]
        return {"tokens": self.load.expert_tokens().tolist(), "window_s": self.load.window_s,
                "expert_metrics": self.config.balance.expert_metrics,
                "imbalance": {str(l): v for l, v in self.load.imbalance(live).items()},
                "server_tokens": {str(l): v for l, v in self.load.server_tokens().items()}}

    def _new_gpu_monitor(self) -> Any:
        from eaas.gpu.health import HealthMonitor as GpuHealthMonitor

        self._gpu_monitor = GpuHealthMonitor(on_event=self.events_bus.emit)
        return self._gpu_monitor

    def _set_routing(self, snap: Any) -> None:
        self.routing = snap

    def events(self) -> AsyncIterator[dict]:
        return self.events_bus.subscribe()


def _server_path(shard: dict, server: str) -> str:
    """"device" when the shard's decode steps reach `server` through its device exchange set,
    "host" otherwise (the dispatcher: prompts always, decode steps when the device path is
    not taken, or the server is out of the set)."""
    dp = shard.get("device_path") or {}
    return "device" if shard.get("data_path") == "device" and \
        dp.get("servers", {}).get(server) == "in" else "host"
