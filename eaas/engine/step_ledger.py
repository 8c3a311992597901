"""The step-replay ledger: every decode step's tokens commit exactly once, over failing servers.

On the device path a captured decode step exchanges rows with the expert servers through GPU
memory; each device wait is bounded by a clock timeout that sets a per-step, per-server failure
flag instead of hanging. The shard reads the flags with the step's token ids and asks this
ledger what to do (`land`). Each lane (micro-batch) keeps up to `max_in_flight` steps launched
(async scheduling: step n+1 is launched before step n's ids land, feeding n's ids on the
device), and lands them in launch order. Verdicts, and what the shard does with each:

- COMMIT: the flags are clean: emit the step's tokens (this happens once per step).
- REPLAY: servers were flagged. The ledger took them out of routing (a new generation) and
  returns `retry`, the same step with the same inputs (token ids fed, positions) at the new
  generation: launch it now; its KV writes overwrite the failed attempt's slots. Every ticket
  launched after the failed one is `voided` (it fed the failed step's tokens): it lands STALE,
  and the shard relaunches those steps fresh after the retry (`launch` numbers them again).
  Undo any per-launch bookkeeping of the voided steps (the shard's `num_computed`).
- FAIL: the step ends without all its tokens. `failed_rows` maps rows to their request's
  error; the other rows' tokens commit. Two causes:
  * rows that needed an expert with no live replica (the device reports them as
    `StepFlags.orphan_rows`: it routes such rows nowhere): those requests fail with a
    `NoReplicaError` naming the expert; the rest of the step is fine, and the steps after it
    stay valid (only those requests fed bad tokens, and they are over).
  * the livelock guard: the step failed `max_replays + 1` attempts (a server flapping between
    failing and rejoining, flags that never clear): `failed_rows` is None, every request of the
    step fails with `StepFailed`, and the steps after it are voided, as for REPLAY.
  A replay comes first: a step whose flags make an expert orphan is replayed with that
  expert unroutable, so only the rows that need it fail.
- STALE: a voided ticket, or one landed twice: drop its results.

Generations are monotonic and a lane's tickets carry non-decreasing ones. Tickets superseded by
a replay (an older generation) never commit. A clean step commits even if another lane's
failure moved the routing on while it was in flight: its flags are per server, and a server
that answered in time wrote correct rows, since expert compute is pure. In batch-invariant mode,
then, every committed token equals the fault-free run's.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Hashable, Iterable, Mapping, Protocol, Sequence, TypeVar

from eaas.errors import EaasError, NoReplicaError

InputsT = TypeVar("InputsT")  # the shard's step inputs, opaque to the ledger
ExpertKey = Hashable  # (layer, expert) in the engine


class StepFailed(EaasError):
    """A decode step kept failing past `max_replays` (the livelock guard); every request in
    the step errors with this. (Moves to eaas.errors with the shard integration.)"""


class Routing(Protocol):
    """The routing side the ledger drives.

    The engine's adapter over the `RoutingTable` actor holds the shard's latest
    `RoutingSnapshot`. `drop` marks the server dead in the shard's view at once (the retry is
    routed around it with no round trip), tells the actor `SetServerState(name, alive=False,
    reason="step timeout")` without waiting, and bumps a shard-local generation. A
    `RoutingUpdate` bumps it too, except that a server dropped here stays dropped until a table
    newer than the drop shows it alive again. `live_replicas((layer, e))` is
    `snapshot.servers_for(layer, e)` minus the dead and the locally dropped. `experts_of(name)`
    is `snapshot.hosted_by(name)` flattened to (layer, expert) keys.
    """

    @property
    def generation(self) -> int: ...

    def drop(self, server: str) -> int:
        """Take `server` out of routing; returns the generation now in force (a new one if it
        was routed, the current one if it was already out)."""
        ...

    def live_replicas(self, expert: ExpertKey) -> Sequence[str]: ...

    def experts_of(self, server: str) -> Iterable[ExpertKey]:
        """The experts `server` hosts (or hosted before it was dropped)."""
        ...


class MemoryRouting:
    """An in-memory `Routing`: a fixed placement {expert: servers} and a set of dropped ones."""

    def __init__(self, homes: Mapping[ExpertKey, Sequence[str]]) -> None:
        self.homes = {e: tuple(s) for e, s in homes.items()}
        self.dropped: set[str] = set()
        self._generation = 1

    @property
    def generation(self) -> int:
        return self._generation

    def drop(self, server: str) -> int:
        if server not in self.dropped:
            self.dropped.add(server)
            self._generation += 1
        return self._generation

    def restore(self, server: str) -> int:
        """`server` is back (restarted, rejoined): routed again, in a new generation."""
        if server in self.dropped:
            self.dropped.discard(server)
            self._generation += 1
        return self._generation

    def live_replicas(self, expert: ExpertKey) -> tuple[str, ...]:
        return tuple(s for s in self.homes[expert] if s not in self.dropped)

    def experts_of(self, server: str) -> list[ExpertKey]:
        return [e for e, s in self.homes.items() if server in s]


class Verdict(enum.Enum):
    COMMIT = "commit"
    REPLAY = "replay"
    FAIL = "fail"
    STALE = "stale"


@dataclass(frozen=True, slots=True)
class StepFlags:
    """What the device reported for one landed step."""

    timed_out: frozenset[str] = frozenset()  # servers whose device wait hit the clock timeout
    errored: frozenset[str] = frozenset()  # servers that reported an error for the step
    orphan_rows: Mapping[int, ExpertKey] = field(default_factory=dict)  # row -> an expert it
    # needed that had no live replica in the ticket's generation (the row's output is garbage)

    @property
    def failed(self) -> frozenset[str]:
        return self.timed_out | self.errored


@dataclass(frozen=True, slots=True, eq=False)
class StepTicket(Generic[InputsT]):
    """One launch of one step. Compared by identity: a ticket is the one `launch` returned."""

    ticket_id: int  # unique per ledger, in launch order
    lane: int
    step: int  # the step's index in its lane (its place in the token stream); kept by replays
    attempt: int  # 0 for a fresh launch, then 1, 2, ... for the step's replays
    generation: int  # the routing generation the step runs with
    inputs: InputsT  # what the device runs; a replay reuses it: valid until the step ends


@dataclass(frozen=True, slots=True)
class Landing(Generic[InputsT]):
    """The ledger's answer to `land` (see the module docstring for what each verdict asks)."""

    verdict: Verdict
    ticket: StepTicket[InputsT]
    retry: StepTicket[InputsT] | None = None  # REPLAY: launch this now
    voided: tuple[StepTicket[InputsT], ...] = ()  # REPLAY, FAIL (livelock): they land STALE
    dropped: frozenset[str] = frozenset()  # servers this landing took out of routing
    orphaned: frozenset[ExpertKey] = frozenset()  # experts left with no live replica by it
    failed_rows: Mapping[int, EaasError] | None = None  # FAIL: row -> error; None: every row
    error: EaasError | None = None  # FAIL: the summary (names the experts or servers)


