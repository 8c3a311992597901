"""The decode step as one CUDA graph per batch-size bucket (nano-vllm's `capture_cudagraph`).

A decode step of B sequences — embedding, every layer through the executor (attention over the
paged cache, norms, router, top-k, the fused MoE kernel over the device's experts, shared
experts, combine), final norm, LM head and sampling — is recorded once per bucket
(1, 2, 4, 8, 16, 32, 64, 128, ..., max_num_seqs) over static buffers, then replayed: the smallest
bucket >= B runs, rows past B are padding (token 0 into the scratch block, attending to nothing).

Per step the host writes one packed int64 row per sequence and one float row (copied with two
non-blocking uploads), replays, and queues the copy of the new token ids to the host
(`DecodeOut.host`): nothing inside the step reads a device value on the host. A row may feed a
token the host does not know yet — the previous step's output for that sequence, still on its
way — by naming its row in that step (`DecodeRow.src`): the graph gathers it on the device
(`run(rows, prev=...)`), so the shard can launch step n + 1 before step n's ids reach the host
(async scheduling: the host's work of a step overlaps the GPU's). A row may also be one token of
a short prompt (`rows_of(..., chunks)`): every row's K/V is written before any row attends, and
the row at position p attends to positions <= p, so a prompt whose tokens fit the bucket beside
the decodes is prefilled by the same replay (fast mode; the shard decides, `AttentionShard._plan`).

Three graph variants per bucket, the step picking the cheapest its rows need: greedy only (argmax);
sampling (temperature, top-k, top-p, per-request noise keys — `eaas.engine.sampling`); processors
(sampling after min_tokens, logit_bias, presence / frequency / repetition penalties and min_p, plus
the log probabilities of the raw logits: the sampled token's, its rank and the top `MAX_LOGPROBS`),
which read per-sequence state in sampling slots (`eaas.engine.sampling_slots`) named by a column of
the packed row and count each sampled token into its slot inside the graph. Plain batches never
replay the processors graph, so they pay nothing for it (their rows' processor numbers are not even
filled in). A batch with one such request pays for every row (estimated, not measured): on the
device some 20-30 elementwise passes over [B, V] (the gathered int32 slot rows, float32 logits,
masks), a log_softmax and a top-20 — a few GB of memory traffic at B = 256, V = 151936, about 1 ms
on an H200, proportionally less for smaller buckets (a fused kernel would cut it to ~2 passes); on
the host four more floats and two ints per row; in the shared graph pool, a few more [B, V]
temporaries at the largest bucket (~0.5-1 GB at B = 256). Grammars (structured output) run on the
processors variant too: the host's matcher fills a row's token bitmask (xgrammar's layout, one
pinned upload) before the step and the step applies it first; since the matcher must accept a
token before it fills the next mask, a lane holding a grammar request lands each step before
launching the next (no async overlap for it).

`DecodeGraphs(..., captured=False)` runs the very same step eagerly (enforce_eager, CPU), which
is what the captured one must equal (bitwise in batch-invariant mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from eaas.engine.params import MAX_LOGPROBS
from eaas.engine.sampling import sample_batch
from eaas.engine.sampling_slots import SamplingSlots
from eaas.gpu.waiter import HostCopy, start_download
from eaas.model.kv_cache import SCRATCH_BLOCK, AttentionBatch

__all__ = ["DecodeGraphs", "DecodeOut", "DecodeRow", "buckets_for"]

_COLS = 7  # packed int64 columns before the block table: id, pos, slot, len, top_k, key, src
_TAIL = 4  # packed int64 columns after it: step, sampling slot, min_tokens, grammar
_FLOATS = 6  # temperature, top_p, presence, frequency, repetition, min_p
_PAD_FLOATS = (0.0, 1.0, 0.0, 0.0, 1.0, 0.0)  # padding rows: greedy, no processors
GREEDY, SAMPLING, PROCESSORS = 0, 1, 2  # graph variants
_STAGES = 4  # pinned staging buffers: steps in flight at once (two per lane, two lanes)


def buckets_for(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, ... up to max_num_seqs (which is always the last bucket)."""
    out, b = [], 1
    while b < max_num_seqs:
        out.append(b)
        b *= 2
    return out + [max_num_seqs]


