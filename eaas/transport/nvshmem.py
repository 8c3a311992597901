"""nvshmem://RANK/socket/path — tensors move by GPU-initiated NVSHMEM puts into the receiver.

A *fabric* (`eaas.transport.fabric`) is one NVSHMEM job: W processes, one GPU each, whose
symmetric heaps hold S slots of `slot_bytes` per source rank, written only by that rank.

A connection is a unix socket (headers, CPU tensors inline exactly as on tcp://) between two
ranks of one fabric. Sending a message whose tensors live on the fabric's device:

    1. take a run of k consecutive free slots of the pair (me -> peer) in the peer's heap row
       `me` (host-side credits: no GPU kernel ever waits, so a dead peer hangs nothing);
    2. enqueue one put kernel per tensor on the current stream: each CTA issues
       `nvshmemx_putmem_block` of its share straight into the peer's GPU memory, then `quiet`;
    3. when a CUDA event after the puts completes (polled, never synchronised), write the header
       naming slot and offset of each tensor; the send handle completes then.

The receiver reads the rows in place (zero-copy `recv_lease`) or clones them out (`recv`) on
its current stream, and sends RELEASE once those reads are done (polled event); the slots are
the sender's again. Tensors arrive on the RECEIVER's fabric device. Headers go after the data
has landed, so a sender that dies mid-put leaves a half-written slot nobody reads.

Flow control: each connection end holds at most `num_slots // 2` slots of its pair at once (so
the two ends of a self connection, which share a pair, cannot starve each other); sends beyond
that queue in order. A message needs its fabric tensors to fit that window.

NVSHMEM cannot admit a process after start-up: a restarted or newly added server connects over
cudaipc:// instead. `HostFabric` runs the same protocol on host memory in one process.

Hazard (as with cudaipc://): closing a connection returns the slots of its unreleased messages
to the pair; a zero-copy lease still held past the close may then see them overwritten.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import torch

from eaas.errors import FrameError, TransportError
from eaas.transport.base import Handler, Lease, SendHandle
from eaas.transport.codec import (DTYPES, KIND_MESSAGE, MAGIC, PREFIX, EncodedMessage,
                                  build_tensors, check_frame_size, flatten, unflatten)
from eaas.transport.fabric import ALIGN, Fabric, align, need_fabric
from eaas.transport.limits import TransportLimits
from eaas.transport.slots import KIND_RELEASE
from eaas.transport.stream import _NOTHING, StreamConnection
from eaas.transport.unix import UnixListener, unix_connect, unix_listen

if TYPE_CHECKING:
    from eaas.transport.auth import TransportSecurity

__all__ = ["NvshmemConnection", "nvshmem_listen", "nvshmem_connect"]

KIND_HELLO = 3  # both ends, first frame: "h": [rank, fabric id]
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class NvshmemConnection(StreamConnection):
    """A StreamConnection whose fabric tensors go through slots in the peer's heap."""

    def __init__(self, url: str, limits: TransportLimits, on_made: Any = None, *,
                 fabric: Fabric, peer_rank: int | None = None) -> None:
        super().__init__(url, limits, on_made)
        self.fabric = fabric
        self.peer_rank = peer_rank  # learnt from the peer's HELLO on the accepting side
        self._held: dict[int, int] = {}  # first slot -> count, sent and not yet released
        self._pending: collections.deque[tuple[Any, asyncio.Future[None]]] = (
            collections.deque())
        self._in_flight: collections.deque[tuple[Any, list[Any], asyncio.Future[None]]] = (
            collections.deque())  # (put event, header parts, handle future) in send order
        self._releasing: list[tuple[Any, int, int]] = []  # (read event, first, count)
        self._key = id(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._send_control(KIND_HELLO, h=[self.fabric.rank, self.fabric.fabric_id])

    # ---- sending ----------------------------------------------------------------------
    def send_start(self, msg: Any) -> SendHandle:
        self._check_open()
        out = flatten(msg, self.limits, keep_cuda=self.fabric.carries)
        nbytes = 0
        for t in out.cuda:
            nbytes = align(nbytes + t.numel() * t.element_size())
        slots = -(-nbytes // self.fabric.slot_bytes)
        if slots > self.fabric.window:
            raise ValueError(f"message's fabric tensors total {nbytes} bytes > the nvshmem:// "
                             f"window of {self.fabric.window} slots x {self.fabric.slot_bytes} B")
        check_frame_size(len(out.header()) + 32 * len(out.cuda) + 64, out.body_bytes, self.limits)
        if not self._pending:
            handle = self._try_send(out, slots)
            if handle is not None:
                return handle
        future = asyncio.get_running_loop().create_future()
        self._pending.append(((out, slots), future))
        return SendHandle(future)

    def _try_send(self, out: EncodedMessage, slots: int,
                  future: asyncio.Future[None] | None = None) -> SendHandle | None:
        """Put `out`'s fabric tensors and queue its header; None if the pair has no room."""
        peer = self.peer_rank
        if peer is None or (slots and sum(self._held.values()) + slots > self.fabric.window):
            return None
        first = 0
        if slots:
            got = self.fabric.acquire(peer, slots)
            if got is None:
                self.fabric.wait(peer, self._key, self._flush_pending)
                return None
            first = got
            self._held[first] = slots
        descs, offset = [], 0
        base = first * self.fabric.slot_bytes
        for t in out.cuda:
            staged = self.fabric.stage(t)
            self.fabric.put(peer, base + offset, staged)
            descs.append([_DTYPE_NAMES[t.dtype], list(t.shape), offset])
            offset = align(offset + t.numel() * t.element_size())
        header = out.header(KIND_MESSAGE, c=descs, s=[first, slots])
        parts = [PREFIX.pack(MAGIC, len(header), out.body_bytes) + header]
        parts += out.frame_parts(self.limits)[1:]
        if not out.cuda and not self._in_flight:
            handle = self._write_parts(parts)
            if future is None:
                return handle
            self._complete(future, handle)
            return SendHandle(future)
        if future is None:
            future = asyncio.get_running_loop().create_future()
        self._in_flight.append((self.fabric.record(), parts, future))
        self._schedule_poll()
        return SendHandle(future)

    def _flush_pending(self) -> None:
        while self._pending and not self._closed:
            (out, slots), future = self._pending[0]
            if self._try_send(out, slots, future) is None:
                return
            self._pending.popleft()

    def _complete(self, future: asyncio.Future[None], handle: SendHandle) -> None:
        """Resolve a queued send's `future` once `handle` (its header write) completes."""
        if future.done():
            return
        if handle.done():
            future.set_result(None)
        else:
            self._drain_waiters.append(future)

    # ---- waiting for CUDA events (never a synchronize on the loop) ---------------------
    def _schedule_poll(self) -> None:
        """Have the oldest pending event (a put, or a read of received slots) wake us when it
        completes; `_on_poll` then takes whatever is done."""
        if self._in_flight:
            self._after_gpu(self._in_flight[0][0], self._on_poll)
        elif self._releasing:
            self._after_gpu(self._releasing[0][0], self._on_poll)

    def _on_poll(self) -> None:
        while self._in_flight and self._in_flight[0][0].query():
            _, parts, future = self._in_flight.popleft()
            self._complete(future, self._write_parts(parts))
        done: list[int] = []
        still = []
        for event, first, count in self._releasing:
            if event.query():
                done += (first, count)
            else:
                still.append((event, first, count))
        self._releasing = still
        if done:
            self._send_control(KIND_RELEASE, r=done)
        self._schedule_poll()

    # ---- receiving --------------------------------------------------------------------
    def _on_frame(self, head: dict[str, Any], body: bytearray | torch.Tensor) -> Any:
        kind = head["k"]
        if kind == KIND_HELLO:
            self._on_hello(head.get("h"))
            return _NOTHING
        if self.peer_rank is None:
            raise FrameError("nvshmem:// peer sent a frame before its HELLO")
        if kind == KIND_RELEASE:
            released = head.get("r")
            if not isinstance(released, list) or len(released) % 2:
                raise FrameError(f"malformed release {released!r}"[:200])
            for first, count in zip(released[::2], released[1::2]):
                if self._held.get(first) != count:
                    raise FrameError(f"release of slots {first!r}+{count!r} not held")
                del self._held[first]
                self.fabric.release(self.peer_rank, first, count)
            self._flush_pending()
            return _NOTHING
        if kind != KIND_MESSAGE:
            raise FrameError(f"unexpected frame kind {kind!r}")
        cpu = build_tensors(head["t"], body, self.limits)
        views, slots = self._views(head.get("c", []), head.get("s"))
        unflatten(head["m"], cpu, self.limits, cuda=views)  # validate now; rebuilt at recv
        return _Item(head["m"], cpu, views, slots)

    def _on_hello(self, hello: Any) -> None:
        if (not isinstance(hello, list) or len(hello) != 2 or not isinstance(hello[0], int)
                or not isinstance(hello[1], str)):
            raise FrameError(f"malformed nvshmem:// HELLO {hello!r}"[:200])
        rank, fabric_id = hello
        if fabric_id != self.fabric.fabric_id:
            raise FrameError("nvshmem:// peer belongs to another fabric (another NVSHMEM job); "
                             "processes started later must use cudaipc://")
        if not 0 <= rank < self.fabric.world_size or (
                self.peer_rank is not None and rank != self.peer_rank):
            raise FrameError(f"nvshmem:// peer says it is rank {rank}, expected "
                             f"{self.peer_rank if self.peer_rank is not None else 'a rank'} of "
                             f"{self.fabric.world_size}")
        self.peer_rank = rank
        self._flush_pending()

    def _views(self, descs: Any, slots: Any) -> tuple[list[torch.Tensor], tuple[int, int]]:
        fab = self.fabric
        if (not isinstance(descs, list) or not isinstance(slots, list) or len(slots) != 2
                or not all(isinstance(v, int) for v in slots)):
            raise FrameError("malformed nvshmem:// header: 'c' and 's' must be arrays")
        first, count = slots
        if not (0 <= first and 0 <= count <= fab.window and first + count <= fab.num_slots):
            raise FrameError(f"nvshmem:// slots {slots!r} out of range")
        views, limit = [], count * fab.slot_bytes
        for desc in descs:
            try:
                name, shape, offset = desc
                dtype = DTYPES[name]
                if (not isinstance(shape, list) or len(shape) > self.limits.max_ndim
                        or not all(isinstance(d, int) and d >= 0 for d in shape)
                        or not isinstance(offset, int) or offset < 0 or offset % ALIGN):
                    raise ValueError
            except (ValueError, TypeError, KeyError):
                raise FrameError(f"malformed fabric tensor descriptor {desc!r}"[:200]) from None
            nbytes = dtype.itemsize
            for d in shape:
                nbytes *= d
            if offset + nbytes > limit:
                raise FrameError(f"fabric tensor {desc!r} does not fit {count} slot(s)")
            flat = fab.view(self.peer_rank, first * fab.slot_bytes + offset, nbytes)
            views.append(flat.view(dtype).view(shape))
        return views, (first, count)

    def _release_later(self, item: _Item) -> None:
        if item.slots[1]:
            self._releasing.append((self.fabric.record(), *item.slots))
            self._schedule_poll()

    async def recv(self, timeout: float | None = None) -> Any:
        item = await self._inbox.get(timeout)
        if not isinstance(item, _Item):
            return item
        owned = [self.fabric.clone(v) for v in item.views]  # stream-ordered copies out
        msg = unflatten(item.tree, item.cpu, self.limits, cuda=owned)
        self._release_later(item)
        return msg

    async def recv_lease(self, timeout: float | None = None) -> Lease:
        item = await self._inbox.get(timeout)
        if not isinstance(item, _Item):
            return Lease(item)
        msg = unflatten(item.tree, item.cpu, self.limits, cuda=item.views)
        return Lease(msg, lambda: None if self._closed else self._release_later(item))

    # ---- teardown ---------------------------------------------------------------------
    def _on_closed(self) -> None:
        pending, self._pending = self._pending, collections.deque()
        in_flight, self._in_flight = self._in_flight, collections.deque()
        for future in [f for _, f in pending] + [f for _, _, f in in_flight]:
            if not future.done():
                future.set_exception(TransportError(f"connection to {self.url} closed before "
                                                    "the message was sent"))
        self._releasing.clear()
        if self.peer_rank is not None:
            self.fabric.unwait(self.peer_rank, self._key)
            held, self._held = self._held, {}
            if not self.fabric.closed:
                for first, count in held.items():
                    self.fabric.release(self.peer_rank, first, count)


class _Item:
    __slots__ = ("tree", "cpu", "views", "slots")

    def __init__(self, tree: bytes, cpu: list[torch.Tensor], views: list[torch.Tensor],
                 slots: tuple[int, int]) -> None:
        self.tree, self.cpu, self.views, self.slots = tree, cpu, views, slots


def _split(url: str) -> tuple[int | None, str]:
    """(rank, socket path) of nvshmem://RANK/path (listening: nvshmem:// or nvshmem:///path)."""
    parts = urlsplit(url)
    if parts.scheme != "nvshmem" or (parts.netloc and not parts.netloc.isdigit()):
        raise ValueError(f"bad nvshmem URL {url!r}: expected nvshmem://RANK/absolute/socket/path "
                         "(or nvshmem:// to listen on a fresh path)")
    return (int(parts.netloc) if parts.netloc else None), parts.path


async def nvshmem_listen(url: str, handler: Handler, limits: TransportLimits,
                         security: TransportSecurity | None = None) -> UnixListener:
    fabric = need_fabric()
    _, path = _split(url)
    listener = await unix_listen(f"nvshmem://{path}", handler, limits, scheme="nvshmem",
                                 conn_class=functools.partial(NvshmemConnection, fabric=fabric),
                                 stem="eaas-nvshmem", security=security)
    listener.url = f"nvshmem://{fabric.rank}{listener.path}"
    return listener


async def nvshmem_connect(url: str, timeout: float, limits: TransportLimits,
                          security: TransportSecurity | None = None) -> NvshmemConnection:
    rank, path = _split(url)
    if rank is None or not path:
        raise ValueError(f"bad nvshmem URL {url!r}: connect needs nvshmem://RANK/socket/path")
    fabric = need_fabric()
    if not 0 <= rank < fabric.world_size:
        raise TransportError(f"nvshmem:// rank {rank} is not in this fabric of "
                             f"{fabric.world_size} ranks")
    conn = await unix_connect(f"nvshmem://{path}", timeout, limits, scheme="nvshmem",
                              conn_class=lambda _, lim: NvshmemConnection(
                                  url, lim, fabric=fabric, peer_rank=rank),
                              security=security)
    assert isinstance(conn, NvshmemConnection)
    return conn
