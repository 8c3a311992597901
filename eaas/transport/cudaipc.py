"""cudaipc:///path/to.sock — same-host GPU transport: CUDA tensors travel as CUDA IPC handles.

Control bytes (msgpack headers, CPU tensors inline exactly as on tcp://) go over a unix socket.
CUDA tensors never touch the socket and are never pickled: each connection end owns a pool of
device *slots* (one `torch.empty(uint8)` per slot, exported once with torch's CUDA IPC
`_share_cuda_`, opened once by the receiver with `_new_shared_cuda`) plus one inter-process
CUDA event per slot. Sending a message copies its CUDA tensors (grouped per device) into a free
slot on that device on the sender's current stream and records the slot's event; the header
names the slot, dtype/shape/offset of each tensor. A process started later (a restarted or
newly added expert server) just connects: nothing is fixed at start-up, unlike NVSHMEM.

Send handles complete once the header is written: the copy into the slot is already enqueued
on the sender's current stream, so later work on that stream may reuse the sent tensors.

Credits (eaas.transport.slots, as on shm://): a slot is busy from the send until the receiver's
RELEASE frame for it; the sender never writes into a busy slot. With no free slot and the
per-device pool (`limits.shm_pool_bytes`) used up, sends queue in order until a release arrives.

Receiving (never blocks the event loop; no `torch.cuda.synchronize()`):
- the receiver's current stream on the slot's device waits on the slot's IPC event;
- `recv()` copies each CUDA tensor out of the slot into a fresh tensor on the SAME device index
  it was sent from (stream-ordered, so the caller may use it at once on that stream), records
  an event and releases the slot when a poll sees that event complete;
- `recv_lease()` is zero-copy: the tensors ALIAS the slot until `lease.release()` (same hazard
  as shm://: values change after release once the sender reuses the slot).

Both processes must see the same devices (same CUDA_VISIBLE_DEVICES) and share a host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from eaas.errors import FrameError
from eaas.transport.base import Handler, Lease, SendHandle
from eaas.transport.codec import (DTYPES, KIND_MESSAGE, MAGIC, PREFIX, EncodedMessage,
                                  build_tensors, check_frame_size, flatten, unflatten)
from eaas.transport.limits import TransportLimits
from eaas.transport.slots import KIND_RELEASE, SlotConnection
from eaas.transport.unix import UnixListener, unix_connect, unix_listen

if TYPE_CHECKING:
    from eaas.transport.auth import TransportSecurity

__all__ = ["CudaIpcConnection", "cudaipc_connect", "cudaipc_listen"]

ALIGN = 256
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class _All:
    """Several CUDA events as one (a read may span slots of several devices)."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events

    def query(self) -> bool:
        return all(e.query() for e in self.events)

    def synchronize(self) -> None:
        for e in self.events:
            e.synchronize()

    @property
    def device(self) -> Any:
        return getattr(self.events[0], "device", None)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(slots=True)
class _Slot:
    """One exported device buffer (sender side) or its opened mapping (receiver side)."""

    slot_id: int
    device: int
    size: int
    flat: torch.Tensor | None  # [size] uint8 on cuda:device
    event: Any  # torch.cuda.Event(interprocess=True)
    spec: list[Any] = field(default_factory=list)  # what the receiver needs to open it


@dataclass(slots=True)
class _Outgoing:
    tree: bytes
    cpu: EncodedMessage  # CPU tensors (inline body)
    entries: list[tuple[torch.Tensor, int, list[Any]]]  # in message order: (tensor, device, desc)
    sizes: dict[int, int]  # device -> bytes needed in its slot


def _flatten(msg: Any, limits: TransportLimits) -> _Outgoing:
    """Pack `msg`: CPU tensors as codec does (inline body), CUDA tensors as CUDA references."""
    cpu = flatten(msg, limits, keep_cuda=True)
    entries: list[tuple[torch.Tensor, int, list[Any]]] = []
    sizes: dict[int, int] = {}
    for t in cpu.cuda:
        dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
        offset = sizes.get(dev, 0)
        entries.append((t, dev, [_DTYPE_NAMES[t.dtype], list(t.shape), offset]))
        sizes[dev] = _align(offset + t.numel() * t.element_size())
    return _Outgoing(cpu.tree, cpu, entries, sizes)