@dataclass(slots=True)
class _Lane:
    inflight: deque[StepTicket] = field(default_factory=deque)
    next_step: int = 0  # the step a fresh launch gets
    ended: int = 0  # steps committed or failed: the oldest in flight is this step
    flagged: list[list[str]] = field(default_factory=list)  # servers per failed attempt of it
    generation: int = 0  # the newest generation launched; a lane's tickets never go back
    floor: int = 0  # the generation of the lane's last replay: older tickets never commit


class StepLedger(Generic[InputsT]):
    """Per-shard ledger of decode steps in flight, per lane.

    max_replays: replays of one step before the livelock guard fails it (>= 0).
    max_in_flight: steps launched and not landed per lane (2 for async scheduling).
    counters: shared counters dict (the shard's); keys "step_*" are added.
    """

    def __init__(self, routing: Routing, *, max_replays: int = 3, max_in_flight: int = 2,
                 counters: dict[str, int] | None = None) -> None:
        if not isinstance(max_replays, int) or max_replays < 0:
            raise ValueError(f"max_replays={max_replays!r}: allowed is an int >= 0")
        if not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight={max_in_flight!r}: allowed is an int >= 1")
        self.routing, self.max_replays, self.max_in_flight = routing, max_replays, max_in_flight
        self.counters = counters if counters is not None else {}
        for key in ("step_launches", "step_commits", "step_replays", "step_voided",
                    "step_stale", "step_failed", "step_failed_rows", "step_dropped_servers"):
            self.counters.setdefault(key, 0)
        self._lanes: dict[int, _Lane] = {}
        self._ids = itertools.count(1)
        self._issued = 0  # the highest ticket id handed out

    def launch(self, lane: int, inputs: InputsT) -> StepTicket[InputsT]:
        """Register the lane's next step (run with the current routing); the shard then
        launches it on the device with `ticket.generation`'s routing."""
        if not isinstance(lane, int) or lane < 0:
            raise ValueError(f"lane={lane!r}: allowed is an int >= 0")
        ln = self._lanes.setdefault(lane, _Lane())
        if len(ln.inflight) >= self.max_in_flight:
            raise RuntimeError(f"lane {lane} has {len(ln.inflight)} steps in flight "
                               f"(max_in_flight={self.max_in_flight}): land one first")
        ticket = self._ticket(ln, lane, ln.next_step, 0, inputs)
        ln.next_step += 1
        return ticket

    def land(self, ticket: StepTicket[InputsT], flags: StepFlags = StepFlags()) -> Landing[InputsT]:
        """The device finished `ticket` with `flags`: the verdict. A lane's live tickets land
        in launch order (the device's stream order); voided or landed ones may land any time."""
        ln = self._lanes.get(ticket.lane)
        if ln is None or not 0 < ticket.ticket_id <= self._issued:
            raise ValueError(f"ticket {ticket.ticket_id} (lane {ticket.lane}, step "
                             f"{ticket.step}) was not launched by this ledger")
        if ticket not in ln.inflight:
            self.counters["step_stale"] += 1
            return Landing(Verdict.STALE, ticket)
        if ln.inflight[0] is not ticket:
            raise RuntimeError(f"lane {ticket.lane}: step {ticket.step} landed before step "
                               f"{ln.inflight[0].step}, launched earlier; land in launch order")
        ln.inflight.popleft()
        assert ticket.step == ln.ended and ticket.generation >= ln.floor, (ticket, ln)
        if flags.failed:
            return self._failed(ln, ticket, flags)
        ln.ended, ln.flagged = ln.ended + 1, []
        if not flags.orphan_rows:
            self.counters["step_commits"] += 1
            return Landing(Verdict.COMMIT, ticket)
        rows = {j: NoReplicaError(f"no live replica of {_expert(e)} (lane {ticket.lane}, step "
                                  f"{ticket.step}, routing generation {ticket.generation})")
                for j, e in sorted(flags.orphan_rows.items())}
        names = ", ".join(sorted({_expert(e) for e in flags.orphan_rows.values()}))
        self.counters["step_failed_rows"] += len(rows)
        return Landing(Verdict.FAIL, ticket, failed_rows=rows, error=NoReplicaError(
            f"{len(rows)} rows of lane {ticket.lane} step {ticket.step} need experts with no "
            f"live replica: {names}"))

    def in_flight(self, lane: int) -> tuple[StepTicket[InputsT], ...]:
        """The lane's live tickets, oldest first (the newest feeds the next fresh launch)."""
        ln = self._lanes.get(lane)
        return tuple(ln.inflight) if ln is not None else ()

    def ended(self, lane: int) -> int:
        """Steps of the lane committed or failed so far."""
        ln = self._lanes.get(lane)
        return ln.ended if ln is not None else 0

    # ---- helpers ----------------------------------------------------------------------------
    def _ticket(self, ln: _Lane, lane: int, step: int, attempt: int,
                inputs: InputsT) -> StepTicket[InputsT]:
        generation = self.routing.generation
        if generation < ln.generation:
            raise RuntimeError(f"routing generation went back from {ln.generation} to "
                               f"{generation}; generations must be monotonic")
        ln.generation = generation
        self._issued = next(self._ids)
        ticket = StepTicket(self._issued, lane, step, attempt, generation, inputs)
        ln.inflight.append(ticket)
        self.counters["step_launches"] += 1
        return ticket

    def _failed(self, ln: _Lane, ticket: StepTicket[InputsT], flags: StepFlags) -> Landing[InputsT]:
        """Flagged servers: drop them, void the steps after this one, replay it or give up."""
        routing, dropped = self.routing, set()
        for server in sorted(flags.failed):
            before = routing.generation
            if routing.drop(server) != before:
                dropped.add(server)
        self.counters["step_dropped_servers"] += len(dropped)
        orphaned = frozenset(e for s in flags.failed for e in routing.experts_of(s)
                             if not routing.live_replicas(e))
        voided = tuple(ln.inflight)
        ln.inflight.clear()
        ln.next_step = ticket.step + 1
        self.counters["step_voided"] += len(voided)
        ln.flagged.append(sorted(flags.failed))
        if len(ln.flagged) > self.max_replays:
            attempts = "; ".join(f"attempt {i}: {', '.join(s)}" for i, s in enumerate(ln.flagged))
            ln.ended, ln.flagged = ln.ended + 1, []
            self.counters["step_failed"] += 1
            return Landing(Verdict.FAIL, ticket, voided=voided, dropped=frozenset(dropped),
                           orphaned=orphaned, error=StepFailed(
                               f"lane {ticket.lane} step {ticket.step} failed "
                               f"{ticket.attempt + 1} attempts (max_replays={self.max_replays}); "
                               f"servers flagged: {attempts}"))
        retry = self._ticket(ln, ticket.lane, ticket.step, ticket.attempt + 1, ticket.inputs)
        ln.floor = retry.generation
        self.counters["step_replays"] += 1
        return Landing(Verdict.REPLAY, ticket, retry=retry, voided=voided,
                       dropped=frozenset(dropped), orphaned=orphaned)


def _expert(e: ExpertKey) -> str:
    """(layer, expert) -> 'layer L expert E'; any other key as it prints."""
    if isinstance(e, tuple) and len(e) == 2:
        return f"layer {e[0]} expert {e[1]}"
    return f"expert {e}"
