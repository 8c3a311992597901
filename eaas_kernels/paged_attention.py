"""Batched decode attention over a paged KV cache in Triton: GQA and absorbed MLA, one query token
per sequence.

Row b's query sits at position p = seq_lens[b] - 1 and sees the keys j in V(b) = [lo, p], lo = 0,
or lo = max(p - window + 1, 0) with a sliding window (as transformers/mistral). Key j sits at slot
block_tables[b, j // block_size] * block_size + j % block_size.

    GQA:  s_j = scale * q[b, h] . K[j, h // rep]                        out[b, h] = softmax(s) @ V
    MLA:  s_j = scale * (q_lat[b, h] . kv_j + q_rope[b, h] . rope_j)    out[b, h] = softmax(s) @ kv

Split-KV (flash-decoding) in two kernels, BATCH-INVARIANT: row b's result depends only on row b's
data, bitwise, whatever B, max_seq_len or the other rows are.
  1. `_partition_kernel`, grid (B, head groups, P): program (b, g, i) takes the FIXED partition
     i = positions [i * PARTITION, (i + 1) * PARTITION) of row b (PARTITION is a constant of the
     config, never derived from B or max_seq_len), walks it in BLOCK_N-token chunks that start at
     multiples of BLOCK_N, with an online softmax, and stores its un-normalised partial
     (m_i = max s, l_i = sum exp(s - m_i), acc_i = sum exp(s - m_i) V) in float32. A partition
     outside V(b) returns at once and reads nothing. A head group is all the query heads of one
     kv head (GQA: K/V are read once per group) or BLOCK_H of the nh heads (MLA), its rows padded
     to >= 16 so that both products run on tl.dot.
  2. `_reduce_kernel`, grid (B, head blocks of 16): combines row b's partitions in ascending order,
     out = sum_i exp(m_i - M) acc_i / sum_i exp(m_i - M) l_i, M = max_i m_i; zeros for a row with
     seq_lens[b] == 0 (which reads no memory in either kernel).
The tile configuration is one per kind (`GQA_CONFIG`, `MLA_CONFIG`) and dtype, never chosen by B.

Rounding: q.K (and the rope term) accumulate in float32 on the matrix units from q's dtype
(float32: IEEE products); the softmax is float32; the weights exp(s - m) are rounded to the
cache's dtype for the P @ V product, which accumulates in float32; the output is rounded to q's
dtype once. References: `reference_attention.paged_decode_gqa_ref` / `paged_decode_mla_ref`
(all float32).

CUDA graphs: the grid and the workspace, float32 [B, heads, P, Dv] and [B, heads, P, 2] with
P = cdiv(min(max_seq_len, max_blocks * block_size), PARTITION), come from host ints only, and
nothing reads a device tensor on the host. The workspace is 4 * B * heads * P * (Dv + 2) bytes:
e.g. 1.1 GB for MLA with B = 64, 128 heads, max_seq_len = 32768. Contract: seq_lens[b] <=
max_seq_len; it is not checked on the device, but a longer row is clamped (it sees only its
first max_seq_len keys), so no read leaves the block table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .reference_attention import check_paged_gqa, check_paged_mla

__all__ = [
    "PagedAttentionConfig",
    "GQA_CONFIG",
    "MLA_CONFIG",
    "paged_decode_gqa_triton",
    "paged_decode_mla_triton",
]


@dataclass(frozen=True, slots=True)
class PagedAttentionConfig:
    """One tile configuration. partition: tokens per split-KV partition (the batch-invariant
    unit); block_n: tokens per inner step (divides partition; halved for float32); block_h: most
    query heads per program (a power of 2; rows are padded to >= 16 for tl.dot); num_warps,
    num_stages: Triton's."""

    partition: int
    block_n: int
    block_h: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_n", "block_h"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of 2 >= 16, got {value}")
        if self.partition < self.block_n or self.partition % self.block_n:
            raise ValueError(
                f"partition must be a multiple of block_n={self.block_n}, got {self.partition}"
            )


