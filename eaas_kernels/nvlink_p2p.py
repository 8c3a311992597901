"""Triton device code of the nvshmem:// data plane's direct path: loads/stores through NVLink.

Within one NVLink domain NVSHMEM maps every peer's symmetric heap into this process
(`nvshmem_ptr`), so a put is a plain store to `my_buffer + delta[peer]`: no NVSHMEM device
library, no `nvshmemx_cumodule_init`, vectorised 16-byte stores from every CTA (what NVSHMEM's
own intra-node put does, without its per-call overhead). Signals are system-scope atomics on the
peer's words with release/acquire ordering. `eaas.gpu.credits.exchange_reference` is the
pure-torch reference of what one put + gather round computes; the CPU tests check it and the GPU
worker checks these kernels against it bit for bit.

Buffers (`eaas.gpu.nvshmem_plane.NvshmemChannel`, symmetric on every rank, same layout):

    recv  [W, S, R, H]   rows from each source rank, S slots each
    meta  [W, S, R+1]    int64: row count n, then n tags
    sig   [W]            int64: arrivals from each source (+1 per CTA of a put)
    credit[W]            int64: messages each destination consumed from me
    delta [4, W]         int64 (local): element offset from my recv/meta/sig/credit to rank d's
    sent, recvd, done_put, done_gather, cut [W]  int64 (local counters; cut: rows left out
                                                  of puts whose group exceeded R)
    fail  [4, W]         int64 (local): row 0 timed-out puts per destination, row 1 timed-out
                         gathers per source; rows 2-3 the verdict of the put / gather in flight
                         per peer (0 undecided, GO, TIMED_OUT; its last CTA puts back 0)

put (grid [C, W], program (c, d)): wait until d gave back slot seq % S (credit[d] >= seq+1-S);
copy rows x[a_d : a_d + n_d] (grouped offsets, or start/count spans) flat into d's
recv[me, slot] (C CTAs; full blocks unmasked so every access is a 16-byte vector, tail masked);
CTA 0 also writes [n, tags]; barrier; add 1 to d's sig[me] (release, system scope). The last
CTA to finish bumps sent[d].
gather (grid [C, W], program (c, s)): wait sig[s] >= (recvd[s] + 1) * C_put (acquire); copy slot
recvd[s] % S out flat; the last CTA bumps recvd[s] and sets s's credit[me] (release).
Bounded waits: `timeout` (a runtime value: one variant serves every timeout; 0 waits forever)
is nanoseconds of %globaltimer, or a number of polls with CLOCK off (Triton's CPU interpreter
runs no inline asm). A put that timed out on destination d copies nothing, signals nothing,
leaves sent[d] and adds 1 to fail[0, d]: the next put retries the same slot. A gather that timed
out on source s writes n = 0 to out_meta[s, 0], leaves recvd[s] and s's credit, and adds 1 to
fail[1, s]: a message that comes later is the next gather's. Without COPY (wait_all) the verdict
stays in fail[3, s] and release_kernel hands back only the slots that were waited for. The CTAs
of one launch agree on one verdict per peer (`_wait`), so a timeout never leaves a half-written
slot signalled, nor a half-copied one counted as received.
Peer masks: peers [W] int64 (local) says which ranks this launch exchanges with. A put skips
a destination d with peers[d] == 0 (no wait, no copy, no signal, no count) and a gather a
source s with peers[s] == 0 (out_meta[s, 0] = 0 at once; without COPY its verdict is TIMED_OUT,
so release_kernel takes nothing): a rank that only ever sends on a channel, or a dead peer,
costs nothing. With `drop` != 0 a timed-out wait also sets peers[peer] = 0, so a dead peer
costs one timeout, not one per round: later launches skip it until the caller sets it back.
Every count lives on the device: both kernels are CUDA-graph capturable. Row tensors must be
16-byte aligned (the plane checks; the copies are vectorised); index, count, tag and meta
tensors are alignment-generic and sizes are runtime values, so each (GROUPED, HAS_TAGS, COPY)
variant compiles once and a warm-up covers every later launch: a first launch loads a module,
which may synchronise the context, and a put or gather spinning meanwhile would never end.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer

__all__ = ["put_kernel", "gather_kernel", "release_kernel", "copy_kernel", "GO", "TIMED_OUT"]

GO = tl.constexpr(1)  # verdicts of one launch's wait on one peer (fail rows 2-3; 0: undecided)
TIMED_OUT = tl.constexpr(2)


@triton.jit
def _copy(dst_ptr, dst0, src_ptr, src0, total, pid, nprog, BLOCK: tl.constexpr,
          SRC_CG: tl.constexpr, VEC: tl.constexpr = 8):
    """Copy `total` elements src[src0:] -> dst[dst0:] with nprog CTAs (pid is this one's share).

    dst0/src0 are multiples of VEC elements (16 bytes: 8 for 2-byte dtypes, 16 for bytes),
    which the hints tell the compiler, so unmasked full blocks vectorise; the tail is masked.
    """
    offs = tl.arange(0, BLOCK)
    nfull = total // BLOCK
    for b in range(pid, nfull, nprog):
        e = tl.cast(b, tl.int64) * BLOCK
        si = tl.max_contiguous(tl.multiple_of(src0 + e + offs, VEC), BLOCK)
        di = tl.max_contiguous(tl.multiple_of(dst0 + e + offs, VEC), BLOCK)
        if SRC_CG:
            v = tl.load(src_ptr + si, cache_modifier=".cg")
        else:
            v = tl.load(src_ptr + si)
        tl.store(dst_ptr + di, v)
    tail = tl.cast(nfull, tl.int64) * BLOCK
    if pid == nprog - 1:
        if tail < total:
            m = tail + offs < total
            v = tl.load(src_ptr + src0 + tail + offs, mask=m, cache_modifier=".cg")
            tl.store(dst_ptr + dst0 + tail + offs, v, mask=m)


@triton.jit
def _wait(word_ptr, target, vote_ptr, timeout, CLOCK: tl.constexpr):
    """Wait until *word_ptr >= target (acquire, system scope), at most `timeout`; True: go on.

    timeout: 0 waits forever; else nanoseconds of %globaltimer (CLOCK), or polls (no CLOCK: the
    CPU interpreter, where nothing changes during a launch anyway). vote_ptr: this launch's
    verdict word for this peer, shared by its CTAs and 0 when the launch starts.

    Agreement of the CTAs: each spins on its own, and the first to decide writes the verdict
    with a compare-and-swap from 0: GO when it saw the word reach the target, TIMED_OUT when its
    clock ran out. A verdict is never changed, and every CTA returns it, so either all CTAs of
    the launch copy and signal (or count the message received) or none does. GO is only a
    permission: a CTA still proceeds only after its own acquire saw the target (the word is
    monotone and another CTA saw it, so that poll succeeds at once), never on another CTA's
    word. TIMED_OUT vetoes even a CTA that saw the target, so a partial timeout (some CTAs saw
    the signal, some not) leaves nothing half-written or half-read behind a counter.
    Uniformity: %globaltimer differs between the threads of a CTA, so the clock only feeds the
    value the swap proposes; a scalar atomic runs in one thread and broadcasts its result, so
    every branch and loop condition here depends on atomic results only and is the same in
    every thread (no thread leaves the loop while another still needs its barrier).
    """
    zero = tl.zeros([], dtype=tl.int64)
    if CLOCK:
        start = globaltimer()
    spent = zero
    verdict = zero
    v = tl.atomic_add(word_ptr, 0, sem="acquire", scope="sys")
    while (v < target) & (verdict != TIMED_OUT):
        if CLOCK:
            spent = globaltimer() - start
        else:
            spent += 1
        late = (timeout > 0) & (spent >= timeout)
        verdict = tl.atomic_cas(vote_ptr, zero, late.to(tl.int64) * TIMED_OUT, sem="acq_rel",
                                scope="gpu")
        v = tl.atomic_add(word_ptr, 0, sem="acquire", scope="sys")
    if timeout > 0:  # (unbounded, no CTA times out: no verdict to agree on)
        verdict = tl.atomic_cas(vote_ptr, zero, zero + GO, sem="acq_rel", scope="gpu")
    return verdict != TIMED_OUT


@triton.jit(do_not_specialize=["a_stride", "n_stride", "me", "W", "S", "R", "H", "timeout",
                               "drop"],
            do_not_specialize_on_alignment=["a_ptr", "n_ptr", "tag_ptr"])
def put_kernel(recv_ptr, meta_ptr, sig_ptr, credit_ptr, delta_ptr,
               sent_ptr, done_ptr, cut_ptr, fail_ptr, peers_ptr,
               x_ptr, a_ptr, a_stride, n_ptr, n_stride, tag_ptr,
               me, W, S, R, H, timeout: tl.int64, drop,
               BLOCK: tl.constexpr, GROUPED: tl.constexpr, HAS_TAGS: tl.constexpr,
               CLOCK: tl.constexpr):
    d = tl.program_id(1)
    if tl.load(peers_ptr + d) != 0:  # a masked destination: nothing at all
        _put(recv_ptr, meta_ptr, sig_ptr, credit_ptr, delta_ptr, sent_ptr, done_ptr, cut_ptr,
             fail_ptr, peers_ptr, x_ptr, a_ptr, a_stride, n_ptr, n_stride, tag_ptr, me, W, S, R,
             H, timeout, drop, d, BLOCK, GROUPED, HAS_TAGS, CLOCK)


@triton.jit
def _put(recv_ptr, meta_ptr, sig_ptr, credit_ptr, delta_ptr, sent_ptr, done_ptr, cut_ptr,
         fail_ptr, peers_ptr, x_ptr, a_ptr, a_stride, n_ptr, n_stride, tag_ptr, me, W, S, R, H,
         timeout, drop, d, BLOCK: tl.constexpr, GROUPED: tl.constexpr, HAS_TAGS: tl.constexpr,
         CLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq = tl.load(sent_ptr + d)
    # slot seq % S still holds message seq - S until d hands it back (credit; target <= 0: free)
    go = _wait(credit_ptr + d, seq + 1 - S, fail_ptr + 2 * W + d, timeout, CLOCK)
    if go:
        slot = seq % S
        if GROUPED:  # a_ptr = offsets [W + 1]
            a = tl.load(a_ptr + d)
            n = tl.load(a_ptr + d + 1) - a
        else:  # spans: start row a_ptr[d * a_stride], count n_ptr[d * n_stride]
            a = tl.load(a_ptr + d * a_stride)
            n = tl.load(n_ptr + d * n_stride)
        if pid == 0:
            if n > R:  # a longer group is cut to R: count the rows left out, per destination
                tl.atomic_add(cut_ptr + d, n - R)
        n = tl.maximum(tl.minimum(n, R), 0)
        box = me.to(tl.int64) * S + slot
        d_rows = tl.load(delta_ptr + d)
        _copy(recv_ptr, d_rows + box * R * H, x_ptr, a * H, n * H, pid, nprog, BLOCK, False)
        if pid == 0:
            mdst = meta_ptr + tl.load(delta_ptr + W + d) + box * (R + 1)
            tl.store(mdst, n)
            if HAS_TAGS:
                toffs = tl.arange(0, 256)
                for t0 in range(0, n, 256):
                    m = t0 + toffs < n
                    tl.store(mdst + 1 + t0 + toffs, tl.load(tag_ptr + a + t0 + toffs, mask=m),
                             mask=m)
        tl.debug_barrier()  # every thread's stores precede the release below
        tl.atomic_add(sig_ptr + tl.load(delta_ptr + 2 * W + d) + me, 1, sem="release",
                      scope="sys")
    if tl.atomic_add(done_ptr + d, 1, sem="acq_rel", scope="gpu") == nprog - 1:
        tl.store(done_ptr + d, 0)
        tl.store(fail_ptr + 2 * W + d, 0)  # every CTA has its verdict: the next put votes anew
        if go:
            tl.store(sent_ptr + d, seq + 1)
        else:  # nothing sent: the next put to d retries slot seq % S
            tl.atomic_add(fail_ptr + d, 1)
            if drop != 0:
                tl.store(peers_ptr + d, 0)


@triton.jit(do_not_specialize=["me", "W", "S", "R", "H", "C_put", "timeout", "drop"],
            do_not_specialize_on_alignment=["out_meta_ptr"])
def gather_kernel(recv_ptr, meta_ptr, sig_ptr, credit_ptr, delta_ptr,
                  recvd_ptr, done_ptr, fail_ptr, peers_ptr,
                  out_ptr, out_meta_ptr,
                  me, W, S, R, H, C_put, timeout: tl.int64, drop,
                  BLOCK: tl.constexpr, COPY: tl.constexpr, CLOCK: tl.constexpr):
    s = tl.program_id(1)
    if tl.load(peers_ptr + s) != 0:
        _gather(recv_ptr, meta_ptr, sig_ptr, credit_ptr, delta_ptr, recvd_ptr, done_ptr,
                fail_ptr, peers_ptr, out_ptr, out_meta_ptr, me, W, S, R, H, C_put, timeout,
                drop, s, BLOCK, COPY, CLOCK)
    elif tl.program_id(0) == 0:  # a masked source: no rows, nothing taken
        if COPY:
            tl.store(out_meta_ptr + s * (R + 1), 0)
        else:
            tl.store(fail_ptr + 3 * W + s, TIMED_OUT)  # release_kernel hands nothing back


@triton.jit
def _gather(recv_ptr, meta_ptr, sig_ptr, credit_ptr, delta_ptr, recvd_ptr, done_ptr, fail_ptr,
            peers_ptr, out_ptr, out_meta_ptr, me, W, S, R, H, C_put, timeout, drop, s,
            BLOCK: tl.constexpr, COPY: tl.constexpr, CLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    r = tl.load(recvd_ptr + s)
    vote = fail_ptr + 3 * W + s
    go = _wait(sig_ptr + s, (r + 1) * C_put, vote, timeout, CLOCK)
    if COPY:  # else wait only: the caller reads the slot in place, then release_kernel
        if go:
            box = s.to(tl.int64) * S + r % S
            mbase = meta_ptr + box * (R + 1)
            n = tl.load(mbase, volatile=True)
            _copy(out_ptr, s.to(tl.int64) * R * H, recv_ptr, box * R * H, n * H, pid, nprog,
                  BLOCK, True)
            if pid == 0:
                toffs = tl.arange(0, 256)
                for t0 in range(0, n + 1, 256):
                    m = t0 + toffs < n + 1
                    v = tl.load(mbase + t0 + toffs, mask=m, volatile=True)
                    tl.store(out_meta_ptr + s * (R + 1) + t0 + toffs, v, mask=m)
        else:
            if pid == 0:  # nothing came from s: no rows
                tl.store(out_meta_ptr + s * (R + 1), 0)
        tl.debug_barrier()  # every thread's loads of the slot precede the credit below
    if tl.atomic_add(done_ptr + s, 1, sem="acq_rel", scope="gpu") == nprog - 1:
        tl.store(done_ptr + s, 0)
        if go:
            if COPY:
                tl.store(recvd_ptr + s, r + 1)
                tl.atomic_xchg(credit_ptr + tl.load(delta_ptr + 3 * W + s) + me, r + 1,
                               sem="release", scope="sys")
        else:  # not consumed: the next gather waits for the same message
            tl.atomic_add(fail_ptr + W + s, 1)
            if drop != 0:
                tl.store(peers_ptr + s, 0)
        if COPY:  # without COPY the verdict stays for release_kernel
            tl.store(vote, 0)


@triton.jit(do_not_specialize=["me", "W"])
def release_kernel(credit_ptr, delta_ptr, recvd_ptr, fail_ptr, me, W):
    """Grid [W]: the in-place readers of every source's current slot are done: bump recvd[s]
    and hand the slot back to s (credit), unless the wait for s (gather_kernel without COPY)
    timed out: then nothing was taken. Either way the verdict word goes back to 0."""
    s = tl.program_id(0)
    vote = fail_ptr + 3 * W + s
    go = tl.load(vote) != TIMED_OUT
    tl.store(vote, 0)
    if go:
        r = tl.load(recvd_ptr + s) + 1
        tl.store(recvd_ptr + s, r)
        tl.atomic_xchg(credit_ptr + tl.load(delta_ptr + 3 * W + s) + me, r, sem="release",
                       scope="sys")


@triton.jit(do_not_specialize=["dst_off", "nbytes"])
def copy_kernel(dst_ptr, dst_off, src_ptr, nbytes, BLOCK: tl.constexpr):
    """nvshmem:// transport's put to a mapped peer: bytes src[:nbytes] -> dst[dst_off:].

    dst_ptr: this rank's symmetric heap (uint8); dst_off: the peer's delta + the slot's offset,
    a multiple of 16. Visibility to the peer: the transport sends the header only after a CUDA
    event recorded behind this kernel completed.
    """
    _copy(dst_ptr, dst_off, src_ptr, 0, nbytes, tl.program_id(0), tl.num_programs(0), BLOCK,
          False, 16)