class CudaIpcConnection(SlotConnection[_Slot]):
    """A StreamConnection on a unix socket whose CUDA tensors go through exported device slots.

    One slot pool per device (the pool key is the device index).
    """

    SLOT_NAME = "a device slot"

    def __init__(self, url: str, limits: TransportLimits, on_made: Any = None) -> None:
        super().__init__(url, limits, on_made)
        self._releasing: list[tuple[Any, list[int]]] = []  # (event, slot ids) awaiting the GPU

    # ---- sending ----------------------------------------------------------------------
    def send_start(self, msg: Any) -> SendHandle:
        self._check_open()
        out = _flatten(msg, self.limits)
        for dev, size in out.sizes.items():
            if size > self.limits.shm_pool_bytes:
                raise ValueError(f"message's CUDA tensors on cuda:{dev} total {size} bytes > "
                                 f"shm_pool_bytes={self.limits.shm_pool_bytes}")
        check_frame_size(len(out.cpu.header()) + 256 * len(out.sizes), out.cpu.body_bytes,
                         self.limits)
        return self._send_or_queue(out)

    def _try_send(self, out: _Outgoing) -> SendHandle | None:
        taken: list[_Slot] = []
        for dev, size in out.sizes.items():
            slot = self._acquire(dev, size)
            if slot is None:
                self._free.extend(s.slot_id for s in taken)
                return None
            taken.append(slot)
        index = {slot.device: slot for slot in taken}
        for t, dev, (_, _, offset) in out.entries:
            nbytes = t.numel() * t.element_size()
            flat = index[dev].flat
            assert flat is not None
            if nbytes:
                with torch.cuda.device(dev):
                    flat[offset:offset + nbytes].view(t.dtype).view(t.shape).copy_(t)
        for slot in taken:  # the receiver's stream waits on this before reading
            slot.event.record(torch.cuda.current_stream(slot.device))
        cuda_descs = [[*desc, index[dev].slot_id] for _, dev, desc in out.entries]
        slot_specs = [slot.spec for slot in taken]
        header = out.cpu.header(KIND_MESSAGE, c=cuda_descs, s=slot_specs)
        parts = [PREFIX.pack(MAGIC, len(header), out.cpu.body_bytes) + header]
        parts += out.cpu.frame_parts(self.limits)[1:]
        return self._write_parts(parts)

    def _create(self, device: int, size: int) -> _Slot:
        flat = torch.empty(size, dtype=torch.uint8, device=f"cuda:{device}")  # [size]
        event = torch.cuda.Event(interprocess=True)  # timing off: required for IPC
        with torch.cuda.device(device):
            event.record(torch.cuda.current_stream(device))  # an IPC handle needs a record
            share = flat.untyped_storage()._share_cuda_()
            event_handle = bytes(event.ipc_handle())
        slot_id = next(self._slot_ids)
        # share: (device, handle, size, offset, ref_handle, ref_offset, event_handle, sync)
        spec = [slot_id, int(share[0]), bytes(share[1]), int(share[2]), int(share[3]),
                bytes(share[4]), int(share[5]), bytes(share[6] or b""), bool(share[7]),
                event_handle, size]
        return _Slot(slot_id, device, size, flat, event, spec)

    def _destroy(self, slot: _Slot) -> None:
        slot.flat = None

    # ---- receiving --------------------------------------------------------------------
    def _released_ids(self, released: Any) -> list[Any]:
        if not isinstance(released, list):  # "r": [slot ids]
            raise FrameError(f"malformed release {released!r}")
        return released

    def _detach(self, slot: _Slot) -> None:
        slot.flat = None

    def _on_message(self, head: dict[str, Any], body: bytearray | torch.Tensor) -> Any:
        cpu = build_tensors(head["t"], body, self.limits)
        descs, specs = head.get("c", []), head.get("s", [])
        if not isinstance(descs, list) or not isinstance(specs, list):
            raise FrameError("malformed cudaipc header: 'c' and 's' must be arrays")
        slots = {}
        for spec in specs:
            slot = self._attach(spec)
            slots[slot.slot_id] = slot
        views = [self._view(desc, slots) for desc in descs]
        unflatten(head["m"], cpu, self.limits, cuda=views)  # validate now; rebuilt at recv
        return _IpcItem(head["m"], cpu, views, list(slots.values()))

    def _attach(self, spec: Any) -> _Slot:
        try:
            (slot_id, device, handle, size, offset, ref_handle, ref_offset, share_event,
             share_sync, event_handle, slot_size) = spec
            if not (isinstance(slot_id, int) and isinstance(device, int) and 0 <= device
                    and isinstance(handle, bytes) and isinstance(ref_handle, bytes)
                    and isinstance(event_handle, bytes) and isinstance(share_event, bytes)
                    and isinstance(share_sync, bool) and isinstance(size, int)
                    and isinstance(offset, int) and isinstance(ref_offset, int)
                    and isinstance(slot_size, int)
                    and 0 < slot_size <= min(size, self.limits.shm_pool_bytes)):
                raise ValueError
        except (ValueError, TypeError):
            raise FrameError(f"malformed cudaipc slot reference {spec!r}"[:200]) from None
        slot = self._attached.get(slot_id)
        if slot is not None:
            if slot.spec != spec:
                raise FrameError(f"slot {slot_id} reused with a new handle without a DROP")
            return slot
        if not torch.cuda.is_available() or device >= torch.cuda.device_count():
            raise FrameError(f"peer sent a CUDA tensor on cuda:{device}, which this process "
                             "cannot see (same host and CUDA_VISIBLE_DEVICES needed)")
        torch.cuda._lazy_init()
        storage = torch.UntypedStorage._new_shared_cuda(
            device, handle, size, offset, ref_handle, ref_offset, share_event or None, share_sync)
        flat = torch.empty(0, dtype=torch.uint8, device=f"cuda:{device}").set_(
            storage, 0, (slot_size,), (1,))  # [slot_size]
        event = torch.cuda.Event.from_ipc_handle(device, event_handle)
        slot = _Slot(slot_id, device, slot_size, flat, event, list(spec))
        self._attached[slot_id] = slot
        return slot

    def _view(self, desc: Any, slots: dict[int, _Slot]) -> torch.Tensor:
        try:
            name, shape, offset, slot_id = desc
            dtype = DTYPES[name]
            slot = slots[slot_id]
            if (not isinstance(shape, list) or len(shape) > self.limits.max_ndim
                    or not all(isinstance(d, int) and d >= 0 for d in shape)
                    or not isinstance(offset, int) or offset < 0 or offset % dtype.itemsize):
                raise ValueError
        except (ValueError, TypeError, KeyError):
            raise FrameError(f"malformed CUDA tensor descriptor {desc!r}") from None
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        if offset + nbytes > slot.size:
            raise FrameError(f"CUDA tensor {desc!r} does not fit slot {slot_id} of {slot.size} B")
        assert slot.flat is not None
        return slot.flat[offset:offset + nbytes].view(dtype).view(shape)

    def _wait_slots(self, item: _IpcItem) -> None:
        for slot in item.slots:  # the sender's copies into the slot come first
            torch.cuda.current_stream(slot.device).wait_event(slot.event)

    def _release_later(self, item: _IpcItem) -> None:
        """Send RELEASE for the item's slots once this process's reads of them are done."""
        events = []
        for slot in item.slots:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(slot.device))
            events.append(event)
        self._releasing.append((events, [s.slot_id for s in item.slots]))
        self._schedule_poll()

    def _schedule_poll(self) -> None:
        """Have the oldest read's events wake us when done; `_poll_releases` takes the rest."""
        if self._releasing:
            self._after_gpu(_All(self._releasing[0][0]), self._poll_releases)

    def _poll_releases(self) -> None:
        still = []
        done: list[int] = []
        for events, ids in self._releasing:
            if all(e.query() for e in events):
                done.extend(ids)
            else:
                still.append((events, ids))
        self._releasing = still
        if done:
            self._send_control(KIND_RELEASE, r=done)
        self._schedule_poll()

    async def recv(self, timeout: float | None = None) -> Any:
        item = await self._inbox.get(timeout)
        if not isinstance(item, _IpcItem):
            return item
        self._wait_slots(item)
        owned = [v.clone() for v in item.views]  # stream-ordered copies out of the slots
        msg = unflatten(item.tree, item.cpu, self.limits, cuda=owned)
        self._release_later(item)
        return msg

    async def recv_lease(self, timeout: float | None = None) -> Lease:
        item = await self._inbox.get(timeout)
        if not isinstance(item, _IpcItem):
            return Lease(item)
        self._wait_slots(item)
        msg = unflatten(item.tree, item.cpu, self.limits, cuda=item.views)
        return Lease(msg, lambda: self._release_later(item))

    # ---- teardown ---------------------------------------------------------------------
    def _on_closed(self) -> None:
        self._releasing.clear()
        # Our own slots: torch's IPC ref counting keeps their memory out of reuse until the
        # peer has dropped its mapping, so the plain dropping in super() is safe here.
        super()._on_closed()  # fails queued sends, detaches the peer's slots


@dataclass(slots=True)
class _IpcItem:
    tree: bytes
    cpu: list[torch.Tensor]
    views: list[torch.Tensor]
    slots: list[_Slot]


async def cudaipc_listen(url: str, handler: Handler, limits: TransportLimits,
                         security: TransportSecurity | None = None) -> UnixListener:
    return await unix_listen(url, handler, limits, scheme="cudaipc",
                             conn_class=CudaIpcConnection, stem="eaas-ipc", security=security)


async def cudaipc_connect(url: str, timeout: float, limits: TransportLimits,
                          security: TransportSecurity | None = None) -> CudaIpcConnection:
    conn = await unix_connect(url, timeout, limits, scheme="cudaipc", conn_class=CudaIpcConnection,
                              security=security)
    assert isinstance(conn, CudaIpcConnection)
    return conn
