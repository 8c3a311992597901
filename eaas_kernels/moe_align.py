"""Triton kernels that sort token-expert pairs by expert and scatter expert rows back.

`moe_align_block_size_triton` computes exactly `reference.moe_align_block_size_ref` (same
`Alignment`, same stable order within an expert):

    counts[e]   = #{p : topk_ids.flat[p] == e}
    padded[e]   = ceil(counts[e] / BM) * BM ;  starts = exclusive_cumsum(padded)
    sorted_ids[starts[e] + rank of p among expert e's pairs] = p ;  other rows = N
    expert_ids[b] = the e with starts[e] <= b*BM < starts[e] + padded[e], else -1

Pairs are read BLOCK_N at a time; a one-hot [BLOCK_N, BLOCK_E] tile gives per-expert counts
(column sums) and stable ranks (column-wise exclusive cumsum) without atomics, so the result is
deterministic. Few pairs (decode): one program does it all. Many pairs: a count kernel over up to
128 chunks, then a scatter kernel in which each chunk's program sums the counts of all chunks
(expert starts) and of the chunks before it (its cursor). On an H200 at N = 32768 one program
took ~1.2 ms; the split path takes 43 + 14 us (E = 256), 2.7 us at N = 8 (benchmarks/RESULTS.md).

`moe_combine_triton` computes `reference.moe_combine_ref`: out[t] = sum_k w[t, k] * y[t*K + k],
summed in float32, one program per (token, BLOCK_H columns).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import Alignment, max_padded_rows

__all__ = ["moe_align_block_size_triton", "moe_combine_triton"]


@triton.jit(do_not_specialize=["N", "TOTAL", "NUM_BLOCKS"])
def _align_kernel(
    ids_ptr, sorted_ptr, expert_ids_ptr, num_post_ptr,  # ids [N] int; outputs as in Alignment
    N, E, TOTAL, NUM_BLOCKS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr,
):
    ecols = tl.arange(0, BLOCK_E)
    rows_n = tl.arange(0, BLOCK_N)
    # pass 1: per-expert counts
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, N, BLOCK_N):
        offs = start + rows_n
        ids = tl.load(ids_ptr + offs, mask=offs < N, other=-1).to(tl.int32)
        onehot = (ids[:, None] == ecols[None, :]).to(tl.int32)  # [BN, BE]
        counts += tl.sum(onehot, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)  # [BE]
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(num_post_ptr, total)
    # expert of each block; -1 past the end
    for bstart in range(0, NUM_BLOCKS, BLOCK_B):
        blocks = bstart + tl.arange(0, BLOCK_B)
        pos = blocks * BLOCK_M
        owner = tl.sum((ends[None, :] <= pos[:, None]).to(tl.int32), axis=1)  # [BB]
        owner = tl.where(pos < total, owner, -1)
        tl.store(expert_ids_ptr + blocks, owner, mask=blocks < NUM_BLOCKS)
    # padding everywhere first, then (after a barrier) the pairs
    for pstart in range(0, TOTAL, BLOCK_N):
        offs = pstart + rows_n
        tl.store(sorted_ptr + offs, tl.zeros([BLOCK_N], dtype=tl.int32) + N, mask=offs < TOTAL)
    tl.debug_barrier()
    cursor = starts
    for start in range(0, N, BLOCK_N):
        offs = start + rows_n
        ids = tl.load(ids_ptr + offs, mask=offs < N, other=-1).to(tl.int32)
        onehot = (ids[:, None] == ecols[None, :]).to(tl.int32)  # [BN, BE]
        before = tl.cumsum(onehot, axis=0) - onehot  # same-expert pairs earlier in the chunk
        dest = tl.sum(onehot * (before + cursor[None, :]), axis=1)  # [BN]
        tl.store(sorted_ptr + dest, offs, mask=offs < N)
        cursor += tl.sum(onehot, axis=0)


@triton.jit(do_not_specialize=["N", "TOTAL", "CHUNK", "FILL"])
def _align_count_kernel(
    ids_ptr, counts_ptr, sorted_ptr,  # ids [N]; counts [C, BLOCK_E] int32; sorted_ids [TOTAL]
    N, TOTAL, CHUNK, FILL,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Program c: per-expert counts of pairs [c*CHUNK, (c+1)*CHUNK), and padding N written into
    its FILL-row slice of sorted_ids (the next kernel overwrites the rows that hold pairs)."""
    c = tl.program_id(0)
    ecols = tl.arange(0, BLOCK_E)
    rows_n = tl.arange(0, BLOCK_N)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    end = tl.minimum(N, (c + 1) * CHUNK)
    for start in range(c * CHUNK, end, BLOCK_N):
        offs = start + rows_n
        ids = tl.load(ids_ptr + offs, mask=offs < end, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == ecols[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + c * BLOCK_E + ecols, counts)
    fill_end = tl.minimum(TOTAL, (c + 1) * FILL)
    for pstart in range(c * FILL, fill_end, BLOCK_N):
        offs = pstart + rows_n
        tl.store(sorted_ptr + offs, tl.zeros([BLOCK_N], dtype=tl.int32) + N, mask=offs < fill_end)


@triton.jit(do_not_specialize=["N", "CHUNK", "NUM_BLOCKS", "BLOCKS_PER"])
def _align_scatter_kernel(
    ids_ptr, counts_ptr, sorted_ptr, expert_ids_ptr, num_post_ptr,
    N, CHUNK, NUM_CHUNKS, NUM_BLOCKS, BLOCKS_PER,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program c: expert starts from all chunks' counts, its cursor from the chunks before it,
    then a stable scatter of its own pairs and the expert id of its slice of blocks."""
    c = tl.program_id(0)
    ecols = tl.arange(0, BLOCK_E)
    totals = tl.zeros([BLOCK_E], dtype=tl.int32)
    before = tl.zeros([BLOCK_E], dtype=tl.int32)
    for cstart in range(0, NUM_CHUNKS, BLOCK_C):
        crows = cstart + tl.arange(0, BLOCK_C)
        tile = tl.load(counts_ptr + crows[:, None] * BLOCK_E + ecols[None, :],
                       mask=crows[:, None] < NUM_CHUNKS, other=0)  # [BC, BE]
        totals += tl.sum(tile, axis=0)
        before += tl.sum(tl.where(crows[:, None] < c, tile, 0), axis=0)
    padded = (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    if c == 0:
        tl.store(num_post_ptr, total)
    bend = tl.minimum(NUM_BLOCKS, (c + 1) * BLOCKS_PER)
    for bstart in range(c * BLOCKS_PER, bend, BLOCK_N):
        blocks = bstart + tl.arange(0, BLOCK_N)
        pos = blocks * BLOCK_M
        owner = tl.sum((ends[None, :] <= pos[:, None]).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + blocks, tl.where(pos < total, owner, -1), mask=blocks < bend)
    cursor = ends - padded + before
    rows_n = tl.arange(0, BLOCK_N)
    end = tl.minimum(N, (c + 1) * CHUNK)
    for start in range(c * CHUNK, end, BLOCK_N):
        offs = start + rows_n
        ids = tl.load(ids_ptr + offs, mask=offs < end, other=-1).to(tl.int32)
        onehot = (ids[:, None] == ecols[None, :]).to(tl.int32)  # [BN, BE]
        earlier = tl.cumsum(onehot, axis=0) - onehot
        dest = tl.sum(onehot * (earlier + cursor[None, :]), axis=1)
        tl.store(sorted_ptr + dest, offs, mask=offs < end)
        cursor += tl.sum(onehot, axis=0)


def moe_align_block_size_triton(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, max_programs: int = 128
) -> Alignment:
    """Triton version of `reference.moe_align_block_size_ref` (same arguments and result).

    Up to BLOCK_N pairs run in one program; more are split into up to `max_programs` chunks,
    counted by one kernel and scattered by a second (the multi-program path).
    """
    flat = topk_ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    num_pairs = flat.numel()
    total = max_padded_rows(num_pairs, num_experts, block_m)
    num_blocks = total // block_m
    device = topk_ids.device
    sorted_ids = torch.empty(total, dtype=torch.int32, device=device)  # [P]
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)  # [P / BM]
    num_post = torch.empty(1, dtype=torch.int32, device=device)  # [1]
    block_e = triton.next_power_of_2(num_experts)
    block_n = max(16, min(128, 16384 // block_e))
    if num_pairs <= block_n:
        # decode: a tile just big enough for the pairs (the [128, E] tile took 6 us at N = 8)
        small_n = max(16, triton.next_power_of_2(num_pairs))
        _align_kernel[(1,)](
            flat, sorted_ids, expert_ids, num_post, num_pairs, num_experts, total, num_blocks,
            BLOCK_M=block_m, BLOCK_N=small_n, BLOCK_E=block_e, BLOCK_B=max(16, 4096 // block_e),
            num_warps=4 if small_n * block_e <= 4096 else 8,
        )
        return Alignment(sorted_ids, expert_ids, num_post)
    chunk = max(block_n, triton.cdiv(num_pairs, max_programs))
    num_chunks = triton.cdiv(num_pairs, chunk)
    counts = torch.empty(num_chunks, block_e, dtype=torch.int32, device=device)  # [C, BE]
    _align_count_kernel[(num_chunks,)](
        flat, counts, sorted_ids, num_pairs, total, chunk, triton.cdiv(total, num_chunks),
        BLOCK_N=block_n, BLOCK_E=block_e, num_warps=8,
    )
    _align_scatter_kernel[(num_chunks,)](
        flat, counts, sorted_ids, expert_ids, num_post, num_pairs, chunk, num_chunks, num_blocks,
        triton.cdiv(num_blocks, num_chunks),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_E=block_e,
        BLOCK_C=max(1, min(16, 4096 // block_e)), num_warps=8,
    )
    return Alignment(sorted_ids, expert_ids, num_post)


@triton.jit
def _combine_kernel(
    y_ptr, w_ptr, out_ptr,  # y [T*K, H]; w [T, K] float; out [T, H]
    H, stride_y, stride_out,
    K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(K):
        w = tl.load(w_ptr + token * K + k).to(tl.float32)
        row = tl.load(y_ptr + (token * K + k) * stride_y + cols, mask=mask, other=0.0)
        acc += w * row.to(tl.float32)
    tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def moe_combine_triton(
    expert_out: torch.Tensor, topk_weights: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton version of `reference.moe_combine_ref`; writes into `out` [T, H] when given."""
    num_tokens, top_k = topk_weights.shape
    hidden = expert_out.shape[1]
    if out is None:
        out = torch.empty(num_tokens, hidden, dtype=expert_out.dtype, device=expert_out.device)
    if num_tokens == 0:
        return out
    weights = topk_weights.contiguous()
    block_h = min(1024, triton.next_power_of_2(hidden))
    grid = (num_tokens, triton.cdiv(hidden, block_h))
    _combine_kernel[grid](
        expert_out, weights, out, hidden, expert_out.stride(0), out.stride(0),
        K=top_k, BLOCK_H=block_h, num_warps=4,
    )
    return out
