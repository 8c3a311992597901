"""nvshmem:// data plane: GPU-initiated point-to-point row mailboxes with credits — the channel.

`NvshmemChannel` is one rank's side of a channel (buffers, counters, the kernels' launches);
`eaas.gpu.symmetric_plane.NvshmemPlane` creates a set of them collectively over torch symmetric
memory, `eaas.gpu.shared_channels` between processes that share buffers by handle.

One process per GPU, in a torch.distributed group (NCCL), all ranks on NVLink (or, with
IBGDA NICs, across hosts). Every rank creates the same channels in the same order:

    plane = NvshmemPlane.create(group, device, {"dispatch": layout, "combine": layout})
    ch = plane.channels["dispatch"]
    ch.send(peer, rows, meta)            # rows [>=n, H] on this GPU; meta [R+1] int64 [n, tags..]
    ch.recv(src, out, out_meta)          # waits on the GPU, copies the n rows into out [R, H]

    # the direct path (every peer in this NVLink domain): one launch to all ranks / from all
    ch.put(rows, offsets, tags)          # rows [N, H] grouped by destination, offsets [W+1]
    ch.gather(out, out_meta)             # out [W, R, H], out_meta [W, R+1]

Both calls only enqueue kernels on the current stream (no host sync, no allocation), so they can
be captured in a CUDA graph after one warm-up launch. A send waits on the GPU for credit when
the receiver still holds all S slots of the pair; a receive waits on the GPU for the signal.
Put receives on a stream of their own when the same stream must also run the sends that feed
them.

Bounded waits (direct path): with `timeout_s` (per channel, `create(..., timeout_s=0.5)`; None,
the default, waits forever) a wait that runs out gives up without consuming or overwriting
anything and counts a failure on the device (`ch.failures()`, [2, W] int64, no host sync):

    put: rank d still holds all S slots    -> d gets nothing, failures()[0, d] += 1; the next
                                              put to d retries the same slot
    gather: nothing arrived from rank s    -> out_meta[s, 0] = 0 (no rows), failures()[1, s] += 1;
                                              s's message, if it comes, is the next gather's

so a late partner's messages still arrive in order, one round late. What to do about a timed-out
step is the caller's choice: retry it, drop it on every rank and `reset_counters()` everywhere,
or stop using the peer (every wait on a dead peer costs timeout_s again); `clear_failures()`
zeroes the words.
Hazard: a send/recv (the NVSHMEM device-library path), or a direct-path wait without
`timeout_s`, whose partner never comes spins its kernel forever.
Hazard: a kernel's first launch loads its module, which may synchronise the whole context
(CUDA lazy loading; NVSHMEM kernels also run `nvshmemx_cumodule_init`'s synchronous copy): if a
send or put of this process spins for credit meanwhile, the load never returns and both ranks
hang. `create` therefore runs every kernel variant once (`NvshmemPlane.warm_up`), and the
kernels take every size and caller pointer as a runtime value (no alignment or value
specialisation), so no later launch loads a module. Row tensors of put/gather must be 16-byte
aligned (checked).

`put`/`gather` (`eaas_kernels.nvlink_p2p`) store straight into peers' heaps through NVSHMEM's
peer mappings (`nvshmem_ptr`, i.e. NVLink loads/stores): plain Triton, so none of the hazards of
NVSHMEM device code apply, and one launch serves every destination. `send`/`recv`
(`eaas_kernels.nvshmem_p2p`, `putmem_signal_block`) are the path for peers without a mapping
(IBGDA across hosts). Both keep the same slots, counts and credit words, but a channel must use
one path or the other for its whole life.

`eaas.gpu.credits` holds the reference arithmetic and `exchange_reference` the reference result.
NVSHMEM cannot admit a process after start-up: a restarted server joins over cudaipc://.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from eaas.gpu.credits import ChannelLayout

__all__ = ["NvshmemChannel", "nvshmem_available", "check_timeout", "DIRECT_BLOCK"]

DIRECT_BLOCK = 8192  # elements per copy step of the direct path (16 KiB of bf16 per CTA)


def nvshmem_available() -> bool:
    """True if torch's symmetric memory can use NVSHMEM here (CUDA build with the library)."""
    if not torch.cuda.is_available():
        return False
    try:
        import torch.distributed._symmetric_memory as symm_mem

        return bool(symm_mem.is_nvshmem_available())
    except Exception:
        return False


