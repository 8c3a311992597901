"""shm:///path/to.sock — same-host transport: tensor bytes in shared memory, headers on a socket.

Each connection end owns a pool of shared-memory *slots* for the messages it sends (files in
/dev/shm, mapped by both processes; the receiver unlinks the name as soon as it has mapped it,
so a crash leaks nothing once a slot was used). Sending a message whose tensors total at least
`limits.shm_min_bytes` copies them into a free slot (one memcpy) and writes only the header,
naming the slot, on the unix socket; smaller messages travel inline as on tcp://.

Credits: a slot is busy from the send until the receiver sends back a RELEASE frame for it;
the sender never writes into a busy slot. When no slot is free and the pool
(`limits.shm_pool_bytes`) is full, sends queue in order (their handles complete later) until a
release arrives. Free slots are evicted (a DROP frame tells the receiver to unmap) when a larger
one is needed.

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

import asyncio
import collections
import itertools
import mmap
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import torch

from eaas.errors import FrameError, TransportError
from eaas.transport.base import Handler, Lease, SendHandle
from eaas.transport.codec import (KIND_MESSAGE, MAGIC, PREFIX, EncodedMessage,
                                  build_tensors, check_frame_size, clone_tensor, copy_bytes,
                                  flatten, unflatten)
from eaas.transport.limits import TransportLimits
from eaas.transport.stream import _NOTHING, StreamConnection, StreamListener

__all__ = ["ShmConnection", "shm_connect", "shm_listen", "remove_stale_segments"]

KIND_RELEASE = 1  # receiver -> sender: "r": slot id is free again
KIND_DROP = 2  # sender -> receiver: "d": slot id is evicted, unmap it
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
_NAME_RE = re.compile(r"^eaas-[0-9a-f]+-[0-9a-f]+-[0-9a-f]+$")
_MIN_SLOT = 1 << 20
_COUNTER = itertools.count()


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


class ShmConnection(StreamConnection):
    """A StreamConnection on a unix socket whose large tensor bodies go through shared memory."""

    def __init__(self, url: str, limits: TransportLimits, on_made: Any = None) -> None:
        super().__init__(url, limits, on_made)
        self._tag = f"{os.getpid():x}-{secrets.token_hex(4)}"
        self._slot_ids = itertools.count()
        self._slots: dict[int, _Slot] = {}  # mine (sending side)
        self._free: list[int] = []
        self._pool_bytes = 0
        self._pending: collections.deque[tuple[EncodedMessage, asyncio.Future[None]]] = (
            collections.deque())
        self._attached: dict[int, _Slot] = {}  # the peer's (receiving side)
        self._attached_bytes = 0

    # ---- sending ----------------------------------------------------------------------
    def send_start(self, msg: Any) -> SendHandle:
        self._check_open()
        enc = flatten(msg, self.limits)
        if enc.body_bytes > self.limits.shm_pool_bytes:
            raise ValueError(f"message tensors total {enc.body_bytes} bytes > shm_pool_bytes="
                             f"{self.limits.shm_pool_bytes}")
        check_frame_size(len(enc.header()), enc.body_bytes, self.limits)
        if not self._pending:
            handle = self._try_send(enc)
            if handle is not None:
                return handle
        future = asyncio.get_running_loop().create_future()
        self._pending.append((enc, future))
        return SendHandle(future)

    def _try_send(self, enc: EncodedMessage) -> SendHandle | None:
        if enc.body_bytes < self.limits.shm_min_bytes:
            return self._write_parts(enc.frame_parts(self.limits))
        slot = self._acquire(enc.body_bytes)
        if slot is None:
            return None
        assert slot.flat is not None
        for flat, (_, _, offset) in zip(enc.tensors, enc.descs):
            if flat.numel():
                copy_bytes(slot.flat[offset:offset + flat.numel()], flat)
        header = enc.header(KIND_MESSAGE, s=[slot.slot_id, slot.name, slot.size])
        return self._write_parts([PREFIX.pack(MAGIC, len(header), 0) + header])

    def _acquire(self, nbytes: int) -> _Slot | None:
        fits = [i for i in self._free if self._slots[i].size >= nbytes]
        if fits:
            best = min(fits, key=lambda i: self._slots[i].size)
            self._free.remove(best)
            return self._slots[best]
        size = max(_MIN_SLOT, 1 << (nbytes - 1).bit_length())
        size = min(size, max(nbytes, self.limits.shm_pool_bytes - self._pool_bytes))
        while self._pool_bytes + size > self.limits.shm_pool_bytes and self._free:
            self._evict(max(self._free, key=lambda i: self._slots[i].size))
        if self._pool_bytes + size > self.limits.shm_pool_bytes:
            return None
        return self._create(size)

    def _create(self, size: int) -> _Slot:
        slot_id = next(self._slot_ids)
        name = f"eaas-{self._tag}-{slot_id:x}"
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            slot = _map(fd, size)
        finally:
            os.close(fd)
        slot.slot_id, slot.name = slot_id, name
        self._slots[slot_id] = slot
        self._pool_bytes += size
        return slot

    def _evict(self, slot_id: int) -> None:
        self._free.remove(slot_id)
        slot = self._slots.pop(slot_id)
        self._pool_bytes -= slot.size
        slot.unmap()
        _unlink(slot.name)
        self._send_control(KIND_DROP, d=slot_id)

    def _send_control(self, kind: int, **extra: Any) -> None:
        if self._closed or self._transport is None or self._transport.is_closing():
            return
        header = EncodedMessage(tree=b"\xc0").header(kind, **extra)
        self._write_parts([PREFIX.pack(MAGIC, len(header), 0) + header])

    def _flush_pending(self) -> None:
        while self._pending and not self._closed:
            enc, future = self._pending[0]
            handle = self._try_send(enc)
            if handle is None:
                return
            self._pending.popleft()
            if not future.done():
                if handle.done():
                    future.set_result(None)
                else:
                    self._drain_waiters.append(future)

    # ---- receiving --------------------------------------------------------------------
    def _on_frame(self, head: dict[str, Any], body: bytearray | torch.Tensor) -> Any:
        kind = head["k"]
        if kind == KIND_RELEASE:
            slot_id = head.get("r")
            if slot_id not in self._slots or slot_id in self._free:
                raise FrameError(f"release of slot {slot_id!r} that is not in use")
            self._free.append(slot_id)
            self._flush_pending()
            return _NOTHING
        if kind == KIND_DROP:
            slot = self._attached.pop(head.get("d"), None)  # type: ignore[arg-type]
            if slot is not None:
                self._attached_bytes -= slot.size
                slot.unmap()
            return _NOTHING
        if kind != KIND_MESSAGE:
            raise FrameError(f"unexpected frame kind {kind!r}")
        if "s" not in head:
            return super()._on_frame(head, body)
        slot = self._attach(head["s"])
        views = build_tensors(head["t"], slot.flat, self.limits)
        extent = max(((v.storage_offset() + v.numel()) * v.element_size() for v in views), default=0)
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
        pending, self._pending = self._pending, collections.deque()
        for _, future in pending:
            if not future.done():
                future.set_exception(TransportError(f"connection to {self.url} closed before "
                                                    "a shared-memory slot was free"))
        busy = set(self._slots) - set(self._free)
        for slot_id, slot in self._slots.items():
            slot.unmap()
            # After our own clean close the peer may still read in-flight messages: it
            # unlinks those slots' names when it maps them. Otherwise nobody will map them.
            if not (self._local_close and slot_id in busy):
                _unlink(slot.name)
        for slot in self._attached.values():
            slot.unmap()
        self._slots.clear()
        self._attached.clear()
        self._free.clear()


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


def _path(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "shm" or parts.netloc:
        raise ValueError(f"bad shm URL {url!r}: expected shm:///absolute/socket/path "
                         "(or shm:// to listen on a fresh path)")
    return parts.path


class ShmListener(StreamListener):
    """StreamListener on a unix socket; removes the socket file on close."""

    async def aclose(self) -> None:
        await super().aclose()
        try:
            os.unlink(_path(self.url))
        except FileNotFoundError:
            pass


async def shm_listen(url: str, handler: Handler, limits: TransportLimits) -> ShmListener:
    path = _path(url) or os.path.join(
        tempfile.gettempdir(), f"eaas-{os.getpid():x}-{next(_COUNTER)}-{secrets.token_hex(3)}.sock")
    listener = ShmListener(handler, limits, conn_class=ShmConnection)
    listener.url = f"shm://{path}"
    try:
        listener._server = await asyncio.get_running_loop().create_unix_server(
            lambda: listener.protocol_factory(f"{listener.url} (accepted)"), path)
    except OSError as exc:
        raise TransportError(f"cannot listen on {url}: {exc}") from exc
    return listener


async def shm_connect(url: str, timeout: float, limits: TransportLimits) -> ShmConnection:
    path = _path(url)
    try:
        async with asyncio.timeout(timeout):
            _, conn = await asyncio.get_running_loop().create_unix_connection(
                lambda: ShmConnection(url, limits), path)
    except TimeoutError:
        raise TransportError(f"connect to {url} timed out after {timeout} s") from None
    except OSError as exc:
        raise TransportError(f"cannot connect to {url}: {exc}") from exc
    return conn
