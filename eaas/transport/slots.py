"""Credit-managed slot pools: the send/release protocol shared by shm:// and cudaipc://.

Both schemes move tensor bytes outside the socket, through *slots*: buffers the sending end
allocates, the receiving end maps once, and both then reuse. The socket carries headers that
name the slot, plus two control frames:

    RELEASE (receiver -> sender, "r"): those slots are free again (a *credit* comes back)
    DROP    (sender -> receiver, "d"): that slot is evicted; unmap it

Credits: a slot is busy from the send until the receiver's RELEASE for it, and the sender never
writes into a busy slot. Each pool (shm://: one per connection end; cudaipc://: one per device)
holds at most `limits.shm_pool_bytes`. A send that finds no free slot big enough first evicts
free slots of that pool to make room; if the pool is still full it queues, in order, and its
handle completes once a release lets it go out. Closing the connection fails queued sends.

`SlotConnection` keeps that bookkeeping; a scheme subclass supplies what is specific to it:
how a message is encoded and written into its slots (`_try_send`), how a slot is created,
destroyed, detached, and what a RELEASE frame holds (`_released_ids`).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from typing import Any, Generic, Protocol, TypeVar

import torch

from eaas.errors import FrameError, TransportError
from eaas.transport.base import SendHandle
from eaas.transport.codec import KIND_MESSAGE
from eaas.transport.limits import TransportLimits
from eaas.transport.stream import _NOTHING, StreamConnection

__all__ = ["SlotConnection", "KIND_RELEASE", "KIND_DROP", "MIN_SLOT"]

KIND_RELEASE = 1  # receiver -> sender: "r": slot id(s) free again (wire form is the scheme's)
KIND_DROP = 2  # sender -> receiver: "d": slot id evicted, unmap it
MIN_SLOT = 1 << 20  # smallest slot created; sizes round up to a power of two (within the pool)


class Slot(Protocol):
    """What the pool needs of a scheme's slot record."""

    slot_id: int
    size: int


SlotT = TypeVar("SlotT", bound=Slot)


class SlotConnection(StreamConnection, Generic[SlotT]):
    """A StreamConnection whose sender keeps credit-managed pools of slots (one per pool key).

    Subclasses set `SLOT_NAME` (for errors), implement `_try_send`, `_create`, `_destroy`,
    `_detach` and `_released_ids`, may override `_on_message`, and call `_send_or_queue` from
    `send_start`.
    """

    SLOT_NAME = "a slot"  # "... closed before {SLOT_NAME} was free"

    def __init__(self, url: str, limits: TransportLimits, on_made: Any = None) -> None:
        super().__init__(url, limits, on_made)
        self._slot_ids = itertools.count()
        self._slots: dict[int, SlotT] = {}  # mine (sending side)
        self._slot_pool: dict[int, Any] = {}  # slot id -> its pool key
        self._free: list[int] = []
        self._pool_bytes: dict[Any, int] = {}  # pool key -> bytes of my slots in it
        self._pending: collections.deque[tuple[Any, asyncio.Future[None]]] = (
            collections.deque())
        self._attached: dict[int, SlotT] = {}  # the peer's (receiving side)

    # ---- scheme hooks -----------------------------------------------------------------
    def _try_send(self, out: Any) -> SendHandle | None:
        """Write `out` into free slots and send its header; None if a slot is not free yet."""
        raise NotImplementedError

    def _create(self, key: Any, size: int) -> SlotT:
        """Allocate a slot of `size` bytes in pool `key` (id from `self._slot_ids`)."""
        raise NotImplementedError

    def _destroy(self, slot: SlotT) -> None:
        """Free an evicted slot of mine (it is already out of the pool; DROP follows)."""
        raise NotImplementedError

    def _detach(self, slot: SlotT) -> None:
        """Unmap a slot of the peer's (on DROP, and on close)."""
        raise NotImplementedError

    def _released_ids(self, released: Any) -> list[Any]:
        """The slot ids in a RELEASE frame's "r" value; FrameError if malformed."""
        raise NotImplementedError

    def _on_message(self, head: dict[str, Any], body: bytearray | torch.Tensor) -> Any:
        """A checked KIND_MESSAGE frame -> the inbox item (default: an inline message)."""
        return super()._on_frame(head, body)

    # ---- sending ----------------------------------------------------------------------
    def _send_or_queue(self, out: Any) -> SendHandle:
        """Send `out` now if nothing is queued and slots are free, else queue it in order."""
        if not self._pending:
            handle = self._try_send(out)
            if handle is not None:
                return handle
        future = asyncio.get_running_loop().create_future()
        self._pending.append((out, future))
        return SendHandle(future)

    def _acquire(self, key: Any, nbytes: int) -> SlotT | None:
        """A free slot of pool `key` holding `nbytes` (best fit, else a new one); None if full."""
        fits = [i for i in self._free
                if self._slot_pool[i] == key and self._slots[i].size >= nbytes]
        if fits:
            best = min(fits, key=lambda i: self._slots[i].size)
            self._free.remove(best)
            return self._slots[best]
        used = self._pool_bytes.get(key, 0)
        size = max(MIN_SLOT, 1 << (max(nbytes, 1) - 1).bit_length())
        size = min(size, max(nbytes, self.limits.shm_pool_bytes - used))
        while used + size > self.limits.shm_pool_bytes:
            mine = [i for i in self._free if self._slot_pool[i] == key]
            if not mine:
                return None
            self._evict(max(mine, key=lambda i: self._slots[i].size))
            used = self._pool_bytes.get(key, 0)
        slot = self._create(key, size)
        self._slots[slot.slot_id] = slot
        self._slot_pool[slot.slot_id] = key
        self._pool_bytes[key] = self._pool_bytes.get(key, 0) + size
        return slot

    def _evict(self, slot_id: int) -> None:
        self._free.remove(slot_id)
        slot = self._slots.pop(slot_id)
        self._pool_bytes[self._slot_pool.pop(slot_id)] -= slot.size
        self._destroy(slot)
        self._send_control(KIND_DROP, d=slot_id)

    def _flush_pending(self) -> None:
        while self._pending and not self._closed:
            out, future = self._pending[0]
            handle = self._try_send(out)
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
            for slot_id in self._released_ids(head.get("r")):
                if slot_id not in self._slots or slot_id in self._free:
                    raise FrameError(f"release of slot {slot_id!r} that is not in use")
                self._free.append(slot_id)
            self._flush_pending()
            return _NOTHING
        if kind == KIND_DROP:
            slot = self._attached.pop(head.get("d"), None)  # type: ignore[arg-type]
            if slot is not None:
                self._detach(slot)
            return _NOTHING
        if kind != KIND_MESSAGE:
            raise FrameError(f"unexpected frame kind {kind!r}")
        return self._on_message(head, body)

    # ---- teardown ---------------------------------------------------------------------
    def _on_closed(self) -> None:
        """Fail queued sends, detach the peer's slots, forget mine (subclasses free them first)."""
        pending, self._pending = self._pending, collections.deque()
        for _, future in pending:
            if not future.done():
                future.set_exception(TransportError(f"connection to {self.url} closed before "
                                                    f"{self.SLOT_NAME} was free"))
        for slot in self._attached.values():
            self._detach(slot)
        self._attached.clear()
        self._slots.clear()
        self._slot_pool.clear()
        self._free.clear()
        self._pool_bytes.clear()
