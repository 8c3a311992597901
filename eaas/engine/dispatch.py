"""Dispatch and combine for one attention shard: the work-unit ledger that loses nothing.

For one layer of one micro-batch step, the (token, k) pairs are grouped by the server chosen for
each expert (a live replica with the fewest rows this shard has in flight), sent as work units,
and kept in a ledger until their rows come back. A unit whose server fails (death notice from the
batcher, the routing table marking the server dead, or no answer by `unit_timeout_s`) is resent
to another live replica — or the restarted server — as a new attempt. Results of an old attempt
or of a unit already combined are dropped and counted, so each unit is combined exactly once.
Expert compute is a pure function of the rows, so resending is safe.

With no live replica of an expert, `fault.no_replica_policy` decides: `wait` (the default: those
pairs are parked while the rest of the call proceeds, and resent the moment a routing change
brings a server back, up to wait_timeout_s; a request's deadline aborts it sooner), `fail` (the
tokens' requests error), or `degrade` (skip the expert, renormalise that token's weights, flag
the request). `Dispatcher.last_failure` says why pairs failed, naming the policy in force.

Hedged resends: a unit unanswered for its server's hedge delay (`fault.hedge_after_s`, or
sooner: 4 x that server's recent p99 round trip, see eaas.engine.unit_latency) is also sent to
other live replicas while the first copy stays in flight. Each pair is combined from the first
answer that covers it; a unit whose pairs are all combined is retired, so the late copy's result
is dropped as stale. A server beaten by a hedged copy, or that let a unit time out, is
*suspect*: new units avoid it while another live replica exists, until it answers in time
again, the routing table marks it dead, or unit_timeout_s passes. So a hung (SIGSTOPped) server
costs one hedge delay, not a unit timeout per step, until the heartbeat declares it dead; a
hedge the first copy beats (a hiccup, not a hung server) costs one unit of duplicate work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from eaas.config import FaultConfig
from eaas.engine.messages import UnitFailed, UnitResult, WorkUnit
from eaas.engine.placement import RoutingSnapshot
from eaas.engine.unit_latency import UnitLatency
from eaas.model.ops import upload

# retired unit ids kept so a late answer counts as stale, not duplicate (counters only: it is
# dropped either way); combined ones are not kept (an id per unit grew the engine's RSS)
_RETIRED_MEMORY = 4096
_PARKED_POLL_S = 0.5  # parked pairs are retried this often without a routing change


class ServerFailed(Exception):
    """A unit's server failed it (death notice, refused call, or deadline)."""


@dataclass(slots=True)
class _Unit:
    unit_id: int
    layer: int
    pair_idx: torch.Tensor  # [N] int64: positions in the flat [T*K] pair array
    expert_ids: torch.Tensor  # [N] int64
    server: str
    attempt: int
    generation: int
    sent_at: float
    future: asyncio.Future
    tried: set[str] = field(default_factory=set)
    notify: Callable[[], None] | None = None  # wakes the ExpertCall waiting on this unit
    hedged: bool = False  # its pairs were also sent elsewhere (or it is such a copy): no more
    is_hedge: bool = False  # a hedged copy of another unit's pairs
    late: str = ""  # a hedged copy: the server it was sent around


@dataclass(slots=True)
class ExpertsOutput:
    y: torch.Tensor  # [T, K, H] per-pair expert outputs (zeros where an expert was skipped/failed)
    weights: torch.Tensor  # [T, K] float32 weights to combine with (renormalised under degrade)
    failed_tokens: set[int]  # tokens whose request must error (policy `fail`)
    degraded_tokens: set[int]  # tokens that skipped an expert (policy `degrade`)