@dataclass(frozen=True, slots=True)
class DecodeRow:
    """One sequence of a decode step: feed `token` at `position`; `block_ids` its block table;
    sampling: temperature (0 greedy), top_k (<= 0 off), top_p, noise key, step (output length);
    processors: slot (its sampling slot, 0: none; `SamplingSlots.slot_of`), min_tokens,
    presence / frequency / repetition penalties, min_p, logprobs (compute log probabilities).
    src >= 0: feed the previous step's output of its row `src` instead of `token`. grammar: the
    request's structured-output matcher (eaas.engine.structured.Matcher) when it constrains
    this token: it fills the row's token bitmask on the host before the step."""

    token: int
    position: int
    block_ids: Sequence[int]
    temperature: float = 0.0
    top_k: int = -1
    top_p: float = 1.0
    key: int = 0
    step: int = 0
    slot: int = 0
    min_tokens: int = 0
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    min_p: float = 0.0
    logprobs: bool = False
    src: int = -1
    grammar: Any = None

    @property
    def processed(self) -> bool:
        """Whether the row needs the processors variant."""
        return self.slot > 0 or self.min_p > 0 or self.logprobs or self.grammar is not None


@dataclass(slots=True)
class DecodeOut:
    """One step's results on the device (copies, safe past the next step).

    ids: int64 [n] the new tokens. finite: bool [n] each row's logits were finite. logprobs:
    None, or (logprob float32 [n], rank int64 [n], top_logprobs float32 [n, N], top_ids int64
    [n, N]) of the raw logits (`logits.compute_logprobs`, N = min(V, MAX_LOGPROBS)) when a row
    asked for them (every row of that step gets them). host: their copies to the host, queued
    right behind the step (`await out.host.wait()` -> the `tensors()` on the host).
    """

    ids: torch.Tensor
    finite: torch.Tensor
    logprobs: tuple[torch.Tensor, ...] | None = None
    host: HostCopy | None = None
    flags: torch.Tensor | None = None  # the experts step's report of the step (`step_flags`)

    def tensors(self) -> list[torch.Tensor]:
        """What `host` copies: ids, finite, the logprobs' tensors if any, then flags if any."""
        return [self.ids, self.finite, *(self.logprobs or ()),
                *(() if self.flags is None else (self.flags,))]


