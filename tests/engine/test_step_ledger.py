"""The step-replay ledger over a fake device: failures cost replays, never tokens.

The fake device runs a toy MoE decode step per lane (2 MoE layers, top-2 of 10 experts, each
expert on 3 of 5 servers); expert compute is a pure function of (hidden, expert) and every row
reads its KV slot from the previous position, so a replay that did not overwrite its slots would
show up in the tokens. Servers time out at a chosen (lane, step, attempt), hang or die for a
window of the device clock (launches), or forever, and rejoin routing a while after they are
healthy again. A driver plays the shard: two steps in flight per lane (step n+1 fed n's ids on
the device), lanes interleaved at random, landings in device order.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, deque
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eaas.engine.step_ledger import (Landing, MemoryRouting, StepFailed, StepFlags, StepLedger,
                                     StepTicket, Verdict)
from eaas.errors import NoReplicaError

V, E, N, R, LAYERS = 997, 10, 5, 3, 2  # vocabulary, experts, servers, replicas, MoE layers
LANES, ROWS, STEPS = 2, 3, 12  # lanes, rows (requests) per lane, decode steps per request
SERVERS = [f"s{i}" for i in range(N)]
# expert e < 5 lives on s[e], s[e+1], s[e+2], expert e >= 5 on s[e], s[e+2], s[e+4] (mod 5):
# any two servers may go and every expert keeps a replica; no two experts share all three homes
HOMES = {(l, e): tuple(SERVERS[(e + i * (1 + e // 5)) % N] for i in range(R))
         for l in range(LAYERS) for e in range(E)}


def _mix(*xs: int) -> int:
    return hash(xs) & 0x7FFFFFFF  # ints and tuples of ints hash the same in every process


def _route(h: int, layer: int) -> tuple[int, int]:
    """The top-2 experts of hidden state h at a layer (distinct)."""
    a = _mix(h, layer) % E
    return a, (a + 1 + _mix(h, layer, 1) % (E - 1)) % E


@dataclass(frozen=True, slots=True)
class Inputs:
    rows: tuple[int, ...]  # request ids, one per row
    positions: tuple[int, ...]  # per row: the KV slot the step writes
    feed: StepTicket | dict[int, int]  # the previous step's ids on the device, or host ids


@dataclass
class Faults:
    transient: set[tuple[str, int, int, int]] = field(default_factory=set)  # (server, lane,
    # step, attempt): its wait times out for that attempt only
    windows: list[tuple[str, str, int, float]] = field(default_factory=list)  # (server,
    # "timeout" (hung) or "error" (dead), from, until): in that span of the device clock
    rejoin_after: int | None = None  # launches after its drop a healthy server is routed again
    flap: set[str] = field(default_factory=set)  # routed again at once after every drop


class FlappingRouting(MemoryRouting):
    """A server the supervisor keeps re-adding (heartbeats fine, device loop wedged)."""

    def __init__(self, homes, flap: set[str]) -> None:
        super().__init__(homes)
        self.flap = flap

    def drop(self, server: str) -> int:
        g = super().drop(server)
        return self.restore(server) if server in self.flap else g


class FakeDevice:
    """Runs a step at launch (stream order = launch order) and keeps its ids and flags."""

    def __init__(self, routing: MemoryRouting, faults: Faults) -> None:
        self.routing, self.faults = routing, faults
        self.clock = 0  # launches so far
        self.kv: dict[tuple[int, int], int] = {}  # (row, pos) -> the slot's value
        self.out: dict[int, dict[int, int]] = {}  # ticket id -> {row: token}
        self.flags: dict[int, StepFlags] = {}
        self.used: dict[tuple[int, int], list] = {}  # (row, pos) -> experts routed to
        self.served: dict[tuple[int, int], set[str]] = {}  # (lane, step) -> servers used
        self._dropped_at: dict[str, int] = {}

    def _fault(self, server: str, t: StepTicket) -> str | None:
        if (server, t.lane, t.step, t.attempt) in self.faults.transient:
            return "timeout"
        for s, kind, start, until in self.faults.windows:
            if s == server and start <= self.clock < until:
                return kind
        return None

    def supervise(self) -> None:
        """Before a fresh launch: route again the dropped servers healthy for long enough."""
        after = self.faults.rejoin_after
        for s in sorted(self.routing.dropped):
            since = self._dropped_at.setdefault(s, self.clock)
            healthy = not any(w[0] == s and w[2] <= self.clock < w[3] for w in self.faults.windows)
            if after is not None and healthy and self.clock - since >= after:
                self.routing.restore(s)
                del self._dropped_at[s]

    def run(self, t: StepTicket) -> None:
        assert t.generation == self.routing.generation  # launched with the routing in force
        self.clock += 1
        inp: Inputs = t.inputs
        feed = self.out[inp.feed.ticket_id] if isinstance(inp.feed, StepTicket) else inp.feed
        timed_out, errored, orphans, out = set(), set(), {}, {}
        for j, (row, pos) in enumerate(zip(inp.rows, inp.positions)):
            h, used = _mix(feed[row], pos), []
            for layer in range(LAYERS):
                acc = h
                for e in _route(h, layer):
                    key = (layer, e)
                    used.append(key)
                    live = self.routing.live_replicas(key)
                    if not live:  # routed nowhere: the row's output is garbage, reported
                        orphans.setdefault(j, key)
                        acc = _mix(acc, -1, self.clock)
                        continue
                    server = live[(row + layer) % len(live)]
                    self.served.setdefault((t.lane, t.step), set()).add(server)
                    why = self._fault(server, t)
                    if why is not None:  # the wait timed out / the server said so: garbage
                        (timed_out if why == "timeout" else errored).add(server)
                        acc = _mix(acc, -2, self.clock)
                    else:
                        acc = _mix(acc, _mix(h, *key))  # the expert: pure in (hidden, expert)
                h = acc
            out[row] = _mix(h, self.kv.get((row, pos - 1), 0)) % V
            self.kv[(row, pos)] = _mix(h, 7)
            self.used[(row, pos)] = used
        self.out[t.ticket_id] = out
        self.flags[t.ticket_id] = StepFlags(frozenset(timed_out), frozenset(errored), orphans)


@dataclass(repr=False)
class Run:
    tokens: dict[int, list[int]]  # request id -> committed tokens
    errors: dict[int, Exception]  # request id -> why it failed
    landings: list[Landing]
    ends: Counter  # (lane, step) -> times it ended (committed or failed)
    committed: set[int]  # ticket ids whose tokens were emitted
    stale: set[int]  # ticket ids that landed STALE
    voided: set[int]  # ticket ids some landing voided
    device: FakeDevice
    counters: dict[str, int]

    def __repr__(self) -> str:  # hypothesis prints it for a failing example
        return f"Run(errors={self.errors}, counters={self.counters})"


def drive(faults: Faults | None = None, *, max_replays: int = 3, seed: int = 0,
          routing: MemoryRouting | None = None) -> Run:
    """Play the shard: keep two steps in flight per lane, land them in device order."""
    routing = routing or MemoryRouting(HOMES)
    counters: dict[str, int] = {}
    ledger = StepLedger(routing, max_replays=max_replays, counters=counters)
    device = FakeDevice(routing, faults or Faults())
    rng = random.Random(seed)
    lane_rows = {lane: [lane * ROWS + i for i in range(ROWS)] for lane in range(LANES)}
    start = {r: 3 + r % 4 for rows in lane_rows.values() for r in rows}
    host = {r: _mix(r, 99) % V for r in start}  # each request's last committed token
    alive = set(start)
    run = Run({r: [] for r in start}, {}, [], Counter(), set(), set(), set(), device, counters)
    streams: dict[int, deque[StepTicket]] = {lane: deque() for lane in lane_rows}
    last_gen = dict.fromkeys(lane_rows, 0)

    def launch(lane: int) -> None:
        while len(flight := ledger.in_flight(lane)) < 2:
            step = ledger.ended(lane) + len(flight)
            rows = tuple(r for r in lane_rows[lane] if r in alive)
            if step >= STEPS or not rows:
                return
            feed = flight[-1] if flight else dict(host)
            device.supervise()
            t = ledger.launch(lane, Inputs(rows, tuple(start[r] + step for r in rows), feed))
            assert t.step == step and t.attempt == 0 and t.generation >= last_gen[lane]
            last_gen[lane] = t.generation
            device.run(t)
            streams[lane].append(t)

    def commit(t: StepTicket, failed: set[int]) -> None:
        run.ends[(t.lane, t.step)] += 1
        run.committed.add(t.ticket_id)
        for r in t.inputs.rows:
            if r in alive and r not in failed:
                run.tokens[r].append(device.out[t.ticket_id][r])
                host[r] = device.out[t.ticket_id][r]

    def fail(r: int, error: Exception) -> None:
        if r in alive:
            alive.discard(r)
            run.errors[r] = error

    for _ in range(LANES * STEPS * (max_replays + 2) * 4):
        busy = [lane for lane in lane_rows if streams[lane] or (
            ledger.ended(lane) < STEPS and any(r in alive for r in lane_rows[lane]))]
        if not busy:
            return run
        lane = rng.choice(busy)
        launch(lane)
        if not streams[lane]:
            continue
        t = streams[lane].popleft()
        landing = ledger.land(t, device.flags[t.ticket_id])
        run.landings.append(landing)
        if landing.verdict is Verdict.STALE:
            run.stale.add(t.ticket_id)
            continue
        if landing.verdict in (Verdict.REPLAY, Verdict.FAIL):
            # what the ledger voided is exactly what the device still runs after t
            assert {v.ticket_id for v in landing.voided} <= {v.ticket_id for v in streams[lane]}
            run.voided.update(v.ticket_id for v in landing.voided)
        if landing.verdict is Verdict.COMMIT:
            commit(t, set())
        elif landing.verdict is Verdict.REPLAY:
            assert landing.voided == tuple(streams[lane]) and landing.retry is not None
            assert landing.retry.inputs is t.inputs and landing.retry.step == t.step
            device.run(landing.retry)
            streams[lane].append(landing.retry)
        elif landing.failed_rows is None:  # the livelock guard: the whole step
            assert isinstance(landing.error, StepFailed)
            run.ends[(t.lane, t.step)] += 1
            for r in t.inputs.rows:
                fail(r, landing.error)
        else:  # rows that needed an expert with no live replica
            bad = {t.inputs.rows[j] for j in landing.failed_rows}
            for j, err in landing.failed_rows.items():
                fail(t.inputs.rows[j], err)
            commit(t, bad)
    pytest.fail("the driver did not finish: a step replayed without bound")


@pytest.fixture(scope="module")
def ref() -> Run:
    return drive()


def _check(run: Run, ref: Run, max_replays: int = 3) -> None:
    """The invariants every run keeps, faults or not."""
    for r, tokens in run.tokens.items():  # every token committed is the fault-free one
        assert tokens == ref.tokens[r][:len(tokens)], f"request {r}"
        if r not in run.errors:
            assert len(tokens) == STEPS, f"request {r} stopped early without an error"
    assert all(n == 1 for n in run.ends.values()), "a step ended twice"
    replays = Counter((x.ticket.lane, x.ticket.step) for x in run.landings
                      if x.verdict is Verdict.REPLAY)
    assert max(replays.values(), default=0) <= max_replays
    assert not run.stale & run.committed, "a stale landing committed"
    assert run.voided <= run.stale, "a voided ticket landed as other than STALE"
    for x in run.landings:
        if x.retry is not None:
            assert x.retry.generation >= x.ticket.generation + bool(x.dropped)


def test_fault_free_commits_each_step_once(ref: Run) -> None:
    assert {x.verdict for x in ref.landings} == {Verdict.COMMIT}
    assert sorted(ref.ends) == [(lane, s) for lane in range(LANES) for s in range(STEPS)]
    assert all(len(t) == STEPS for t in ref.tokens.values()) and not ref.errors
    assert ref.counters["step_commits"] == LANES * STEPS == ref.counters["step_launches"]


def test_failure_at_n_voids_n_plus_1_and_replays_n(ref: Run) -> None:
    """Step 3 fails when step 4 is already in flight on its tokens: 4 is voided (lands STALE),
    3 is replayed without the server at a new generation, then 4 is launched afresh."""
    server = sorted(ref.device.served[(0, 3)])[0]
    run = drive(Faults(transient={(server, 0, 3, 0)}))
    _check(run, ref)
    lane0 = [(x.verdict, x.ticket.step, x.ticket.attempt) for x in run.landings
             if x.ticket.lane == 0]
    i = lane0.index((Verdict.REPLAY, 3, 0))
    assert lane0[i:i + 4] == [(Verdict.REPLAY, 3, 0), (Verdict.STALE, 4, 0),
                              (Verdict.COMMIT, 3, 1), (Verdict.COMMIT, 4, 0)]
    replay = next(x for x in run.landings if x.verdict is Verdict.REPLAY)
    assert replay.dropped == {server} and [v.step for v in replay.voided] == [4]
    assert replay.retry.generation == replay.ticket.generation + 1
    assert run.tokens == ref.tokens and run.counters["step_replays"] == 1


def test_hung_server_recovers_and_rejoins(ref: Run) -> None:
    """SIGSTOP for 6 launches, SIGCONT, routed again 3 launches later: used again, same tokens."""
    run = drive(Faults(windows=[("s1", "timeout", 2, 8)], rejoin_after=3))
    _check(run, ref)
    assert run.tokens == ref.tokens and run.counters["step_dropped_servers"] == 1
    assert "s1" not in run.device.routing.dropped
    late = set().union(*(v for (lane, s), v in run.device.served.items() if s >= STEPS - 2))
    assert "s1" in late


def test_ledger_api_misuse_and_stale() -> None:
    routing = MemoryRouting(HOMES)
    ledger: StepLedger[str] = StepLedger(routing)
    a, b = ledger.launch(0, "a"), ledger.launch(0, "b")
    with pytest.raises(RuntimeError, match="max_in_flight=2"):
        ledger.launch(0, "c")
    with pytest.raises(RuntimeError, match="step 1 landed before step 0"):
        ledger.land(b)
    assert ledger.land(a).verdict is Verdict.COMMIT
    assert ledger.land(a).verdict is Verdict.STALE  # landed twice: dropped, never committed
    with pytest.raises(ValueError, match="not launched by this ledger"):
        StepLedger(routing).land(b)
    with pytest.raises(ValueError, match="max_replays=-1"):
        StepLedger(routing, max_replays=-1)
    with pytest.raises(ValueError, match="lane=-1"):
        ledger.launch(-1, "x")
    assert ledger.land(b).verdict is Verdict.COMMIT and ledger.ended(0) == 2


def test_lanes_share_drops_and_clean_steps_of_an_older_generation_commit() -> None:
    routing = MemoryRouting(HOMES)
    ledger: StepLedger[str] = StepLedger(routing)
    a, b, c = ledger.launch(0, "a"), ledger.launch(1, "b"), ledger.launch(2, "c")
    x = ledger.land(a, StepFlags(timed_out=frozenset({"s1"})))
    assert x.verdict is Verdict.REPLAY and x.dropped == {"s1"} and x.retry.generation == 2
    y = ledger.land(b, StepFlags(errored=frozenset({"s1"})))  # already out: no new generation
    assert y.verdict is Verdict.REPLAY and not y.dropped and y.retry.generation == 2
    assert ledger.land(c).verdict is Verdict.COMMIT  # generation 1, clean flags: its rows hold
    assert ledger.land(x.retry).verdict is Verdict.COMMIT


def test_livelock_guard_fails_the_step_naming_the_server(ref: Run) -> None:
    """A server the supervisor keeps re-adding times out on every attempt: each step that uses
    it is replayed max_replays times, then fails, and its followers are voided; no hang."""
    routing = FlappingRouting(HOMES, {"s2"})
    run = drive(Faults(windows=[("s2", "timeout", 0, math.inf)]), max_replays=2, routing=routing)
    _check(run, ref, max_replays=2)
    fails = [x for x in run.landings if x.verdict is Verdict.FAIL]
    assert fails and all(x.failed_rows is None for x in fails)
    assert all(re.search(r"failed 3 attempts \(max_replays=2\).*attempt 2: [^;]*s2", str(x.error))
               for x in fails)
    assert set(run.errors) == set(run.tokens)  # every request of both lanes met s2


def test_all_replicas_dead_fails_the_rows_naming_the_expert(ref: Run) -> None:
    """s0, s1, s2 (every home of expert 0) die at once: each request runs on with the
    fault-free tokens until the first step that needs expert 0, and fails there with an error
    naming it; the other rows of that step commit; no hang."""
    run = drive(Faults(windows=[(s, "error", 0, math.inf) for s in HOMES[(0, 0)]]))
    _check(run, ref)
    _check_orphans(run, ref, expert=0)
    for r, tokens in run.tokens.items():
        needs = [s for s in range(STEPS)
                 if {(0, 0), (1, 0)} & set(ref.device.used[(r, 3 + r % 4 + s)])]
        assert len(tokens) == (needs[0] if needs else STEPS), f"request {r}"
    assert any(x.failed_rows is not None and len(x.failed_rows) < len(x.ticket.inputs.rows)
               for x in run.landings if x.verdict is Verdict.FAIL)


def _check_orphans(run: Run, ref: Run, expert: int) -> None:
    for r, err in run.errors.items():
        assert isinstance(err, NoReplicaError), err
        m = re.search(rf"no live replica of layer (\d) expert {expert} \(", str(err))
        assert m, str(err)
        pos = 3 + r % 4 + len(run.tokens[r])  # the step it failed at
        assert (int(m.group(1)), expert) in ref.device.used[(r, pos)]


@st.composite
def _faults(draw, bad: list[str]) -> Faults:
    transient = draw(st.sets(st.tuples(st.sampled_from(bad), st.integers(0, LANES - 1),
                                       st.integers(0, STEPS - 1), st.integers(0, 2)),
                             max_size=8))
    windows = [(s, kind, start, math.inf if length is None else start + length)
               for s, kind, start, length in draw(st.lists(st.tuples(
                   st.sampled_from(bad), st.sampled_from(["timeout", "error"]),
                   st.integers(0, 40), st.none() | st.integers(1, 30)), max_size=3))]
    return Faults(transient, windows, draw(st.none() | st.integers(0, 6)))


@settings(max_examples=150, deadline=None)
@given(data=st.data(), bad=st.lists(st.sampled_from(SERVERS), min_size=1, max_size=2,
                                   unique=True), seed=st.integers(0, 2**16))
def test_any_schedule_with_a_live_replica_gives_the_fault_free_tokens(data, bad, seed, ref):
    """Up to two servers time out, hang, die, recover and rejoin at random: every request gets
    the fault-free tokens, each step ends once, replays stay bounded, stale never commits."""
    run = drive(data.draw(_faults(bad)), max_replays=6, seed=seed)
    _check(run, ref, max_replays=6)
    assert run.tokens == ref.tokens and not run.errors


@settings(max_examples=100, deadline=None)
@given(first=st.integers(0, E - 1), data=st.data(), seed=st.integers(0, 2**16))
def test_any_schedule_that_kills_an_expert_fails_only_its_rows(first, data, seed, ref):
    """The three homes of one expert die at random times (and time out before that): only rows
    that need it fail, each with an error naming it, and nothing hangs."""
    bad = list(HOMES[(0, first)])
    faults = data.draw(_faults(bad))
    starts = data.draw(st.lists(st.integers(0, 30), min_size=R, max_size=R))
    faults.windows += [(s, "error", t, math.inf) for s, t in zip(bad, starts)]
    faults.rejoin_after = None
    run = drive(faults, seed=seed)
    _check(run, ref)
    _check_orphans(run, ref, expert=first)
