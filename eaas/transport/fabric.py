"""Fabrics of the nvshmem:// transport: the slots every rank can write into, and the puts.

A *fabric* is one NVSHMEM job: W processes (ranks), one GPU each, that allocated the same
symmetric heap at start-up (`join_fabric`, collective). Every rank's heap holds, for every
source rank s, S slots of `slot_bytes`:   heap [W, S, slot_bytes] uint8, row s written only by s.
Credits on those slots are kept on the host (`Fabric.acquire` / `release`), shared by every
connection of this process to the same peer. `HostFabric` runs the same protocol on host
memory in one process (rank 0 of a world of 1): the CPU tests, and single-process debugging.
The protocol on top (headers, RELEASE frames, windows) is `eaas.transport.nvshmem`.
"""

from __future__ import annotations

import collections
import secrets
from typing import Any, Callable

import torch

from eaas.errors import FrameError, TransportError
from eaas.gpu.symmetric_plane import peer_offsets
from eaas.transport.codec import clone_tensor, copy_bytes

__all__ = ["ALIGN", "Fabric", "NvshmemFabric", "HostFabric", "join_fabric",
           "open_host_fabric", "current_fabric", "close_fabric", "need_fabric", "align"]

ALIGN = 256


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Fabric:
    """Slots of every (me -> peer) pair, the host-side credits on them, and the puts.

    rank/world_size: this process in the job; slot_bytes/num_slots: S slots per source rank in
    every rank's heap; fabric_id: the same string on every rank (peers of other jobs are refused).
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, slot_bytes: int,
                 num_slots: int, fabric_id: str) -> None:
        if slot_bytes < ALIGN or slot_bytes % ALIGN:
            raise ValueError(f"slot_bytes={slot_bytes}: must be a multiple of {ALIGN}")
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots}: must be >= 1")
        self.rank, self.world_size, self.device = rank, world_size, device
        self.slot_bytes, self.num_slots, self.fabric_id = slot_bytes, num_slots, fabric_id
        self.window = max(1, num_slots // 2)  # slots one connection end may hold
        self._busy = [[False] * num_slots for _ in range(world_size)]  # [peer][slot]
        self._waiters: list[collections.OrderedDict[int, Callable[[], None]]] = [
            collections.OrderedDict() for _ in range(world_size)]
        self.closed = False

    # ---- device side (subclasses) -----------------------------------------------------
    def carries(self, t: torch.Tensor) -> bool:
        """Whether tensor `t` travels through the fabric (else inline over the socket)."""
        raise NotImplementedError

    def put(self, peer: int, offset: int, src: torch.Tensor) -> None:
        """Enqueue: write `src` (contiguous) at byte `offset` of my row in `peer`'s heap."""
        raise NotImplementedError

    def view(self, src_rank: int, offset: int, nbytes: int) -> torch.Tensor:
        """[nbytes] uint8 view of my heap: bytes `src_rank` put at `offset` of its row."""
        raise NotImplementedError

    def record(self) -> Any:
        """An event (`.query()`) completing after the work enqueued so far."""
        raise NotImplementedError

    def stage(self, t: torch.Tensor) -> torch.Tensor:
        """`t` as a contiguous tensor on the fabric's device (a copy only when needed)."""
        return t.to(self.device).contiguous()

    def clone(self, view: torch.Tensor) -> torch.Tensor:
        """A copy of a received view that owns its memory (stream-ordered on a GPU)."""
        return view.clone()

    # ---- host-side credits ------------------------------------------------------------
    def acquire(self, peer: int, count: int) -> int | None:
        """First slot of `count` consecutive free slots to `peer` (now busy), or None."""
        busy = self._busy[peer]
        run = 0
        for i, b in enumerate(busy):
            run = 0 if b else run + 1
            if run == count:
                first = i - count + 1
                busy[first:i + 1] = [True] * count
                return first
        return None

    def release(self, peer: int, first: int, count: int) -> None:
        """Slots first..first+count-1 to `peer` are free again; wake the senders waiting."""
        busy = self._busy[peer]
        if not all(busy[first:first + count]):
            raise FrameError(f"release of slots {first}..{first + count - 1} to rank {peer} "
                             "that are not in use")
        busy[first:first + count] = [False] * count
        for key, wake in list(self._waiters[peer].items()):
            self._waiters[peer].pop(key, None)
            wake()

    def wait(self, peer: int, key: int, wake: Callable[[], None]) -> None:
        """Call `wake()` once, at the next release of slots to `peer` (keyed per connection)."""
        self._waiters[peer][key] = wake

    def unwait(self, peer: int, key: int) -> None:
        self._waiters[peer].pop(key, None)

    def slot_offset(self, src_rank: int, slot: int) -> int:
        """Byte offset of slot `slot` of row `src_rank` in a heap."""
        return (src_rank * self.num_slots + slot) * self.slot_bytes

    def close(self) -> None:
        self.closed = True


