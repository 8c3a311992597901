"""One MoE layer's device data path between attention shards and expert servers (issue 17).

A shard's experts step packs its token rows once per server (`row_layout.pack_rows`), stores
them straight into each server's receive slots over the nvshmem:// direct path
(`NvshmemChannel.put_spans`: NVLink stores through peer mappings, or CUDA IPC mappings), and
waits on the device for the results (`gather`) before combining them (`combine_rows`). A server
gathers the rows of every shard, runs the grouped GEMM over its local experts on the pairs that
arrived (`eaas_kernels.fused_moe`, masked by the device-side counts) and puts one weighted sum
per row back where the row came from. Nothing reads a device value on the host and every shape
is fixed, so both ends can be captured in CUDA graphs.

Wire format (`ExchangeFormat`): three channels over ONE plane whose ranks are the shards and
the servers (W = shards + servers), S slots per pair, R rows per message (= pack_rows' capacity:
R >= the largest step's token count means nothing can overflow, since a token crosses to a
server at most once):

    moe_rows    [H] activation dtype   the token row x[t]; int64 tag = t (the shard's token index)
    moe_pairs   [P] float32, P = 2K rounded up to 8: [w_0 .. w_K-1, e_0 .. e_K-1, 0 ...], the
                row's (local expert, weight) pairs on that server in the token's k order; ids are
                exact float32 integers (< 2**24), -1 pads with weight 0
    moe_results [H] activation dtype   sum_j w_j * expert_e_j(x[t]) for that server; tag = t

Why a companion float32 channel: the weights stay exact float32 by value (no bit casts through a
bf16 payload, which a copy that converts, or a later fp8 dispatch of the row payload, would
corrupt); the ids need no packing limit (an int64 tag holds 8 ids of 7 bits at most, and still
no weights); the activation rows keep exactly [H] (the same buffers and copy kernels as any
row); the cost is one more put/gather of 4P bytes per row in the same round.

Who talks to whom: every channel has a peer mask (`NvshmemChannel.peers`), one per rank shared
by its three channels. A shard exchanges with the servers only (it puts rows and pairs, gathers
results), a server with the shards only (it gathers rows and pairs, puts results): shards never
wait for each other nor servers for each other, and a rank sends nothing it does not need.
Each MoE layer of each step is one round, in layer order, on every rank of the set. In the
engine a set has ONE shard (a star: the shard and its servers; each shard has its own set), so
shards never wait for each other at all.

A failed peer costs one timeout: the channels drop a peer whose wait timed out from the mask
(`drop_on_timeout`), so later rounds skip it at once, on the device, inside captured graphs.
A shard's `trouble()` ([W] int64, cumulative, on the device) counts per server the waits that
timed out AND the rows it had to leave out because the server was masked (rows routed to a
server that is not exchanged with any more): a step whose delta is not zero for a server had
some token computed without it (its contribution is 0, never a stale slot), so the step
ledger replays it with that server out of the routing. A server's timeouts drop the shard from
its mask too, so it stops answering that set rather than answering out of step: a timed-out
server round is never followed by a silently misaligned one (the shard then times out on it).

Worked example: ranks 0 = shard, 1 = server 0, 2 = server 1; R = 2, K = 2 (P = 8); experts 0, 1
on server 0 and 2, 3 on server 1 (local ids 0, 1 on each), as in row_layout's example:

    topk_ids = [[0, 2], [1, 0], [3, 2]], topk_weights = [[.6, .4], [.7, .3], [.5, .5]]
    pack_rows: rows = [[0, 1], [0, 2]], counts = [2, 2]
    shard, moe_rows:  put_spans(x[rows.flat] = [x0, x1, x0, x2], starts = [0, 0, 2],
                                counts = [0, 2, 2], tags = [0, 1, 0, 2])   (peers: 1, 2)
    shard, moe_pairs: the same spans of [[.6, 0, 0, -1, 0..], [.7, .3, 1, 0, 0..],
                                         [.4, 0, 0, -1, 0..], [.5, .5, 1, 0, 0..]]
    server 0 gathers (peers: 0): rows_in[0] = [x0, x1], meta_in[0] = [2, 0, 1]
    server 0, moe_results: put_spans(y [W * R, H], starts = [0, R, 2R], counts = meta_in[:, 0],
                                     tags = meta_in[:, 1:]) to rank 0: y[0] = .6 e0(x0),
                                     y[1] = .7 e1(x1) + .3 e0(x1)
    shard gathers results_in [W, R, H] from 1, 2; combine_rows(results_in[[1, 2]], layout)

Wiring: `eaas.engine.device_path` (the shard's side: one set per shard over shared channels,
`SharedChannels`, the servers told over the RPC transport) and `eaas.engine.exchange_host` (a
server process's side: its sets and their `ServerLoop`s).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from eaas.engine.row_layout import RowLayout, combine_rows, pack_rows
from eaas.gpu.credits import ChannelLayout
from eaas.gpu.nvshmem_plane import NvshmemChannel
from eaas_kernels import fused_moe

__all__ = ["ExchangeFormat", "ExchangeChannels", "ExpertPlacement", "ShardExchange",
           "ServerExchange", "serve_pairs", "warm_up_experts", "bank_rows", "ROWS", "PAIRS",
           "RESULTS"]

ROWS, PAIRS, RESULTS = "moe_rows", "moe_pairs", "moe_results"  # the plane's channel names
MAX_LOCAL_EXPERTS = 1 << 24  # local ids travel as float32 integers: exact below 2**24


@dataclass(frozen=True, slots=True)
class ExchangeFormat:
    """The wire format of one layer's exchange (see the module docstring), the same on every rank.

    shard_ranks / server_ranks: the plane's ranks of the shards and of the servers, together
                  exactly 0..W-1; server index s (pack_rows' servers) is rank server_ranks[s].
    max_rows:     R, rows per (shard, server) message: the shard's packing capacity per server.
    hidden:       H. top_k: K. dtype: the activation dtype name ("bfloat16", ...).
    num_slots, ctas_per_send: the channels' S and put CTAs; gather_ctas: CTAs per gather.
    """

    shard_ranks: tuple[int, ...]
    server_ranks: tuple[int, ...]
    max_rows: int
    hidden: int
    top_k: int
    dtype: str = "bfloat16"
    num_slots: int = 2
    ctas_per_send: int = 16
    gather_ctas: int = 64

    def __post_init__(self) -> None:
        ranks = sorted(self.shard_ranks + self.server_ranks)
        if not self.shard_ranks or not self.server_ranks or ranks != list(range(len(ranks))):
            raise ValueError(f"shard_ranks {self.shard_ranks} and server_ranks "
                             f"{self.server_ranks} must be non-empty and split 0..W-1")
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: must be >= 1")
        self.layouts()  # ChannelLayout checks the sizes

    @property
    def world_size(self) -> int:
        return len(self.shard_ranks) + len(self.server_ranks)

    @property
    def pair_width(self) -> int:
        """P: K weights and K ids, rounded up to 8 floats (the direct path's 16-byte vectors)."""
        return -(-2 * self.top_k // 8) * 8

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def layouts(self) -> dict[str, ChannelLayout]:
        """The three channels' layouts, for `NvshmemPlane.create`."""
        def lay(hidden: int, dtype: str) -> ChannelLayout:
            return ChannelLayout(world_size=self.world_size, num_slots=self.num_slots,
                                 max_rows=self.max_rows, hidden=hidden, dtype=dtype,
                                 ctas_per_send=self.ctas_per_send)

        return {ROWS: lay(self.hidden, self.dtype), PAIRS: lay(self.pair_width, "float32"),
                RESULTS: lay(self.hidden, self.dtype)}

    def encode_pairs(self, pair_experts: torch.Tensor, pair_weights: torch.Tensor
                     ) -> torch.Tensor:
        """[..., K] int64 ids (-1 pads) and [..., K] weights -> [..., P] float32 pair rows."""
        k = self.top_k
        out = pair_weights.new_zeros(*pair_weights.shape[:-1], self.pair_width,
                                     dtype=torch.float32)
        out[..., :k] = pair_weights
        out[..., k:2 * k] = pair_experts
        return out

    def decode_pairs(self, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., P] float32 pair rows -> (ids int64 [..., K], weights float32 [..., K])."""
        k = self.top_k
        return pairs[..., k:2 * k].long(), pairs[..., :k]


@dataclass(frozen=True, slots=True)
class ExchangeChannels:
    """This rank's three channels of the exchange (one set for every MoE layer)."""

    rows: NvshmemChannel
    pairs: NvshmemChannel
    results: NvshmemChannel

    @classmethod
    def from_plane(cls, plane: Any) -> ExchangeChannels:
        """The channels `fmt.layouts()` named in an `NvshmemPlane`."""
        return cls(plane.channels[ROWS], plane.channels[PAIRS], plane.channels[RESULTS])

    @property
    def rank(self) -> int:
        return self.rows.rank

    @property
    def device(self) -> torch.device:
        return self.rows.recv_buf.device

    def exchange_with(self, ranks: Any) -> torch.Tensor:
        """One peer mask for the three channels, exchanging with `ranks` only, and a timed-out
        wait dropping that peer from it (`NvshmemChannel.peers`, `drop_on_timeout`). Returns
        the mask ([W] int64 on the device; set words back to 1 to re-admit a peer)."""
        w = self.rows.layout.world_size
        mask = torch.zeros(w, dtype=torch.int64)
        mask[sorted(set(ranks))] = 1
        peers = mask.to(self.device)
        for ch in (self.rows, self.pairs, self.results):
            ch.peers, ch.drop_on_timeout = peers, True
        return peers

    def failures(self) -> torch.Tensor:
        """[2, W] int64 on the device: timed-out waits of the three channels so far, row 0 puts
        per destination, row 1 gathers per source (`NvshmemChannel.failures`)."""
        return self.rows.failures() + self.pairs.failures() + self.results.failures()

    def check(self, fmt: ExchangeFormat) -> None:
        want = fmt.layouts()
        for name, ch in ((ROWS, self.rows), (PAIRS, self.pairs), (RESULTS, self.results)):
            if ch.layout != want[name] or ch.rank != self.rank:
                raise ValueError(f"channel {name}: layout {ch.layout} (rank {ch.rank}) does not "
                                 f"match the format's {want[name]} (rank {self.rank})")


@dataclass(frozen=True, slots=True)
class ExpertPlacement:
    """The routing of one layer as device tensors: where each expert's pairs go.

    server: [E] int64, the server index (position in `ExchangeFormat.server_ranks`) chosen for
            each expert (one replica of a replicated expert); -1: no live replica (dropped).
    local:  [E] int64, the expert's row in that server's weights (its id on the wire).
    """

    server: torch.Tensor
    local: torch.Tensor

    @classmethod
    def build(cls, num_experts: int, choice: Mapping[int, tuple[int, int]],
              device: torch.device | str = "cpu") -> ExpertPlacement:
        """choice: expert -> (server index, local row); experts left out go nowhere."""
        server = torch.full((num_experts,), -1, dtype=torch.long)
        local = torch.zeros(num_experts, dtype=torch.long)
        for e, (s, row) in choice.items():
            if not 0 <= row < MAX_LOCAL_EXPERTS:
                raise ValueError(f"expert {e}: local row {row} is not in [0, 2**24)")
            server[e], local[e] = s, row
        return cls(server.to(device), local.to(device))

    def update(self, other: ExpertPlacement) -> None:
        """Take `other`'s routing in place (captured graphs keep reading these tensors)."""
        self.server.copy_(other.server, non_blocking=True)
        self.local.copy_(other.local, non_blocking=True)


def bank_rows(bank: Any) -> dict[int, int]:
    """Row of each expert an `ExpertBank` hosts in its weight tensors (`ExpertBank.rows`): its
    index in a loaded bank, its global id in a view of a whole-layer bank."""
    return bank.rows()


def serve_pairs(rows_in: torch.Tensor, pairs_in: torch.Tensor, counts: torch.Tensor,
                fmt: ExchangeFormat, w_gate_up: torch.Tensor, w_down: torch.Tensor
                ) -> torch.Tensor:
    """What a server computes on one round's arrivals: y[s, c] = sum_j w * expert_e(x) over row
    c's pairs from rank s, for c < counts[s]; 0 elsewhere.

    rows_in [W, R, H], pairs_in [W, R, P] float32 (a gather's outputs: rows past counts hold
    stale data), counts [W] int64 on the device. Returns [W * R, H] in rows_in's dtype. One
    grouped GEMM over the W * R * K flattened pairs (`fused_moe`: Triton on CUDA, no host
    sync); padding pairs run local expert 0 on a zero row with weight 0 (exactly 0).
    """
    w, r, h = rows_in.shape
    valid = torch.arange(r, device=rows_in.device)[None, :] < counts[:, None]  # [W, R]
    ids, weights = fmt.decode_pairs(pairs_in)  # [W, R, K]
    present = valid[..., None] & (ids >= 0)
    x = torch.where(valid[..., None], rows_in, 0).view(w * r, h)
    return fused_moe(x, w_gate_up, w_down, torch.where(present, ids, 0).view(w * r, -1),
                     torch.where(present, weights, 0).view(w * r, -1))


def warm_up_experts(fmt: ExchangeFormat,
                    experts: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Run every layer's grouped GEMM of `serve_pairs` once on zero rows, no channel traffic:
    its first launch compiles (Triton, on CUDA: seconds) and loads kernel modules, which must
    happen before the first round — the shards' waits for this server are bounded (timeout_s)
    and a module load may synchronise the context while a wait of this process spins."""
    w, r = fmt.world_size, fmt.max_rows
    for w13, w2 in (pair for pair in experts.values() if pair is not None):
        dev = w13.device
        rows = torch.zeros(w, r, fmt.hidden, dtype=fmt.torch_dtype, device=dev)
        pairs = torch.zeros(w, r, fmt.pair_width, dtype=torch.float32, device=dev)
        serve_pairs(rows, pairs, torch.full((w,), r, dtype=torch.long, device=dev), fmt, w13, w2)


class ShardExchange:
    """A shard's experts step over the device exchange, with `bank_experts`' signature.

    `step(layer, x, topk_ids, topk_weights, params)` = `send` then `receive`: one round. The
    two halves are public so that one process can interleave fake ranks (tests), or a caller
    can overlap work between them. `overflow` ([] int64, on the device) counts every row
    dropped so far because a server's R rows were full; `peers` is the shared peer mask (the
    servers at first); `trouble()` what went wrong per server (module docstring).
    """

    def __init__(self, fmt: ExchangeFormat, channels: ExchangeChannels,
                 placements: Mapping[int, ExpertPlacement]) -> None:
        channels.check(fmt)
        if channels.rank not in fmt.shard_ranks:
            raise ValueError(f"rank {channels.rank} is not a shard rank {fmt.shard_ranks}")
        self.fmt, self.channels, self.placements = fmt, channels, dict(placements)
        self.peers = channels.exchange_with(fmt.server_ranks)
        dev, dt, i64 = channels.device, fmt.torch_dtype, torch.int64
        w, r, h = fmt.world_size, fmt.max_rows, fmt.hidden
        self._server_rank = torch.tensor(fmt.server_ranks, dtype=i64, device=dev)  # [S]
        self._starts = torch.zeros(w, dtype=i64, device=dev).index_copy_(
            0, self._server_rank, torch.arange(len(fmt.server_ranks), device=dev) * r)
        self.results_in = torch.zeros(w, r, h, dtype=dt, device=dev)
        self.results_meta = torch.zeros(w, r + 1, dtype=i64, device=dev)
        self.overflow = torch.zeros((), dtype=i64, device=dev)
        self.lost = torch.zeros(w, dtype=i64, device=dev)  # rows routed to a masked server
        self._pending: RowLayout | None = None

    def __call__(self, layer: Any, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, params: Mapping[str, Any] | None = None
                 ) -> torch.Tensor:
        """The executor's experts step: x [T, H], topk_ids/topk_weights [T, K] -> [T, H]."""
        self.send(layer.layer_idx, x, topk_ids, topk_weights)
        return self.receive()

    def send(self, layer_idx: int, x: torch.Tensor, topk_ids: torch.Tensor,
             topk_weights: torch.Tensor) -> None:
        """Enqueue this round's puts: each server's packed rows and pairs."""
        fmt, ch = self.fmt, self.channels
        if self._pending is not None:
            raise RuntimeError("send: the previous round was not received")
        if layer_idx not in self.placements:
            raise ValueError(f"layer {layer_idx} has no expert placement here "
                             f"(layers: {sorted(self.placements)})")
        if x.dtype != fmt.torch_dtype or x.dim() != 2 or x.shape[1] != fmt.hidden:
            raise ValueError(f"x must be [T, {fmt.hidden}] {fmt.torch_dtype}, got "
                             f"{x.dtype} {tuple(x.shape)}")
        if topk_ids.dim() != 2 or topk_ids.shape != (x.shape[0], fmt.top_k):
            raise ValueError(f"topk_ids must be [{x.shape[0]}, {fmt.top_k}], got "
                             f"{tuple(topk_ids.shape)}")
        place = self.placements[layer_idx]
        layout = pack_rows(topk_ids, topk_weights, place.server, len(fmt.server_ranks),
                           fmt.max_rows, place.local)
        counts = torch.zeros_like(self.lost).index_copy_(0, self._server_rank, layout.counts)
        self.lost += counts * (self.peers == 0)  # this round's rows a masked server will not see
        tokens = layout.rows.reshape(-1)  # [S * R]: row s * R + c is token rows[s, c]
        rows = x[tokens.clamp(min=0)] if x.shape[0] else x.new_zeros(tokens.shape[0], fmt.hidden)
        ch.rows.put_spans(rows, self._starts, counts, tokens)
        pairs = fmt.encode_pairs(layout.pair_experts, layout.pair_weights)
        ch.pairs.put_spans(pairs.view(-1, fmt.pair_width), self._starts, counts)
        self.overflow += layout.overflow
        self._pending = layout

    def receive(self) -> torch.Tensor:
        """Enqueue this round's gather of results (waits on the device for every server in the
        mask); combine."""
        layout, self._pending = self._pending, None
        if layout is None:
            raise RuntimeError("receive: no round was sent")
        self.channels.results.gather(self.results_in, self.results_meta, self.fmt.gather_ctas)
        y = self.results_in.index_select(0, self._server_rank)  # [S, R, H]
        got = self.results_meta.index_select(0, self._server_rank)[:, :1]  # [S, 1]
        arrived = torch.arange(self.fmt.max_rows, device=y.device)[None, :] < got  # [S, R]
        # a masked or timed-out server reports n = 0: its rows add 0, never stale slots
        return combine_rows(torch.where(arrived[..., None], y, 0), layout)

    def failures(self) -> torch.Tensor:
        """[2, W] int64 on the device (no host sync): timed-out waits of this rank's three
        channels so far, row 0 puts per destination, row 1 gathers per source (always 0
        without the channels' `timeout_s`)."""
        return self.channels.failures()

    def trouble(self) -> torch.Tensor:
        """[W] int64 on the device, cumulative: per server rank, waits that timed out plus rows
        left out because it was masked. A step whose delta is 0 everywhere computed every row
        with every pair it routed."""
        return self.failures().sum(0) + self.lost


class ServerExchange:
    """An expert server's side of every MoE layer's round: `server(layer_idx)`, what one
    captured graph per layer replays.

    experts: layer -> (w_gate_up [E_local, 2F, H], w_down [E_local, H, F]) in the activation
    dtype, local row i = the wire's expert id i; None for a MoE layer it hosts nothing of (it
    still takes part in that layer's round: shards route it no rows, it answers zeros). After
    a round, `rows_in` [W, R, H], `meta_in` [W, R + 1] and `pairs_in` [W, R, P] hold what
    arrived (valid until the next round).
    """

    def __init__(self, fmt: ExchangeFormat, channels: ExchangeChannels,
                 experts: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        channels.check(fmt)
        if channels.rank not in fmt.server_ranks:
            raise ValueError(f"rank {channels.rank} is not a server rank {fmt.server_ranks}")
        for l, pair in experts.items():
            if pair is None:
                continue
            w13 = pair[0]
            if w13.shape[0] > MAX_LOCAL_EXPERTS or w13.dtype != fmt.torch_dtype:
                raise ValueError(f"layer {l}: {w13.shape[0]} local experts in {w13.dtype}; "
                                 f"at most 2**24 in {fmt.torch_dtype}")
        self.fmt, self.channels, self.experts = fmt, channels, dict(experts)
        self.peers = channels.exchange_with(fmt.shard_ranks)
        dev, dt, i64 = channels.device, fmt.torch_dtype, torch.int64
        w, r, h, p = fmt.world_size, fmt.max_rows, fmt.hidden, fmt.pair_width
        self.rows_in = torch.zeros(w, r, h, dtype=dt, device=dev)
        self.meta_in = torch.zeros(w, r + 1, dtype=i64, device=dev)
        self.pairs_in = torch.zeros(w, r, p, dtype=torch.float32, device=dev)
        self._pairs_meta = torch.zeros(w, r + 1, dtype=i64, device=dev)
        self._starts = torch.arange(w, dtype=i64, device=dev) * r  # where each rank's rows landed
        self._zeros = torch.zeros(w * r, h, dtype=dt, device=dev)  # a layer hosted nothing of

    @classmethod
    def from_banks(cls, fmt: ExchangeFormat, channels: ExchangeChannels,
                   banks: Mapping[int, Any]) -> ServerExchange:
        """From the server's `ExpertBank`s per layer (None: a layer it hosts nothing of); wire
        ids are `bank_rows(bank)`' rows. The banks' stacked weights (`ExpertBank.stacked`: no
        copy on CUDA)."""
        return cls(fmt, channels, {l: None if b is None else b.stacked()
                                   for l, b in banks.items()})

    def __call__(self, layer_idx: int) -> None:
        """Enqueue one round: gather every shard's rows and pairs, run the layer's experts, put
        the weighted sums back to each shard, from where its rows landed (tags: its token ids).
        A shard whose rows or pairs did not come in time drops out of the mask (no rows from
        it, so none are computed, and no results go back: the shard times out on this server
        instead of getting an answer out of step)."""
        if layer_idx not in self.experts:
            raise ValueError(f"layer {layer_idx}: no experts here (layers: {sorted(self.experts)})")
        ch, ctas = self.channels, self.fmt.gather_ctas
        ch.rows.gather(self.rows_in, self.meta_in, ctas)
        ch.pairs.gather(self.pairs_in, self._pairs_meta, ctas)
        counts = self.meta_in[:, 0]  # [W] on the device
        weights = self.experts[layer_idx]
        y = self._zeros if weights is None else serve_pairs(
            self.rows_in, self.pairs_in, counts, self.fmt, *weights)
        ch.results.put_spans(y, self._starts, counts, self.meta_in[:, 1:].reshape(-1))

    def failures(self) -> torch.Tensor:
        """[2, W] int64 on the device: this server's timed-out waits so far (see ShardExchange)."""
        return self.channels.failures()
