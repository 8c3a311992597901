"""Pure-torch references of the attention kernels (CPU or any device): paged decode attention
(GQA and absorbed MLA, kernels in `paged_attention`) and GQA attention's row preparation (q/k norm,
RoPE, the paged K/V write; kernel in `rope_cache`), with the argument checks the kernels share.

Paged decode attention: scores, softmax and P @ V all in float32, the output rounded to q's dtype
once. The row preparation rounds as torch's elementwise ops do (see `rope_cache_write_ref`).
"""

from __future__ import annotations

import torch

from .reference import rms_norm_ref

__all__ = [
    "check_paged_args",
    "check_paged_gqa",
    "check_paged_mla",
    "paged_positions",
    "paged_decode_gqa_ref",
    "paged_decode_mla_ref",
    "check_rope_cache_args",
    "rope_cache_write_ref",
]


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
