"""Pure-torch references for every kernel in this package (CPU or any device, any float dtype).

The engine runs on these alone on CPU; the Triton kernels in `topk_gating`, `moe_align`,
`grouped_gemm`, `paged_attention`, `invariant` and `rope_cache` are checked against them.
Routing follows Hugging Face
exactly (see `topk_gating` for the math); the expert MLP is `down(silu(gate(x)) * up(x))` with
`w_gate_up [E, 2F, H]` (gate rows first, then up rows) and `w_down [E, H, F]`, the layout of
transformers' fused `*Experts` modules.

Rounding points, shared with the kernels: products accumulate in float32; the activation
`silu(gate) * up` and each expert's output row are rounded to the input dtype (the kernels store
them in that dtype); the weighted sum over K accumulates in float32. Paged decode attention:
scores, softmax and P @ V all in float32, the output rounded to q's dtype once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "Routing",
    "Alignment",
    "check_logits",
    "check_grouped_args",
    "check_moe_weights",
    "topk_softmax_ref",
    "topk_grouped_sigmoid_ref",
    "max_padded_rows",
    "moe_align_block_size_ref",
    "moe_combine_ref",
    "fused_moe_ref",
    "expert_rows_ref",
    "matmul_ref",
    "rms_norm_ref",
    "check_rope_cache_args",
    "rope_cache_write_ref",
]


class Routing(NamedTuple):
    """Result of a router: which K experts each token goes to, and with what weight.

    topk_weights: [T, K] float32, the gate weight of each chosen expert.
    topk_ids:     [T, K] int64, expert ids in [0, E), in descending order of choice score.
    """

    topk_weights: torch.Tensor
    topk_ids: torch.Tensor


def check_logits(logits: torch.Tensor, k: int) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a float tensor, got {logits.dtype}")
    num_experts = logits.shape[1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, E={num_experts}], got {k}")


def check_grouped_args(
    logits: torch.Tensor, bias: torch.Tensor | None, k: int, n_group: int, topk_group: int
) -> None:
    """Validate the deepseek_v3 routing arguments (raises ValueError/TypeError)."""
    check_logits(logits, k)
    num_experts = logits.shape[1]
    if n_group < 1 or num_experts % n_group != 0:
        raise ValueError(f"n_group must divide E={num_experts}, got {n_group}")
    if num_experts // n_group < 2:
        raise ValueError(f"each group needs >= 2 experts (E/n_group), got {num_experts // n_group}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
    if k > topk_group * (num_experts // n_group):
        raise ValueError(f"k={k} exceeds the experts in topk_group={topk_group} groups")
    if bias is not None and tuple(bias.shape) != (num_experts,):
        raise ValueError(f"bias must be [E={num_experts}], got shape {tuple(bias.shape)}")


# --- references ------------------------------------------------------------------------------
def topk_softmax_ref(logits: torch.Tensor, k: int, renormalize: bool) -> Routing:
    """Hugging Face's softmax router on logits [T, E] (any float dtype); see the module doc."""
    check_logits(logits, k)
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, k, dim=-1)  # [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(weights, ids)


