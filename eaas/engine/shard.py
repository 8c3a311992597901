"""AttentionShard: owns its requests, their KV caches, a continuous-batching scheduler, and the
dispatch/combine of its micro-batches.

Each shard runs `scheduler.micro_batches` lanes (ping-pong): a lane runs one decode step of its
requests layer by layer, following the layer's dataflow graph; while one lane waits for its
expert rows, the other computes attention. Shards never wait for each other.

The co-located decode step, scheduled asynchronously, is the `AsyncDecode` mixin
(eaas/engine/decode_lane.py); how new tokens become outputs (text, stop strings, logprobs,
finishing) is the `TokenEmission` mixin (eaas/engine/emission.py); the n > 1 / best_of forks
of a prefilled prompt are `SeqForking` (eaas/engine/forking.py); what a step holds (prefill
chunks, prompts as rows of the captured step) is `StepPlanning` (eaas/engine/step_plan.py).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from eaas.actors import Actor
from eaas.config import EngineConfig
from eaas.engine.batch_sampling import needs_batched_sampling, sample_rows
from eaas.engine.blocks import BlockAllocator, num_blocks_for
from eaas.engine.decode_graph import DecodeGraphs
from eaas.engine.decode_lane import AsyncDecode, Launch
from eaas.engine.device_path import SERVER_WAIT_S, DeviceShard
from eaas.engine.dispatch import Dispatcher, ExpertCall, StepCancelled
from eaas.engine.emission import TokenEmission
from eaas.engine.forking import SeqForking
from eaas.engine.messages import (AbortRequest, AddRequest, Crash, RoutingUpdate,
                                  Stats, Subscribe, UnitFailed, UnitResult)
from eaas.engine.request import Request, SeqGroup
from eaas.engine.step_plan import StepPlanning
from eaas.engine.sampling import sample
from eaas.errors import EaasError, InjectedFault
from eaas.gpu.waiter import download
from eaas.model import bank_experts, combine_experts
from eaas.model.kv_cache import AttentionBatch, PagedKVCache, SeqSpan
from eaas.model.ops import upload


class _Combine:
    """The deferred result of one layer's dispatch (executor `Deferred`): waits for the rows,
    notes tokens that failed or were degraded, and combines."""

    __slots__ = ("call", "bad", "degraded")

    def __init__(self, call: ExpertCall, bad: set[int], degraded: set[int]) -> None:
        self.call, self.bad, self.degraded = call, bad, degraded

    async def wait(self) -> torch.Tensor:
        eo = await self.call.wait()
        self.bad |= eo.failed_tokens
        self.degraded |= eo.degraded_tokens
        return combine_experts(eo.y, eo.weights)


class LaneBoard:
    """How many lanes run a step right now, over every shard that shares it (one event loop).

    Work units carry this count (`WorkUnit.round_units`) so a batcher knows when no other unit
    can join a batch: with one request running, its rows are flushed at once.
    """

    __slots__ = ("running",)

    def __init__(self) -> None:
        self.running = 0


@dataclass(frozen=True, slots=True)
class ShardDeps:
    """What a shard needs from the engine (in-process). The engine makes one for all its shards,
    so they share `lanes`."""

    config: EngineConfig
    graph: Any  # eaas.dataflow.ModelGraph
    routing: Any  # ActorRef of the RoutingTable
    batcher_for: Callable[[str], Any]  # server name -> Batcher ActorRef | None
    load_model: Callable[[str], Any]  # device -> (model without routed experts, Tokenizer)
    counters: dict[str, int]  # engine-wide counters (shared by all shards; one event loop)
    emit: Callable[[dict], None]
    load: Any  # LoadTracker (routed tokens per expert / server)
    lanes: LaneBoard = field(default_factory=LaneBoard)  # shared by the shards of one engine
    pools_on: Callable[[str], int] = lambda device: 1  # shards with a KV pool on a device
    shards: dict[str, Any] = field(default_factory=dict)  # name -> running AttentionShard
    store: Any = None  # eaas.engine.expert_store.ExpertStore of the in-process servers
    server_devices: Callable[[], dict[str, str]] = dict  # server name -> its device
    server_urls: Callable[[], dict[str, str]] = dict  # server name -> its RPC listener's URL


class AttentionShard(StepPlanning, AsyncDecode, DeviceShard, TokenEmission, SeqForking, Actor):
    def __init__(self, name: str, deps: ShardDeps, device: str) -> None:
        self.name = name
        self.deps = deps
        self.device = device
        cfg = deps.config.scheduler
        self.max_num_seqs = cfg.max_num_seqs
        self.lanes: list[list[Request]] = [[] for _ in range(cfg.micro_batches)]
        self.waiting: deque[Request] = deque()
        self.by_id: dict[str, Request] = {}
        self._wake = [asyncio.Event() for _ in self.lanes]
        self._calls: list[ExpertCall | None] = [None for _ in self.lanes]  # lane's call in flight
        # per lane: the co-located decode step in flight whose ids are not on the host yet
        # (its live requests, its DecodeOut); the lane's next step feeds them on the device
        self._ahead: list[Launch | None] = [
            None for _ in self.lanes]
        self._retry: list[Any] = [None for _ in self.lanes]  # per lane: a replay to launch
        self.device_path: Any = None  # eaas.engine.device_path.DevicePath, when taken
        self.device_path_reason = "not decided yet"  # why not, when not taken
        self.ledger: Any = None  # its StepLedger
        self._stepping: set[str] = set()  # requests of the steps in flight (their blocks stay)
        self._unforked: list[SeqGroup] = []  # admitted groups whose followers await the fork
        self.steps = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    async def on_start(self) -> None:
        self.model, self.tokenizer = await asyncio.to_thread(self.deps.load_model, self.device)
        snap = await self.deps.routing.ask(Subscribe(self.context.self_ref), timeout=10.0)
        self.dispatcher = Dispatcher(self.context.self_ref, self.deps.batcher_for,
                                     self.deps.config.fault, self.deps.counters, snap,
                                     self.deps.load, round_units=self._round_units)
        self.graphs: DecodeGraphs | None = None
        self.local = False  # every expert computed here, on this shard's device (see _colocate)
        if self._colocated(snap):
            await asyncio.to_thread(self._colocate)
        self.cache, self.blocks = await asyncio.to_thread(self._new_cache)
        if self.local:
            await asyncio.to_thread(self._capture)
        else:
            await self._open_device_path(snap)
        self.deps.shards[self.name] = self  # the engine's snapshot reads stats() of each
        for i in range(len(self.lanes)):
            self.context.create_task(self._lane(i), name=f"{self.name}-lane{i}")

    # ---- co-located experts: the GPU-resident fast path --------------------------------------
    def _colocated(self, snap: Any) -> bool:
        """Whether every routed expert has a live in-process server on this shard's GPU: then the
        shard computes them itself from the device's shared expert store (the fused kernel, in
        the captured decode graph) instead of dispatching rows to its own process's servers."""
        cfg = self.deps.config
        if cfg.placement.server_mode != "inproc" or not self.device.startswith("cuda"):
            return False
        here = str(torch.device(self.device))
        local = {n for n, d in self.deps.server_devices().items()
                 if n not in snap.dead and str(torch.device(d)) == here}
        return all(any(s in local for s in servers)
                   for experts in snap.table.values() for servers in experts.values())

    def data_path(self) -> str:
        """How this shard's steps run: "captured" (decode steps replay CUDA graphs, experts
        computed here), "local" (experts computed here, eagerly), "device" (decode steps
        replay CUDA graphs whose MoE layers exchange rows with the server processes' GPUs:
        eaas.engine.device_path; prompts go the dispatcher's way), or "dispatch" (rows sent
        to the expert servers through the dispatcher)."""
        if self._device_ready():
            return "device"
        if not getattr(self, "local", False):
            return "dispatch"
        g = getattr(self, "graphs", None)
        return "captured" if g is not None and g.captured else "local"

    def _colocate(self) -> None:
        store = self.deps.store
        for layer in self.model.layers:
            if layer.is_moe:
                layer.experts = store.layer(self.device, layer.layer_idx)
        self.local = True

    def _capture(self, path: Any = None) -> None:
        """The decode graphs over the co-located experts, or over the device path's exchange
        (its servers told to run the capture's warm-up steps; the warm-up waits as long as a
        first compile may take, the recorded graphs fault.device_timeout_s)."""
        cfg, mc = self.deps.config, self.model.config
        max_len = cfg.scheduler.max_model_len or mc.max_position_embeddings
        graphs = DecodeGraphs(self.model, self.cache, max_num_seqs=cfg.scheduler.max_num_seqs,
                              max_blocks=-(-max_len // cfg.cache.block_size),
                              experts=bank_experts if path is None else path.exchange,
                              captured=not cfg.enforce_eager,
                              step_flags=None if path is None else path.step_flags)
        if path is None:
            graphs.capture()
        else:
            assert graphs.warm_up_steps == path.announced, (graphs.warm_up_steps, path.announced)
            path.set_timeout(SERVER_WAIT_S)
            graphs.capture(before_recording=lambda: path.set_timeout(
                cfg.fault.device_timeout_s))
            path.step_flags()  # the warm-up's own report is not a step's
        self.graphs = graphs

    def _new_cache(self) -> tuple[PagedKVCache, BlockAllocator]:
        """The shard's paged KV cache, sized now (after the weights are loaded); the allocator
        hands out blocks 1..n (cache block 0 is the scratch block)."""
        cfg, mc = self.deps.config, self.model.config
        max_len = cfg.scheduler.max_model_len or mc.max_position_embeddings
        n = num_blocks_for(cfg.cache, mc, self.model.dtype, self.device,
                           cfg.scheduler.max_num_seqs, max_len,
                           pools_on_device=self.deps.pools_on(self.device))
        cache = PagedKVCache(mc, n + 1, cfg.cache.block_size, self.model.dtype, self.device)
        return cache, BlockAllocator(n, cfg.cache.block_size, first_block_id=1)

    async def on_stop(self) -> None:
        if self.deps.shards.get(self.name) is self:
            del self.deps.shards[self.name]
        path, self.device_path = getattr(self, "device_path", None), None
        if path is not None:
            await path.aclose()
        # crash or shutdown: every request this shard holds ends now, with the reason
        for r in list(self.by_id.values()):
            self._finish(r, "abort", error=f"attention shard {self.name} stopped "
                         "(engine shutdown or shard crash)")

    async def on_receive(self, msg: Any) -> Any:
        if isinstance(msg, UnitResult):
            self.dispatcher.on_result(msg)
        elif isinstance(msg, UnitFailed):
            self.dispatcher.on_failed(msg)
        elif isinstance(msg, RoutingUpdate):
            self.dispatcher.on_routing(msg.snapshot)
            if self.device_path is not None:
                self.device_path.routing.update(msg.snapshot)
            elif self.graphs is not None:  # a local expert lost its last live server: dispatch
                self.local = self._colocated(msg.snapshot)
        elif isinstance(msg, AddRequest):
            r: Request = msg.request
            for m in (r.group.members if r.group is not None else (r,)):
                self.by_id[m.request_id] = m
            self.waiting.append(r)
            self._admit()
        elif isinstance(msg, AbortRequest):
            self._abort(msg.request_id, msg.reason)
        elif isinstance(msg, Stats):
            return self.stats()
        elif isinstance(msg, Crash):
            raise InjectedFault(f"{self.name}: {msg.reason}")
        else:
            raise TypeError(f"AttentionShard cannot handle {type(msg).__name__}")
        return None

    def stats(self) -> dict:
        running = [r for lane in self.lanes for r in lane]
        blocks = getattr(self, "blocks", None)
        return {"running": len(running), "waiting": len(self.waiting), "steps": self.steps,
                "kv_tokens": sum(r.num_computed for r in running if r.blocks is not None),
                "kv_caches": sum(1 for r in running if r.blocks is not None),
                "kv_blocks_used": blocks.num_used if blocks is not None else 0,
                "kv_blocks_total": blocks.num_blocks if blocks is not None else 0,
                "data_path": self.data_path(),
                "device_path": (self.device_path.describe() if self.device_path is not None
                                else {"reason": self.device_path_reason}),
                "graph_replays": self.graphs.replays if getattr(self, "graphs", None) else 0,
                "inflight_units": self.dispatcher.inflight() if hasattr(self, "dispatcher") else 0,
                "lanes": [len(lane) for lane in self.lanes]}

    # ---- scheduling -------------------------------------------------------------------------
    def _admit(self) -> None:
        """Start waiting requests, oldest first, while a lane seat and KV blocks are free. A
        request reserves blocks for its prompt and every token it may generate, so a running
        request never runs out; one that cannot get them now waits (never over-commits)."""
        while self.waiting and self._seats() < self.max_num_seqs:
            r = self.waiting[0]
            if r.finished:
                self.waiting.popleft()
                continue
            followers = r.group.followers if r.group is not None else []
            if self._seats() + 1 + len(followers) > self.max_num_seqs:
                return  # a group takes all its seats at once (its sequences decode together)
            try:
                table = self.blocks.allocate(r.request_id, r.max_positions())
            except EaasError as e:  # larger than the whole pool: it would wait forever
                self.waiting.popleft()
                self._finish(r, "error", error=str(e))
                continue
            if table is None:
                return  # blocks busy: wait for a running request to free its own
            if followers:
                shared = len(r.prompt_ids) // self.blocks.block_size
                forks = self.blocks.fork(r.request_id, [f.request_id for f in followers],
                                         r.max_positions(), shared)
                if forks is None:
                    self.blocks.free(r.request_id)
                    return
                for f, t in zip(followers, forks):
                    f.blocks = t
                self._unforked.append(r.group)
            self.waiting.popleft()
            r.blocks = table
            i = min(range(len(self.lanes)), key=lambda j: len(self.lanes[j]))
            r.metrics.first_scheduled_time = time.time()
            self.lanes[i].append(r)
            self._wake[i].set()

    def _seats(self) -> int:
        """Sequences running or promised a seat (followers of admitted, unforked groups)."""
        return sum(len(l) for l in self.lanes) + sum(
            1 for g in self._unforked for f in g.followers if not f.finished)

    def _release(self, r: Request) -> None:
        """Give r's KV blocks back unless a step in flight still writes them."""
        if r.blocks is not None and r.request_id not in self._stepping:
            self.blocks.free(r.request_id)
            r.blocks = None

    def _abort(self, request_id: str, reason: str) -> None:
        r = self.by_id.get(request_id)
        if r is None or r.finished:
            return
        for m in (r.group.members if r.group is not None else (r,)):
            self._finish(m, "abort", error=reason)
        for i, lane in enumerate(self.lanes):
            call = self._calls[i]
            if call is not None and lane and all(x.finished for x in lane):
                call.cancel()  # nothing left to compute: retire the step's work units now

    async def _lane(self, i: int) -> None:
        while True:
            lane = self.lanes[i]
            lane[:] = [r for r in lane if not r.finished]
            self._admit()
            if not lane and self._ahead[i] is None:
                self._wake[i].clear()
                await self._wake[i].wait()
                continue
            reqs = list(lane)
            board = self.deps.lanes
            board.running += 1
            self._stepping.update(r.request_id for r in reqs)
            try:
                if reqs:
                    await self._step(reqs, i)
                else:  # every row of the lane's step in flight has ended: land it
                    await self._drain(i)
            except StepCancelled:
                pass
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug or a model error: fail these requests, keep serving
                ahead, self._ahead[i] = self._ahead[i], None
                for r in reqs + ([m for m, _ in ahead.live] if ahead is not None else []):
                    self._finish(r, "error", error=f"{type(e).__name__}: {e}")
                self.deps.emit({"type": "step_failed", "shard": self.name, "error": repr(e),
                                "time": time.time()})
            finally:
                board.running -= 1
                self._calls[i] = None
                self._stepping.difference_update(r.request_id for r in reqs)
                for r in reqs:
                    if r.finished:
                        self._release(r)
                self._admit()

    def _round_units(self) -> int:
        """Units of one layer that can reach a batcher this round: one per running lane."""
        return self.deps.lanes.running

    # ---- one step of one micro-batch ----------------------------------------------------------
    async def _step(self, reqs: list[Request], lane: int) -> None:
        if (self.local or self._device_ready()) and self.graphs is not None:
            reqs, chunks = self._plan(reqs)
            if all(r.prefilled for r in reqs):
                return await self._decode_step(reqs, lane)
            if chunks is not None:  # short prompts ride the captured step beside the decodes
                return await self._decode_step(reqs, lane, chunks)
        await self._drain(lane)  # the eager step feeds the tokens of the step in flight
        reqs = [r for r in reqs if not r.finished]
        if not reqs:
            return
        model = self.model
        chunks = self._chunks(reqs)
        spans = [SeqSpan(self._table(r), r.num_computed, len(c)) for r, c in zip(reqs, chunks)]
        rows, start = [], 0
        for c in chunks:
            rows.append((start, start + len(c)))
            start += len(c)
        bad_tokens: set[int] = set()
        degraded_tokens: set[int] = set()
        experts = bank_experts if self.local else functools.partial(
            self._remote_experts, lane=lane, bad=bad_tokens, degraded=degraded_tokens)

        def check_abort(layer_idx: int) -> None:
            if all(r.finished for r in reqs):
                raise StepCancelled()

        with torch.no_grad():
            flat = [t for c in chunks for t in c]
            h = model.embed(upload(flat, self.device), host_ids=flat)
            batch = AttentionBatch.build(spans, self.cache.block_size, self.device)
            h = await model.run_layers(h, self.cache, batch, experts, check_abort)
            emit = [b for b, r in enumerate(reqs)
                    if r.num_computed + len(chunks[b]) >= len(r.prompt_ids)]  # rows that sample
            last = h[upload([rows[b][1] - 1 for b in emit], h.device)]  # [B', H]
            logits = model.lm_head(model.final_norm(last))  # [B', V] float32
            finite = torch.isfinite(logits).all(dim=-1)  # [B']: a NaN/inf row fails its request
            pos = {b: j for j, b in enumerate(emit)}
            # sequences forked from a prompt finishing its prefill now sample from its row
            forks = [(b, f) for b in emit if self._forking(reqs[b])
                     for f in reqs[b].group.followers if not f.finished]
            self._copy_prompt_tail(reqs, emit)
            prompt_lp = self._prompt_logprobs(reqs, chunks, rows, h)
            batched = bool(forks) or needs_batched_sampling([reqs[b] for b in emit])
            srows: list[Request] = []
            if batched:
                srows = [reqs[b] for b in emit] + [f for _, f in forks]
                picked = sample_rows(logits, srows, [pos[b] for b in emit] +
                                     [pos[b] for b, _ in forks])
                tensors = picked.tensors()
            else:
                picks = logits.argmax(dim=-1)  # [B']: greedy rows need only their id on the host
                sampled = {b: j for j, b in enumerate(
                    b for b in emit if not reqs[b].params.greedy)}  # row -> logits row
                want = [pos[b] for b in sampled]
                sel = logits[upload(want, logits.device)] if want else logits[:0]
                tensors = [picks, sel]
        # the eager path samples on the host unless a request needs the batched processors:
        # bring back the ids (or the sampled rows' logits), waiting only for them
        owners, plp = prompt_lp
        finite, *tensors = await download(finite, *tensors, *plp)
        if owners:
            self._store_prompt_logprobs(owners, tensors[len(tensors) - len(plp):])
            tensors = tensors[:len(tensors) - len(plp)]
        self.steps += 1
        tokens: dict[int, int] = {}  # sampling row -> token
        entries: dict[int, tuple[float, Any]] = {}  # sampling row -> (logprob, position entry)
        if batched:
            tokens = dict(enumerate(tensors[0].tolist()))
            if len(tensors) > 1:
                entries = self._logprob_entries(srows, tokens, tensors[1:])
        for b, r in enumerate(reqs):
            if r.finished:
                continue
            r.num_computed += len(chunks[b])
            s, e = rows[b]
            if any(s <= t < e for t in bad_tokens):
                self._finish(r, "error", error="no live server could compute an expert this "
                             f"request needs: {self.dispatcher.last_failure}")
                continue
            if any(s <= t < e for t in degraded_tokens):
                if not r.degraded:
                    self.deps.counters["degraded_requests"] = \
                        self.deps.counters.get("degraded_requests", 0) + 1
                r.degraded = True
            if b not in pos:
                continue  # a prefill chunk short of the prompt's end: no token yet
            if not bool(finite[pos[b]]):
                self._emit(r, 0, False)
                continue
            if self._forking(r):
                self._fork(r, [(len(emit) + j, f) for j, (fb, f) in enumerate(forks) if fb == b],
                           tokens, entries)
            try:
                if batched:
                    token = tokens[pos[b]]
                else:
                    picks, sel = tensors
                    token = int(picks[pos[b]]) if b not in sampled else \
                        sample(sel[sampled[b]], r.params, r.noise_key, len(r.output_ids))
            except Exception as e:  # this request's own failure: its batch-mates go on
                self._finish(r, "error", error=f"sampling failed: {type(e).__name__}: {e}")
                continue
            self._emit(r, token, True, entries.get(pos[b]))

    def _table(self, r: Request) -> list[int] | None:
        """r's cache block ids, None once finished: its rows then write the scratch block and
        attend to nothing."""
        if r.finished or r.blocks is None:
            return None
        return list(r.blocks.block_ids)

    async def _remote_experts(self, layer: Any, x: torch.Tensor, topk_ids: torch.Tensor,
                              topk_weights: torch.Tensor, params: dict, *, lane: int,
                              bad: set[int], degraded: set[int]) -> _Combine:
        """The experts step through the expert servers (executor `ExpertsStep`): sends the rows
        now, returns the deferred combine. Node params override the fault config per layer."""
        # routing bookkeeping reads the ids on the host: fetch them without stalling the loop
        (topk_ids,) = await download(topk_ids)
        call = self.dispatcher.start(layer.layer_idx, x, topk_ids, topk_weights,
                                     timeout_s=params.get("timeout_s"),
                                     policy=params.get("no_replica_policy"))
        self._calls[lane] = call
        return _Combine(call, bad, degraded)
