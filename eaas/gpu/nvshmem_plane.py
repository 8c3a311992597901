"""nvshmem:// data plane: GPU-initiated point-to-point row mailboxes with credits.

One process per GPU, in a torch.distributed group (NCCL), all ranks on NVLink (or, with
IBGDA NICs, across hosts). Every rank creates the same channels in the same order:

    plane = NvshmemPlane.create(group, device, {"dispatch": layout, "combine": layout})
    ch = plane.channels["dispatch"]
    ch.send(peer, rows, meta)            # rows [>=n, H] on this GPU; meta [R+1] int64 [n, tags..]
    ch.recv(src, out, out_meta)          # waits on the GPU, copies the n rows into out [R, H]

Both calls only enqueue kernels on the current stream (no host sync, no allocation), so they can
be captured in a CUDA graph after one warm-up launch. A send waits on the GPU for credit when
the receiver still holds all S slots of the pair; a receive waits on the GPU for the signal.
Hazard: a send or receive whose partner never comes spins its kernel forever; put receives on
a stream of their own when the same stream must also run the sends that feed them.
Hazard: run every kernel once (e.g. a send to self and its receive, per channel) before any
send can wait for credit. A kernel's first launch loads its module and runs
`nvshmemx_cumodule_init`, whose synchronous copy waits for the kernels already running — a
spinning send among them never finishes. (Our best explanation of the two-rank credit check's
hang on the H200s; the warmed-up check has not run on a GPU yet.)

`eaas.gpu.credits` holds the reference arithmetic; `eaas_kernels.nvshmem_p2p` the kernels.
NVSHMEM cannot admit a process after start-up: a restarted server joins over cudaipc://.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from eaas.gpu.credits import ChannelLayout

__all__ = ["NvshmemChannel", "NvshmemPlane", "nvshmem_available"]


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


@dataclass(slots=True)
class NvshmemChannel:
    """The symmetric mailboxes of one channel on this rank, plus its local counters.

    recv   [W, S, R, H] symmetric: rows from each source rank, S slots each.
    meta   [W, S, R+1]  int64 symmetric: per slot the row count, then a tag per row.
    sig    [W]          int64 symmetric: arrivals from each source (C per message).
    credit [W]          int64 symmetric: messages each destination consumed from me.
    sent, recvd [W]     int64 local counters (device), so launches need no host values.
    """

    layout: ChannelLayout
    rank: int
    recv_buf: torch.Tensor
    meta: torch.Tensor
    sig: torch.Tensor
    credit: torch.Tensor
    sent: torch.Tensor
    recvd: torch.Tensor
    _host_recvd: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._host_recvd = [0] * self.layout.world_size

    def send(self, peer: int, rows: torch.Tensor, meta: torch.Tensor) -> None:
        """Enqueue a put of meta[0] rows of `rows` into `peer`'s mailbox for this rank.

        rows: [>= n, H] contiguous, this channel's dtype, on this rank's GPU (for IBGDA it must be
              symmetric memory; on NVLink any device memory works).
        meta: [R + 1] int64 on the GPU: meta[0] = n (0 <= n <= R), meta[1:1+n] tags.
        `rows` and `meta` must not change until the send has executed (stream order).
        """
        k, lay = _kernels(), self.layout
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
        k, lay = _kernels(), self.layout
        if out.shape != (lay.max_rows, lay.hidden) or out_meta.shape != (lay.max_rows + 1,):
            raise ValueError(f"recv: out must be [{lay.max_rows}, {lay.hidden}] and out_meta "
                             f"[{lay.max_rows + 1}], got {tuple(out.shape)}, "
                             f"{tuple(out_meta.shape)}")
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
        k, lay = _kernels(), self.layout
        slot = self._host_recvd[src] % lay.num_slots
        k.recv_kernel[(1,)](
            self.recv_buf, self.meta, self.sig, self.recvd, self.recv_buf, self.meta,
            src, lay.num_slots, lay.max_rows, lay.hidden, lay.ctas_per_send, k.CMP_GE,
            BLOCK=1024, COPY=False, num_warps=1)
        return self.recv_buf[src, slot], self.meta[src, slot]

    def release(self, src: int) -> None:
        """Enqueue: the current message from `src` is consumed; give its slot back (credit)."""
        k = _kernels()
        self._host_recvd[src] += 1
        k.ack_kernel[(1,)](self.recvd, self.credit, src, self.rank, k.SIGNAL_SET, num_warps=1)


def lay_check(lay: ChannelLayout, peer: int, rows: torch.Tensor, meta: torch.Tensor) -> None:
    if not 0 <= peer < lay.world_size:
        raise ValueError(f"peer {peer} is not a rank of a {lay.world_size}-rank channel")
    if rows.dim() != 2 or rows.shape[1] != lay.hidden or not rows.is_contiguous():
        raise ValueError(f"rows must be contiguous [n, {lay.hidden}], got {tuple(rows.shape)}")
    if meta.dtype != torch.int64 or meta.numel() < 1:
        raise ValueError("meta must be int64 [R + 1] with meta[0] = row count")


class NvshmemPlane:
    """Channels on one rank; create collectively (same layouts, same order) on every rank."""

    def __init__(self, channels: Mapping[str, NvshmemChannel], group_name: str) -> None:
        self.channels = dict(channels)
        self.group_name = group_name

    @classmethod
    def create(cls, group: Any, device: torch.device | str,
               layouts: Mapping[str, ChannelLayout]) -> NvshmemPlane:
        """Allocate every channel's symmetric buffers (collective) and zero the words.

        group:   a torch.distributed ProcessGroup (NCCL) whose ranks are this plane's PEs.
        device:  this rank's GPU, e.g. "cuda:1" (explicit index: NVSHMEM wants one device).
        Sets torch's symmetric-memory backend to NVSHMEM (must precede any other symmetric
        allocation in this process); warm the kernels up before timing or capturing.
        """
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        device = torch.device(device)
        if device.type != "cuda" or device.index is None:
            raise ValueError(f"device must be an explicit cuda:N, got {device}")
        if symm_mem.get_backend(device) != "NVSHMEM":
            symm_mem.set_backend("NVSHMEM")
        rank = dist.get_rank(group)
        name = group.group_name
        channels = {}
        for key, lay in layouts.items():
            if lay.world_size != dist.get_world_size(group):
                raise ValueError(f"channel {key!r}: world_size {lay.world_size} != group size "
                                 f"{dist.get_world_size(group)}")
            dtype = getattr(torch, lay.dtype)
            recv = symm_mem.empty(lay.recv_shape, dtype=dtype, device=device)
            meta = symm_mem.empty(lay.meta_shape, dtype=torch.int64, device=device)
            sig = symm_mem.empty(lay.world_size, dtype=torch.int64, device=device).zero_()
            credit = symm_mem.empty(lay.world_size, dtype=torch.int64, device=device).zero_()
            for t in (recv, meta, sig, credit):
                symm_mem.rendezvous(t, name)
            zeros = torch.zeros(lay.world_size, dtype=torch.int64, device=device)
            channels[key] = NvshmemChannel(lay, rank, recv, meta, sig, credit,
                                           zeros, zeros.clone())
        torch.cuda.synchronize(device)  # start-up only: words are zero before anyone signals
        dist.barrier(group)
        return cls(channels, name)