def _kernels() -> Any:
    from eaas_kernels import nvshmem_p2p  # noqa: PLC0415 (device code: import only here)

    return nvshmem_p2p


def _direct() -> Any:
    from eaas_kernels import nvlink_p2p  # noqa: PLC0415

    return nvlink_p2p


@dataclass(slots=True)
class NvshmemChannel:
    """The symmetric mailboxes of one channel on this rank, plus its local counters.

    recv   [W, S, R, H] symmetric: rows from each source rank, S slots each.
    meta   [W, S, R+1]  int64 symmetric: per slot the row count, then a tag per row.
    sig    [W]          int64 symmetric: arrivals from each source (C per message).
    credit [W]          int64 symmetric: messages each destination consumed from me.
    sent, recvd [W]     int64 local counters (device), so launches need no host values.
    delta  [4, W]       int64: element offset from this rank's recv/meta/sig/credit to rank d's
                        (NVSHMEM's peer mapping); None when some peer has no mapping.
    done   [3, W]       int64: CTAs finished per put / gather (the last one bumps the counter);
                        row 2: rows cut from puts whose group exceeded R, per destination.
    nvshmem             the buffers are NVSHMEM's (send/recv work); False: torch's CUDA
                        symmetric memory (CUDA IPC mappings), where only the direct path runs.
    timeout_s           bound of every wait of put / gather / wait_all (None: wait forever). Read
                        at each launch: a CUDA graph keeps the value it was captured with.
    fail   [4, W]       int64 (allocated when None): row 0 puts that timed out per destination,
                        row 1 gathers / wait_all per source (`failures()`); rows 2-3 the verdict
                        of the put / gather in flight per peer, which its CTAs agree on
                        (`eaas_kernels.nvlink_p2p._wait`; 0 between launches, except that
                        wait_all leaves it for release_all).
    peers  [W]          int64 (allocated when None: all 1): the ranks put / gather / wait_all
                        exchange with; a 0 is skipped at once (a put sends it nothing, a gather
                        reports n = 0 from it, no wait, no failure counted). `set_peers`.
    drop_on_timeout     a wait that times out also sets that peer's `peers` word to 0 (on the
                        device): a dead peer costs one timeout, then nothing, until set back.
    """

    layout: ChannelLayout
    rank: int
    recv_buf: torch.Tensor
    meta: torch.Tensor
    sig: torch.Tensor
    credit: torch.Tensor
    sent: torch.Tensor
    recvd: torch.Tensor
    delta: torch.Tensor | None = None
    done: torch.Tensor | None = None
    nvshmem: bool = True
    timeout_s: float | None = None
    fail: torch.Tensor | None = None
    peers: torch.Tensor | None = None
    drop_on_timeout: bool = False
    _host_recvd: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        w = self.layout.world_size
        self._host_recvd = [0] * w
        check_timeout(self.timeout_s)
        if self.fail is None:
            self.fail = torch.zeros(4, w, dtype=torch.int64, device=self.recv_buf.device)
        elif self.fail.shape != (4, w) or self.fail.dtype != torch.int64:
            raise ValueError(f"fail must be int64 [4, {w}], got {self.fail.dtype} "
                             f"{tuple(self.fail.shape)}")
        if self.peers is None:
            self.peers = torch.ones(w, dtype=torch.int64, device=self.recv_buf.device)
        elif self.peers.shape != (w,) or self.peers.dtype != torch.int64:
            raise ValueError(f"peers must be int64 [{w}], got {self.peers.dtype} "
                             f"{tuple(self.peers.shape)}")

    def set_peers(self, ranks: Any) -> None:
        """Enqueue: exchange with exactly `ranks` (an iterable of ranks) from now on; every other
        rank is skipped by put / gather / wait_all (a graph captured earlier reads the words)."""
        w = self.layout.world_size
        ranks = sorted(set(int(r) for r in ranks))
        if any(not 0 <= r < w for r in ranks):
            raise ValueError(f"set_peers: ranks {ranks} must be in [0, {w})")
        mask = torch.zeros(w, dtype=torch.int64)
        mask[ranks] = 1
        self.peers.copy_(mask, non_blocking=True)

    def send(self, peer: int, rows: torch.Tensor, meta: torch.Tensor) -> None:
        """Enqueue a put of meta[0] rows of `rows` into `peer`'s mailbox for this rank.

        rows: [>= n, H] contiguous, this channel's dtype, on this rank's GPU (for IBGDA it must be
              symmetric memory; on NVLink any device memory works).
        meta: [R + 1] int64 on the GPU: meta[0] = n (0 <= n <= R), meta[1:1+n] tags.
        `rows` and `meta` must not change until the send has executed (stream order).
        """
        k, lay = self._need_nvshmem("send"), self.layout
        lay_check(lay, peer, rows, meta)
        k.send_kernel[(lay.ctas_per_send,)](
            self.recv_buf, self.meta, self.sig, self.credit, self.sent, rows, meta,
            self.rank, peer, lay.num_slots, lay.max_rows, lay.hidden, lay.hidden * lay.itemsize,
            1, k.SIGNAL_ADD, k.CMP_GE, C=lay.ctas_per_send, num_warps=16)
        k.bump_kernel[(1,)](self.sent, peer, num_warps=1)

    def recv(self, src: int, out: torch.Tensor, out_meta: torch.Tensor, ctas: int = 32) -> None:
        """Enqueue: wait for the next message from `src`, copy it out, give the slot back.

        out:      [R, H] this channel's dtype: rows 0..n-1 are written.
        out_meta: [R + 1] int64: [n, tags...] written (n on the device; read it without a
                  host sync by launching work sized R with a mask, or copy it back async).
        """
        self._need_nvshmem("recv")
        lay = self.layout
        if out.shape != (lay.max_rows, lay.hidden) or out_meta.shape != (lay.max_rows + 1,):
            raise ValueError(f"recv: out must be [{lay.max_rows}, {lay.hidden}] and out_meta "
                             f"[{lay.max_rows + 1}], got {tuple(out.shape)}, "
                             f"{tuple(out_meta.shape)}")
        self._recv(src, out, out_meta, ctas)

    def _recv(self, src: int, out: torch.Tensor, out_meta: torch.Tensor, ctas: int) -> None:
        k, lay = _kernels(), self.layout
        k.recv_kernel[(ctas,)](
            self.recv_buf, self.meta, self.sig, self.recvd, out, out_meta,
            src, lay.num_slots, lay.max_rows, lay.hidden, lay.ctas_per_send, k.CMP_GE,
            BLOCK=1024, COPY=True, num_warps=8)
        self.release(src)

    def recv_view(self, src: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Enqueue a wait for the next message from `src`; return views of its slot.

        Returns (rows [R, H], meta [R+1] int64) ALIASING the mailbox: valid for kernels enqueued
        after this call and until `release(src)`; the sender may overwrite the slot once
        released. The slot index comes from a host-side mirror of the counter, so unlike
        `recv` this is not replayable from a CUDA graph (a replay would reuse one slot).
        """
        k, lay = self._need_nvshmem("recv_view"), self.layout
        slot = self._host_recvd[src] % lay.num_slots
        k.recv_kernel[(1,)](
            self.recv_buf, self.meta, self.sig, self.recvd, self.recv_buf, self.meta,
            src, lay.num_slots, lay.max_rows, lay.hidden, lay.ctas_per_send, k.CMP_GE,
            BLOCK=1024, COPY=False, num_warps=1)
        return self.recv_buf[src, slot], self.meta[src, slot]

    def release(self, src: int) -> None:
        """Enqueue: the current message from `src` is consumed; give its slot back (credit)."""
        k = self._need_nvshmem("release")
        self._host_recvd[src] += 1
        k.ack_kernel[(1,)](self.recvd, self.credit, src, self.rank, k.SIGNAL_SET, num_warps=1)

    # -- direct path: NVLink loads/stores through the peer mappings, all ranks in one launch --

    def put(self, rows: torch.Tensor, offsets: torch.Tensor, tags: torch.Tensor | None = None
            ) -> None:
        """Enqueue one message to every rank: rows[offsets[d]:offsets[d+1]] go to rank d.

        rows:    [N, H] contiguous, this channel's dtype, on this GPU, grouped by destination.
        offsets: [W + 1] int64 on the GPU, non-decreasing, offsets[0] = 0; a group longer than
                 R rows is cut to R (split it over several puts); `rows_cut()` counts the loss.
        tags:    [N] int64 on the GPU (e.g. token index or expert id), delivered beside the rows;
                 without tags the receiver's tag entries are undefined (whatever the slot held).
        Rank d's slot is written only after d handed it back (credit): a put may wait on the GPU,
        at most `timeout_s`; past it d gets nothing this time (`failures()[0, d]` counts it).
        """
        lay = self.layout
        if offsets.dtype != torch.int64 or offsets.shape != (lay.world_size + 1,):
            raise ValueError(f"put: offsets must be int64 [{lay.world_size + 1}], got "
                             f"{offsets.dtype} {tuple(offsets.shape)}")
        self._put(rows, offsets, 1, offsets, 1, tags, grouped=True)

    def put_spans(self, rows: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
                  tags: torch.Tensor | None = None) -> None:
        """Like `put`, but rank d gets rows[starts[d] : starts[d] + counts[d]].

        starts, counts: [W] int64 on the GPU, any stride (e.g. counts = out_meta[:, 0] of a
        gather, to send each source's rows back from where they landed). Counts past R are cut.
        """
        lay = self.layout
        for name, t in (("starts", starts), ("counts", counts)):
            if t.dtype != torch.int64 or t.shape != (lay.world_size,):
                raise ValueError(f"put_spans: {name} must be int64 [{lay.world_size}], got "
                                 f"{t.dtype} {tuple(t.shape)}")
        self._put(rows, starts, starts.stride(0), counts, counts.stride(0), tags, grouped=False)

    def _put(self, rows: torch.Tensor, a: torch.Tensor, a_stride: int, n: torch.Tensor,
             n_stride: int, tags: torch.Tensor | None, grouped: bool) -> None:
        lay, delta = self.layout, self._need_direct("put")
        if rows.dim() != 2 or rows.shape[1] != lay.hidden or not rows.is_contiguous():
            raise ValueError(f"put: rows must be contiguous [N, {lay.hidden}], got "
                             f"{tuple(rows.shape)}")
        self._check_on_gpu("put", rows=rows, index=a, counts=n, tags=tags)
        if tags is not None and (tags.dtype != torch.int64 or tags.shape != rows.shape[:1]):
            raise ValueError(f"put: tags must be int64 [{rows.shape[0]}], got "
                             f"{tags.dtype} {tuple(tags.shape)}")
        timeout, clock = self._wait_bound()
        _direct().put_kernel[(lay.ctas_per_send, lay.world_size)](
            self.recv_buf, self.meta, self.sig, self.credit, delta, self.sent, self.done[0],
            self.done[2], self.fail, self.peers, rows, a, a_stride, n, n_stride,
            a if tags is None else tags, self.rank, lay.world_size, lay.num_slots, lay.max_rows,
            lay.hidden, timeout, int(self.drop_on_timeout), BLOCK=DIRECT_BLOCK, GROUPED=grouped,
            HAS_TAGS=tags is not None, CLOCK=clock, num_warps=8)

    def gather(self, out: torch.Tensor, out_meta: torch.Tensor, ctas: int = 64) -> None:
        """Enqueue: wait for the next message from every rank, copy each out, give slots back.

        out:      [W, R, H]: out[s, :n_s] = the rows rank s put for this rank.
        out_meta: [W, R + 1] int64: out_meta[s] = [n_s, tags...]. A source whose message did not
                  come within `timeout_s` gets n_s = 0 (`failures()[1, s]` counts it; its message,
                  if it comes later, is the next gather's).
        """
        self._need_direct("gather")
        lay = self.layout
        w, r, h = lay.world_size, lay.max_rows, lay.hidden
        if out.shape != (w, r, h) or out_meta.shape != (w, r + 1) or not out.is_contiguous() \
                or not out_meta.is_contiguous() or out_meta.dtype != torch.int64:
            raise ValueError(f"gather: out must be contiguous [{w}, {r}, {h}] and out_meta "
                             f"contiguous int64 [{w}, {r + 1}], got {tuple(out.shape)}, "
                             f"{out_meta.dtype} {tuple(out_meta.shape)}")
        self._check_on_gpu("gather", out=out, out_meta=out_meta)
        self._gather(out, out_meta, ctas)

    def _gather(self, out: torch.Tensor, out_meta: torch.Tensor, ctas: int) -> None:
        lay = self.layout
        timeout, clock = self._wait_bound()
        _direct().gather_kernel[(ctas, lay.world_size)](
            self.recv_buf, self.meta, self.sig, self.credit, self.delta, self.recvd,
            self.done[1], self.fail, self.peers, out, out_meta, self.rank, lay.world_size,
            lay.num_slots, lay.max_rows, lay.hidden, lay.ctas_per_send, timeout,
            int(self.drop_on_timeout), BLOCK=DIRECT_BLOCK, COPY=True,
            CLOCK=clock, num_warps=8)
        self._host_recvd = [n + 1 for n in self._host_recvd]  # eager mirror (see wait_all)

    def wait_all(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Enqueue a wait for the next message from every rank; return views of their slots.

        Returns (rows, meta): per source s, rows [R, H] and meta [R+1] ALIASING the mailboxes
        (zero copy), valid for work enqueued after this call until `release_all()`. Slots come
        from a host-side mirror of the counters: a CUDA graph may capture wait_all/release_all
        only as S rounds in a row, starting from a count that is a multiple of S (each replay
        then sees the same slots in the same order); after replays of `gather`, call
        `sync_counters()` first. A source whose message did not come within `timeout_s` counts
        in `failures()[1, s]` and its views show a stale slot: check before reading them;
        release_all then leaves that source's slot alone, and the host mirror is one ahead
        (`sync_counters()` before the next wait_all, as after any failure).
        """
        lay, delta = self.layout, self._need_direct("wait_all")
        w = lay.world_size
        timeout, clock = self._wait_bound()
        _direct().gather_kernel[(1, w)](
            self.recv_buf, self.meta, self.sig, self.credit, delta, self.recvd, self.done[1],
            self.fail, self.peers, self.recv_buf, self.meta, self.rank, w, lay.num_slots,
            lay.max_rows, lay.hidden, lay.ctas_per_send, timeout, int(self.drop_on_timeout),
            BLOCK=DIRECT_BLOCK, COPY=False, CLOCK=clock,
            num_warps=1)
        slots = [n % lay.num_slots for n in self._host_recvd]
        return ([self.recv_buf[s, slot] for s, slot in enumerate(slots)],
                [self.meta[s, slot] for s, slot in enumerate(slots)])

    def rows_cut(self) -> list[int]:
        """Rows left out so far, per destination, by puts whose group exceeded R (host sync).

        Nonzero means the caller's R (`ChannelLayout.max_rows`) is too small for its traffic:
        the kernels cannot raise, so check this in tests and health probes.
        """
        return [int(n) for n in self.done[2].tolist()]

    def failures(self) -> torch.Tensor:
        """Waits that timed out so far: a live [2, W] int64 view on the device (no host sync;
        `.tolist()` syncs). Row 0: puts per destination that found no free slot within
        `timeout_s` (nothing sent); row 1: gathers / wait_all per source whose message did not
        come (n = 0 rows, nothing consumed). Always zero without `timeout_s`.
        """
        return self.fail[:2]

    def clear_failures(self) -> None:
        """Enqueue: zero the failure words (e.g. once a timed-out step has been dealt with)."""
        self.fail[:2].zero_()

    def sync_counters(self) -> None:
        """Re-read the device's receive counters into the host mirror `wait_all` uses.

        Needed after CUDA-graph replays of `gather` (they advance the device counters behind
        the host's back) and after a timed-out gather or wait_all (the mirror advanced, the
        device did not). Synchronises the device: start-up / between phases only.
        """
        self._host_recvd = [int(n) for n in self.recvd.tolist()]

    def release_all(self) -> None:
        """Enqueue: every slot returned by `wait_all` is consumed; hand them back (credit)."""
        lay, delta = self.layout, self._need_direct("release_all")
        self._host_recvd = [n + 1 for n in self._host_recvd]
        _direct().release_kernel[(lay.world_size,)](self.credit, delta, self.recvd, self.fail,
                                                    self.rank, lay.world_size, num_warps=1)

    # -- warm-up (see NvshmemPlane.warm_up): step i of every channel, all ranks in lockstep --

    def warm_up_steps(self) -> list[int]:
        """The warm-up steps this channel has: 0-3 the direct path's put/put_spans x tags, each
        taken by gather or wait_all/release_all; 4-5 send/recv and send/recv_view to self."""
        return ([0, 1, 2, 3] if self.delta is not None else []) + ([4, 5] if self.nvshmem else [])

    def warm_up_send(self, step: int) -> None:
        """Send side of a warm-up step: zero rows to every rank (direct) or one row to self."""
        lay, dev = self.layout, self.recv_buf.device
        w, i64 = lay.world_size, torch.int64
        rows = torch.zeros(1, lay.hidden, dtype=self.recv_buf.dtype, device=dev)
        tags = torch.zeros(1, dtype=i64, device=dev) if step in (1, 3) else None
        if step in (0, 1):
            self.put(rows, torch.zeros(w + 1, dtype=i64, device=dev), tags)
        elif step in (2, 3):
            zeros = torch.zeros(w, dtype=i64, device=dev)
            self.put_spans(rows, zeros, zeros, tags)
        else:
            meta = torch.zeros(lay.max_rows + 1, dtype=i64, device=dev)
            meta[0] = 1
            self.send(self.rank, rows, meta)

    def warm_up_take(self, step: int) -> None:
        """Receive side of a warm-up step (the messages of `warm_up_send`)."""
        lay, dev = self.layout, self.recv_buf.device
        out = torch.zeros(1, lay.hidden, dtype=self.recv_buf.dtype, device=dev)  # n <= 1 rows
        out_meta = torch.zeros(lay.world_size, lay.max_rows + 1, dtype=torch.int64, device=dev)
        if step == 1:
            self.wait_all()
            self.release_all()
        elif step in (0, 2, 3):
            self._gather(out, out_meta, 1)
        elif step == 4:
            self._recv(self.rank, out, out_meta[0], 1)
        else:
            self.recv_view(self.rank)
            self.release(self.rank)

    def reset_counters(self) -> None:
        """Zero this rank's signal, credit, counter and failure words (start-up, or every rank
        resynchronising after a failed step: no message may be in flight to or from this rank,
        on any rank)."""
        for t in (self.sig, self.credit, self.sent, self.recvd, self.done, self.fail):
            if t is not None:
                t.zero_()
        self._host_recvd = [0] * self.layout.world_size

    def _wait_bound(self) -> tuple[int, bool]:
        """(timeout, CLOCK) of the direct path's kernels: nanoseconds of %globaltimer on a GPU;
        in Triton's CPU interpreter, which runs no inline asm and no other program during a
        launch, one poll per millisecond. 0: wait forever."""
        clock = os.environ.get("TRITON_INTERPRET") != "1"
        seconds = check_timeout(self.timeout_s)
        if seconds is None:
            return 0, clock
        return max(1, round(seconds * (1e9 if clock else 1e3))), clock

    def _check_on_gpu(self, what: str, **tensors: torch.Tensor | None) -> None:
        """Row tensors in the channel's dtype, everything on this rank's device."""
        dtype = getattr(torch, self.layout.dtype)
        for name, t in tensors.items():
            if t is None:
                continue
            if t.device != self.recv_buf.device:
                raise ValueError(f"{what}: {name} is on {t.device}, the channel on "
                                 f"{self.recv_buf.device}")
            if name in ("rows", "out") and t.dtype != dtype:
                raise ValueError(f"{what}: {name} is {t.dtype}, the channel carries {dtype}")
            if name in ("rows", "out") and t.data_ptr() % 16:
                raise ValueError(f"{what}: {name} must start on a 16-byte boundary (the copies "
                                 f"are 16-byte vectors), got address {t.data_ptr():#x}: pass "
                                 "a fresh tensor or a view at a row offset that keeps it")

    def _need_nvshmem(self, what: str) -> Any:
        if not self.nvshmem:
            raise RuntimeError(f"{what}: this channel's buffers are CUDA symmetric memory, not "
                               "NVSHMEM; use put/gather (the direct path)")
        return _kernels()

    def _need_direct(self, what: str) -> torch.Tensor:
        if self.delta is None:
            raise RuntimeError(f"{what}: no direct path on this channel: some peer has no NVLink "
                               "mapping (NVSHMEM's nvshmem_ptr is NULL, e.g. another host) or "
                               "hidden is not a multiple of 8; use send/recv (putmem_signal)")
        return self.delta


def check_timeout(timeout_s: object) -> float | None:
    """A channel's `timeout_s`: None (wait forever) or a finite number of seconds > 0."""
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) \
            or not 0 < timeout_s < 1e9:
        raise ValueError(f"timeout_s={timeout_s!r}: must be None (wait forever) or a number of "
                         "seconds > 0 (and < 1e9)")
    return float(timeout_s)


def lay_check(lay: ChannelLayout, peer: int, rows: torch.Tensor, meta: torch.Tensor) -> None:
    if not 0 <= peer < lay.world_size:
        raise ValueError(f"peer {peer} is not a rank of a {lay.world_size}-rank channel")
    if rows.dim() != 2 or rows.shape[1] != lay.hidden or not rows.is_contiguous():
        raise ValueError(f"rows must be contiguous [n, {lay.hidden}], got {tuple(rows.shape)}")
    if meta.dtype != torch.int64 or meta.numel() < 1:
        raise ValueError("meta must be int64 [R + 1] with meta[0] = row count")
