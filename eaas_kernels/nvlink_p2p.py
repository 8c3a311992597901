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

put (grid [C, W], program (c, d)): wait until d gave back slot seq % S (credit[d] >= seq+1-S);
copy rows x[a_d : a_d + n_d] (grouped offsets, or start/count spans) flat into d's
recv[me, slot] (C CTAs; full blocks unmasked so every access is a 16-byte vector, tail masked);
CTA 0 also writes [n, tags]; barrier; add 1 to d's sig[me] (release, system scope). The last
CTA to finish bumps sent[d].
gather (grid [C, W], program (c, s)): wait sig[s] >= (recvd[s] + 1) * C_put (acquire); copy slot
recvd[s] % S out flat; the last CTA bumps recvd[s] and sets s's credit[me] (release).
Every count lives on the device: both kernels are CUDA-graph capturable. Row tensors must be
16-byte aligned (the plane checks; the copies are vectorised); index, count, tag and meta
tensors are alignment-generic and sizes are runtime values, so each (GROUPED, HAS_TAGS, COPY)
variant compiles once and a warm-up covers every later launch: a first launch loads a module,
which may synchronise the context, and a put or gather spinning meanwhile would never end.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["put_kernel", "gather_kernel", "release_kernel", "copy_kernel"]


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
def _spin_until(word_ptr, target):
    v = tl.atomic_add(word_ptr, 0, sem="acquire", scope="sys")
    while v < target:
        v = tl.atomic_add(word_ptr, 0, sem="acquire", scope="sys")


@triton.jit(do_not_specialize=["a_stride", "n_stride", "me", "W", "S", "R", "H"],
            do_not_specialize_on_alignment=["a_ptr", "n_ptr", "tag_ptr"])
def put_kernel(recv_ptr, meta_ptr, sig_ptr, credit_ptr, delta_ptr,
               sent_ptr, done_ptr, cut_ptr,
               x_ptr, a_ptr, a_stride, n_ptr, n_stride, tag_ptr,
               me, W, S, R, H,
               BLOCK: tl.constexpr, GROUPED: tl.constexpr, HAS_TAGS: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    d = tl.program_id(1)
    seq = tl.load(sent_ptr + d)
    if seq >= S:  # slot seq % S still holds message seq - S until d hands it back
        _spin_until(credit_ptr + d, seq + 1 - S)
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
                tl.store(mdst + 1 + t0 + toffs, tl.load(tag_ptr + a + t0 + toffs, mask=m), mask=m)
    tl.debug_barrier()  # every thread's stores precede the release below
    tl.atomic_add(sig_ptr + tl.load(delta_ptr + 2 * W + d) + me, 1, sem="release", scope="sys")
    if tl.atomic_add(done_ptr + d, 1, sem="acq_rel", scope="gpu") == nprog - 1:
        tl.store(done_ptr + d, 0)
        tl.store(sent_ptr + d, seq + 1)


@triton.jit(do_not_specialize=["me", "W", "S", "R", "H", "C_put"],
            do_not_specialize_on_alignment=["out_meta_ptr"])
def gather_kernel(recv_ptr, meta_ptr, sig_ptr, credit_ptr, delta_ptr,
                  recvd_ptr, done_ptr,
                  out_ptr, out_meta_ptr,
                  me, W, S, R, H, C_put,
                  BLOCK: tl.constexpr, COPY: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    s = tl.program_id(1)
    r = tl.load(recvd_ptr + s)
    _spin_until(sig_ptr + s, (r + 1) * C_put)
    if COPY:  # else wait only: the caller reads the slot in place, then release_kernel
        box = s.to(tl.int64) * S + r % S
        mbase = meta_ptr + box * (R + 1)
        n = tl.load(mbase, volatile=True)
        _copy(out_ptr, s.to(tl.int64) * R * H, recv_ptr, box * R * H, n * H, pid, nprog, BLOCK,
              True)
        if pid == 0:
            toffs = tl.arange(0, 256)
            for t0 in range(0, n + 1, 256):
                m = t0 + toffs < n + 1
                v = tl.load(mbase + t0 + toffs, mask=m, volatile=True)
                tl.store(out_meta_ptr + s * (R + 1) + t0 + toffs, v, mask=m)
        tl.debug_barrier()  # every thread's loads of the slot precede the credit below
        if tl.atomic_add(done_ptr + s, 1, sem="acq_rel", scope="gpu") == nprog - 1:
            tl.store(done_ptr + s, 0)
            tl.store(recvd_ptr + s, r + 1)
            tl.atomic_xchg(credit_ptr + tl.load(delta_ptr + 3 * W + s) + me, r + 1,
                           sem="release", scope="sys")


@triton.jit(do_not_specialize=["me", "W"])
def release_kernel(credit_ptr, delta_ptr, recvd_ptr, me, W):
    """Grid [W]: the in-place readers of every source's current slot are done: bump recvd[s]
    and hand the slot back to s (credit)."""
    s = tl.program_id(0)
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