class DecodeGraphs:
    """Decode steps over `model` and its paged `cache`; `experts` is the executor's experts step
    (the device's whole-layer banks: `eaas.model.bank_experts`, or the device exchange with
    expert-server processes: `eaas.engine.device_path`). num_slots: sampling slots for the
    processors (default max_num_seqs: every running sequence may hold one). step_flags: called
    after each step is enqueued, a device tensor that travels to the host with the step's ids
    (`DecodeOut.flags`: the exchange's per-server failures of the step)."""

    def __init__(self, model: Any, cache: Any, *, max_num_seqs: int, max_blocks: int,
                 experts: Any, captured: bool, num_slots: int | None = None,
                 step_flags: Callable[[], torch.Tensor] | None = None) -> None:
        self.model, self.cache, self.experts = model, cache, experts
        self.step_flags = step_flags
        self.max_blocks, self.block_size = max_blocks, cache.block_size
        self.buckets = buckets_for(max_num_seqs)
        self.captured = captured and model.device.type == "cuda"
        dev, bmax = model.device, self.buckets[-1]
        vocab = model.lm_head_weight.shape[0]
        self.slots = SamplingSlots(num_slots or max_num_seqs, vocab, dev)
        self.num_top = min(vocab, MAX_LOGPROBS)
        # packed per row: the _COLS scalars, the block table, the _TAIL columns
        width = _COLS + max_blocks + _TAIL
        self._step_col = _COLS + max_blocks
        self._ints = torch.zeros(bmax, width, dtype=torch.long, device=dev)
        self._floats = torch.zeros(bmax, _FLOATS, dtype=torch.float32, device=dev)
        self._out = torch.zeros(bmax, dtype=torch.long, device=dev)
        self._prev = torch.zeros(bmax, dtype=torch.long, device=dev)  # the `src` rows' tokens
        # grammar rows' token bitmasks (xgrammar's layout), filled on the host per step
        words = -(-vocab // 32)
        self._bitmask = torch.zeros(bmax, words, dtype=torch.int32, device=dev)
        self._mask_stage: tuple[torch.Tensor, Any] | None = None  # pinned, made on first use
        self._finite = torch.zeros(bmax, dtype=torch.bool, device=dev)  # rows' logits finite
        n = self.num_top
        self._lp = (torch.zeros(bmax, dtype=torch.float32, device=dev),  # chosen's logprob
                    torch.zeros(bmax, dtype=torch.long, device=dev),  # its rank
                    torch.zeros(bmax, n, dtype=torch.float32, device=dev),  # top logprobs
                    torch.zeros(bmax, n, dtype=torch.long, device=dev))  # top ids
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pinned = dev.type == "cuda"
        self._stage: list[tuple[torch.Tensor, torch.Tensor, Any]] = [
            (torch.zeros(bmax, width, dtype=torch.long, pin_memory=self._pinned),
             torch.zeros(bmax, _FLOATS, dtype=torch.float32, pin_memory=self._pinned), None)
            for _ in range(_STAGES)]
        self._turn = 0
        self._tables: dict[int, tuple[Sequence[int], np.ndarray]] = {}  # id -> (ids, array)
        self._pool: Any = None
        self.replays = 0
        self.steps = 0  # steps run (replayed or eager)
        self.processor_steps = 0  # of which on the processors variant

    def _fill_bitmasks(self, rows: Sequence[DecodeRow]) -> None:
        """Upload the token bitmasks of the grammar rows (others' bitmask rows are not read)."""
        if not any(r.grammar is not None for r in rows):
            return
        if self._mask_stage is None:
            self._mask_stage = (torch.empty(self._bitmask.shape, dtype=torch.int32,
                                            pin_memory=self._pinned), None)
        stage, done = self._mask_stage
        if done is not None:
            done.synchronize()  # the previous grammar step's upload (long done, normally)
        n = len(rows)
        for i, r in enumerate(rows):
            if r.grammar is not None:
                r.grammar.fill(stage, i)
        self._bitmask[:n].copy_(stage[:n], non_blocking=self._pinned)
        if self._pinned:
            ev = torch.cuda.Event()
            ev.record()
            self._mask_stage = (stage, ev)

    # ---- the step itself (what a graph records) ----------------------------------------------
    def _forward(self, b: int, mode: int) -> None:
        ints, floats = self._ints[:b], self._floats[:b]
        batch = AttentionBatch(
            positions=ints[:, 1], slots=ints[:, 2], single_rows=None,
            block_tables=ints[:, _COLS:_COLS + self.max_blocks].to(torch.int32),
            seq_lens=ints[:, 3].to(torch.int32),
            max_seq_len=self.max_blocks * self.block_size, multi=[], num_single=b)
        src = ints[:, 6]
        tokens = torch.where(src >= 0, self._prev[src.clamp(min=0)], ints[:, 0])  # [b]
        h = self.model.forward_hidden(tokens, self.cache, batch, self.experts)
        logits = self.model.lm_head(self.model.final_norm(h), float32=mode != GREEDY)  # [b, V]
        best = logits.argmax(dim=-1)  # [b]
        c = self._step_col
        if mode == PROCESSORS:
            ids, lp = self.slots.sample_processed(
                logits, floats[:, 0], ints[:, 4], floats[:, 1], ints[:, 5], ints[:, c],
                ints[:, c + 1], ints[:, c + 2], (floats[:, 2], floats[:, 3], floats[:, 4]),
                floats[:, 5], (self._bitmask[:b], ints[:, c + 3] > 0), self.num_top)
            for buf, t in zip(self._lp, lp):
                buf[:b].copy_(t)
        elif mode == SAMPLING:
            ids = sample_batch(logits, floats[:, 0], ints[:, 4], floats[:, 1], ints[:, 5],
                               ints[:, c])
        else:
            ids = best
        self._out[:b].copy_(ids)
        # a row's logits hold a NaN or +inf (or are all -inf) iff its argmax is not finite:
        # argmax propagates NaN, so one gathered value per row instead of a pass over [b, V]
        self._finite[:b].copy_(torch.isfinite(logits.gather(1, best[:, None]))[:, 0])

    # ---- capture -----------------------------------------------------------------------------
    @property
    def warm_up_steps(self) -> int:
        """Steps `capture` runs (eagerly, before recording): one per bucket and variant."""
        return len(self.buckets) * 3 if self.captured else 0

    @torch.inference_mode()
    def capture(self, before_recording: Callable[[], None] | None = None) -> None:
        """Record every bucket's graphs (largest first, sharing one memory pool), after a
        warm-up run of each on a side stream (kernels compiled and loaded, allocator primed;
        `warm_up_steps` of them). The padding rows write the scratch block (and sampling slot
        0, adding nothing): capture touches no sequence's cache or slot. before_recording: run
        between the warm-up and the recording (e.g. the exchange's wait bound: the warm-up's
        may be longer than what the graphs keep)."""
        if not self.captured:
            return
        self._ints.zero_()
        self._floats.copy_(torch.tensor(_PAD_FLOATS, device=self._floats.device))
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            for b in reversed(self.buckets):
                for mode in (GREEDY, SAMPLING, PROCESSORS):
                    self._forward(b, mode)
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        torch.cuda.synchronize(self.model.device)
        if before_recording is not None:
            before_recording()
        for b in reversed(self.buckets):
            for mode in (GREEDY, SAMPLING, PROCESSORS):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self._pool):
                    self._forward(b, mode)
                if self._pool is None:
                    self._pool = g.pool()
                self._graphs[(b, mode)] = g
        torch.cuda.synchronize(self.model.device)

    # ---- one step ----------------------------------------------------------------------------
    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"a decode step of {n} sequences exceeds the largest bucket "
                         f"({self.buckets[-1]} = scheduler.max_num_seqs)")

    def rows_of(self, reqs: Sequence[Any], pending: dict[str, int] | None = None,
                chunks: Sequence[Sequence[int] | None] | None = None) -> list[DecodeRow]:
        """The rows of `reqs` (eaas.engine.request.Request) for the step about to run: frees the
        sampling slots of finished requests, then gives each request whose processors need one
        its slot (`SamplingSlots.slot_of`). A prefilled request is one row: it feeds its last
        token, or — named in `pending` (request id -> its row in the step still in flight) —
        that step's output for it, not yet on the host (`DecodeRow.src`).

        chunks[i] (when given and not None): request i's next prompt tokens instead, one row per
        token at its position (a short prompt rides the captured step: the rows' K/V are written
        before any row attends, and row p attends to positions <= p). Only the chunk's last row
        samples, and only when it ends the prompt; the others are plain greedy rows whose output
        is dropped. `sampled_rows` gives each request's sampling row."""
        self.slots.release_finished()
        pending = pending or {}
        rows = []
        for i, r in enumerate(reqs):
            chunk = chunks[i] if chunks is not None else None
            if chunk is not None:
                p0, table = r.num_computed, r.blocks.block_ids
                last = len(chunk) - 1 if p0 + len(chunk) >= len(r.prompt_ids) else len(chunk)
                rows.extend(DecodeRow(t, p0 + k, table) for k, t in enumerate(chunk[:last]))
                if last < len(chunk):
                    rows.append(self._sampling_row(r, chunk[-1], p0 + last, -1))
                continue
            src = pending.get(r.request_id, -1) if pending else -1
            rows.append(self._sampling_row(r, 0 if src >= 0 else r.output_ids[-1],
                                           r.num_computed, src))
        return rows

    @staticmethod
    def sampled_rows(reqs: Sequence[Any], chunks: Sequence[Sequence[int] | None] | None = None
                     ) -> list[int]:
        """The row of `rows_of(reqs, ..., chunks)` that samples each request's next token, -1
        for a prompt chunk that does not end its prompt."""
        out, n = [], 0
        for i, r in enumerate(reqs):
            chunk = chunks[i] if chunks is not None else None
            if chunk is None:
                out.append(n)
                n += 1
                continue
            n += len(chunk)
            out.append(n - 1 if r.num_computed + len(chunk) >= len(r.prompt_ids) else -1)
        return out

    def _sampling_row(self, r: Any, token: int, position: int, src: int) -> DecodeRow:
        """The row that samples r's next token (fed `token`, or the row `src` of the step in
        flight), with its sampling parameters and, if its processors need one, its slot."""
        p = r.params
        ahead = src >= 0
        head = (token, position, r.blocks.block_ids, float(p.temperature), p.top_k,
                float(p.top_p), r.noise_key, len(r.output_ids) + ahead)
        if not p.needs_processors:
            return DecodeRow(*head, src=src)
        return DecodeRow(
            *head, slot=self.slots.slot_of(r, pending=int(ahead)), min_tokens=p.min_tokens,
            presence=float(p.presence_penalty), frequency=float(p.frequency_penalty),
            repetition=float(p.repetition_penalty), min_p=float(p.min_p),
            logprobs=p.logprobs is not None or p.num_sequences > p.n, src=src,
            grammar=r.grammar if r.grammar is not None and not r.grammar.terminated else None)

    @torch.inference_mode()
    def step(self, rows: Sequence[DecodeRow]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one decode step; returns (int64 [len(rows)] the new token ids, bool [len(rows)]
        whether each row's logits were finite), on the device (copies: the next step may
        overwrite the graph's output buffers at once). `run` also returns log probabilities."""
        out = self.run(rows)
        return out.ids, out.finite

    @torch.inference_mode()
    def run(self, rows: Sequence[DecodeRow], prev: torch.Tensor | None = None) -> DecodeOut:
        """Run one decode step of `rows` (see `step`), on the processors variant when a row
        needs it (`DecodeRow.processed`). prev: the ids of the previous step of these
        sequences (its `DecodeOut.ids`, on the device), which rows with `src >= 0` feed."""
        n = len(rows)
        if prev is not None:  # queued behind the step that makes them: no wait here
            self._prev[:prev.shape[0]].copy_(prev)
        elif any(r.src >= 0 for r in rows):
            raise ValueError("a row feeds the previous step's output (src >= 0) but no "
                             "previous ids were given")
        b = self.bucket(n)
        bs, width, c = self.block_size, self.max_blocks, self._step_col
        # pinned staging buffers, used in turn: the upload of one may still be queued (behind
        # the steps in flight of this lane and the others) while the next step fills another
        turn = self._turn
        ints_t, floats_t, done = self._stage[turn]
        self._turn = (turn + 1) % _STAGES
        if done is not None:
            done.synchronize()  # normally long finished: uploads run ahead of their steps
        ints, floats = ints_t.numpy(), floats_t.numpy()
        # block tables as int64 arrays, converted once per table: a request's table is one tuple
        # for its whole life, so this step's cache holds last step's conversions by identity
        seen, known = self._tables, {}
        head = []
        for i, r in enumerate(rows):
            ids = r.block_ids
            hit = seen.get(id(ids))
            if hit is None or hit[0] is not ids:
                hit = (ids, np.asarray(ids, dtype=np.int64))
            known[id(ids)] = hit
            table, p = hit[1], r.position
            t = table.shape[0]
            if t > width or not 0 <= p < t * bs:
                raise ValueError(f"row {i}: position {p} is outside its block table "
                                 f"({t} blocks of {bs}; at most {width} blocks)")
            ints[i, _COLS:_COLS + t] = table  # entries past t are never read
            head.append((r.token, p, int(table[p // bs]) * bs + p % bs, p + 1, r.top_k, r.key,
                         r.src))
        self._tables = known
        mode = PROCESSORS if any(r.processed for r in rows) else \
            SAMPLING if any(r.temperature > 0 for r in rows) else GREEDY
        if rows:
            ints[:n, :_COLS] = head
            if mode == PROCESSORS:  # the processors' columns are read by that variant only
                ints[:n, c:c + _TAIL] = [(r.step, r.slot, r.min_tokens, r.grammar is not None)
                                         for r in rows]
                self._fill_bitmasks(rows)
                floats[:n] = [(r.temperature, r.top_p, r.presence, r.frequency, r.repetition,
                               r.min_p) for r in rows]
            else:
                ints[:n, c] = [r.step for r in rows]
                floats[:n, :2] = [(r.temperature, r.top_p) for r in rows]
        ints[n:b, :_COLS] = (0, 0, SCRATCH_BLOCK * bs, 0, -1, 0, -1)  # padding: scratch, no keys
        ints[n:b, c:c + _TAIL] = 0  # no slot, no min_tokens, no grammar
        floats[n:b] = _PAD_FLOATS
        # whole rows: contiguous copies (one DMA each), table entries past a row's own unread
        self._ints[:b].copy_(ints_t[:b], non_blocking=self._pinned)
        self._floats[:b].copy_(floats_t[:b], non_blocking=self._pinned)
        if self._pinned:
            ev = torch.cuda.Event()
            ev.record()
            self._stage[turn] = (ints_t, floats_t, ev)
        g = self._graphs.get((b, mode))
        if g is not None:
            g.replay()
            self.replays += 1
        else:
            self._forward(b, mode)
        self.steps += 1
        lp = None
        if mode == PROCESSORS:
            self.processor_steps += 1
            if any(r.logprobs for r in rows):
                lp = tuple(t[:n].clone() for t in self._lp)
        out = DecodeOut(self._out[:n].clone(), self._finite[:n].clone(), lp,
                        flags=self.step_flags() if self.step_flags is not None else None)
        out.host = start_download(*out.tensors())
        return out