class NvshmemFabric(Fabric):
    """The real fabric: a symmetric NVSHMEM heap on this rank's GPU; puts are Triton kernels.

    A peer whose heap NVSHMEM maps into this process (same NVLink domain) is written with plain
    vectorised stores (`eaas_kernels.nvlink_p2p.copy_kernel`); any other peer (another host,
    IBGDA) with NVSHMEM's own put (`eaas_kernels.nvshmem_p2p.put_bytes_kernel`).
    """

    def __init__(self, group: Any, device: torch.device, slot_bytes: int, num_slots: int,
                 ctas: int = 32) -> None:
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        if device.type != "cuda" or device.index is None:
            raise ValueError(f"device must be an explicit cuda:N, got {device}")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        box = [secrets.token_hex(8) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=group, device=device)
        super().__init__(rank, world, device, slot_bytes, num_slots, str(box[0]))
        if symm_mem.get_backend(device) != "NVSHMEM":
            symm_mem.set_backend("NVSHMEM")
        with torch.cuda.device(device):
            self.heap = symm_mem.empty(world * num_slots * slot_bytes, dtype=torch.uint8,
                                       device=device)  # [W * S * slot_bytes]
            hdl = symm_mem.rendezvous(self.heap, group.group_name)
        self.ctas = ctas
        # byte offset from my heap to peer d's mapping of its heap; None: not mapped
        self.delta = peer_offsets(hdl, rank, 16)
        from eaas_kernels import nvlink_p2p  # noqa: PLC0415 (device code: import only here)

        self._direct = nvlink_p2p
        self._kernels: Any = None  # eaas_kernels.nvshmem_p2p, imported at the first such put
        dist.barrier(group)

    def carries(self, t: torch.Tensor) -> bool:
        return t.is_cuda

    def put(self, peer: int, offset: int, src: torch.Tensor, nvshmem: bool = False) -> None:
        """Enqueue a put of src's bytes into `peer`'s heap; `nvshmem` forces NVSHMEM's put."""
        nbytes = src.numel() * src.element_size()
        if nbytes == 0:
            return
        flat = src.reshape(-1).view(torch.uint8)
        dst = self.slot_offset(self.rank, 0) + offset
        delta = self.delta[peer]
        with torch.cuda.device(self.device):
            if delta is not None and not nvshmem:  # NVLink: stores through the peer mapping
                ctas = max(1, min(self.ctas, nbytes // (32 << 10)))
                self._direct.copy_kernel[(ctas,)](self.heap, delta + dst, flat, nbytes,
                                                  BLOCK=16384, num_warps=8)
                return
            if self._kernels is None:
                from eaas_kernels import nvshmem_p2p  # noqa: PLC0415

                self._kernels = nvshmem_p2p
            ctas = max(1, min(self.ctas, nbytes // (64 << 10)))
            self._kernels.put_bytes_kernel[(ctas,)](self.heap, flat, dst, nbytes, peer, C=ctas,
                                                    num_warps=16)

    def view(self, src_rank: int, offset: int, nbytes: int) -> torch.Tensor:
        start = self.slot_offset(src_rank, 0) + offset
        return self.heap[start:start + nbytes]

    def record(self) -> Any:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event


class _Done:
    @staticmethod
    def query() -> bool:
        return True


class HostFabric(Fabric):
    """The protocol on host memory in one process (world of 1): every CPU tensor uses slots."""

    def __init__(self, slot_bytes: int, num_slots: int) -> None:
        super().__init__(0, 1, torch.device("cpu"), slot_bytes, num_slots,
                         "host-" + secrets.token_hex(8))
        self.heap = torch.empty(num_slots * slot_bytes, dtype=torch.uint8)  # [S * slot_bytes]
        self.puts = 0  # counted, so tests can see the slots were used

    def carries(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu"

    def put(self, peer: int, offset: int, src: torch.Tensor) -> None:
        nbytes = src.numel() * src.element_size()
        self.puts += 1
        copy_bytes(self.heap[offset:offset + nbytes], src.reshape(-1).view(torch.uint8))

    def view(self, src_rank: int, offset: int, nbytes: int) -> torch.Tensor:
        return self.heap[offset:offset + nbytes]

    def record(self) -> Any:
        return _Done()

    def stage(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous()

    def clone(self, view: torch.Tensor) -> torch.Tensor:
        return clone_tensor(view)


_FABRIC: Fabric | None = None


def current_fabric() -> Fabric | None:
    """The process-wide fabric, if one was joined (or opened)."""
    return _FABRIC


def close_fabric() -> None:
    """Forget the process-wide fabric (local only; no collective, so dead peers cannot hang it).

    Existing nvshmem:// connections keep working until they close; new ones are refused.
    """
    global _FABRIC
    if _FABRIC is not None:
        _FABRIC.close()
    _FABRIC = None


def open_host_fabric(slot_bytes: int = 8 << 20, num_slots: int = 32) -> HostFabric:
    """Install a HostFabric as the process-wide fabric (replacing any other)."""
    global _FABRIC
    close_fabric()
    _FABRIC = HostFabric(slot_bytes, num_slots)
    return _FABRIC


def join_fabric(store: str, rank: int, world_size: int, device: str, *,
                slot_bytes: int = 4 << 20, num_slots: int = 16,
                timeout_s: float = 120.0) -> NvshmemFabric:
    """Join the NVSHMEM job of `world_size` processes; blocking and collective.

    store:  "host:port" of the rendezvous (rank 0 hosts a TCPStore there).
    device: this rank's GPU, an explicit "cuda:N" (one rank per GPU).
    Initialises torch.distributed's default group (NCCL) if it is not yet, sets torch's
    symmetric-memory backend to NVSHMEM, allocates W * num_slots * slot_bytes of symmetric
    heap, and warms the put kernel up. Multicast stays off (see eaas.gpu.MULTICAST_OFF).
    """
    import datetime
    import os

    import torch.distributed as dist

    from eaas.gpu.devices import MULTICAST_OFF

    global _FABRIC
    os.environ.update(MULTICAST_OFF)
    dev = torch.device(device)
    if dev.type != "cuda" or dev.index is None:
        raise ValueError(f"join_fabric: device must be an explicit cuda:N, got {device!r}")
    torch.cuda.set_device(dev)
    if not dist.is_initialized():
        from eaas.transport.rendezvous import rendezvous_store  # binds `store`'s host only

        dist.init_process_group("nccl", store=rendezvous_store(store, rank, world_size,
                                                               timeout_s), rank=rank,
                                world_size=world_size, device_id=dev,
                                timeout=datetime.timedelta(seconds=timeout_s))
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(f"join_fabric: torch.distributed is already initialised as rank "
                           f"{dist.get_rank()} of {dist.get_world_size()}, not {rank} of "
                           f"{world_size}")
    close_fabric()
    fabric = NvshmemFabric(dist.group.WORLD, dev, slot_bytes, num_slots)
    warm = torch.zeros(ALIGN, dtype=torch.uint8, device=dev)
    # compile + load the kernels (seconds) before anyone times them: the put to self has
    # offset 0 (a 32-bit argument), a put to a mapped peer a large delta (64-bit), a distinct
    # Triton specialisation; no connection exists yet, so writing my slot 0 on a peer is safe
    for peer in dict.fromkeys([rank] + [d for d, delta in enumerate(fabric.delta)
                                        if delta is not None]):
        fabric.put(peer, 0, warm)
    if None in fabric.delta:  # some peer is written by NVSHMEM's put: its module too
        fabric.put(rank, 0, warm, nvshmem=True)
    torch.cuda.synchronize(dev)  # start-up only, never on a serving loop
    dist.barrier()
    _FABRIC = fabric
    return fabric


def need_fabric() -> Fabric:
    fabric = current_fabric()
    if fabric is None:
        raise TransportError("nvshmem:// needs a fabric: call join_fabric() (or "
                             "open_host_fabric()) in this process first")
    return fabric
