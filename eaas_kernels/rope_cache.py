"""GQA attention's per-row preparation in one Triton kernel: per-head RMSNorm of q and k
(qwen3_moe's q_norm / k_norm, optional), RoPE (halves layout), and the K/V write into the paged
cache at each row's slot.

In the eager torch path this is ~25 kernels per layer (two norms of ~6 kernels each, the cos/sin
table, two rotations of ~5 kernels each, two index_copy); here it is one launch of grid
(T, NH + NKV): program (t, h) prepares head h of row t — a query head (normed, rotated, stored
to `q_out`) or, for h >= NH, key head h - NH (normed, rotated, stored to the cache) together with
value head h - NH (copied to the cache).

Rounding is the eager path's, step by step, so the kernel equals it up to the float32 sum order of
the norm's mean of squares: with x in the model dtype DT,
    norm:  y = DT(w * DT(x * rsqrt(mean(x^2) + eps)))          (eaas.model.ops.rms_norm)
    rope:  out1 = DT(DT(y1 * c) + DT(-y2 * s)), out2 = DT(DT(y2 * c) + DT(y1 * s))
                                                               (eaas.model.ops.apply_rope)
with (c, s) = the DT cos/sin table row of the position (`rope_table`: cos(p f) * factor and
sin(p f) * factor rounded to DT, as `ops.rope_cos_sin`). Every row is independent of the others
(batch-invariant by construction); nothing reads a device value on the host (capturable).
Reference: `reference_attention.rope_cache_write_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference_attention import check_rope_cache_args

__all__ = ["rope_cache_write_triton"]


@triton.jit
def _rope_cache_kernel(
    q_ptr, k_ptr, v_ptr,  # [T, NH, D], [T, NKV, D], [T, NKV, D] (unit stride in D)
    pos_ptr, slot_ptr, table_ptr,  # int64 [T], int64 [T], [P, 2, D/2] (cos | sin) in DT
    qw_ptr, kw_ptr,  # norm weights [D] (placeholders without NORM)
    q_out_ptr, k_cache_ptr, v_cache_ptr,  # [T, NH, D]; caches [S, NKV, D]
    NH, HALF, max_pos, eps, stride_pos, stride_slot,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_ks, stride_kch, stride_vs, stride_vch, stride_tp,
    NORM: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    ok = offs < HALF
    is_q = h < NH
    kh = h - NH
    if is_q:
        src = q_ptr + t * stride_qt + h * stride_qh
    else:
        src = k_ptr + t * stride_kt + kh * stride_kh
    dt = q_out_ptr.dtype.element_ty
    x1 = tl.load(src + offs, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + offs, mask=ok, other=0.0).to(tl.float32)
    if NORM:
        inv = tl.math.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF)
                            + eps)
        w_ptr = qw_ptr if is_q else kw_ptr
        w1 = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + offs, mask=ok, other=0.0).to(tl.float32)
        x1 = (w1 * (x1 * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x2 = (w2 * (x2 * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    pos = tl.minimum(tl.maximum(tl.load(pos_ptr + t * stride_pos), 0), max_pos - 1)
    row = table_ptr + pos * stride_tp
    c = tl.load(row + offs, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(row + HALF + offs, mask=ok, other=0.0).to(tl.float32)
    o1 = ((x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
    if is_q:
        dst = q_out_ptr + t * stride_ot + h * stride_oh
        tl.store(dst + offs, o1, mask=ok)
        tl.store(dst + HALF + offs, o2, mask=ok)
    else:
        slot = tl.load(slot_ptr + t * stride_slot)
        dst = k_cache_ptr + slot * stride_ks + kh * stride_kch
        tl.store(dst + offs, o1.to(k_cache_ptr.dtype.element_ty), mask=ok)
        tl.store(dst + HALF + offs, o2.to(k_cache_ptr.dtype.element_ty), mask=ok)
        vsrc = v_ptr + t * stride_vt + kh * stride_vh
        vdst = v_cache_ptr + slot * stride_vs + kh * stride_vch
        v1 = tl.load(vsrc + offs, mask=ok, other=0.0)
        v2 = tl.load(vsrc + HALF + offs, mask=ok, other=0.0)
        tl.store(vdst + offs, v1.to(v_cache_ptr.dtype.element_ty), mask=ok)
        tl.store(vdst + HALF + offs, v2.to(v_cache_ptr.dtype.element_ty), mask=ok)


def rope_cache_write_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    slots: torch.Tensor, table: torch.Tensor, q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None, eps: float, k_cache: torch.Tensor, v_cache: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of `reference_attention.rope_cache_write_ref` (same arguments, same
    result): returns the prepared queries [T, NH, D]; writes k/v of every row to k_cache/v_cache
    [S, NKV, D] at `slots`."""
    check_rope_cache_args(q, k, v, positions, slots, table, q_norm, k_norm, k_cache, v_cache)
    t, nh, d = q.shape
    nkv = k.shape[1]
    if out is None:
        out = torch.empty(t, nh, d, dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    norm = q_norm is not None
    qw = q_norm if norm else q
    kw = k_norm if norm else q
    half = d // 2
    _rope_cache_kernel[(t, nh + nkv)](
        q, k, v, positions, slots, table, qw, kw, out, k_cache, v_cache,
        nh, half, table.shape[0], eps, positions.stride(0), slots.stride(0),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), table.stride(0),
        NORM=norm, BLOCK=max(16, triton.next_power_of_2(half)), num_warps=1,
    )
    return out
