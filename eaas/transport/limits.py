"""Transport limits: the bounds a peer's frames must respect (checked before allocating)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TransportLimits"]


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """Bounds on frames and buffering for one connection (both directions).

    max_frame_bytes:     largest frame (16-byte prefix + header + tensor body) accepted or sent.
    max_header_bytes:    largest msgpack header (the message tree and tensor descriptors).
    max_tensors:         most tensor leaves in one message.
    max_ndim:            most dimensions of one tensor.
    max_depth:           deepest nesting of containers (dict, list, tuple; a tuple counts
                         twice) in a received message tree, checked on the raw bytes before
                         anything is unpacked (a deeper one closes the connection).
    max_elements:        most values (containers, keys and leaves) in one message tree.
    max_queued_messages: received messages buffered before reading from the peer pauses
                         (inproc: sent messages buffered before `send` waits).
    max_queued_bytes:    received tensor bytes buffered before reading from the peer pauses
                         (tcp://, shm:// inline bodies; a single larger frame is still read).
    shm_min_bytes:       shm:// only; messages whose tensors total fewer bytes travel inline
                         over the socket (a copy there is cheaper than a slot round trip).
    shm_pool_bytes:      shm:// only; most shared memory one sender keeps mapped per connection;
                         a send that needs more waits until the receiver releases slots.
    """

    max_frame_bytes: int = 1 << 30
    max_header_bytes: int = 1 << 20
    max_tensors: int = 4096
    max_ndim: int = 16
    max_depth: int = 32
    max_elements: int = 1 << 17
    max_queued_messages: int = 1024
    max_queued_bytes: int = 256 << 20
    shm_min_bytes: int = 64 << 10
    shm_pool_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        for name in ("max_frame_bytes", "max_header_bytes", "max_tensors", "max_ndim",
                     "max_depth", "max_elements", "max_queued_messages", "max_queued_bytes",
                     "shm_pool_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransportLimits.{name}={value!r}: must be an int >= 1")
        for name in ("shm_min_bytes",):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TransportLimits.{name}={value!r}: must be an int >= 0")
        if self.max_header_bytes > self.max_frame_bytes:
            raise ValueError(
                f"TransportLimits.max_header_bytes={self.max_header_bytes} must not exceed "
                f"max_frame_bytes={self.max_frame_bytes}"
            )
