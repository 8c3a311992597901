"""Slot and credit bookkeeping of the nvshmem:// mailboxes, as plain Python.

This is the reference of the arithmetic the device kernels (`eaas_kernels.nvshmem_p2p`) run,
and what CPU tests check. One *channel* connects every rank to every rank; for each ordered pair
(sender s, receiver d) the receiver owns S slots in its symmetric receive buffer, reserved for s.

Worked example (S = 2 slots, C = 4 CTAs per send):

    s sends message 0 -> slot 0; receiver's sig[s] goes 0 -> 4 (each CTA adds 1)
    s sends message 1 -> slot 1; sig[s] -> 8
    s wants to send message 2 -> slot 0 again: it waits until credit[d] >= 1 (message 0 consumed)
    d receives: waits sig[s] >= (0 + 1) * 4, reads slot 0, then writes credit[d] = 1 on s
    now s sends message 2 -> slot 0; sig[s] -> 12; d waits sig[s] >= 12 for it, and so on.

A sender never overwrites a slot its receiver has not consumed, and messages between one pair
arrive in send order. Different pairs are independent: no rank waits for a third one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

__all__ = ["ChannelLayout", "slot_of", "credit_needed", "arrival_target", "PairState",
           "exchange_reference"]


def slot_of(seq: int, num_slots: int) -> int:
    """Slot index of message `seq` (0-based, per sender->receiver pair)."""
    return seq % num_slots


def credit_needed(seq: int, num_slots: int) -> int:
    """Consumed-message count the sender must see before writing message `seq` (<= 0: none)."""
    return seq + 1 - num_slots


def arrival_target(seq: int, ctas_per_send: int) -> int:
    """Signal value at which message `seq` has fully arrived (every CTA added 1)."""
    return (seq + 1) * ctas_per_send


@dataclass(frozen=True, slots=True)
class ChannelLayout:
    """Sizes of one channel's symmetric buffers (identical on every rank: allocation is collective).

    world_size:    ranks (PEs) in the channel.
    num_slots:     S, messages in flight per ordered pair before the sender waits for credit.
    max_rows:      R, rows one message may carry.
    hidden:        H, elements per row.
    dtype:         row dtype name ("bfloat16", "float16", "float32").
    ctas_per_send: C, thread blocks that put one message (bandwidth: NVLink needs many SMs).
    """

    world_size: int
    num_slots: int
    max_rows: int
    hidden: int
    dtype: str = "bfloat16"
    ctas_per_send: int = 16

    def __post_init__(self) -> None:
        for name in ("world_size", "num_slots", "max_rows", "hidden", "ctas_per_send"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ChannelLayout.{name}={value!r}: must be an int >= 1")
        if self.dtype not in _ITEMSIZE:
            raise ValueError(f"ChannelLayout.dtype={self.dtype!r}: must be one of "
                             f"{list(_ITEMSIZE)}")
        if self.max_rows * self.hidden >= 2**31:
            raise ValueError(f"ChannelLayout: max_rows * hidden = {self.max_rows * self.hidden} "
                             "must be < 2**31 (kernels index one slot with int32)")

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    @property
    def recv_shape(self) -> tuple[int, int, int, int]:
        """[W, S, R, H]: rows from each source rank, slot by slot."""
        return (self.world_size, self.num_slots, self.max_rows, self.hidden)

    @property
    def meta_shape(self) -> tuple[int, int, int]:
        """[W, S, R + 1] int64: row count, then one tag per row (e.g. expert id or token index)."""
        return (self.world_size, self.num_slots, self.max_rows + 1)

    @property
    def symmetric_bytes(self) -> int:
        """Bytes of symmetric memory one rank allocates for this channel."""
        w, s, r, h = self.recv_shape
        return w * s * r * h * self.itemsize + w * s * (r + 1) * 8 + 2 * w * 8


_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(slots=True)
class PairState:
    """Host-side model of one sender->receiver pair: the counters and words the kernels keep.

    Mirrors the device: `sent` (sender's counter), `sig` (receiver's arrival word), `recvd`
    (receiver's counter), `credit` (sender's copy of the receiver's consumed count), and the
    receiver's S slots. Used by tests to check that no interleaving loses or overwrites data.
    """

    num_slots: int
    ctas_per_send: int = 1
    sent: int = 0
    sig: int = 0
    recvd: int = 0
    credit: int = 0
    slots: list[object | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.slots = [None] * self.num_slots

    def can_send(self) -> bool:
        return self.credit >= credit_needed(self.sent, self.num_slots)

    def send(self, payload: object) -> int:
        """Put `payload` into the next slot (all CTAs at once); returns the slot. Needs can_send."""
        if not self.can_send():
            raise RuntimeError(f"send of message {self.sent} before credit "
                               f"{credit_needed(self.sent, self.num_slots)} (have {self.credit})")
        slot = slot_of(self.sent, self.num_slots)
        if self.slots[slot] is not None:
            raise AssertionError(f"slot {slot} overwritten before it was consumed")
        self.slots[slot] = payload
        self.sig += self.ctas_per_send
        self.sent += 1
        return slot

    def can_recv(self) -> bool:
        return self.sig >= arrival_target(self.recvd, self.ctas_per_send)

    def recv(self) -> object:
        """Take the next message and hand its slot back (credit). Needs can_recv."""
        if not self.can_recv():
            raise RuntimeError(f"recv of message {self.recvd} before it arrived")
        slot = slot_of(self.recvd, self.num_slots)
        payload, self.slots[slot] = self.slots[slot], None
        self.recvd += 1
        self.credit = self.recvd  # signal_op SET on the sender
        return payload


def exchange_reference(puts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                       max_rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What one round of the direct path computes: every rank puts, then every rank gathers.

    puts[s] = (rows [N_s, H], offsets [W + 1], tags [N_s] or None) of rank s, as given to
    `NvshmemChannel.put`. Returns per rank d (out [W, R, H], out_meta [W, R + 1]) as
    `NvshmemChannel.gather` leaves them: out[s, :n] = rank s's rows for d and
    out_meta[s] = [n, tags...] with n = min(group size, R); entries past n are zero here (the
    kernels leave them untouched). Pure torch on any device.
    """
    import torch

    world = len(puts)
    hidden = puts[0][0].shape[1]
    outs = []
    for d in range(world):
        out = torch.zeros(world, max_rows, hidden, dtype=puts[0][0].dtype)
        meta = torch.zeros(world, max_rows + 1, dtype=torch.int64)
        for s, (rows, offsets, tags) in enumerate(puts):
            if offsets.shape != (world + 1,):
                raise ValueError(f"rank {s}: offsets must have {world + 1} entries, got "
                                 f"{tuple(offsets.shape)}")
            a, b = int(offsets[d]), int(offsets[d + 1])
            n = min(b - a, max_rows)
            out[s, :n] = rows[a:a + n].cpu()
            meta[s, 0] = n
            if tags is not None:
                meta[s, 1:1 + n] = tags[a:a + n].cpu()
        outs.append((out, meta))
    return outs