# Picked on one H200 (bf16, block_size 16 / 64) from a small sweep timed by CUDA-graph replay:
# GQA 32 q / 4 kv heads, head_dim 128 reads K/V at ~3.1-3.3 TB/s for B >= 64; MLA L=512, R=64
# with 128 heads ~135 TFLOP/s (64 heads a program ran 2x faster than 16). 512-token partitions as
# vLLM's paged attention v2. float32 runs half-size chunks (shared memory).
GQA_CONFIG = PagedAttentionConfig(partition=512, block_n=128, block_h=64, num_warps=8, num_stages=2)
MLA_CONFIG = PagedAttentionConfig(partition=512, block_n=64, block_h=64, num_warps=8, num_stages=2)
REDUCE_HEADS = 16  # heads per program of the reduce kernel


@triton.jit(do_not_specialize=["window", "max_len", "num_parts", "stride_tb"])
def _partition_kernel(
    q_ptr, qr_ptr, k_ptr, kr_ptr, v_ptr,  # q [B, NH, DK]; q_rope [B, NH, DR]; [NB, BS, NKV, D*]
    tables_ptr, lens_ptr,  # block_tables [B, max_blocks] int32; seq_lens [B] int32
    part_acc_ptr, part_ml_ptr,  # workspace [B, NH, P, DV] and [B, NH, P, 2] (m, l)
    scale, window, max_len, num_parts, REP, NH, BS, DK, DR, DV,
    stride_qb, stride_qh, stride_rb, stride_rh,
    stride_kb, stride_ko, stride_kh, stride_krb, stride_kro, stride_krh,
    stride_vb, stride_vo, stride_vh, stride_tb, stride_tn, stride_l,
    HAS_ROPE: tl.constexpr, V_IS_K: tl.constexpr, PARTITION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    part = tl.program_id(2)
    seq_len = tl.minimum(tl.load(lens_ptr + b * stride_l), max_len)
    lo = tl.maximum(seq_len - window, 0)  # first visible position
    part_lo = part * PARTITION
    if (part_lo >= seq_len) | (part_lo + PARTITION <= lo):
        return
    head_blocks = tl.cdiv(REP, BLOCK_H)
    kv_head = tl.program_id(1) // head_blocks
    rows = (tl.program_id(1) % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < REP
    heads = kv_head * REP + rows  # [BH]
    dk = tl.arange(0, BLOCK_DK)
    dr = tl.arange(0, BLOCK_DR)
    dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + dk[None, :],
                mask=row_ok[:, None] & (dk < DK)[None, :], other=0.0)  # [BH, BDK]
    if UPCAST:  # the CPU interpreter gets half-precision products wrong
        q = q.to(tl.float32)
    if HAS_ROPE:
        qr = tl.load(qr_ptr + b64 * stride_rb + heads[:, None] * stride_rh + dr[None, :],
                     mask=row_ok[:, None] & (dr < DR)[None, :], other=0.0)  # [BH, BDR]
        if UPCAST:
            qr = qr.to(tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    end = tl.minimum(part_lo + PARTITION, seq_len)
    table = tables_ptr + b64 * stride_tb
    # chunks start at multiples of BLOCK_N: the same positions whatever else is in the batch
    for n0 in range(tl.maximum(part_lo, lo // BLOCK_N * BLOCK_N), end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        ok = (n >= lo) & (n < end)  # [BN]; hidden tokens (and their table entries) are not read
        block = tl.load(table + (n // BS) * stride_tn, mask=ok, other=0).to(tl.int64)
        off = n % BS
        k_rows = k_ptr + block * stride_kb + off * stride_ko + kv_head * stride_kh  # [BN]
        k = tl.load(k_rows[:, None] + dk[None, :], mask=ok[:, None] & (dk < DK)[None, :],
                    other=0.0)  # [BN, BDK]
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BH, BN]
        if HAS_ROPE:
            kr_rows = kr_ptr + block * stride_krb + off * stride_kro + kv_head * stride_krh
            kr = tl.load(kr_rows[:, None] + dr[None, :], mask=ok[:, None] & (dr < DR)[None, :],
                         other=0.0)  # [BN, BDR]
            if UPCAST:
                kr = kr.to(tl.float32)
            s += tl.dot(qr, tl.trans(kr), input_precision=PRECISION)
        s = tl.where(ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every chunk has a visible key
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if V_IS_K:
            v = k
        else:
            v_rows = v_ptr + block * stride_vb + off * stride_vo + kv_head * stride_vh
            v = tl.load(v_rows[:, None] + dv[None, :], mask=ok[:, None] & (dv < DV)[None, :],
                        other=0.0)  # [BN, BDV]
            if UPCAST:
                v = v.to(tl.float32)
        p = p.to(v_ptr.dtype.element_ty)  # the rounding point of the GPU's P @ V
        if UPCAST:
            p = p.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new
    ws_row = (b64 * NH + heads) * num_parts + part  # [BH]
    tl.store(part_acc_ptr + ws_row[:, None] * DV + dv[None, :], acc,
             mask=row_ok[:, None] & (dv < DV)[None, :])
    tl.store(part_ml_ptr + 2 * ws_row, m_i, mask=row_ok)
    tl.store(part_ml_ptr + 2 * ws_row + 1, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["window", "max_len", "num_parts"])
def _reduce_kernel(
    part_acc_ptr, part_ml_ptr, lens_ptr, out_ptr,  # workspace; seq_lens; out [B, NH, DV]
    window, max_len, num_parts, NH, DV, stride_l, stride_ob, stride_oh,
    PARTITION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < NH
    seq_len = tl.minimum(tl.load(lens_ptr + b * stride_l), max_len)
    first = tl.maximum(seq_len - window, 0) // PARTITION
    last = tl.cdiv(tl.maximum(seq_len, 0), PARTITION)
    rows = (b.to(tl.int64) * NH + heads) * num_parts  # [BH]
    dv = tl.arange(0, BLOCK_DV)
    mask = head_ok[:, None] & (dv < DV)[None, :]
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for i in range(first, last):
        m = tl.maximum(m, tl.load(part_ml_ptr + 2 * (rows + i), mask=head_ok, other=0.0))
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for i in range(first, last):  # ascending: a fixed order
        w = tl.exp(tl.load(part_ml_ptr + 2 * (rows + i), mask=head_ok, other=0.0) - m)
        l_sum += w * tl.load(part_ml_ptr + 2 * (rows + i) + 1, mask=head_ok, other=0.0)
        part = tl.load(part_acc_ptr + (rows + i)[:, None] * DV + dv[None, :], mask=mask, other=0.0)
        acc += w[:, None] * part
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]  # an empty row: 0 / 1
    out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + dv[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _dim_block(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _check_unit_stride(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dim, got {t.stride()}")


def _launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, max_seq_len: int, window: int | None,
    out: torch.Tensor | None, cfg: PagedAttentionConfig,
) -> torch.Tensor:
    """q: [B, NH, DK]; k, v: caches as [NB, BS, NKV, D*] (views); rope: (q_rope [B, NH, DR],
    rope cache [NB, BS, NKV, DR]) or None. Returns [B, NH, DV]."""
    num_seqs, num_heads, dim_k = q.shape
    block_size, num_kv_heads, dim_v = k.shape[1], k.shape[2], v.shape[3]
    rep = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(num_seqs, num_heads, dim_v, dtype=q.dtype, device=q.device)
    _check_unit_stride(q=q, k_cache=k, v_cache=v, out=out)
    if rope is not None:
        _check_unit_stride(q_rope=rope[0], rope_cache=rope[1])
    if num_seqs == 0 or num_heads == 0:
        return out
    max_len = min(max_seq_len, block_tables.shape[1] * block_size)
    num_parts = max(1, triton.cdiv(max_len, cfg.partition))
    part_acc = torch.empty(num_seqs, num_heads, num_parts, dim_v, dtype=torch.float32,
                           device=q.device)  # [B, NH, P, DV]
    part_ml = torch.empty(num_seqs, num_heads, num_parts, 2, dtype=torch.float32,
                          device=q.device)  # [B, NH, P, (m, l)]
    window_arg = window if window is not None else max(max_len, 1)  # >= seq_len: sees from 0
    block_h = _dim_block(min(rep, cfg.block_h))
    qr, kr = rope if rope is not None else (q, k)  # placeholders, never read without HAS_ROPE
    dim_r = qr.shape[-1] if rope is not None else 0
    grid = (num_seqs, num_kv_heads * triton.cdiv(rep, block_h), num_parts)
    _partition_kernel[grid](
        q, qr, k, kr, v, block_tables, seq_lens, part_acc, part_ml,
        scale, window_arg, max_len, num_parts, rep, num_heads, block_size,
        dim_k, dim_r, dim_v,
        q.stride(0), q.stride(1), qr.stride(0), qr.stride(1),
        k.stride(0), k.stride(1), k.stride(2), kr.stride(0), kr.stride(1), kr.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        block_tables.stride(0), block_tables.stride(1), seq_lens.stride(0),
        HAS_ROPE=rope is not None, V_IS_K=v is k, PARTITION=cfg.partition,
        BLOCK_N=cfg.block_n if q.element_size() < 4 else max(16, cfg.block_n // 2),
        BLOCK_H=block_h, BLOCK_DK=_dim_block(dim_k), BLOCK_DR=_dim_block(dim_r),
        BLOCK_DV=_dim_block(dim_v), UPCAST=q.device.type == "cpu",
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    reduce_h = min(REDUCE_HEADS, triton.next_power_of_2(num_heads))
    _reduce_kernel[(num_seqs, triton.cdiv(num_heads, reduce_h))](
        part_acc, part_ml, seq_lens, out,
        window_arg, max_len, num_parts, num_heads, dim_v, seq_lens.stride(0),
        out.stride(0), out.stride(1),
        PARTITION=cfg.partition, BLOCK_H=reduce_h, BLOCK_DV=_dim_block(dim_v), num_warps=4,
    )
    return out


def paged_decode_gqa_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, max_seq_len: int, window: int | None = None,
    out: torch.Tensor | None = None, config: PagedAttentionConfig | None = None,
) -> torch.Tensor:
    """Triton version of `reference_attention.paged_decode_gqa_ref` (same arguments and result);
    `config` overrides `GQA_CONFIG` (tests use small partitions)."""
    check_paged_gqa(q, k_cache, v_cache, block_tables, seq_lens, max_seq_len, window, out)
    return _launch(q, k_cache, v_cache, None, block_tables, seq_lens, scale, max_seq_len,
                   window, out, config or GQA_CONFIG)


def paged_decode_mla_triton(
    q_lat: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, rope_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, max_seq_len: int,
    out: torch.Tensor | None = None, config: PagedAttentionConfig | None = None,
) -> torch.Tensor:
    """Triton version of `reference_attention.paged_decode_mla_ref` (same arguments and result);
    `config` overrides `MLA_CONFIG`. The latent is read once per chunk, for both products."""
    check_paged_mla(q_lat, q_rope, kv_cache, rope_cache, block_tables, seq_lens, max_seq_len, out)
    kv = kv_cache.unsqueeze(2)  # [NB, BS, 1, L]: one shared "kv head"
    return _launch(q_lat, kv, kv, (q_rope, rope_cache.unsqueeze(2)), block_tables, seq_lens,
                   scale, max_seq_len, None, out, config or MLA_CONFIG)
