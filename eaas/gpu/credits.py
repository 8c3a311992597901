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

With a timeout (the direct path's `NvshmemChannel.timeout_s`) a wait that runs out changes
nothing of its pair: the send is not made (it is retried by the next one), the receive takes
nothing (the message, if it comes, is the next receive's); a failure word counts it.
`exchange_reference` is one round of the direct path; `ExchangeModel` any sequence of puts and
gathers, dead or late peers included, with the failure words the kernels count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

__all__ = ["ChannelLayout", "slot_of", "credit_needed", "arrival_target", "PairState",
           "exchange_reference", "ExchangeModel"]


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


def exchange_reference(
        puts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None],
        max_rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What one round of the direct path computes: every rank puts, then every rank gathers.

    puts[s] = (rows [N_s, H], offsets [W + 1], tags [N_s] or None) of rank s, as given to
    `NvshmemChannel.put`, or None: rank s put nothing (a gather from it times out: n = 0).
    Returns per rank d (out [W, R, H], out_meta [W, R + 1]) as `NvshmemChannel.gather` leaves
    them: out[s, :n] = rank s's rows for d and out_meta[s] = [n, tags...] with
    n = min(group size, R) (0 from a rank that put nothing); entries past n are zero here (the
    kernels leave them untouched). Pure torch on any device. One round of `ExchangeModel` from
    fresh counters; use the model for several rounds, dead peers and the failure words.
    """
    first = next((p for p in puts if p is not None), None)
    if first is None:
        raise ValueError("exchange_reference: no rank put anything (rows give H and the dtype)")
    model = ExchangeModel(len(puts), 1, max_rows, first[0].shape[1], first[0].dtype)
    return model.round(puts)  # type: ignore[return-value]  (every rank gathers)


class ExchangeModel:
    """Host model of one channel's direct path over any sequence of puts and gathers, with the
    kernels' timeouts: a test says which ranks put or gather when, dead peers included, and gets
    every gather's output and every rank's failure words (`NvshmemChannel.failures()`).

    Every ordered pair is a `PairState` (S slots, credits); a put or a gather of rank r acts on
    its W pairs in one go, as one kernel launch does, and ops apply in the order called. Where a
    kernel with `timeout_s` gives up, the model does what the kernel does: a put to a rank that
    still holds all S slots of the pair sends it nothing (failures(r)[0, d] += 1), a gather from
    a rank with no message in flight gives n = 0 rows (failures(r)[1, s] += 1); that pair's
    state does not change either way, so a late message is the next gather's.
    Peer masks (`NvshmemChannel.peers`): `peers[r]` ([W] of 0/1, all 1 at first) says whom rank
    r exchanges with; a masked pair is skipped (no message, no failure; a gather reports n = 0
    from it), and with `drop_on_timeout[r]` a timed-out wait of rank r masks that peer.

    Worked example (W = 2, S = 1; rank 1 stops after round 0, round(puts) = all put, all gather):

        round 1, rank 0 alone: its put reaches both ranks (rank 1 handed slot 0 back in round 0);
                 its gather: from 0 its rows, from 1 n = 0         failures(0) = [[0, 0], [0, 1]]
        round 2, rank 0 alone: its put to 1 waits for message 1's slot and is not sent, its
                 gather gets n = 0 from 1 again                     failures(0) = [[0, 1], [0, 2]]
        rank 1 resumes: its gather takes rank 0's round-1 message (round 2's was never sent);
                 its next put is what rank 0's next gather reads from 1.
    """

    def __init__(self, world_size: int, num_slots: int, max_rows: int, hidden: int,
                 dtype: torch.dtype) -> None:
        import torch

        self.world_size, self.max_rows, self.hidden, self.dtype = (world_size, max_rows, hidden,
                                                                   dtype)
        self.pairs = [[PairState(num_slots) for _ in range(world_size)]
                      for _ in range(world_size)]  # pairs[s][d]: sender s -> receiver d
        self._fail = torch.zeros(world_size, 2, world_size, dtype=torch.int64)
        self.peers = torch.ones(world_size, world_size, dtype=torch.int64)  # [rank, peer]
        self.drop_on_timeout = [False] * world_size

    @classmethod
    def for_layout(cls, layout: ChannelLayout) -> ExchangeModel:
        import torch

        return cls(layout.world_size, layout.num_slots, layout.max_rows, layout.hidden,
                   getattr(torch, layout.dtype))

    def put(self, rank: int, rows: torch.Tensor, offsets: torch.Tensor,
            tags: torch.Tensor | None = None) -> None:
        """Rank `rank` runs `NvshmemChannel.put(rows, offsets, tags)`."""
        w = self.world_size
        if offsets.shape != (w + 1,):
            raise ValueError(f"rank {rank}: offsets must have {w + 1} entries, got "
                             f"{tuple(offsets.shape)}")
        for d in range(w):
            pair = self.pairs[rank][d]
            if not self.peers[rank, d]:  # masked: nothing at all
                continue
            if not pair.can_send():  # the kernel's wait for credit times out
                self._fail[rank, 0, d] += 1
                self._timed_out(rank, d)
                continue
            a = int(offsets[d])
            n = max(min(int(offsets[d + 1]) - a, self.max_rows), 0)
            pair.send((rows[a:a + n].cpu(), None if tags is None else tags[a:a + n].cpu()))

    def gather(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank `rank` runs `NvshmemChannel.gather`: returns (out [W, R, H], out_meta [W, R+1]),
        zero past each n."""
        import torch

        w, r = self.world_size, self.max_rows
        out = torch.zeros(w, r, self.hidden, dtype=self.dtype)
        meta = torch.zeros(w, r + 1, dtype=torch.int64)
        for s in range(w):
            pair = self.pairs[s][rank]
            if not self.peers[rank, s]:  # masked: n = 0 at once
                continue
            if not pair.can_recv():  # the kernel's wait for the signal times out: n = 0
                self._fail[rank, 1, s] += 1
                self._timed_out(rank, s)
                continue
            rows, tags = pair.recv()  # type: ignore[misc]
            n = rows.shape[0]
            out[s, :n] = rows
            meta[s, 0] = n
            if tags is not None:
                meta[s, 1:1 + n] = tags
        return out, meta

    def _timed_out(self, rank: int, peer: int) -> None:
        if self.drop_on_timeout[rank]:
            self.peers[rank, peer] = 0

    def round(self, puts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None],
              gather: Sequence[int] | None = None
              ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Every rank with puts[s] not None puts, then every rank in `gather` (default: all)
        gathers; returns each rank's gather output, None for a rank that did not gather."""
        if len(puts) != self.world_size:
            raise ValueError(f"puts: one entry per rank ({self.world_size}), got {len(puts)}")
        for s, p in enumerate(puts):
            if p is not None:
                self.put(s, *p)
        takers = range(self.world_size) if gather is None else set(gather)
        return [self.gather(d) if d in takers else None for d in range(self.world_size)]

    def failures(self, rank: int) -> torch.Tensor:
        """Rank `rank`'s failure words as `NvshmemChannel.failures()`: [2, W] int64, row 0 puts
        per destination, row 1 gathers per source."""
        return self._fail[rank].clone()

    def clear_failures(self, rank: int) -> None:
        self._fail[rank].zero_()
