"""The captured decode step of a shard's lane, scheduled asynchronously (`AsyncDecode`, a mixin
of `AttentionShard`, eaas/engine/shard.py): step n + 1 is launched before step n's token ids
reach the host, then step n lands (its tokens taken and settled) while n + 1 runs.

Its experts are computed on the shard's GPU (co-located) or by expert-server processes over
the device exchange (`eaas.engine.device_path`). On the device path every launch is a ticket
of the step ledger (`eaas.engine.step_ledger`) and lands with the exchange's flags: a step
that a server failed (a timed-out wait, rows it could not be sent) is REPLAYed — the lane's
requests go back to where they were before it (`num_computed`; its tokens were never taken),
the step launched after it is voided (it fed the failed step's tokens), their sampling slots
are refilled from the host's tokens, and the lane's next launch is the ledger's retry, with
the failed server routed around. KV writes of the replay
overwrite the failed attempt's, expert compute is pure: the tokens are a fault-free run's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from eaas.engine.decode_graph import DecodeGraphs, DecodeOut
from eaas.engine.request import Request
from eaas.engine.step_ledger import StepFlags, Verdict

__all__ = ["AsyncDecode", "Launch"]


@dataclass(slots=True)
class Launch:
    """A step in flight: its (request, sampling row) pairs, its outputs, and on the device path
    its ledger ticket (whose inputs are the requests' `num_computed` before it)."""

    live: list[tuple[Request, int]]
    out: DecodeOut
    ticket: Any = None  # StepTicket[list[tuple[Request, int]]] | None


class AsyncDecode:
    """_decode_step / _drain / _land over the shard's DecodeGraphs and its lanes' steps in flight
    (`_ahead`: per lane, the `Launch` whose ids are not on the host yet)."""

    graphs: DecodeGraphs | None
    _ahead: list[Launch | None]
    _retry: list[Any]
    device_path: Any
    ledger: Any
    steps: int
    deps: Any
    name: str
    _emit: Any
    _finish: Any
    _ends_by_count: Any
    _logprob_entries: Any

    async def _decode_step(self, reqs: list[Request], lane: int,
                           chunks: list[list[int] | None] | None = None) -> None:
        """A step on the co-located fast path: one graph replay (or the same step eagerly under
        enforce_eager), one device->host copy of the new token ids (and, when a request asks,
        their log probabilities). Decode rows, and — `chunks[i]` not None — request i's prompt
        chunk as one row per token (short prompts beside the decodes, fast mode: the shard
        decides which steps qualify, `AttentionShard._plan`).

        Async scheduling: this step is launched before the previous step's ids reach the host —
        its rows feed those tokens on the device (`DecodeGraphs.rows_of(..., pending)`) — and
        only then does the host wait for them, take them and settle them (detokenizing, stop
        strings, handing each caller its output, `_land`) while this step runs. So the GPU
        never waits for the host's work of a step, only for the launch. A request whose
        tokens end it by their count (max_tokens, the context length) is not stepped past its
        last token; one that its in-flight token ends (a stop id, a stop string) has a row of
        this step computed for nothing, dropped when it lands (its blocks are reused only by
        work queued after this step on the same stream). Penalties, min_tokens, logit_bias,
        min_p, logprobs and grammar bitmasks run inside the step (`DecodeGraphs.rows_of` gives
        those requests sampling slots and frees the slots of finished ones); a lane with a
        grammar request lands each step before the next (its matcher must accept the token
        before it fills the next bitmask), so it runs without the overlap."""
        graphs = self.graphs
        assert graphs is not None  # `_step` takes this path only with graphs
        if any(r.grammar is not None for r in reqs):
            # a grammar's next bitmask needs its last token accepted on the host: land first
            await self._drain(lane)
        ahead, self._ahead[lane] = self._ahead[lane], None
        pending = {r.request_id: j for r, j in ahead.live} if ahead is not None else {}
        keep = [i for i, r in enumerate(reqs) if not r.finished and not self._ends_by_count(
            r, r.request_id in pending)]
        live = [reqs[i] for i in keep]
        chunked = [chunks[i] for i in keep] if chunks is not None else None
        if live:
            sampled = graphs.sampled_rows(live, chunked)
            ticket = self._ticket(lane, live)
            out = graphs.run(graphs.rows_of(live, pending, chunked),
                             prev=ahead.out.ids if ahead is not None else None)
            for i, r in enumerate(live):  # its KV at these positions is written by the step
                r.num_computed += 1 if chunked is None or chunked[i] is None else len(chunked[i])
            self._ahead[lane] = Launch([(r, j) for r, j in zip(live, sampled) if j >= 0], out,
                                       ticket)
        if ahead is not None:
            await self._land(ahead, lane)

    def _ticket(self, lane: int, live: list[Request]) -> Any:
        """On the device path: the launch's ledger ticket (the lane's pending retry, else a
        fresh one), and the servers told to run one more step."""
        if self.device_path is None or self.graphs is None or \
                self.graphs.experts is not self.device_path.exchange:
            return None
        before = [(r, r.num_computed) for r in live]
        ticket, self._retry[lane] = self._retry[lane], None
        if ticket is None:
            ticket = self.ledger.launch(lane, before)
        else:  # the replay of a failed step, over its requests still running
            ticket.inputs[:] = before
        self.device_path.announce(1)
        return ticket

    async def _drain(self, lane: int) -> None:
        """Land the lane's step in flight, if any (before an eager step, or when it is the
        lane's last)."""
        ahead, self._ahead[lane] = self._ahead[lane], None
        if ahead is not None:
            await self._land(ahead, lane)

    async def _land(self, launch: Launch, lane: int) -> None:
        """Wait for a step's ids on the host, then take and settle each request's token (from
        its sampling row); requests that ended meanwhile (a stop, an abort) are dropped. On
        the device path the ledger decides first (a failed step is replayed, not taken)."""
        live, out = launch.live, launch.out
        assert out.host is not None
        ids, finite, *lp = await out.host.wait()
        if out.flags is not None:
            flags, lp = lp[-1], lp[:-1]
            if launch.ticket is not None and not self._commits(launch, flags.tolist(), lane):
                return
        self.steps += 1
        rows = [j for _, j in live]
        tokens, ok = ids[rows].tolist(), finite[rows].tolist()
        reqs = [r for r, _ in live]
        entries = self._logprob_entries(reqs, dict(enumerate(tokens)),
                                        [t[rows] for t in lp]) if lp else {}
        for j, (r, token, good) in enumerate(zip(reqs, tokens, ok)):
            if not r.finished:
                self._emit(r, token, good, entries.get(j))

    def _commits(self, launch: Launch, flags: list[int], lane: int) -> bool:
        """The ledger's verdict on a device-path step: True to take its tokens. A REPLAY
        rolls the lane back to before the step (the step in flight after it is voided) and
        leaves the retry ticket for the lane's next launch; the livelock guard's FAIL ends the
        step's requests with its error."""
        path = self.device_path
        landing = self.ledger.land(launch.ticket, StepFlags(timed_out=path.flagged(flags)))
        if landing.verdict is Verdict.COMMIT:
            return True
        if landing.verdict is Verdict.STALE:
            return False
        for ticket in (*reversed(landing.voided), launch.ticket):
            for r, n in ticket.inputs:
                r.num_computed = n
                self.graphs.slots.forget(r)  # the failed attempts' tokens are in its counts
        voided = self._ahead[lane]
        if voided is not None and voided.ticket in landing.voided:
            self._ahead[lane] = None  # it fed this step's tokens: its own are never taken
        self.deps.emit({"type": "step_replay" if landing.verdict is Verdict.REPLAY else
                        "step_failed", "shard": self.name, "lane": lane,
                        "step": launch.ticket.step, "attempt": launch.ticket.attempt,
                        "servers": sorted(path.flagged(flags)),
                        "dropped": sorted(landing.dropped), "time": time.time()})
        if landing.verdict is Verdict.REPLAY:
            self._retry[lane] = landing.retry
        else:
            for r, _ in launch.ticket.inputs:
                self._finish(r, "error", error=str(landing.error))
        return False