class Dispatcher:
    """Per-shard ledger of work units in flight."""

    def __init__(self, shard_ref: Any, batcher_for: Callable[[str], Any], fault: FaultConfig,
                 counters: dict[str, int], routing: RoutingSnapshot, load: Any = None, *,
                 round_units: Callable[[], int] | None = None) -> None:
        self.load = load  # LoadTracker or None
        self.round_units = round_units  # -> WorkUnit.round_units hint (None: unknown)
        self.shard_ref = shard_ref
        self.batcher_for = batcher_for
        self.fault = fault
        self.counters = counters
        self.routing = routing
        self.units: dict[int, _Unit] = {}
        self.outstanding: dict[str, int] = defaultdict(int)  # rows in flight per server
        self._retired: OrderedDict[int, None] = OrderedDict()  # the latest retired unit ids
        self._ids = itertools.count(1)
        self._parked: set[ExpertCall] = set()  # calls with pairs waiting for a live server
        # servers that let a unit time out -> until when new units avoid them (if they can)
        self.suspect: dict[str, float] = {}
        self.last_failure = ""  # why pairs last failed (the policy in force), for the error
        self.latency = UnitLatency(fault.hedge_after_s)  # round trips per server: hedge delays
        for key in ("units_dispatched", "units_combined", "units_retired", "resent_units",
                    "reroutes", "unit_timeouts", "dropped_duplicates", "stale_results",
                    "failed_pairs", "degraded_pairs", "combine_violations",
                    "attempts_exhausted", "hedged_units", "hedge_wins"):
            counters.setdefault(key, 0)

    # ---- messages from the shard's mailbox --------------------------------------------------
    def on_routing(self, snap: RoutingSnapshot) -> None:
        if snap.generation <= self.routing.generation:
            return
        self.routing = snap
        for name in snap.dead:  # a dead server comes back as a fresh process
            self.suspect.pop(name, None)
            self.latency.forget(name)
        for call in list(self._parked):
            call._notify()  # parked pairs are resent at once
        for u in list(self.units.values()):
            if u.server in snap.dead and not u.future.done():
                u.future.set_exception(ServerFailed(f"{u.server} marked dead"))
                _notify(u)

    def on_result(self, msg: UnitResult) -> None:
        u = self.units.get(msg.unit_id)
        if u is None:
            stale = msg.unit_id in self._retired
            self.counters["stale_results" if stale else "dropped_duplicates"] += 1
            return
        if msg.attempt != u.attempt or msg.server != u.server or u.future.done():
            stale = msg.attempt != u.attempt
            self.counters["stale_results" if stale else "dropped_duplicates"] += 1
            return
        if not u.hedged or u.is_hedge:  # answered in time (a hedged late copy did not)
            self.suspect.pop(msg.server, None)
        self.latency.observe(msg.server, time.monotonic() - u.sent_at)
        u.future.set_result(msg.y)
        _notify(u)

    def on_failed(self, msg: UnitFailed) -> None:
        u = self.units.get(msg.unit_id)
        if u is not None and msg.attempt == u.attempt and not u.future.done():
            u.future.set_exception(ServerFailed(f"{msg.server}: {msg.reason}"))
            _notify(u)

    # ---- the layer call (split phase: start() sends, ExpertCall.wait() combines) -----------
    def start(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor, *, timeout_s: float | None = None,
              policy: str | None = None) -> ExpertCall:
        """Send x [T, H]'s rows to the experts topk_ids [T, K] names; returns a call to await.
        timeout_s / policy: this call's unit deadline and no-replica policy (the layer graph's
        experts-node params), instead of the fault config's.

        The sends happen now, so the caller can compute its shared expert while they are out.
        `call.cancel()` (every request of the step aborted) retires its units at once.
        """
        fault = self.fault
        if timeout_s is not None or policy is not None:
            fault = dataclasses.replace(
                fault, unit_timeout_s=fault.unit_timeout_s if timeout_s is None else timeout_s,
                no_replica_policy=policy or fault.no_replica_policy)
        call = ExpertCall(self, layer, x, topk_ids, topk_weights, fault)
        if self.load is not None:
            self.load.record_experts(layer, call.flat_ids)
        call.send(torch.arange(call.T * call.K), set(), 0)
        return call

    # ---- helpers ----------------------------------------------------------------------------
    def _assign(self, layer: int, flat_ids: torch.Tensor, pair_idx: torch.Tensor,
                tried: set[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Choose a server per expert among live replicas, least loaded first.

        Returns ({server: pair indices}, orphan pair indices with no live replica).
        Example: pairs [0, 1, 2, 3] routed to experts [5, 2, 5, 7], expert 5 on s0 and 2, 7 on s1
        -> ({"s0": [0, 2], "s1": [1, 3]}, []).
        """
        experts = flat_ids[pair_idx]  # [N]
        uniq, inverse, counts = torch.unique(experts, return_inverse=True, return_counts=True)
        table, dead = self.routing.table[layer], self.routing.dead
        if self.suspect:
            now = time.monotonic()
            self.suspect = {s: t for s, t in self.suspect.items() if t > now}
        planned: dict[str, int] = defaultdict(int)
        servers: list[str] = []  # distinct choices, in first-chosen order
        code: list[int] = []  # per unique expert: index into servers, -1 for no live replica
        for e, n in zip(uniq.tolist(), counts.tolist()):
            alive = [s for s in table.get(e, ()) if s not in dead]
            alive = [s for s in alive if s not in self.suspect] or alive  # avoid hung ones
            fresh = [s for s in alive if s not in tried] or alive  # all tried: retry the live ones
            if not fresh:
                code.append(-1)
                continue
            best = fresh[0] if len(fresh) == 1 else \
                min(fresh, key=lambda s: (self.outstanding[s] + planned[s], s in tried))
            planned[best] += n
            if best not in servers:
                servers.append(best)
            code.append(servers.index(best))
        if len(servers) == 1 and -1 not in code:  # one server takes every pair (batch-1 decode)
            return {servers[0]: pair_idx}, pair_idx[:0]
        per_pair = torch.tensor(code, dtype=torch.long)[inverse]  # [N] server index per pair
        groups = {s: pair_idx[per_pair == j] for j, s in enumerate(servers)}
        return groups, pair_idx[per_pair < 0]

    def _send(self, layer: int, rows: torch.Tensor, flat_ids: torch.Tensor, idx: torch.Tensor,
              server: str, attempt: int, tried: set[str]) -> _Unit:
        """rows: [N, H], row n = the token of pair idx[n] (what the unit carries)."""
        uid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        u = _Unit(uid, layer, idx, flat_ids[idx], server, attempt, self.routing.generation,
                  time.monotonic(), fut, set(tried))
        self.units[uid] = u
        self.outstanding[server] += int(idx.numel())
        self.counters["units_dispatched"] += 1
        if self.load is not None:
            self.load.record_server(layer, server, int(idx.numel()))
            self.load.inflight[server] += int(idx.numel())
        if attempt:
            self.counters["reroutes"] += 1
        batcher = self.batcher_for(server)
        hint = self.round_units() if self.round_units is not None else 0
        msg = WorkUnit(uid, attempt, u.generation, layer, rows, u.expert_ids, self.shard_ref,
                       hint)
        try:
            if batcher is None:
                raise ServerFailed(f"no batcher for {server}")
            batcher.tell_nowait(msg)
        except Exception as e:  # full or dead mailbox: fail fast, the loop resends
            fut.set_exception(ServerFailed(f"{server}: {type(e).__name__}: {e}"))
        return u

    def _close(self, u: _Unit) -> None:
        self.units.pop(u.unit_id, None)
        self.outstanding[u.server] -= int(u.pair_idx.numel())
        if self.load is not None:
            self.load.inflight[u.server] -= int(u.pair_idx.numel())
        if not u.future.done():
            u.future.cancel()
        elif not u.future.cancelled():
            u.future.exception()  # mark retrieved: no "exception never retrieved" noise

    def _retire(self, u: _Unit) -> None:
        self._retired[u.unit_id] = None
        if len(self._retired) > _RETIRED_MEMORY:
            self._retired.popitem(last=False)
        self.counters["units_retired"] += 1

    def inflight(self) -> int:
        return len(self.units)


def _notify(u: _Unit) -> None:
    if u.notify is not None:
        u.notify()


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class StepCancelled(Exception):
    """Every request of the step was aborted; its work units were retired."""


class ExpertCall:
    """One layer's dispatch for one micro-batch step, from send to combine."""

    def __init__(self, d: Dispatcher, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, fault: FaultConfig | None = None) -> None:
        self.d, self.layer = d, layer
        self.fault = fault or d.fault  # this call's deadlines and no-replica policy
        self.cancelled = False
        self.T, self.K = topk_ids.shape
        self.topk_weights = topk_weights
        self.flat_ids = topk_ids.reshape(-1).cpu()  # [T*K]: routing bookkeeping lives on the host
        self.x = x  # [T, H]: pair p = (t, k) reads x[t], t = p // K
        self.out = x.new_zeros((self.T * self.K, x.shape[1]))  # [T*K, H]
        self.skipped = torch.zeros(self.T * self.K, dtype=torch.bool)  # pairs not contributing
        self.filled = torch.zeros(self.T * self.K, dtype=torch.int32)  # times each pair combined
        self.failed_tokens: set[int] = set()
        self.degraded_tokens: set[int] = set()
        self.live: dict[asyncio.Future, _Unit] = {}
        self.parked: list[torch.Tensor] = []
        self.parked_generation = 0  # the routing generation the parked pairs found no server in
        self._retry_at = 0.0  # when the parked pairs are retried without a routing change
        self.wait_started: float | None = None
        self._waiter: asyncio.Future | None = None  # wait() sleeps on it; a unit's end wakes it
        self.hedges = 0  # hedged copies sent: from the first, units' pairs may overlap

    def _notify(self) -> None:
        if self._waiter is not None:
            _wake(self._waiter)

    def _launch(self, server: str, idx: torch.Tensor, attempt: int, tried: set[str]) -> _Unit:
        u = self.d._send(self.layer, self._rows(idx), self.flat_ids, idx, server, attempt, tried)
        u.notify = self._notify
        self.live[u.future] = u
        return u

    def send(self, pair_idx: torch.Tensor, tried: set[str], attempt: int) -> None:
        d = self.d
        groups: dict[str, torch.Tensor]
        exhausted = attempt >= self.fault.max_unit_attempts
        if exhausted:  # a livelock guard: it keeps failing everywhere
            groups, orphans = {}, pair_idx
            d.counters["attempts_exhausted"] += 1
        else:
            groups, orphans = d._assign(self.layer, self.flat_ids, pair_idx, tried)
        for server, idx in groups.items():
            self._launch(server, idx, attempt, tried)
        if orphans.numel() == 0:
            return
        policy = self.fault.no_replica_policy
        why = (f"every attempt failed (fault.max_unit_attempts={self.fault.max_unit_attempts})"
               if exhausted else "no live replica")
        if policy == "wait":
            now = time.monotonic()
            self.wait_started = self.wait_started or now
            if now - self.wait_started < self.fault.wait_timeout_s:
                self.parked.append(orphans)
                self.parked_generation = d.routing.generation
                # retried on a routing change, or after a short poll (a server alive but failing
                # them may recover), never past the wait's end
                self._retry_at = min(now + _PARKED_POLL_S,
                                     self.wait_started + self.fault.wait_timeout_s)
                d._parked.add(self)
                return
            why = f"waited {now - self.wait_started:.1f} s for a live server"
        d.last_failure = f"{why} (no_replica_policy={policy})"
        self.skipped[orphans] = True
        tokens = {int(p) // self.K for p in orphans}
        if policy == "degrade":
            d.counters["degraded_pairs"] += int(orphans.numel())
            self.degraded_tokens.update(tokens)
        else:
            d.counters["failed_pairs"] += int(orphans.numel())
            self.failed_tokens.update(tokens)

    def _on_device(self, idx: torch.Tensor) -> torch.Tensor:
        """A host index tensor copied to x's device without a host sync (a blocking copy would
        wait for all the GPU work queued so far)."""
        return idx if self.x.device.type == "cpu" else upload(idx, self.x.device)

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        """[N, H]: the token row of each pair in idx (pair p reads x[p // K])."""
        return self.x.index_select(0, self._on_device(idx // self.K))

    def cancel(self) -> None:
        """Retire every unit in flight now (late results are dropped); wait() raises."""
        self.cancelled = True
        self.parked.clear()
        self.d._parked.discard(self)
        for u in self.live.values():
            self.d._close(u)
            self.d._retire(u)
        self.live.clear()
        self._notify()  # a wait() in progress ends now

    async def wait(self) -> ExpertsOutput:
        d, timeout = self.d, self.fault.unit_timeout_s
        hedging = self.fault.hedge_after_s > 0
        try:
            while self.live or self.parked:
                if self.parked and (d.routing.generation != self.parked_generation or
                                    not self.live and self._retry_due()):
                    # a routing change (a server back, a replacement) or the retry poll: the
                    # parked pairs are sent now, or parked again, or fail past wait_timeout_s
                    todo, self.parked = self.parked, []
                    d._parked.discard(self)
                    for idx in todo:
                        self.send(idx, set(), 0)
                    continue
                if not any(fut.done() for fut in self.live):
                    # sleep until a unit ends (its result, failure or death notice pokes the
                    # waiter directly: no per-future callbacks), a routing change while pairs
                    # are parked, or the oldest unit's deadline / the parked pairs' retry
                    now = time.monotonic()
                    deadline = min(self._due(u, hedging) for u in self.live.values()) \
                        if self.live else now + _PARKED_POLL_S
                    if self.parked:
                        deadline = min(deadline, self._retry_at)
                    await self._sleep(max(0.0, deadline - now))
                if self.cancelled:
                    break
                now = time.monotonic()
                for fut in list(self.live):
                    u = self.live.get(fut)
                    if u is None:  # retired above: a copy of its pairs answered first
                        continue
                    if fut.done():
                        del self.live[fut]
                        d._close(u)
                        if fut.exception() is None:
                            self._combine(u, fut.result())
                            continue
                        d._retire(u)
                        self._resend(u)
                    elif now - u.sent_at >= timeout:
                        del self.live[fut]
                        d._close(u)
                        d._retire(u)
                        d.counters["unit_timeouts"] += 1
                        d.suspect[u.server] = now + timeout
                        self._resend(u)
                    elif hedging and not u.hedged and \
                            now - u.sent_at >= d.latency.hedge_delay(u.server):
                        self._hedge(u)
        finally:  # task cancelled or a bug: nothing stays in the ledger
            if self.live or self.parked:
                self.cancel()
        if self.cancelled:
            raise StepCancelled()
        return self._result()

    def _due(self, u: _Unit, hedging: bool) -> float:
        """When wait() must look at unit u again: its hedge delay, else its timeout."""
        due = self.fault.unit_timeout_s
        return u.sent_at + (min(due, self.d.latency.hedge_delay(u.server))
                            if hedging and not u.hedged else due)

    def _combine(self, u: _Unit, y: torch.Tensor) -> None:
        """Add unit u's rows y [N, H] for the pairs no copy has combined yet; then retire the
        units whose pairs are all combined (their late answers are dropped as stale)."""
        d, idx = self.d, u.pair_idx
        y = y.to(self.out.device, self.out.dtype)  # [N, H]
        if self.hedges:
            fresh = self.filled[idx] == 0  # [N] bool
            if not bool(fresh.all()):
                idx, y = idx[fresh], y[self._on_device(fresh.nonzero().squeeze(1))]
        self.out.index_copy_(0, self._on_device(idx), y)
        self.filled[idx] += 1
        d.counters["units_combined"] += 1
        if u.is_hedge:  # it beat the late copy: that server is suspect
            d.counters["hedge_wins"] += 1
            d.suspect[u.late] = time.monotonic() + self.fault.unit_timeout_s
        if self.hedges:
            for fut, v in list(self.live.items()):
                if bool((self.filled[v.pair_idx] > 0).all()):
                    del self.live[fut]
                    d._close(v)
                    d._retire(v)

    def _resend(self, u: _Unit) -> None:
        """Resend unit u's pairs (u failed or timed out) that no answer or live unit covers."""
        idx = u.pair_idx
        if self.hedges:
            mask = self.filled[idx] == 0
            for v in self.live.values():
                mask &= ~torch.isin(idx, v.pair_idx)
            idx = idx[mask]
        if idx.numel():
            self.d.counters["resent_units"] += 1
            self.send(idx, u.tried | {u.server}, u.attempt + 1)

    def _hedge(self, u: _Unit) -> None:
        """Unit u is late: its pairs go to other live replicas too (u stays in flight)."""
        d = self.d
        u.hedged = True
        groups, _ = d._assign(self.layer, self.flat_ids, u.pair_idx, u.tried | {u.server})
        for server, idx in groups.items():
            if server == u.server:
                continue
            v = self._launch(server, idx, u.attempt + 1, u.tried | {u.server})
            v.hedged = v.is_hedge = True
            v.late = u.server
            self.hedges += 1
            d.counters["hedged_units"] += 1

    async def _sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(seconds, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _retry_due(self) -> bool:
        return time.monotonic() >= self._retry_at

    def _result(self) -> ExpertsOutput:
        T, K = self.T, self.K
        # exactly-once: every pair combined once, or skipped under the no-replica policy
        exact = ((self.filled == 1) & ~self.skipped) | ((self.filled == 0) & self.skipped)
        if not bool(exact.all()):
            self.d.counters["combine_violations"] += 1
            raise AssertionError(f"layer {self.layer}: pairs combined other than exactly once: "
                                 f"{self.filled.tolist()}")
        weights = self.topk_weights.float().clone()  # [T, K]
        if self.skipped.any():
            mask = ~self.skipped.view(T, K).to(weights.device)
            kept = weights * mask
            total, kept_total = weights.sum(-1, keepdim=True), kept.sum(-1, keepdim=True)
            weights = torch.where(kept_total > 0, kept * (total / kept_total.clamp_min(1e-30)),
                                  torch.zeros_like(kept))
        return ExpertsOutput(self.out.view(T, K, -1), weights, self.failed_tokens,
                             self.degraded_tokens)
