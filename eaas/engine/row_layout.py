"""Token rows packed once per server (DeepEP-style), and the map that combines their results.

The per-pair layout sends one row per (token, k) pair: a token whose K experts live on two
servers crosses to each of them once per expert it has there. The packed layout sends each
token to each server it needs ONCE, with the list of (local expert, weight) pairs that server
runs on it; the server returns one row per token (the weighted sum over its pairs), and the
shard adds up one returned row per server it sent the token to.

Everything is batched tensor ops over fixed shapes (no per-token loop, no host sync, no
data-dependent shapes), so `pack_rows` and `combine_rows` can run inside a captured graph:
each server has a fixed `capacity` of rows; rows past it are dropped and counted in
`RowLayout.overflow` (a 0-dim tensor), never raised.

Worked example: experts 0, 1 on server 0 and 2, 3 on server 1 (local ids 0, 1 on each),
capacity 2.

    topk_ids     = [[0, 2], [1, 0], [3, 2]]        topk_weights = [[.6, .4], [.7, .3], [.5, .5]]
    rows         = [[0, 1], [0, 2]]                 server 0: tokens 0, 1; server 1: tokens 0, 2
    pair_experts = [[[0, -1], [1, 0]], [[0, -1], [1, 0]]]
    pair_weights = [[[.6, 0], [.7, .3]], [[.4, 0], [.5, .5]]]
    counts = [2, 2], overflow = 0
    token_slots  = [[0, 2], [1, -1], [3, -1]]       flat slot s * capacity + c, -1 padded
    pair_slots   = [[0, 2], [1, 1], [3, 3]]

`moe_per_pair_ref` and `serve_rows_ref` are the pure-torch references: the per-pair MoE sum,
and what a server computes on its packed rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["RowLayout", "pack_rows", "combine_rows", "serve_rows_ref", "moe_per_pair_ref"]

# expert_forward(rows [N, H], expert_ids [N] int64) -> [N, H]: row n through expert_ids[n]
ExpertForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class RowLayout:
    """Where each token row goes, per server (S servers, C = capacity rows each, K = top-k).

    rows:         [S, C] int64, the token of each packed row; -1 for an empty row.
    pair_experts: [S, C, K] int64, the row's local expert ids on that server, in the token's
                  k order; -1 pads (a row has as many pairs as the token has experts there).
    pair_weights: [S, C, K] topk_weights' dtype, the matching weights; 0 where padded.
    counts:       [S] int64, rows packed for each server (<= C).
    overflow:     [] int64, rows that did not fit their server's capacity (dropped).
    token_slots:  [T, K] int64, the combine map: flat slots (s * C + c) of the token's rows,
                  one per server it was sent to, in order of its first pair there; -1 pads.
    pair_slots:   [T, K] int64, the flat slot that carries pair (t, k); -1 for an absent pair
                  (topk_ids -1, an expert on no server) or a dropped row.
    """

    rows: torch.Tensor
    pair_experts: torch.Tensor
    pair_weights: torch.Tensor
    counts: torch.Tensor
    overflow: torch.Tensor
    token_slots: torch.Tensor
    pair_slots: torch.Tensor

    @property
    def num_servers(self) -> int:
        return int(self.rows.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.rows.shape[1])


def pack_rows(topk_ids: torch.Tensor, topk_weights: torch.Tensor, expert_server: torch.Tensor,
              num_servers: int, capacity: int,
              expert_local: torch.Tensor | None = None) -> RowLayout:
    """Pack each token once per server it needs (see the module docstring's example).

    topk_ids:      [T, K] int64, global expert ids per token; -1: no expert in that place.
    topk_weights:  [T, K] float, their weights.
    expert_server: [E] int64, the server index (0 <= s < num_servers) chosen for each expert;
                   -1: no server (its pairs are dropped like absent ones; the routing decides
                   what that means). Ids in topk_ids must be < E (not checked: no host sync).
    num_servers:   S. capacity: C, rows each server can take (its receive slots).
    expert_local:  [E] int64, each expert's id on its server (None: the global id).
    Rows keep token order within a server. All outputs are on topk_ids' device.
    """
    if topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [T, K]")
    if topk_ids.dtype.is_floating_point or expert_server.dim() != 1:
        raise ValueError("topk_ids must be an integer [T, K] tensor and expert_server an [E] "
                         "integer tensor")
    if num_servers < 1 or capacity < 1:
        raise ValueError(f"num_servers={num_servers}, capacity={capacity}: both must be >= 1")
    if expert_local is not None and expert_local.shape != expert_server.shape:
        raise ValueError(f"expert_local {tuple(expert_local.shape)} must match expert_server "
                         f"{tuple(expert_server.shape)}")
    dev = topk_ids.device
    T, K = topk_ids.shape
    S, C = num_servers, capacity
    ids = topk_ids.long()
    known = ids >= 0
    safe = ids.clamp(min=0)  # [T, K]
    srv = torch.where(known, expert_server.long().to(dev)[safe], -1)  # [T, K]
    valid = srv >= 0  # [T, K]
    srv_or_dummy = torch.where(valid, srv, S)  # [T, K] column S: a dummy server

    # which servers each token needs, and its row on each (token order, capacity-bounded)
    needs = torch.zeros(T, S + 1, dtype=torch.long, device=dev)
    needs.scatter_(1, srv_or_dummy, 1)
    needs = needs[:, :S]  # [T, S] 0/1
    pos = needs.cumsum(0) - 1  # [T, S] the token's row on server s, if it needs s
    need = needs.sum(0)  # [S]
    counts = need.clamp(max=C)
    overflow = (need - C).clamp(min=0).sum()
    kept = (needs > 0) & (pos < C)  # [T, S]
    dummy_slot = S * C
    slot_ts = torch.where(kept, torch.arange(S, device=dev) * C + pos, dummy_slot)  # [T, S]

    tokens = torch.arange(T, device=dev)
    rows = torch.full((S * C + 1,), -1, dtype=torch.long, device=dev)
    rows.scatter_(0, slot_ts.reshape(-1), tokens[:, None].expand(T, S).reshape(-1))
    rows = rows[:dummy_slot].view(S, C)

    # each pair's slot, and its place j among the token's pairs on the same server
    slot_pad = torch.cat([slot_ts, torch.full((T, 1), dummy_slot, dtype=torch.long,
                                              device=dev)], 1)  # [T, S + 1]
    slot = slot_pad.gather(1, srv_or_dummy)  # [T, K]
    carried = valid & (slot < dummy_slot)  # [T, K]
    same = (srv[:, :, None] == srv[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    earlier = torch.ones(K, K, dtype=torch.bool, device=dev).tril(-1)  # [k, k'] k' < k
    j = (same & earlier).sum(-1)  # [T, K]

    dummy_pair = (dummy_slot + 1) * K - 1  # the dummy row's last place: never read
    pair_at = torch.where(carried, slot * K + j, dummy_pair).reshape(-1)  # [T * K]
    local = ids if expert_local is None else expert_local.long().to(dev)[safe]  # [T, K]
    pair_experts = torch.full(((S * C + 1) * K,), -1, dtype=torch.long, device=dev)
    pair_experts.scatter_(0, pair_at, torch.where(carried, local, -1).reshape(-1))
    pair_weights = torch.zeros((S * C + 1) * K, dtype=topk_weights.dtype, device=dev)
    pair_weights.scatter_(0, pair_at, torch.where(carried, topk_weights,
                                                  0).reshape(-1).to(topk_weights.dtype))
    pair_experts = pair_experts[:dummy_slot * K].view(S, C, K)
    pair_weights = pair_weights[:dummy_slot * K].view(S, C, K)

    # combine map: the first pair of each (token, server) stands for the token's row there
    first = carried & (j == 0)  # [T, K]
    m = first.long().cumsum(1) - 1  # [T, K] its place among the token's rows
    token_slots = torch.full((T, K + 1), -1, dtype=torch.long, device=dev)
    token_slots.scatter_(1, torch.where(first, m, K), torch.where(first, slot, -1))
    return RowLayout(rows=rows, pair_experts=pair_experts, pair_weights=pair_weights,
                     counts=counts, overflow=overflow, token_slots=token_slots[:, :K],
                     pair_slots=torch.where(carried, slot, -1))


def combine_rows(y: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """out[t] = sum of the token's returned rows, one per server it was sent to.

    y: [S, C, H], server s's result for its packed row c (rows past counts[s] are ignored).
    Returns [T, H] in y's dtype. The sum runs in a fixed order (the token's first pair on each
    server), over fixed shapes: deterministic and capturable.
    """
    S, C, H = y.shape
    if (S, C) != tuple(layout.rows.shape):
        raise ValueError(f"y is [{S}, {C}, {H}] but the layout packs [{layout.num_servers}, "
                         f"{layout.capacity}] rows")
    flat = torch.cat([y.reshape(S * C, H), y.new_zeros(1, H)])  # [S * C + 1, H]
    index = torch.where(layout.token_slots >= 0, layout.token_slots, S * C)  # [T, K]
    return flat[index].sum(1)  # [T, H]


def serve_rows_ref(x_rows: torch.Tensor, pair_experts: torch.Tensor, pair_weights: torch.Tensor,
                   expert_forward: ExpertForward) -> torch.Tensor:
    """What a server computes on its packed rows: y[c] = sum_j w[c, j] * expert_{e[c, j]}(x[c]).

    x_rows: [C, H] the rows it received; pair_experts / pair_weights: [C, K] (-1 / 0 padded);
    expert_forward(rows [N, H], local expert ids [N]) -> [N, H]. Returns [C, H].
    """
    C, K = pair_experts.shape
    H = x_rows.shape[1]
    present = pair_experts >= 0  # [C, K]
    flat_rows = x_rows[:, None, :].expand(C, K, H).reshape(C * K, H)
    out = expert_forward(flat_rows, pair_experts.clamp(min=0).reshape(-1)).view(C, K, H)
    w = torch.where(present, pair_weights, 0).to(out.dtype)  # [C, K]
    return (out * w[:, :, None]).sum(1)  # [C, H]


def moe_per_pair_ref(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     expert_forward: ExpertForward) -> torch.Tensor:
    """The per-pair reference: one row per (token, k), out[t] = sum_k w[t, k] * f(x[t], id[t, k]).

    x: [T, H]; topk_ids: [T, K] global ids (-1: absent, contributes nothing); topk_weights:
    [T, K]; expert_forward(rows [N, H], global expert ids [N]) -> [N, H]. Returns [T, H].
    """
    T, K = topk_ids.shape
    H = x.shape[1]
    rows = x[:, None, :].expand(T, K, H).reshape(T * K, H)  # [T * K, H]
    out = expert_forward(rows, topk_ids.clamp(min=0).reshape(-1)).view(T, K, H)
    w = torch.where(topk_ids >= 0, topk_weights, 0).to(out.dtype)  # [T, K]
    return (out * w[:, :, None]).sum(1)  # [T, H]
