"""Direct-path channels between separate processes over memory shared by handle (issue 17).

`NvshmemPlane.create` builds channels collectively (torch.distributed + symmetric memory), so
only the processes of one job at start-up have them. Here every rank is an ordinary process
that allocates its own buffers, hands a small description of them to its peers over any
control channel (a dict of ints, bools, strings, bytes and lists: msgpack or pickle), maps
the peers' buffers from their descriptions and gets the same `NvshmemChannel`s
(`nvshmem=False`: the direct path's put / gather, `eaas_kernels.nvlink_p2p`) the kernels
already run on:

    mine = SharedChannels.allocate(fmt.layouts(), rank, "cuda:0")   # this rank's buffers
    control.send(mine.export())                                      # -> every peer
    channels = mine.connect(exports_of_all_ranks, timeout_s=2.0)     # {name: NvshmemChannel}
    mine.warm_up()                                                   # every rank, in lockstep
    mine.unlink()                                                    # once every peer mapped

Who allocates what. Each rank allocates ONE arena for the whole set (every channel of
`layouts`, in the mapping's order), carved at 256-byte aligned offsets that are the same on
every rank, per channel the four buffers `NvshmemChannel` expects:

    recv   [W, S, R, H]  rows dtype   rows from each source, S slots each     (peers store)
    meta   [W, S, R+1]   int64        row count, then a tag per row           (peers store)
    sig    [W]           int64        arrivals from each source               (peers add)
    credit [W]           int64        messages each destination consumed      (peers set)

plus, local and never shared, `sent`, `recvd` [W], `done` [3, W], `fail` [4, W] and `delta`
[4, W]. The arena is zero at allocation (so are the words; no reset needed before the first
round). On CUDA it is a device tensor exported as a CUDA IPC handle (torch's `_share_cuda_` /
`_new_shared_cuda`, as `eaas.transport.cudaipc` does for its slots); on CPU a file in
/dev/shm mapped with `torch.from_file(shared=True)` (MAP_SHARED), so that the CPU tests run
two real processes with Triton's interpreter, whose atomics and loads go to the mapping.

Deltas are computed in THIS process's address space: delta[k, d] = (address of buffer k of
rank d as mapped here - address of my buffer k) // element size, 0 for myself (my own arena:
a process cannot open its own IPC handle). Every buffer of a kind has one element size on every
rank (the layouts must match, checked), and the row buffers' deltas must be multiples of 8
elements (the copies are 16-byte vectors, like row tensors of put / gather): arenas and
offsets are 256-byte aligned, and `connect` checks every delta anyway.

Lifetimes. The channels are `SharedChannel`s (an `NvshmemChannel` that also holds the peer
mappings), so a peer's buffers stay mapped as long as any channel of the set is referenced;
`close()` drops the set's own references and removes the CPU files' names. A mapping outlives
the peer: POSIX shared memory stays valid while mapped (a store into a dead peer's mailbox
lands in memory nobody reads); a CUDA IPC mapping is torch's reference-counted import, and what
the driver does with an exporter that died is not something to rely on either way: stop
putting to a dead peer. A dead peer's waits do not hang when the channels have `timeout_s`:
puts to it give up, gathers from it report n = 0 and count `failures()`, as on a plane (in
Triton's CPU interpreter a timeout counts polls, about one per millisecond).

Hazards.
- The exporter's whole CUDA allocation block is mapped by its peers (torch shares blocks of
  its caching allocator, offset included), i.e. any tensor that shares that block: same trust
  domain only, like cudaipc://. Expandable segments (PYTORCH_CUDA_ALLOC_CONF) may not be
  shareable by IPC on every torch version.
- Ranks on different GPUs need peer access from each importer's GPU to the exporter's (the
  kernels load and store through the mapping); `connect` refuses a pair that cannot have it,
  and only same-GPU pairs are tested. Two processes on one GPU without MPS time-slice: a
  spinning gather may wait up to a timeslice for the other process's put (use a generous
  `timeout_s`).
- A first kernel launch may load its module and synchronise the context; a put or gather of
  this process spinning meanwhile would never end (see `NvshmemPlane.warm_up`): on CUDA run
  `warm_up()` on every rank before the first real round. It runs four real rounds of every
  channel, in lockstep through the channels themselves (no barrier, no counter reset: every
  rank's counters advance by the same four messages).
- CPU backing files live in /dev/shm until `unlink()` (or `close()`, or garbage collection) of
  their owner: a process killed before it leaves its file behind. Unlink once every peer has
  connected (after the warm-up, or the first round: a peer that put to you has mapped you);
  mappings survive it.

A late joiner (a server that starts while W ranks are serving) is not added to a running set:
the set's W is fixed in every buffer shape. Instead every rank allocates a NEW set for W + 1
ranks (`allocate` with the W + 1 layouts, the joiner too), the descriptions travel over the
control plane (the engine's RPC transport), every rank `connect`s and `warm_up`s the new set
while the old one keeps serving steps (the new set's rounds are independent of the old one's:
own buffers and counters; run its warm-up on a stream of its own, so that its waits for the
joiner do not stall the old set's rounds, and it loads no module the old set did not), and at
a step boundary named by one host message ("from step N use set g + 1") every rank switches:
a new `ExchangeFormat` with the new ranks, new `ShardExchange` / `ServerExchange`, recaptured
graphs; then the old set is closed. Nothing in this module is specific to the first set, so
that is `allocate` + `connect` again.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eaas.gpu.credits import ChannelLayout
from eaas.gpu.nvshmem_plane import NvshmemChannel, check_timeout

__all__ = ["SharedChannels", "SharedChannel", "arena_plan", "ALIGN", "EXPORT_VERSION"]

ALIGN = 256  # bytes: every buffer's offset in the arena (and every arena's base, checked)
EXPORT_VERSION = 1
VEC = 8  # elements per 16-byte vector of the row copies (the plane's `_peer_deltas` rule)
_KINDS = ("recv", "meta", "sig", "credit")


class SharedChannel(NvshmemChannel):
    """An `NvshmemChannel` whose peers' buffers are mapped into this process by handle;
    `mappings` (the peers' arenas, mapped here) keeps them mapped as long as the channel."""

    __slots__ = ("mappings",)
    mappings: tuple[torch.Tensor, ...]


@dataclass(frozen=True, slots=True)
class _Buffer:
    offset: int  # bytes from the arena's start
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def arena_plan(layouts: Mapping[str, ChannelLayout]) -> tuple[dict[str, tuple[_Buffer, ...]],
                                                                int]:
    """Where each channel's recv / meta / sig / credit lie in one rank's arena, and its size in
    bytes: the channels in the mapping's order, every buffer at a 256-byte aligned offset.
    The same on every rank for the same layouts."""
    plan, at = {}, 0
    for name, lay in layouts.items():
        bufs = []
        for dtype, shape in ((getattr(torch, lay.dtype), lay.recv_shape),
                             (torch.int64, lay.meta_shape), (torch.int64, (lay.world_size,)),
                             (torch.int64, (lay.world_size,))):
            buf = _Buffer(at, dtype, tuple(shape))
            bufs.append(buf)
            at = _align(at + buf.nbytes)
        plan[name] = tuple(bufs)
    return plan, max(at, ALIGN)


def _layout_list(layouts: Mapping[str, ChannelLayout]) -> list[list[Any]]:
    return [[name, lay.world_size, lay.num_slots, lay.max_rows, lay.hidden, lay.dtype,
             lay.ctas_per_send] for name, lay in layouts.items()]


def _shm_dir() -> str:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class SharedChannels:
    """One rank's side of a channel set whose ranks are separate processes (module docstring):
    `allocate` its arena, `export` a description, `connect` to every rank's description."""

    def __init__(self, layouts: Mapping[str, ChannelLayout], rank: int, arena: torch.Tensor,
                 handle: Any, path: str | None) -> None:
        self.layouts, self.rank, self.arena = dict(layouts), rank, arena
        self.plan, self.nbytes = arena_plan(self.layouts)
        self._handle, self._path = handle, path
        self._channels: dict[str, SharedChannel] | None = None
        self._mapped: tuple[torch.Tensor | None, ...] = ()

    @classmethod
    def allocate(cls, layouts: Mapping[str, ChannelLayout], rank: int,
                 device: torch.device | str = "cpu", shm_dir: str | None = None
                 ) -> SharedChannels:
        """Allocate this rank's zeroed arena for every channel of `layouts` (same layouts, same
        order, on every rank). device: "cpu" (a /dev/shm file, or `shm_dir`) or an explicit
        "cuda:N" (one device tensor, exported by CUDA IPC)."""
        device = torch.device(device)
        if not layouts:
            raise ValueError("layouts: at least one channel")
        worlds = {lay.world_size for lay in layouts.values()}
        if len(worlds) != 1:
            raise ValueError(f"layouts: every channel of a set has the same world_size, got "
                             f"{sorted(worlds)}")
        (world,) = worlds
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
            raise ValueError(f"rank {rank!r} is not a rank of a {world}-rank channel set")
        for name, lay in layouts.items():
            if lay.hidden % VEC:
                raise ValueError(f"channel {name!r}: hidden={lay.hidden} must be a multiple of "
                                 f"{VEC} (the direct path's 16-byte row vectors; shared "
                                 "channels have no other path)")
        _, nbytes = arena_plan(layouts)
        if device.type == "cuda":
            if device.index is None:
                raise ValueError(f"device must be an explicit cuda:N, got {device}")
            arena = torch.zeros(nbytes, dtype=torch.uint8, device=device)
            with torch.cuda.device(device):
                share = arena.untyped_storage()._share_cuda_()
            # (device, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync)
            handle = [int(share[0]), bytes(share[1]), int(share[2]), int(share[3]),
                      bytes(share[4]), int(share[5]), bytes(share[6] or b""), bool(share[7])]
            return cls(layouts, rank, arena, handle, None)
        if device.type != "cpu":
            raise ValueError(f"device {device}: must be cpu or cuda:N")
        path = os.path.join(shm_dir or _shm_dir(),
                            f"eaas-channels-{os.getpid()}-{rank}-{secrets.token_hex(6)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)  # zero-filled
        finally:
            os.close(fd)
        arena = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        return cls(layouts, rank, arena, path, path)

    @property
    def device(self) -> torch.device:
        return self.arena.device

    def export(self) -> dict[str, Any]:
        """This rank's description for its peers: a dict of ints, bools, strings, bytes and
        lists (msgpack- and pickle-able; tuples that come back as lists are fine)."""
        return {"version": EXPORT_VERSION, "rank": self.rank, "pid": os.getpid(),
                "layouts": _layout_list(self.layouts), "nbytes": self.nbytes,
                "device": self.device.type, "handle": self._handle}

    @property
    def channels(self) -> dict[str, SharedChannel]:
        if self._channels is None:
            raise RuntimeError("channels: call connect(exports) first")
        return self._channels

    def connect(self, exports: Sequence[Mapping[str, Any]], timeout_s: float | None = None
                ) -> dict[str, SharedChannel]:
        """Map every peer's arena (`exports`: every rank's `export()`, this one's included, any
        order; None in place of a rank this one never exchanges with: it is not mapped, its
        deltas are 0, and its peer word is 0 in every channel: keep it masked) and build this
        rank's channels, name -> channel, with `timeout_s` as every wait's bound (None:
        forever). Start-up only (CUDA: imports may synchronise)."""
        if self._channels is not None:
            raise RuntimeError("connect: this set is already connected")
        check_timeout(timeout_s)
        world = next(iter(self.layouts.values())).world_size
        if len(exports) != world:
            raise ValueError(f"connect: one export (or None) per rank ({world}), got "
                             f"{len(exports)}")
        by_rank = self._check_exports([e for e in exports if e is not None], world)
        mapped = tuple(None if r == self.rank or r not in by_rank else self._map(by_rank[r])
                       for r in range(world))
        bases = [self.arena.data_ptr() if m is None else m.data_ptr() for m in mapped]
        live = torch.tensor([int(r in by_rank) for r in range(world)], dtype=torch.int64)
        for r, base in enumerate(bases):
            if base % ALIGN:
                raise ValueError(f"rank {r}'s arena is mapped at {base:#x} here, not on a "
                                 f"{ALIGN}-byte boundary")
        dev, i64 = self.device, torch.int64
        peers = tuple(m for m in mapped if m is not None)
        channels = {}
        diffs = [base - bases[self.rank] for base in bases]  # bytes, the same for every buffer
        for name, lay in self.layouts.items():
            views = [self._view(buf) for buf in self.plan[name]]
            rows = []
            for kind, view in zip(_KINDS, views):
                size = view.element_size()
                step = size * (VEC if kind == "recv" else 1)
                bad = [r for r, diff in enumerate(diffs) if diff % step]
                if bad:
                    raise ValueError(f"channel {name!r}: rank {bad[0]}'s {kind} buffer is "
                                     f"{diffs[bad[0]]} bytes from this rank's, not a multiple "
                                     f"of {step}")
                rows.append([diff // size for diff in diffs])
            w = lay.world_size
            ch = SharedChannel(
                layout=lay, rank=self.rank, recv_buf=views[0], meta=views[1], sig=views[2],
                credit=views[3], sent=torch.zeros(w, dtype=i64, device=dev),
                recvd=torch.zeros(w, dtype=i64, device=dev),
                delta=torch.tensor(rows, dtype=i64, device=dev),
                done=torch.zeros(3, w, dtype=i64, device=dev), nvshmem=False,
                timeout_s=timeout_s, peers=live.to(dev))
            ch.mappings = peers
            channels[name] = ch
        self._mapped, self._channels = mapped, channels
        return channels

    def reset_peer(self, rank: int) -> None:
        """Enqueue: zero this rank's side of the pair with `rank` in every channel (the signal
        and credit words the peer writes here, the pair's counters, done and failure words):
        the pair starts afresh, as at allocation. The peer must be masked in every channel
        (`NvshmemChannel.peers`) while this runs, and no message of the pair may be in flight."""
        for ch in self.channels.values():
            for t in (ch.sig, ch.credit, ch.sent, ch.recvd):
                t[rank] = 0
            ch.done[:, rank] = 0
            ch.fail[:, rank] = 0

    def readmit(self, export: Mapping[str, Any]) -> None:
        """Map the NEW arena of a restarted peer (`export`: its process's `export()`, same
        rank, same layouts) in place of the old one: every channel's deltas to that rank are
        rewritten and the pair's words reset (`reset_peer`). The peer must be masked in every
        channel until this returns (stream order: launches before it skip the peer, launches
        after it see the new mapping); unmask it once the peer is connected and warmed up."""
        world = next(iter(self.layouts.values())).world_size
        by_rank = self._check_exports([self.export(), export], world)
        (rank,) = (r for r in by_rank if r != self.rank)
        mapped = self._map(by_rank[rank])
        if mapped.data_ptr() % ALIGN:
            raise ValueError(f"rank {rank}'s new arena is mapped at {mapped.data_ptr():#x}, not "
                             f"on a {ALIGN}-byte boundary")
        diff = mapped.data_ptr() - self.arena.data_ptr()
        for name, ch in self.channels.items():
            for k, (kind, buf) in enumerate(zip(_KINDS, self.plan[name])):
                size = buf.dtype.itemsize
                if diff % (size * (VEC if kind == "recv" else 1)):
                    raise ValueError(f"channel {name!r}: rank {rank}'s new {kind} buffer is "
                                     f"{diff} bytes from this rank's, not aligned")
                ch.delta[k, rank] = diff // size
            ch.mappings = ch.mappings + (mapped,)  # the old mapping goes with the channel set
        self.reset_peer(rank)
        self._mapped = tuple(mapped if r == rank else m for r, m in enumerate(self._mapped))

    def warm_up_alone(self, peers: torch.Tensor) -> None:
        """Warm up this rank's kernels with itself only (no peer takes part): every channel's
        mask `peers` is set to this rank alone for four rounds to itself, then the self pair is
        reset and `peers` put back. For a rank joining a set that is already running (its
        peers' kernels are loaded): its own first launches must not happen in a real round."""
        saved = peers.clone()
        peers.zero_()
        peers[self.rank] = 1
        try:
            self.warm_up()
        finally:
            self.reset_peer(self.rank)
            peers.copy_(saved)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

    def warm_up(self, timeout_s: float | None = None) -> None:
        """Run every direct-path kernel variant of every channel once: four real rounds (put /
        put_spans x tags, taken by gather or wait_all + release_all), every rank in lockstep
        (each must call this as its first rounds; the rounds themselves are the barrier).
        Needed on CUDA before any real round (module loads, see the module docstring).
        timeout_s: the warm-up's own bound (default None: peers may still be compiling); the
        channels' own `timeout_s` is put back after. Counters are not reset: every rank's
        advance by the same four messages. Synchronises the device after each round."""
        check_timeout(timeout_s)
        chans = list(self.channels.values())
        saved = [ch.timeout_s for ch in chans]
        try:
            for ch in chans:
                ch.timeout_s = timeout_s
            for step in (0, 1, 2, 3):
                for ch in chans:
                    ch.warm_up_send(step)
                for ch in chans:
                    ch.warm_up_take(step)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
        finally:
            for ch, t in zip(chans, saved):
                ch.timeout_s = t

    def unlink(self) -> None:
        """Remove the name of this rank's CPU backing file (mappings, here and in peers that
        already connected, stay valid; no peer can connect after it). No-op on CUDA."""
        path, self._path = self._path, None
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Drop this object's references to the channels and mappings and `unlink()`. Channels
        still referenced elsewhere keep their mappings (`SharedChannel.mappings`)."""
        self.unlink()
        self._channels, self._mapped = None, ()

    def __del__(self) -> None:
        try:
            self.unlink()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass

    # -- internals --

    def _view(self, buf: _Buffer) -> torch.Tensor:
        return self.arena[buf.offset:buf.offset + buf.nbytes].view(buf.dtype).view(buf.shape)

    def _check_exports(self, exports: Sequence[Mapping[str, Any]], world: int
                       ) -> dict[int, Mapping[str, Any]]:
        mine, by_rank = self.export(), {}
        for e in exports:
            if not isinstance(e, Mapping) or e.get("version") != EXPORT_VERSION:
                raise ValueError(f"connect: not a shared-channels export of version "
                                 f"{EXPORT_VERSION}: {str(e)[:200]}")
            r = e.get("rank")
            if not isinstance(r, int) or not 0 <= r < world or r in by_rank:
                raise ValueError(f"connect: export rank {r!r} is not a distinct rank of "
                                 f"0..{world - 1}")
            got = [list(x) for x in e.get("layouts", [])]
            if got != mine["layouts"] or e.get("nbytes") != self.nbytes:
                raise ValueError(f"connect: rank {r}'s channels {got} ({e.get('nbytes')} B) do "
                                 f"not match this rank's {mine['layouts']} ({self.nbytes} B)")
            if e.get("device") != mine["device"]:
                raise ValueError(f"connect: rank {r}'s buffers are on {e.get('device')!r}, this "
                                 f"rank's on {mine['device']!r}")
            by_rank[r] = e
        if self.rank not in by_rank:
            raise ValueError(f"connect: the exports lack this rank's own ({self.rank})")
        if _wire(by_rank[self.rank]["handle"]) != _wire(mine["handle"]):
            raise ValueError(f"connect: the export of rank {self.rank} is not this rank's")
        return by_rank

    def _map(self, export: Mapping[str, Any]) -> torch.Tensor:
        """Rank `export["rank"]`'s arena, mapped into this process: [nbytes] uint8."""
        r, handle, nbytes = export["rank"], export["handle"], self.nbytes
        if self.device.type == "cpu":
            if not isinstance(handle, str) or not os.path.isfile(handle):
                raise ValueError(f"connect: rank {r}'s arena file {handle!r} does not exist "
                                 "(unlinked already, or another host)")
            if os.path.getsize(handle) != nbytes:
                raise ValueError(f"connect: rank {r}'s arena file {handle!r} has "
                                 f"{os.path.getsize(handle)} B, expected {nbytes}")
            return torch.from_file(handle, shared=True, size=nbytes, dtype=torch.uint8)
        try:
            device, ipc, size, offset, ref, ref_offset, event, sync = handle
            if not (isinstance(device, int) and isinstance(ipc, bytes) and isinstance(ref, bytes)
                    and isinstance(event, bytes) and isinstance(size, int)
                    and isinstance(offset, int) and isinstance(ref_offset, int)
                    and isinstance(sync, bool) and 0 <= offset and nbytes <= size):
                raise ValueError
        except (ValueError, TypeError):
            raise ValueError(f"connect: malformed CUDA IPC handle of rank {r}: "
                             f"{str(handle)[:200]}") from None
        mine = self.device.index
        if device >= torch.cuda.device_count():
            raise ValueError(f"connect: rank {r}'s arena is on cuda:{device}, which this "
                             "process cannot see (same host and CUDA_VISIBLE_DEVICES needed)")
        if device != mine and not torch.cuda.can_device_access_peer(mine, device):
            raise ValueError(f"connect: cuda:{mine} has no peer access to rank {r}'s "
                             f"cuda:{device}")
        torch.cuda._lazy_init()  # as torch's rebuild_cuda_tensor and cudaipc:// do
        storage = torch.UntypedStorage._new_shared_cuda(device, ipc, size, offset, ref,
                                                        ref_offset, event or None, sync)
        return torch.empty(0, dtype=torch.uint8, device=f"cuda:{device}").set_(
            storage, 0, (nbytes,), (1,))


def _wire(x: Any) -> Any:
    """Lists and tuples alike (a description that went through msgpack or pickle)."""
    return [_wire(v) for v in x] if isinstance(x, (list, tuple)) else x
