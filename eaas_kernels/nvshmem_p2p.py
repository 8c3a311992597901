"""Triton device code of the nvshmem:// data plane: point-to-point row mailboxes with credits.

Import only on a CUDA machine whose torch has NVSHMEM (`eaas.gpu.nvshmem_plane` does so lazily):
`@requires_nvshmem` links NVSHMEM's device bitcode and fails at import elsewhere.

Protocol (one channel; every rank can send to every rank; `eaas.gpu.credits` is the pure-Python
reference of the same arithmetic and is what the CPU tests check):

    symmetric on every rank:  recv  [W, S, R, H]  rows from each source rank, S slots each
                              meta  [W, S, R+1]   int64: meta[.., 0] = row count n, then n tags
                              sig   [W]           uint64: C (= CTAs per send) added per message
                              credit[W]           uint64: messages rank d consumed from me
    local on every rank:      sent  [W]  int64: messages I sent to each peer
                              recvd [W]  int64: messages I consumed from each source

    send(peer): seq = sent[peer]; wait credit[peer] >= seq + 1 - S (slot seq % S is free);
                CTA 0 puts meta then fences; every CTA puts its share of rows with
                putmem_signal_block(ADD 1) into recv[me, seq % S] on `peer`; then sent[peer] += 1.
    recv(src):  r = recvd[src]; wait sig[src] >= (r + 1) * C; copy recv[src, r % S] out;
                then recvd[src] += 1 and signal_op SET credit[me] = r + 1 on `src`.

Counters live on the device and every size is fixed, so send/recv are CUDA-graph capturable.
Caller tensors are alignment-generic (`do_not_specialize_on_alignment`) and every size is a
runtime value: one compiled variant per kernel, so a warm-up covers every later launch (a
first launch loads a module, which may synchronise the context: deadly while a send spins).
Signal/compare constants are NVSHMEM 3.4.5's (SET=9, ADD=10, GE=5; torch's docstrings are wrong).
"""

from __future__ import annotations

import triton
import triton.language as tl
import torch.distributed._symmetric_memory._nvshmem_triton as nvshmem
from torch.distributed._symmetric_memory._nvshmem_triton import requires_nvshmem

SIGNAL_SET, SIGNAL_ADD = 9, 10
CMP_GE = 5

__all__ = ["send_kernel", "recv_kernel", "ack_kernel", "bump_kernel", "put_bytes_kernel",
           "SIGNAL_SET", "SIGNAL_ADD", "CMP_GE"]


@requires_nvshmem
@triton.jit(do_not_specialize=["me", "peer", "S", "R", "H", "row_bytes"],
            do_not_specialize_on_alignment=["x_ptr", "xmeta_ptr"])
def send_kernel(recv_ptr, meta_ptr, sig_ptr, credit_ptr,  # symmetric
                sent_ptr, x_ptr, xmeta_ptr,  # local: counters [W], rows [>=n, H], [count, tags]
                me, peer, S, R, H, row_bytes,  # sizes
                one, sig_add, cmp_ge, C: tl.constexpr):
    pid = tl.program_id(0)
    seq = tl.load(sent_ptr + peer)
    if seq >= S:  # slot seq % S held message seq - S: wait until `peer` consumed it
        nvshmem.signal_wait_until(credit_ptr + peer, cmp_ge, seq + 1 - S)
    slot = seq % S
    n = tl.load(xmeta_ptr)
    per = (n + C - 1) // C
    r0 = tl.minimum(pid * per, n)
    nr = tl.minimum(n - r0, per)
    box = me * S + slot
    if pid == 0:
        nvshmem.put(meta_ptr + box * (R + 1), xmeta_ptr, n + 1, peer)
        nvshmem.fence()
    nvshmem.putmem_signal_block(recv_ptr + (box * R + r0) * H, x_ptr + r0 * H, nr * row_bytes,
                                sig_ptr + me, one, sig_add, peer)


@requires_nvshmem
@triton.jit(do_not_specialize=["src", "S", "R", "H", "C_send"],
            do_not_specialize_on_alignment=["out_ptr", "out_meta_ptr"])
def recv_kernel(recv_ptr, meta_ptr, sig_ptr,  # symmetric
                recvd_ptr, out_ptr, out_meta_ptr,  # local: [W], [R, H], [R+1]
                src, S, R, H, C_send, cmp_ge, BLOCK: tl.constexpr, COPY: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    r = tl.load(recvd_ptr + src)
    nvshmem.signal_wait_until(sig_ptr + src, cmp_ge, (r + 1) * C_send)
    if COPY:  # else zero-copy receive: the caller reads recv[src, r % S] after this kernel
        box = src * S + r % S
        mbase = meta_ptr + box * (R + 1)
        n = tl.load(mbase, volatile=True).to(tl.int32)  # R * H < 2**31 (checked by the layout)
        offs = tl.arange(0, BLOCK)
        if pid == 0:
            for m0 in range(0, n + 1, BLOCK):
                mm = m0 + offs
                v = tl.load(mbase + mm, mask=mm < n + 1, volatile=True)
                tl.store(out_meta_ptr + mm, v, mask=mm < n + 1)
        rows = recv_ptr + box * R * H
        for i in range(pid, n, nprog):
            for h0 in range(0, H, BLOCK):
                hh = h0 + offs
                v = tl.load(rows + i * H + hh, mask=hh < H, cache_modifier=".cg")
                tl.store(out_ptr + i * H + hh, v, mask=hh < H)


@requires_nvshmem
@triton.jit(do_not_specialize=["src", "me"])
def ack_kernel(recvd_ptr, credit_ptr, src, me, sig_set):
    r = tl.load(recvd_ptr + src) + 1
    tl.store(recvd_ptr + src, r)
    nvshmem.signal_op((credit_ptr + me).to(tl.int64), r, sig_set, src)


@triton.jit(do_not_specialize=["index"])
def bump_kernel(counter_ptr, index):
    tl.store(counter_ptr + index, tl.load(counter_ptr + index) + 1)


@requires_nvshmem
@triton.jit(do_not_specialize=["dst_off", "nbytes", "peer"],
            do_not_specialize_on_alignment=["src_ptr"])
def put_bytes_kernel(heap_ptr, src_ptr, dst_off, nbytes, peer, C: tl.constexpr):
    """nvshmem:// transport: put `nbytes` of src into `peer`'s heap at byte dst_off, then quiet.

    heap_ptr: symmetric uint8 heap (this rank's address; NVSHMEM maps it to the peer's copy);
    src_ptr: uint8 device memory. C CTAs each put one 256-byte-aligned share.
    """
    pid = tl.program_id(0)
    total = nbytes.to(tl.int64)
    per = ((total + C - 1) // C + 255) // 256 * 256
    b0 = tl.minimum(pid * per, total)
    nb = tl.minimum(total - b0, per)
    if nb > 0:
        nvshmem.put(heap_ptr + dst_off + b0, src_ptr + b0, nb, peer)  # uint8: nb elements
    nvshmem.quiet()