def topk_grouped_sigmoid_ref(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    renormalize: bool,
) -> Routing:
    """DeepSeek-V3's router (`DeepseekV3TopkRouter.forward` after the linear); see module doc."""
    check_grouped_args(logits, bias, k, n_group, topk_group)
    num_tokens, num_experts = logits.shape
    scores = logits.float().sigmoid()  # [T, E]
    choice = scores if bias is None else scores + bias.float()  # [T, E]
    group_scores = choice.view(num_tokens, n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # [T, G]
    score_mask = group_mask.unsqueeze(-1).expand(-1, -1, num_experts // n_group)
    choice = choice.masked_fill(~score_mask.reshape(num_tokens, -1).bool(), float("-inf"))
    ids = torch.topk(choice, k=k, dim=-1)[1]  # [T, K], descending by biased score
    weights = scores.gather(1, ids)  # [T, K]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return Routing(weights * routed_scaling_factor, ids)


# --- align / permute / combine -----------------------------------------------------------------
class Alignment(NamedTuple):
    """Token-expert pairs sorted by expert into groups padded to whole blocks of `block_m` rows.

    A pair is p = t * K + k (token t's k-th choice); there are N = T * K pairs.
    sorted_ids:  [P] int32, P = `max_padded_rows(N, E, block_m)`: the pair at each sorted row,
                 or N for a padding row (and for every row past `num_post_padded`).
    expert_ids:  [P / block_m] int32: the expert of each block, -1 for blocks past the end.
    num_post_padded: [1] int32: rows in use (a multiple of block_m); stays on the device.

    Example, topk_ids = [[2, 0], [2, 1]] (T=2, K=2, N=4), E=3, block_m=2:
      expert 0: pair 1; expert 1: pair 3; expert 2: pairs 0, 2
      sorted_ids = [1, 4, 3, 4, 0, 2, 4, 4, ...], expert_ids = [0, 1, 2, -1, ...],
      num_post_padded = [6]
    """

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_post_padded: torch.Tensor


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static bound on sorted rows: every non-empty expert (at most min(N, E)) pads < block_m."""
    rows = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    return max(block_m, -(-rows // block_m) * block_m)


def moe_align_block_size_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort the pairs of topk_ids [T, K] (int, values in [0, E)) by expert; see `Alignment`.

    Pairs of one expert keep ascending pair order. Fixed-size outputs and no host sync, so this
    also runs inside a CUDA graph.
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()  # [N]
    num_pairs = flat.numel()
    total = max_padded_rows(num_pairs, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    ends = torch.cumsum(padded, 0)  # [E]
    starts = ends - padded
    firsts = torch.cumsum(counts, 0) - counts  # [E] first sorted index of each expert, unpadded
    sorted_expert, order = torch.sort(flat, stable=True)  # [N]
    rank = torch.arange(num_pairs, device=device) - firsts[sorted_expert]
    sorted_ids = torch.full((total,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[starts[sorted_expert] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, total, block_m, device=device)  # [P / block_m]
    expert_ids = torch.searchsorted(ends, block_start, right=True)
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    num_post = ends[-1:].to(torch.int32)
    return Alignment(sorted_ids, expert_ids, num_post)


def moe_combine_ref(expert_out: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Weighted scatter-back: out[t] = sum_k topk_weights[t, k] * expert_out[t * K + k].

    expert_out: [T * K, H] rows in pair order; topk_weights: [T, K]. Returns [T, H] in
    expert_out's dtype, summed in float32.
    """
    num_tokens, top_k = topk_weights.shape
    rows = expert_out.view(num_tokens, top_k, -1).float()  # [T, K, H]
    return (rows * topk_weights.float().unsqueeze(-1)).sum(dim=1).to(expert_out.dtype)


# --- expert MLP ----------------------------------------------------------------------------------
def check_moe_weights(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> None:
    """Validate x [*, H] against w_gate_up [E, 2F, H] and w_down [E, H, F] (dtypes and shapes)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    if w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError("w_gate_up must be [E, 2F, H] and w_down [E, H, F]")
    num_experts, two_f, hidden = w_gate_up.shape
    if hidden != x.shape[1] or two_f % 2 != 0:
        raise ValueError(
            f"w_gate_up {tuple(w_gate_up.shape)} does not fit x {tuple(x.shape)}: need [E, 2F, H]"
        )
    if tuple(w_down.shape) != (num_experts, hidden, two_f // 2):
        raise ValueError(
            f"w_down must be [E={num_experts}, H={hidden}, F={two_f // 2}], "
            f"got {tuple(w_down.shape)}"
        )
    allowed = (torch.float32, torch.float16, torch.bfloat16)
    if x.dtype not in allowed or w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise TypeError(
            f"x, w_gate_up, w_down must share one dtype of {allowed}, "
            f"got {x.dtype}, {w_gate_up.dtype}, {w_down.dtype}"
        )


def _expert_mlp(rows: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """rows [n, H] through one expert (w_gate_up [2F, H], w_down [H, F]) -> [n, H], rows.dtype."""
    gate, up = (rows.float() @ w_gate_up.float().T).chunk(2, dim=-1)  # [n, F] each
    act = (torch.nn.functional.silu(gate) * up).to(rows.dtype)  # [n, F]
    return (act.float() @ w_down.float().T).to(rows.dtype)  # [n, H]


def expert_rows_ref(
    x: torch.Tensor, expert_ids: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """Each row x[n] [N, H] through expert expert_ids[n] [N]; no weighting. Returns [N, H]."""
    check_moe_weights(x, w_gate_up, w_down)
    out = torch.empty_like(x)  # [N, H]
    for expert in torch.unique(expert_ids).tolist():
        rows = (expert_ids == expert).nonzero().squeeze(1)  # [n]
        out[rows] = _expert_mlp(x[rows], w_gate_up[expert], w_down[expert])
    return out


def fused_moe_ref(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """The routed-expert output of an MoE layer: sum_k topk_weights[t, k] * expert_k(x[t]).

    x [T, H]; topk_ids [T, K] int; topk_weights [T, K] float. Returns [T, H] in x.dtype.
    """
    num_tokens, top_k = topk_ids.shape
    per_pair = expert_rows_ref(
        x.repeat_interleave(top_k, dim=0), topk_ids.reshape(-1), w_gate_up, w_down
    )  # [T * K, H], pair order
    return moe_combine_ref(per_pair, topk_weights)


# --- paged decode attention ----------------------------------------------------------------------
# One query token per sequence over a paged KV cache (math in `paged_attention`'s docstring).
# Token j of sequence b sits at slot block_tables[b, j // block_size] * block_size + j % block_size.
def check_paged_args(
    q: torch.Tensor,
    caches: tuple[torch.Tensor, ...],
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    out: torch.Tensor | None,
    out_dim: int,
) -> None:
    """Shape, dtype and device checks shared by the paged decode references and kernels. Reads
    no tensor's values (so it is safe inside a CUDA-graph capture)."""
    allowed = (torch.float32, torch.float16, torch.bfloat16)
    if q.dtype not in allowed or any(c.dtype != q.dtype for c in caches):
        raise TypeError(
            f"q and the caches must share one dtype of {allowed}, "
            f"got {q.dtype} and {[c.dtype for c in caches]}"
        )
    if any(c.shape[:2] != caches[0].shape[:2] for c in caches):
        raise ValueError(
            f"caches must share [num_blocks, block_size], got {[tuple(c.shape) for c in caches]}"
        )
    num_seqs = q.shape[0]
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2:
        raise TypeError(
            f"block_tables must be int32 [B, max_blocks], got {block_tables.dtype} "
            f"{tuple(block_tables.shape)}"
        )
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != (num_seqs,):
        raise TypeError(f"seq_lens must be int32 [B={num_seqs}], got {seq_lens.dtype} "
                        f"{tuple(seq_lens.shape)}")
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows, q has B={num_seqs}")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 0:
        raise TypeError(f"max_seq_len must be a host int >= 0, got {max_seq_len!r}")
    tensors = (q, *caches, block_tables, seq_lens) + (() if out is None else (out,))
    if any(t.device != q.device for t in tensors):
        raise ValueError(
            f"all tensors must be on one device, got {[str(t.device) for t in tensors]}"
        )
    want = (num_seqs, q.shape[1], out_dim)
    if out is not None and (tuple(out.shape) != want or out.dtype != q.dtype):
        raise ValueError(f"out must be {q.dtype} {want}, got {out.dtype} {tuple(out.shape)}")


def check_paged_gqa(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, max_seq_len: int, window: int | None, out: torch.Tensor | None,
) -> None:
    """Validate `paged_decode_gqa` arguments (raises ValueError/TypeError; reads no values)."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"need q [B, num_heads, head_dim] and k_cache = v_cache shape [num_blocks, block_size, "
            f"num_kv_heads, head_dim], got {tuple(q.shape)}, {tuple(k_cache.shape)}, "
            f"{tuple(v_cache.shape)}"
        )
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit k_cache {tuple(k_cache.shape)}: head_dim must match "
            f"and num_kv_heads must divide num_heads"
        )
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    check_paged_args(q, (k_cache, v_cache), block_tables, seq_lens, max_seq_len, out, head_dim)


def check_paged_mla(
    q_lat: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, rope_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
    out: torch.Tensor | None,
) -> None:
    """Validate `paged_decode_mla` arguments (raises ValueError/TypeError; reads no values)."""
    if q_lat.dim() != 3 or q_rope.dim() != 3 or kv_cache.dim() != 3 or rope_cache.dim() != 3:
        raise ValueError(
            f"need q_lat [B, nh, L], q_rope [B, nh, R], kv_cache [num_blocks, block_size, L], "
            f"rope_cache [num_blocks, block_size, R], got {tuple(q_lat.shape)}, "
            f"{tuple(q_rope.shape)}, {tuple(kv_cache.shape)}, {tuple(rope_cache.shape)}"
        )
    if (q_rope.shape[:2] != q_lat.shape[:2] or kv_cache.shape[2] != q_lat.shape[2]
            or rope_cache.shape[2] != q_rope.shape[2]):
        raise ValueError(
            f"q_lat {tuple(q_lat.shape)}, q_rope {tuple(q_rope.shape)} do not fit kv_cache "
            f"{tuple(kv_cache.shape)}, rope_cache {tuple(rope_cache.shape)}"
        )
    if q_rope.dtype != q_lat.dtype:
        raise TypeError(f"q_rope must be {q_lat.dtype} like q_lat, got {q_rope.dtype}")
    check_paged_args(q_lat, (kv_cache, rope_cache), block_tables, seq_lens, max_seq_len, out,
                     q_lat.shape[2])


def paged_positions(
    block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, max_seq_len: int,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(block_ids, offsets, visible), each [B, S] over positions 0..S-1, S = max(seq_lens): where
    each position sits in the cache (cache[block_ids, offsets]) and whether the row's query (at
    seq_lens[b] - 1) sees it. Hidden positions point at block 0, offset 0 (padding table entries
    are never looked up). Reads seq_lens on the host: references only.

    Example (block_size 2): tables [[3, 1], [2, 0]], seq_lens [3, 1] ->
      block_ids [[3, 3, 1], [2, 0, 0]], offsets [[0, 1, 0], [0, 0, 0]],
      visible [[T, T, T], [T, F, F]]
    """
    lens = seq_lens.long()  # [B]
    span = int(lens.max()) if lens.numel() else 0
    if span > max_seq_len or span > block_tables.shape[1] * block_size:
        raise ValueError(f"seq_lens reach {span}, past max_seq_len={max_seq_len} or "
                         f"max_blocks * block_size = {block_tables.shape[1] * block_size}")
    pos = torch.arange(span, device=seq_lens.device)  # [S]
    visible = pos[None, :] < lens[:, None]  # [B, S]
    if window is not None:
        visible &= pos[None, :] > lens[:, None] - 1 - window
    table_idx = (pos // block_size).expand(lens.numel(), -1)  # [B, S]
    block_ids = block_tables.long().gather(1, table_idx).where(visible, 0)  # [B, S]
    offsets = (pos % block_size).expand_as(block_ids).where(visible, 0)  # [B, S]
    return block_ids, offsets, visible


def _paged_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """float32 softmax of scores [B, ..., S] over visible [B, S]; all-hidden rows give zeros."""
    mask = visible.view((visible.shape[0],) + (1,) * (scores.dim() - 2) + (visible.shape[1],))
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return probs.masked_fill(~mask, 0.0)  # a row with no key: zeros, not NaN


def paged_decode_gqa_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, max_seq_len: int, window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over a paged cache, GQA; arguments as `eaas_kernels.paged_decode_gqa`.

    Gathers every row's visible K/V through its block table (vectorised over the batch; hidden
    positions read as zeros), then plain float32 softmax(scale * q.K^T) @ V.
    Returns [B, num_heads, head_dim] in q.dtype.
    """
    check_paged_gqa(q, k_cache, v_cache, block_tables, seq_lens, max_seq_len, window, out)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    blocks, offsets, visible = paged_positions(
        block_tables, seq_lens, k_cache.shape[1], max_seq_len, window
    )  # [B, S] each
    hidden = ~visible[:, :, None, None]  # [B, S, 1, 1]: zeroed, so no stale slot can be NaN
    k = k_cache[blocks, offsets].float().masked_fill(hidden, 0.0)  # [B, S, nkv, d]
    v = v_cache[blocks, offsets].float().masked_fill(hidden, 0.0)  # [B, S, nkv, d]
    qg = q.float().view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("bgrd,bsgd->bgrs", qg, k) * scale  # [B, nkv, rep, S]
    probs = _paged_softmax(scores, visible)
    result = torch.einsum("bgrs,bsgd->bgrd", probs, v).reshape(num_seqs, num_heads, head_dim)
    return result.to(q.dtype) if out is None else out.copy_(result)


def paged_decode_mla_ref(
    q_lat: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, rope_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, max_seq_len: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode over a paged latent cache; arguments as `eaas_kernels.paged_decode_mla`.

    score_j = scale * (q_lat . kv_j + q_rope . rope_j); out = softmax(score) @ kv, in float32.
    Returns [B, nh, L] in q_lat.dtype.
    """
    check_paged_mla(q_lat, q_rope, kv_cache, rope_cache, block_tables, seq_lens, max_seq_len, out)
    blocks, offsets, visible = paged_positions(
        block_tables, seq_lens, kv_cache.shape[1], max_seq_len
    )  # [B, S] each
    hidden = ~visible[:, :, None]  # [B, S, 1]
    kv = kv_cache[blocks, offsets].float().masked_fill(hidden, 0.0)  # [B, S, L]
    rope = rope_cache[blocks, offsets].float().masked_fill(hidden, 0.0)  # [B, S, R]
    scores = (torch.einsum("bhl,bsl->bhs", q_lat.float(), kv)
              + torch.einsum("bhr,bsr->bhs", q_rope.float(), rope)) * scale  # [B, nh, S]
    result = torch.einsum("bhs,bsl->bhl", _paged_softmax(scores, visible), kv)  # [B, nh, L]
    return result.to(q_lat.dtype) if out is None else out.copy_(result)


# --- batch-invariant linear and RMSNorm (kernels in `invariant`) --------------------------------
def matmul_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ w.T + bias: x [M, K], w [N, K], bias [N] or None. Products and sums in float32,
    bias added in float32, one rounding to x.dtype. Returns [M, N]."""
    y = x.float() @ w.float().T  # [M, N]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., H] with weight [H]: statistics in float32, the
    normalised x rounded to x.dtype before the weight multiplies it (transformers' order).
    Returns x's shape in torch.promote_types(weight.dtype, x.dtype)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


# --- GQA q/k norm + RoPE + paged K/V write (kernel in `rope_cache`) ------------------------------
def check_rope_cache_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    slots: torch.Tensor, table: torch.Tensor, q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
) -> None:
    """Validate `rope_cache_write` arguments (raises ValueError/TypeError; reads no values)."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or k.shape[0] != q.shape[0] \
            or k.shape[2] != q.shape[2]:
        raise ValueError(f"need q [T, NH, D], k = v [T, NKV, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    t, _, d = q.shape
    if d % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {d}")
    if k_cache.dim() != 3 or k_cache.shape[1:] != k.shape[1:] or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches must be [S, NKV={k.shape[1]}, D={d}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if table.dim() != 3 or tuple(table.shape[1:]) != (2, d // 2) or not table.is_contiguous():
        raise ValueError(f"table must be a contiguous [P, 2, {d // 2}] cos|sin table, got "
                         f"{tuple(table.shape)}")
    for name, ix in (("positions", positions), ("slots", slots)):
        if ix.dtype != torch.long or tuple(ix.shape) != (t,):
            raise TypeError(f"{name} must be int64 [T={t}], got {ix.dtype} {tuple(ix.shape)}")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm must both be given or both be None")
    if q_norm is not None and (q_norm.shape != (d,) or k_norm.shape != (d,)):
        raise ValueError(f"q_norm/k_norm must be [D={d}], got {tuple(q_norm.shape)}, "
                         f"{tuple(k_norm.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dim, got {x.stride()}")
    tensors = [q, k, v, positions, slots, table, k_cache, v_cache]
    tensors += [] if q_norm is None else [q_norm, k_norm]
    if any(x.device != q.device for x in tensors):
        raise ValueError(f"all tensors must be on one device, got "
                         f"{[str(x.device) for x in tensors]}")
    if table.dtype != q.dtype:
        raise TypeError(f"table must be in q's dtype {q.dtype}, got {table.dtype}")


def rope_cache_write_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    slots: torch.Tensor, table: torch.Tensor, q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None, eps: float, k_cache: torch.Tensor, v_cache: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, NH, D], k/v [T, NKV, D]: optional per-head RMSNorm of q and k (weights [D], as
    `rms_norm_ref`), RoPE in the halves layout with the cos|sin rows table[positions] ([P, 2,
    D/2] in q's dtype; every product and sum rounded to that dtype, as torch's elementwise ops
    do), k and v stored to k_cache/v_cache [S, NKV, D] at slots. Returns the queries [T, NH, D]
    (into `out` if given)."""
    check_rope_cache_args(q, k, v, positions, slots, table, q_norm, k_norm, k_cache, v_cache)
    if q_norm is not None:
        q, k = rms_norm_ref(q, q_norm, eps), rms_norm_ref(k, k_norm, eps)
    rows = table[positions.clamp(0, table.shape[0] - 1)]  # [T, 2, D/2]
    cos = torch.cat([rows[:, 0], rows[:, 0]], dim=-1)[:, None, :]  # [T, 1, D]
    sin = torch.cat([rows[:, 1], rows[:, 1]], dim=-1)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    qo = rotate(q)
    k_cache.index_copy_(0, slots, rotate(k).to(k_cache.dtype))
    v_cache.index_copy_(0, slots, v.to(v_cache.dtype))
    if out is not None:
        out.copy_(qo)
        return out
    return qo
