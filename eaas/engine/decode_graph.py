"""The decode step as one CUDA graph per batch-size bucket (nano-vllm's `capture_cudagraph`).

A decode step of B sequences — embedding, every layer through the executor (attention over the
paged cache, norms, router, top-k, the fused MoE kernel over the device's experts, shared
experts, combine), final norm, LM head and sampling — is recorded once per bucket
(1, 2, 4, 8, 16, 32, 64, 128, ..., max_num_seqs) over static buffers, then replayed: the smallest
bucket >= B runs, rows past B are padding (token 0 into the scratch block, attending to nothing).

Per step the host writes one packed int64 row per sequence and one float row (copied with two
non-blocking uploads), replays, and gets back a copy of the new token ids: nothing inside the
step reads a device value on the host. Two graph variants per bucket: greedy only (argmax), and
sampling (temperature, top-k, top-p, per-request noise keys — `eaas.engine.sampling`).

`DecodeGraphs(..., captured=False)` runs the very same step eagerly (enforce_eager, CPU), which
is what the captured one must equal (bitwise in batch-invariant mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from eaas.engine.sampling import sample_batch
from eaas.model.kv_cache import SCRATCH_BLOCK, AttentionBatch

__all__ = ["DecodeGraphs", "DecodeRow", "buckets_for"]

_COLS = 6  # packed int64 columns before the block table: id, pos, slot, len, top_k, key


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
    sampling: temperature (0 greedy), top_k (<= 0 off), top_p, noise key, step (output length)."""

    token: int
    position: int
    block_ids: Sequence[int]
    temperature: float = 0.0
    top_k: int = -1
    top_p: float = 1.0
    key: int = 0
    step: int = 0


class DecodeGraphs:
    """Decode steps over `model` and its paged `cache`; `experts` is the executor's experts step
    (the device's whole-layer banks: `eaas.model.bank_experts`)."""

    def __init__(self, model: Any, cache: Any, *, max_num_seqs: int, max_blocks: int,
                 experts: Any, captured: bool) -> None:
        self.model, self.cache, self.experts = model, cache, experts
        self.max_blocks, self.block_size = max_blocks, cache.block_size
        self.buckets = buckets_for(max_num_seqs)
        self.captured = captured and model.device.type == "cuda"
        dev, bmax = model.device, self.buckets[-1]
        # packed per row: the _COLS scalars, the block table, the step (sampling counter)
        self._ints = torch.zeros(bmax, _COLS + max_blocks + 1, dtype=torch.long, device=dev)
        self._floats = torch.zeros(bmax, 2, dtype=torch.float32, device=dev)  # temp, top_p
        self._out = torch.zeros(bmax, dtype=torch.long, device=dev)
        self._finite = torch.zeros(bmax, dtype=torch.bool, device=dev)  # rows' logits finite
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._pinned = dev.type == "cuda"
        self._stage: list[tuple[torch.Tensor, torch.Tensor, Any]] = [
            (torch.zeros(bmax, _COLS + max_blocks + 1, dtype=torch.long, pin_memory=self._pinned),
             torch.zeros(bmax, 2, dtype=torch.float32, pin_memory=self._pinned), None)
            for _ in range(2)]
        self._turn = 0
        self._tables: dict[int, tuple[Sequence[int], np.ndarray]] = {}  # id -> (ids, array)
        self._pool: Any = None
        self.replays = 0

    # ---- the step itself (what a graph records) ----------------------------------------------
    def _forward(self, b: int, sampling: bool) -> None:
        ints, floats = self._ints[:b], self._floats[:b]
        batch = AttentionBatch(
            positions=ints[:, 1], slots=ints[:, 2], single_rows=None,
            block_tables=ints[:, _COLS:_COLS + self.max_blocks].to(torch.int32),
            seq_lens=ints[:, 3].to(torch.int32),
            max_seq_len=self.max_blocks * self.block_size, multi=[], num_single=b)
        h = self.model.forward_hidden(ints[:, 0], self.cache, batch, self.experts)
        logits = self.model.lm_head(self.model.final_norm(h), float32=sampling)  # [b, V]
        best = logits.argmax(dim=-1)  # [b]
        if sampling:
            ids = sample_batch(logits, floats[:, 0], ints[:, 4], floats[:, 1], ints[:, 5],
                               ints[:, _COLS + self.max_blocks])
        else:
            ids = best
        self._out[:b].copy_(ids)
        # a row's logits hold a NaN or +inf (or are all -inf) iff its argmax is not finite:
        # argmax propagates NaN, so one gathered value per row instead of a pass over [b, V]
        self._finite[:b].copy_(torch.isfinite(logits.gather(1, best[:, None]))[:, 0])

    # ---- capture -----------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self) -> None:
        """Record every bucket's graphs (largest first, sharing one memory pool), after a
        warm-up run of each on a side stream (kernels compiled and loaded, allocator primed).
        The padding rows write the scratch block: capture touches no sequence's cache."""
        if not self.captured:
            return
        self._ints.zero_()
        self._floats[:, 0].zero_()
        self._floats[:, 1].fill_(1.0)
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            for b in reversed(self.buckets):
                for sampling in (False, True):
                    self._forward(b, sampling)
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        torch.cuda.synchronize(self.model.device)
        for b in reversed(self.buckets):
            for sampling in (False, True):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self._pool):
                    self._forward(b, sampling)
                if self._pool is None:
                    self._pool = g.pool()
                self._graphs[(b, sampling)] = g
        torch.cuda.synchronize(self.model.device)

    # ---- one step ----------------------------------------------------------------------------
    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"a decode step of {n} sequences exceeds the largest bucket "
                         f"({self.buckets[-1]} = scheduler.max_num_seqs)")

    @torch.inference_mode()
    def step(self, rows: Sequence[DecodeRow]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one decode step; returns (int64 [len(rows)] the new token ids, bool [len(rows)]
        whether each row's logits were finite), on the device (copies: the next step may
        overwrite the graph's output buffers at once)."""
        n = len(rows)
        b = self.bucket(n)
        bs, width = self.block_size, self.max_blocks
        # two pinned staging buffers, used in turn: the upload of one may still be queued
        # (behind another lane's step) while the next step fills the other
        ints_t, floats_t, done = self._stage[self._turn]
        self._turn ^= 1
        if done is not None:
            done.synchronize()  # normally long finished: the step that used it was awaited
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
            head.append((r.token, p, int(table[p // bs]) * bs + p % bs, p + 1, r.top_k, r.key))
        self._tables = known
        if rows:
            ints[:n, :_COLS] = head
            ints[:n, _COLS + width] = [r.step for r in rows]
            floats[:n] = [(r.temperature, r.top_p) for r in rows]
        ints[n:b, :_COLS] = (0, 0, SCRATCH_BLOCK * bs, 0, -1, 0)  # padding: scratch, no keys
        ints[n:b, _COLS + width] = 0
        floats[n:b] = (0.0, 1.0)
        # whole rows: contiguous copies (one DMA each), table entries past a row's own unread
        self._ints[:b].copy_(ints_t[:b], non_blocking=self._pinned)
        self._floats[:b].copy_(floats_t[:b], non_blocking=self._pinned)
        if self._pinned:
            ev = torch.cuda.Event()
            ev.record()
            self._stage[self._turn ^ 1] = (ints_t, floats_t, ev)
        sampling = any(r.temperature > 0 for r in rows)
        g = self._graphs.get((b, sampling))
        if g is not None:
            g.replay()
            self.replays += 1
        else:
            self._forward(b, sampling)
        return self._out[:n].clone(), self._finite[:n].clone()
