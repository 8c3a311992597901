"""The co-located decode step of a shard's lane, scheduled asynchronously (`AsyncDecode`, a mixin
of `AttentionShard`, eaas/engine/shard.py): step n + 1 is launched before step n's token ids
reach the host, then step n lands (its tokens taken and settled) while n + 1 runs."""

from __future__ import annotations

from typing import Any

from eaas.engine.decode_graph import DecodeGraphs, DecodeOut
from eaas.engine.request import Request

__all__ = ["AsyncDecode"]


class AsyncDecode:
    """_decode_step / _drain / _land over the shard's DecodeGraphs and its lanes' steps in flight
    (`_ahead`: per lane, the (request, sampling row) pairs and DecodeOut of the step whose ids
    are not on the host yet)."""

    graphs: DecodeGraphs | None
    _ahead: list[tuple[list[tuple[Request, int]], DecodeOut] | None]
    steps: int
    _emit: Any
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
        pending = {r.request_id: j for r, j in ahead[0]} if ahead is not None else {}
        keep = [i for i, r in enumerate(reqs) if not r.finished and not self._ends_by_count(
            r, r.request_id in pending)]
        live = [reqs[i] for i in keep]
        chunked = [chunks[i] for i in keep] if chunks is not None else None
        if live:
            sampled = graphs.sampled_rows(live, chunked)
            out = graphs.run(graphs.rows_of(live, pending, chunked),
                             prev=ahead[1].ids if ahead is not None else None)
            for i, r in enumerate(live):  # its KV at these positions is written by the step
                r.num_computed += 1 if chunked is None or chunked[i] is None else len(chunked[i])
            self._ahead[lane] = ([(r, j) for r, j in zip(live, sampled) if j >= 0], out)
        if ahead is not None:
            await self._land(*ahead)

    async def _drain(self, lane: int) -> None:
        """Land the lane's step in flight, if any (before an eager step, or when it is the
        lane's last)."""
        ahead, self._ahead[lane] = self._ahead[lane], None
        if ahead is not None:
            await self._land(*ahead)

    async def _land(self, live: list[tuple[Request, int]], out: DecodeOut) -> None:
        """Wait for a step's ids on the host, then take and settle each request's token (from
        its sampling row); requests that ended meanwhile (a stop, an abort) are dropped."""
        assert out.host is not None
        ids, finite, *lp = await out.host.wait()
        self.steps += 1
        rows = [j for _, j in live]
        tokens, ok = ids[rows].tolist(), finite[rows].tolist()
        reqs = [r for r, _ in live]
        entries = self._logprob_entries(reqs, dict(enumerate(tokens)),
                                        [t[rows] for t in lp]) if lp else {}
        for j, (r, token, good) in enumerate(zip(reqs, tokens, ok)):
            if not r.finished:
                self._emit(r, token, good, entries.get(j))
