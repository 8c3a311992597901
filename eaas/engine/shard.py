"""AttentionShard: owns its requests, their KV caches, a continuous-batching scheduler, and the
dispatch/combine of its micro-batches.

Each shard runs `scheduler.micro_batches` lanes (ping-pong): a lane runs one decode step of its
requests layer by layer, following the layer's dataflow graph; while one lane waits for its
expert rows, the other computes attention. Shards never wait for each other.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from eaas.actors import Actor
from eaas.config import EngineConfig
from eaas.engine.dispatch import Dispatcher, ExpertCall, StepCancelled
from eaas.engine.messages import (AbortRequest, AddRequest, Crash, RoutingUpdate,
                                  Stats, Subscribe, UnitFailed, UnitResult)
from eaas.engine.request import Request
from eaas.engine.sampling import sample
from eaas.errors import EaasError
from eaas.gpu.waiter import download
from eaas.model.ops import upload


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


class AttentionShard(Actor):
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
        self.steps = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    async def on_start(self) -> None:
        self.model, self.tokenizer = await asyncio.to_thread(self.deps.load_model, self.device)
        snap = await self.deps.routing.ask(Subscribe(self.context.self_ref), timeout=10.0)
        self.dispatcher = Dispatcher(self.context.self_ref, self.deps.batcher_for,
                                     self.deps.config.fault, self.deps.counters, snap,
                                     self.deps.load, round_units=self._round_units)
        for i in range(len(self.lanes)):
            self.context.create_task(self._lane(i), name=f"{self.name}-lane{i}")

    async def on_stop(self) -> None:
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
        elif isinstance(msg, AddRequest):
            r: Request = msg.request
            self.by_id[r.request_id] = r
            self.waiting.append(r)
            self._admit()
        elif isinstance(msg, AbortRequest):
            self._abort(msg.request_id, msg.reason)
        elif isinstance(msg, Stats):
            return self.stats()
        elif isinstance(msg, Crash):
            raise EaasError(f"{self.name}: {msg.reason}")
        else:
            raise TypeError(f"AttentionShard cannot handle {type(msg).__name__}")
        return None

    def stats(self) -> dict:
        running = [r for lane in self.lanes for r in lane]
        return {"running": len(running), "waiting": len(self.waiting), "steps": self.steps,
                "kv_tokens": sum(r.cache.seq_len for r in running if r.cache is not None),
                "kv_caches": sum(1 for r in running if r.cache is not None),
                "inflight_units": self.dispatcher.inflight() if hasattr(self, "dispatcher") else 0,
                "lanes": [len(lane) for lane in self.lanes]}

    # ---- scheduling -------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and sum(len(l) for l in self.lanes) < self.max_num_seqs:
            r = self.waiting.popleft()
            if r.finished:
                continue
            i = min(range(len(self.lanes)), key=lambda j: len(self.lanes[j]))
            r.cache = self.model.new_cache()
            r.metrics.first_scheduled_time = time.time()
            self.lanes[i].append(r)
            self._wake[i].set()

    def _abort(self, request_id: str, reason: str) -> None:
        r = self.by_id.get(request_id)
        if r is None or r.finished:
            return
        self._finish(r, "abort", error=reason)
        for i, lane in enumerate(self.lanes):
            call = self._calls[i]
            if call is not None and lane and all(x.finished for x in lane):
                call.cancel()  # nothing left to compute: retire the step's work units now

    async def _lane(self, i: int) -> None:
        while True:
            lane = self.lanes[i]
            lane[:] = [r for r in lane if not r.finished]
            self._admit()
            if not lane:
                self._wake[i].clear()
                await self._wake[i].wait()
                continue
            reqs = list(lane)
            board = self.deps.lanes
            board.running += 1
            try:
                await self._step(reqs, i)
            except StepCancelled:
                pass
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug or a model error: fail these requests, keep serving
                for r in reqs:
                    self._finish(r, "error", error=f"{type(e).__name__}: {e}")
                self.deps.emit({"type": "step_failed", "shard": self.name, "error": repr(e),
                                "time": time.time()})
            finally:
                board.running -= 1
                self._calls[i] = None

    def _round_units(self) -> int:
        """Units of one layer that can reach a batcher this round: one per running lane."""
        return self.deps.lanes.running

    # ---- one step of one micro-batch ----------------------------------------------------------
    async def _step(self, reqs: list[Request], lane: int) -> None:
        model = self.model
        inputs = [r.next_input() for r in reqs]
        spans, start = [], 0
        for ids in inputs:
            spans.append((start, start + len(ids)))
            start += len(ids)
        with torch.no_grad():
            flat = [t for ids in inputs for t in ids]
            h = model.embed(upload(flat, self.device), host_ids=flat)
        bad_tokens: set[int] = set()
        degraded_tokens: set[int] = set()
        for layer in model.layers:
            if all(r.finished for r in reqs):
                raise StepCancelled()
            h = await self._layer(layer, h, reqs, spans, lane, bad_tokens, degraded_tokens)
        with torch.no_grad():
            last = h[upload([e - 1 for _, e in spans], h.device)]  # [B, H]
            logits = model.lm_head(model.final_norm(last))  # [B, V] float32
            picks = logits.argmax(dim=-1)  # [B]: greedy rows need only their id on the host
            sampled = {b: j for j, b in enumerate(
                b for b, r in enumerate(reqs) if not r.params.greedy)}  # row -> logits row
            rows = logits[upload(list(sampled), logits.device)] if sampled else logits[:0]
        # sampling runs on the host (request generators are CPU generators): bring back the
        # greedy ids and the sampled rows' logits, waiting only for them
        picks, rows = await download(picks, rows)
        self.steps += 1
        for b, r in enumerate(reqs):
            if r.finished:
                continue
            s, e = spans[b]
            if any(s <= t < e for t in bad_tokens):
                self._finish(r, "error", error="no live server could compute an expert this "
                             "request needs (no live replica, or every attempt failed; "
                             "no_replica_policy=fail)")
                continue
            if any(s <= t < e for t in degraded_tokens):
                if not r.degraded:
                    self.deps.counters["degraded_requests"] = \
                        self.deps.counters.get("degraded_requests", 0) + 1
                r.degraded = True
            token = int(picks[b]) if b not in sampled else \
                sample(rows[sampled[b]], r.params, r.generator)
            self._append(r, token)

    async def _layer(self, layer: Any, h: torch.Tensor, reqs: list[Request], spans: list,
                     lane: int, bad: set[int], degraded: set[int]) -> torch.Tensor:
        """Run one layer's dataflow graph over h [T, H] (the micro-batch's tokens)."""
        from eaas.model import combine_experts

        g = self.deps.graph.layer(layer.layer_idx)
        vals: dict[tuple[str, str], Any] = {}

        def arg(node: str, port: str) -> Any:
            src, sport = g.inputs(node)[port][0]
            return vals[(src, sport)]

        with torch.no_grad():
            for node in g.order:
                n, kind = node.name, str(getattr(node.kind, "value", node.kind))
                if kind == "attention":
                    # one call for the micro-batch (an aborted request's cache is None: its rows
                    # pass through untouched); per-request attention inside in invariant mode
                    vals[(n, "hidden")] = layer.attention_block_batch(
                        h, [r.cache for r in reqs], spans)
                elif kind == "ffn_norm":
                    vals[(n, "x")] = layer.ffn_input(arg(n, "hidden"))
                elif kind == "router":
                    vals[(n, "routing")] = layer.router(arg(n, "x"))
                elif kind == "experts":
                    topk_ids, topk_weights = arg(n, "routing")
                    # routing bookkeeping reads the ids on the host: fetch them without
                    # stalling the loop (other lanes run meanwhile)
                    (topk_ids,) = await download(topk_ids)
                    call = self.dispatcher.start(layer.layer_idx, arg(n, "x"), topk_ids,
                                                 topk_weights)
                    vals[(n, "y")] = self._calls[lane] = call
                elif kind == "shared_expert":
                    vals[(n, "y")] = layer.shared_expert(arg(n, "x"))
                elif kind == "dense_mlp":
                    vals[(n, "y")] = layer.dense_mlp(arg(n, "x"))
                elif kind == "combine":
                    parts = []
                    for src, sport in g.inputs(n)["parts"]:
                        v = vals[(src, sport)]
                        if isinstance(v, ExpertCall):
                            eo = await v.wait()
                            bad |= eo.failed_tokens
                            degraded |= eo.degraded_tokens
                            v = combine_experts(eo.y, eo.weights)
                        parts.append(v)
                    out = parts[0]
                    for p in parts[1:]:
                        out = out + p
                    return arg(n, "residual") + out
                else:
                    raise EaasError(f"layer {layer.layer_idx}: node {n!r} has kind {kind!r}, "
                                    "which the attention shard cannot execute")
        raise EaasError(f"layer {layer.layer_idx}: graph has no combine node")

    # ---- outputs ----------------------------------------------------------------------------
    def _append(self, r: Request, token: int) -> None:
        now = time.time()
        r.output_ids.append(token)
        if r.metrics.first_token_time is None:
            r.metrics.first_token_time = now
        r.metrics.last_token_time = now
        self.deps.counters["tokens_generated"] = self.deps.counters.get("tokens_generated", 0) + 1
        if token in r.stop_ids:
            r.stop_reason = token
            self._finish(r, "stop")
        elif len(r.output_ids) >= r.params.max_tokens or \
                len(r.prompt_ids) + len(r.output_ids) >= r.max_len:
            self._finish(r, "length")
        else:
            r.queue.put_nowait(r.snapshot(self.tokenizer.decode(r.output_ids)))

    def _finish(self, r: Request, reason: str, *, error: str | None = None) -> None:
        if r.finished:
            return
        r.finished, r.finish_reason, r.error = True, reason, error
        r.metrics.finished_time = time.time()
        r.cache = None  # free the KV cache now
        self.by_id.pop(r.request_id, None)
        key = "requests_" + {"stop": "finished", "length": "finished"}.get(reason, reason)
        self.deps.counters[key] = self.deps.counters.get(key, 0) + 1
        text = self.tokenizer.decode(r.output_ids) if hasattr(self, "tokenizer") else ""
        r.queue.put_nowait(r.snapshot(text))
        self._admit()
