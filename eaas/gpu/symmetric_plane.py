"""A set of nvshmem:// channels created collectively over torch symmetric memory (NVSHMEM or
CUDA IPC mappings): `NvshmemPlane.create` on every rank of a torch.distributed group, same layouts
in the same order. The channel itself — buffers, counters, put / gather / send / recv, bounded
waits — is `eaas.gpu.nvshmem_plane.NvshmemChannel` (its module docstring shows the use)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from eaas.gpu.credits import ChannelLayout
from eaas.gpu.nvshmem_plane import NvshmemChannel, check_timeout

__all__ = ["NvshmemPlane", "peer_offsets"]


def peer_offsets(handle: Any, rank: int, align: int) -> list[int | None]:
    """Byte offset from this rank's symmetric buffer to each rank's, as mapped here.

    `handle` is a symmetric-memory rendezvous handle: NVSHMEM (or CUDA IPC) maps every peer
    reachable by loads/stores (NVLink) into this process (`buffer_ptrs[d]`). None for a peer
    that is not mapped (0) or whose offset is not a multiple of `align` bytes.
    """
    ptrs = [int(p) for p in handle.buffer_ptrs]
    return [p - ptrs[rank] if p and (p - ptrs[rank]) % align == 0 else None for p in ptrs]


def _peer_deltas(handles: list[Any], bufs: tuple[torch.Tensor, ...], rank: int,
                 device: torch.device) -> torch.Tensor | None:
    """[4, W] int64: element offset from each local buffer to the same buffer on rank d, or
    None (no direct path) if a peer is unmapped or rows are not multiples of 8 elements (the
    copy loop's 16-byte vector hints)."""
    if bufs[0].shape[-1] % 8:
        return None
    rows = []
    for hdl, buf in zip(handles, bufs):
        size = buf.element_size()
        offsets = peer_offsets(hdl, rank, 8 * size)
        if None in offsets:
            return None
        rows.append([o // size for o in offsets])
    return torch.tensor(rows, dtype=torch.int64, device=device)


class NvshmemPlane:
    """Channels on one rank; create collectively (same layouts, same order) on every rank."""

    def __init__(self, channels: Mapping[str, NvshmemChannel], group_name: str) -> None:
        self.channels = dict(channels)
        self.group_name = group_name

    @classmethod
    def create(cls, group: Any, device: torch.device | str,
               layouts: Mapping[str, ChannelLayout], backend: str = "NVSHMEM",
               warm_up: bool = True, timeout_s: float | None = None) -> NvshmemPlane:
        """Allocate every channel's symmetric buffers (collective) and zero the words.

        group:   a torch.distributed ProcessGroup (NCCL) whose ranks are this plane's PEs.
        device:  this rank's GPU, e.g. "cuda:1" (explicit index: NVSHMEM wants one device).
        backend: torch symmetric-memory backend: "NVSHMEM" (both paths) or "CUDA" (CUDA IPC
                 mappings, same host only: the direct path alone, the cudaipc:// flavour).
        warm_up: run every kernel once (`warm_up`; compiles on a fresh machine take seconds).
        timeout_s: every channel's bound on the direct path's waits (`NvshmemChannel.timeout_s`;
                 None: forever). The warm-up itself waits without bound (peers may compile).
        Sets torch's symmetric-memory backend (must precede any other symmetric allocation in
        this process).
        """
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        device = torch.device(device)
        if device.type != "cuda" or device.index is None:
            raise ValueError(f"device must be an explicit cuda:N, got {device}")
        if backend not in ("NVSHMEM", "CUDA"):
            raise ValueError(f"backend {backend!r}: must be 'NVSHMEM' or 'CUDA'")
        check_timeout(timeout_s)
        if symm_mem.get_backend(device) != backend:
            symm_mem.set_backend(backend)
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
            handles = [symm_mem.rendezvous(t, name) for t in (recv, meta, sig, credit)]
            zeros = torch.zeros(lay.world_size, dtype=torch.int64, device=device)
            channels[key] = NvshmemChannel(
                lay, rank, recv, meta, sig, credit, zeros, zeros.clone(),
                _peer_deltas(handles, (recv, meta, sig, credit), rank, device),
                torch.zeros(3, lay.world_size, dtype=torch.int64, device=device),
                backend == "NVSHMEM")
        torch.cuda.synchronize(device)  # start-up only: words are zero before anyone signals
        dist.barrier(group)
        plane = cls(channels, name)
        if warm_up:
            plane.warm_up(group, device)
        for ch in channels.values():  # after the warm-up: the timeout is a runtime value, so the
            ch.timeout_s = timeout_s  # warmed-up variants serve it (no module load later)
        return plane

    def warm_up(self, group: Any, device: torch.device) -> None:
        """Collective, start-up only: run every kernel variant of every channel once, then zero
        every counter again (the planes look freshly created).

        A kernel's first launch compiles and loads its module, and loading may synchronise the
        whole context (CUDA lazy loading; for NVSHMEM kernels also `nvshmemx_cumodule_init`'s
        synchronous copy). If a put or send of this process is spinning for credit meanwhile,
        that load never returns. Every size and caller pointer is a runtime value of the
        kernels (one variant each), so after this no launch loads a module.
        """
        import torch.distributed as dist

        steps = sorted({i for ch in self.channels.values() for i in ch.warm_up_steps()})
        for step in steps:  # one message per pair and step: S = 1 never waits for credit
            chans = [ch for ch in self.channels.values() if step in ch.warm_up_steps()]
            for ch in chans:
                ch.warm_up_send(step)
            for ch in chans:
                ch.warm_up_take(step)
            torch.cuda.synchronize(device)
            dist.barrier(group)  # every rank's messages of this step were consumed
        for ch in self.channels.values():
            ch.reset_counters()
        torch.cuda.synchronize(device)
        dist.barrier(group)
