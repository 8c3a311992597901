"""shm:///path/to.sock — same-host transport: tensor bytes in shared memory, headers on a socket.

Each connection end owns a pool of shared-memory *slots* for the messages it sends (files in
/dev/shm, mapped by both processes; the receiver unlinks the name as soon as it has mapped it,
so a crash leaks nothing once a slot was used). Sending a message whose tensors total at least
`limits.shm_min_bytes` copies them into a free slot (one memcpy) and writes only the header,
naming the slot, on the unix socket; smaller messages travel inline as on tcp://.

Credits (pool logic in eaas.transport.slots, shared with cudaipc://): a slot is busy from the
send until the receiver sends back a RELEASE frame for it; the sender never writes into a busy
slot. When no slot is free and the pool (`limits.shm_pool_bytes`) is full, sends queue in order
(their handles complete later) until a release arrives. Free slots are evicted (a DROP frame
tells the receiver to unmap) when a larger one is needed.

Receiving:
- `recv()` copies the tensors out of the slot and releases it at once: received tensors own
  their memory (like tcp://).
- `recv_lease()` is zero-copy: the tensors in `lease.msg` ALIAS the slot. ALIASING HAZARD: after
  `lease.release()` (or leaving `with lease:`) the sender may overwrite the slot with a later
  message, so any tensor (or view of one) still held silently changes its values. Copy what you
  keep before releasing; hold leases briefly, since a held slot stalls the sender once its
  pool is used up. Releasing is idempotent; a lease never released pins its slot until the
  connection closes.

Credits are returned by the receiver's `recv`/`release`, not by its socket reader: two peers
that each await a send while neither receives can stall once both pools are full (tcp:// has
the same hazard once socket buffers and inboxes fill). RpcClient/serve_rpc always keep
reading, so RPC traffic never stalls this way.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from eaas.errors import FrameError
from eaas.transport.base import Handler, Lease, SendHandle
from eaas.transport.codec import (KIND_MESSAGE, MAGIC, PREFIX, EncodedMessage, build_tensors,
                                  check_frame_size, clone_tensor, copy_bytes, flatten, unflatten)
from eaas.transport.limits import TransportLimits
from eaas.transport.slots import KIND_RELEASE, SlotConnection
from eaas.transport.unix import UnixListener, unix_connect, unix_listen

if TYPE_CHECKING:
    from eaas.transport.auth import TransportSecurity

__all__ = ["ShmConnection", "shm_connect", "shm_listen", "remove_stale_segments"]

SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
_NAME_RE = re.compile(r"^eaas-[0-9a-f]+-[0-9a-f]+-[0-9a-f]+$")
_POOL = None  # pool key: one pool per connection end


@dataclass(slots=True)
class _Slot:
    slot_id: int
    name: str
    size: int
    mm: mmap.mmap | None
    flat: torch.Tensor | None  # [size] uint8 over mm

    def unmap(self) -> None:
        self.flat = None
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # a zero-copy tensor still views it; freed when that dies
                pass
            self.mm = None


def _map(fd: int, size: int) -> _Slot:
    mm = mmap.mmap(fd, size)
    return _Slot(-1, "", size, mm, torch.frombuffer(mm, dtype=torch.uint8))


class ShmConnection(SlotConnection[_Slot]):
    """A StreamConnection on a unix socket whose large tensor bodies go through shared memory."""

    SLOT_NAME = "a shared-memory slot"

    def __init__(self, url: str, limits: TransportLimits, on_made: Any = None) -> None:
        super().__init__(url, limits, on_made)
        self._tag = f"{os.getpid():x}-{secrets.token_hex(4)}"
        self._attached_bytes = 0

    # ---- sending ----------------------------------------------------------------------
    def send_start(self, msg: Any) -> SendHandle:
        self._check_open()
        enc = flatten(msg, self.limits)
        if enc.body_bytes > self.limits.shm_pool_bytes:
            raise ValueError(f"message tensors total {enc.body_bytes} bytes > shm_pool_bytes="
                             f"{self.limits.shm_pool_bytes}")
        check_frame_size(len(enc.header()), enc.body_bytes, self.limits)
        return self._send_or_queue(enc)

    def _try_send(self, enc: EncodedMessage) -> SendHandle | None:
        if enc.body_bytes < self.limits.shm_min_bytes:
            return self._write_parts(enc.frame_parts(self.limits))
        slot = self._acquire(_POOL, enc.body_bytes)
        if slot is None:
            return None
        assert slot.flat is not None
        for flat, (_, _, offset) in zip(enc.tensors, enc.descs):
            if flat.numel():
                copy_bytes(slot.flat[offset:offset + flat.numel()], flat)
        header = enc.header(KIND_MESSAGE, s=[slot.slot_id, slot.name, slot.size])
        return self._write_parts([PREFIX.pack(MAGIC, len(header), 0) + header])

    def _create(self, key: None, size: int) -> _Slot:
        slot_id = next(self._slot_ids)
        name = f"eaas-{self._tag}-{slot_id:x}"
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            slot = _map(fd, size)
        finally:
            os.close(fd)
        slot.slot_id, slot.name = slot_id, name
        return slot

    def _destroy(self, slot: _Slot) -> None:
        slot.unmap()
        _unlink(slot.name)

    # ---- receiving --------------------------------------------------------------------
    def _released_ids(self, released: Any) -> list[Any]:
        return [released]  # "r": one slot id per RELEASE frame

    def _detach(self, slot: _Slot) -> None:
        self._attached_bytes -= slot.size
        slot.unmap()

    def _on_message(self, head: dict[str, Any], body: bytearray | torch.Tensor) -> Any:
        if "s" not in head:
            return super()._on_message(head, body)  # inline body, as on tcp://
        slot = self._attach(head["s"])
        views = build_tensors(head["t"], slot.flat, self.limits)
        extent = max(((v.storage_offset() + v.numel()) * v.element_size() for v in views),
                     default=0)
        if extent > self.limits.max_frame_bytes:
            raise FrameError(f"shm message of {extent} bytes > max_frame_bytes="
                             f"{self.limits.max_frame_bytes}")
        unflatten(head["m"], views, self.limits)  # validate now; rebuilt at recv
        return _ShmItem(head, slot.slot_id, views)

    def _attach(self, spec: Any) -> _Slot:
        try:
            slot_id, name, size = spec
            if not (isinstance(slot_id, int) and isinstance(size, int) and isinstance(name, str)
                    and _NAME_RE.match(name) and 0 < size <= self.limits.shm_pool_bytes):
                raise ValueError
        except (ValueError, TypeError):
            raise FrameError(f"malformed shm slot reference {spec!r}") from None
        slot = self._attached.get(slot_id)
        if slot is not None and slot.name == name:
            return slot
        if slot is not None:
            raise FrameError(f"slot {slot_id} reused under a new name without a DROP")
        if self._attached_bytes + size > self.limits.shm_pool_bytes:
            raise FrameError(f"peer maps more than shm_pool_bytes={self.limits.shm_pool_bytes}")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise FrameError(f"cannot open shm slot {name}: {exc}") from None
        try:
            if os.fstat(fd).st_size < size:
                raise FrameError(f"shm slot {name} is smaller than the announced {size} bytes")
            slot = _map(fd, size)
        finally:
            os.close(fd)
        _unlink(name)  # both ends have it mapped; the name is no longer needed
        slot.slot_id, slot.name = slot_id, name
        self._attached[slot_id] = slot
        self._attached_bytes += size
        return slot

    async def recv(self, timeout: float | None = None) -> Any:
        item = await self._inbox.get(timeout)
        if not isinstance(item, _ShmItem):
            return item
        try:
            return unflatten(item.head["m"], [clone_tensor(v) for v in item.views], self.limits)
        finally:
            item.views = []
            self._send_control(KIND_RELEASE, r=item.slot_id)

    async def recv_lease(self, timeout: float | None = None) -> Lease:
        item = await self._inbox.get(timeout)
        if not isinstance(item, _ShmItem):
            return Lease(item)
        msg = unflatten(item.head["m"], item.views, self.limits)
        item.views = []
        return Lease(msg, lambda: self._send_control(KIND_RELEASE, r=item.slot_id))

    # ---- teardown ---------------------------------------------------------------------
    def _on_closed(self) -> None:
        busy = set(self._slots) - set(self._free)
        for slot_id, slot in self._slots.items():
            slot.unmap()
            # After our own clean close the peer may still read in-flight messages: it
            # unlinks those slots' names when it maps them. Otherwise nobody will map them.
            if not (self._local_close and slot_id in busy):
                _unlink(slot.name)
        super()._on_closed()  # fails queued sends, unmaps the peer's slots


@dataclass(slots=True)
class _ShmItem:
    head: dict[str, Any]
    slot_id: int
    views: list[torch.Tensor]


def remove_stale_segments() -> list[str]:
    """Unlink shared-memory slot names left by eaas processes that no longer exist.

    A name is normally unlinked as soon as the receiver maps it, so only a sender killed with a
    message still in flight leaves one behind. Names carry the creator's pid; this removes the
    names whose pid is not a live process *in this pid namespace* (do not run it where another
    container shares /dev/shm). Returns the names removed. Never called implicitly.
    """
    removed = []
    for name in os.listdir(SHM_DIR):
        if not _NAME_RE.match(name):
            continue
        pid = int(name.split("-")[1], 16)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _unlink(name)
            removed.append(name)
        except PermissionError:
            pass  # alive, owned by someone else
    return removed


def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


async def shm_listen(url: str, handler: Handler, limits: TransportLimits,
                     security: TransportSecurity | None = None) -> UnixListener:
    return await unix_listen(url, handler, limits, scheme="shm", conn_class=ShmConnection,
                             stem="eaas", security=security)


async def shm_connect(url: str, timeout: float, limits: TransportLimits,
                      security: TransportSecurity | None = None) -> ShmConnection:
    conn = await unix_connect(url, timeout, limits, scheme="shm", conn_class=ShmConnection,
                              security=security)
    assert isinstance(conn, ShmConnection)
    return conn
