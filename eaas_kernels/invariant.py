"""Batch-invariant matmul and RMSNorm in Triton: each row's bits never depend on the other rows.

A row's result is invariant when the arithmetic that produces it is the same whatever M (the
number of rows) is. Both kernels get that by fixing everything that orders the float32 sums from
the weight shape and dtype alone, never from M (as Thinking Machines' `batch_invariant_ops` and
vLLM/SGLang's batch-invariant modes do):

    matmul:   y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n])     x [M, K], w [N, K], y [M, N]
              One tile config per (N, K, dtype) (`matmul_config`): a BLOCK_M x BLOCK_N tile walks
              its K range in BLOCK_K steps on the matrix units, float32 accumulation. With
              split_k = S > 1, K is cut into S fixed ranges of `k_per_split` columns; program s
              stores its float32 partial to a workspace [S, M, N] and a second kernel sums the
              partials in the order 0, 1, .., S-1 and adds the bias (no atomics: deterministic).
              A row sits at a different position in its M tile for different M; the matrix units
              treat every row of a tile alike, and rows past M are masked to zero.
    rms_norm: y[m] = weight * (x[m] * rsqrt(mean(x[m]^2) + eps)).to(x.dtype), statistics in
              float32; one program per row, a fixed BLOCK = min(next_pow2(H), 8192) chunk
              loop, so the sum of squares has one order per H.

Pure-torch references: `reference.matmul_ref`, `reference.rms_norm_ref`. Every size is static
and nothing syncs with the host (the workspace size is a function of shapes only), so both
capture into a CUDA graph. Bits agree across M on one card and one Triton build; not across
cards, builds or with cuBLAS (`F.linear` itself is not batch-invariant).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

__all__ = ["MatmulConfig", "matmul_config", "matmul", "rms_norm", "TARGET_PROGRAMS"]

TARGET_PROGRAMS = 264  # 2 waves of the H200's 132 SMs: enough CTAs to stream weights at M = 1
MAX_SPLIT_K = 16
MIN_K_PER_SPLIT = 256  # shorter K ranges cost more in partial sums than they gain in CTAs
MAX_NORM_BLOCK = 8192
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _pow2(name: str, value: int, low: int, high: int) -> None:
    if value < low or value > high or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [{low}, {high}], got {value}")


@dataclass(frozen=True, slots=True)
class MatmulConfig:
    """Tiles of the batch-invariant matmul; its result bits depend on every field except
    num_stages, so one layer must keep one config for every M."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        _pow2("block_m", self.block_m, 16, 256)
        _pow2("block_n", self.block_n, 16, 256)
        _pow2("block_k", self.block_k, 16, 256)
        _pow2("num_warps", self.num_warps, 1, 16)
        if not 1 <= self.split_k <= 64:
            raise ValueError(f"split_k must be in [1, 64], got {self.split_k}")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"num_stages must be in [1, 8], got {self.num_stages}")

    def k_per_split(self, k: int) -> int:
        """Columns of K per split: a whole number of BLOCK_K steps, the last range shorter."""
        return triton.cdiv(triton.cdiv(k, self.split_k), self.block_k) * self.block_k


@lru_cache(maxsize=256)
def matmul_config(n: int, k: int, dtype: torch.dtype) -> MatmulConfig:
    """The one config of a weight [N, K] of `dtype`; M plays no part (that is the invariance).

    Tiles: BLOCK_M 64 (one Hopper warpgroup MMA), BLOCK_N 64, BLOCK_K 128 (64 for float32, same
    bytes per stage). Split-K: decode (M = 1..256) is bound by reading w, which needs many CTAs;
    N / BLOCK_N column tiles alone are few for N = 2048 (32), so K is split until
    tiles_n * split >= TARGET_PROGRAMS, at most MAX_SPLIT_K ways and with ranges of at least
    MIN_K_PER_SPLIT columns, rounded so every range is a whole number of BLOCK_K steps.
    Examples (bf16): N=2048, K=4096 -> split 8; N=4096, K=2048 -> 4; N=128, K=2048 -> 8;
    N=151936, K=2048 -> 1.
    H200 sweep (bf16, CUDA graphs, weights from HBM; 2026-12-03): at M = 1..64 this config is
    within ~1.3x of cuBLAS `F.linear` for N = 2048..4096 (9 vs 7-9 us) and faster for N <= 1536;
    without split-K, N=2048, K=4096 takes 17 us. At M = 256 the split's float32 partials cost
    (25 vs 11 us there); BLOCK_M 16/32 were as fast at M <= 8 and 2x slower at M >= 64.
    """
    if n < 1 or k < 1:
        raise ValueError(f"weight must be [N >= 1, K >= 1], got [{n}, {k}]")
    block_k = 64 if dtype == torch.float32 else 128
    tiles_n = triton.cdiv(n, 64)
    want = triton.cdiv(TARGET_PROGRAMS, tiles_n)
    split = max(1, min(want, MAX_SPLIT_K, k // MIN_K_PER_SPLIT))
    split = triton.cdiv(k, MatmulConfig(split_k=split, block_k=block_k).k_per_split(k))
    return MatmulConfig(block_m=64, block_n=64, block_k=block_k, split_k=split)


@triton.jit(do_not_specialize=["M", "stride_os"])
def _matmul_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,  # x [M, K]; w [N, K]; bias [N]; out [M, N] or ws [S, M, N]
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_wn, stride_om, stride_os,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    k_start = pid_s * K_PER_SPLIT
    ks = k_start + tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]  # [BM, BK]
    b_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]  # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for step in range(0, tl.cdiv(tl.minimum(K - k_start, K_PER_SPLIT), BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = ks < K - step * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if INTERPRETED:
            # the interpreter's tl.dot is numpy's BLAS, which sums rows differently by their
            # position in the tile (and gets half-precision products wrong): one fixed order
            a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    mask = row_ok[:, None] & col_ok[None, :]
    if PARTIAL:
        out_ptrs = out_ptr + pid_s.to(tl.int64) * stride_os + rows[:, None].to(tl.int64) * stride_om
        tl.store(out_ptrs + cols[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["stride_ws"])
def _split_sum_kernel(
    ws_ptr, bias_ptr, out_ptr,  # ws [S, M, N] float32; bias [N]; out [M, N]
    N, stride_ws, stride_om,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ptrs = ws_ptr + row * N + cols
    acc = tl.load(ptrs, mask=col_ok, other=0.0)
    for s in tl.static_range(1, SPLIT):  # fixed order 0, 1, .., S-1
        ptrs += stride_ws.to(tl.int64)  # S * M * N may pass 2^31
        acc += tl.load(ptrs, mask=col_ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def _check_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"x must be [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    if x.dtype not in _DTYPES or w.dtype != x.dtype:
        raise TypeError(f"x and w must share one dtype of {_DTYPES}, got {x.dtype}, {w.dtype}")
    if w.shape[1] < 1:
        raise ValueError("K must be >= 1")
    if bias is not None and (tuple(bias.shape) != (w.shape[0],) or not bias.is_floating_point()):
        raise ValueError(f"bias must be a float [N={w.shape[0]}], got {tuple(bias.shape)}")
    if w.device != x.device or (bias is not None and bias.device != x.device):
        raise ValueError("x, w and bias must be on one device")


def matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: MatmulConfig | None = None,
) -> torch.Tensor:
    """y = x @ w.T + bias with each row's bits independent of M and of the other rows.

    x: [M, K] float32/float16/bfloat16 rows. w: [N, K], x's dtype (an nn.Linear weight).
    bias: [N] any float dtype, or None; added in float32 before the one rounding to x.dtype.
    out: [M, N] of x's dtype to write into (unit stride along N), or None for a new tensor.
    config: overrides `matmul_config(N, K, dtype)`; for tests only, since the bits follow it.
    Returns out (or a new [M, N] tensor) in x.dtype; products accumulate in float32 (IEEE
    float32 products for float32 inputs, no TF32). With split_k > 1 it allocates a float32
    workspace [split_k, M, N] per call (inside a CUDA graph: from the graph's pool).
    """
    _check_matmul(x, w, bias)
    x, w = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, w))
    bias = None if bias is None else bias.contiguous()
    (m, k), n = x.shape, w.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be [{m}, {n}] {x.dtype} with unit stride along N")
    if m == 0:
        return out
    cfg = config or matmul_config(n, k, x.dtype)
    chunk = cfg.k_per_split(k)
    split = triton.cdiv(k, chunk)
    has_bias = bias is not None
    common = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, HAS_BIAS=has_bias,
        EVEN_K=k % chunk == 0, INTERPRETED=x.device.type == "cpu",
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
    bias_arg = bias if has_bias else out  # never read without HAS_BIAS
    if split == 1:
        _matmul_kernel[grid](
            x, w, bias_arg, out, m, n, k, chunk,
            x.stride(0), w.stride(0), out.stride(0), 0, PARTIAL=False, **common,
        )
        return out
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device)  # [S, M, N]
    _matmul_kernel[grid](
        x, w, bias_arg, ws, m, n, k, chunk,
        x.stride(0), w.stride(0), n, m * n, PARTIAL=True, **common,
    )
    block_n = min(1024, triton.next_power_of_2(n))
    _split_sum_kernel[(m, triton.cdiv(n, block_n))](
        ws, bias_arg, out, n, m * n, out.stride(0),
        SPLIT=split, HAS_BIAS=has_bias, BLOCK_N=block_n, num_warps=4,
    )
    return out


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr,  # x [M, H]; weight [H]; out [M, H]
    H, stride_x, stride_o, eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_o
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, H, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        xf = tl.load(x_row + offs, mask=offs < H, other=0.0).to(tl.float32)
        acc += xf * xf
    inv_rms = tl.math.rsqrt(tl.sum(acc, axis=0) / H + eps)
    for start in range(0, H, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < H
        xf = tl.load(x_row + offs, mask=ok, other=0.0).to(tl.float32)
        y = (xf * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded as torch does
        wf = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_row + offs, (wf * y).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, block: int | None = None
) -> torch.Tensor:
    """RMSNorm of each row alone: weight * (xf * rsqrt(mean(xf^2) + eps)).to(x.dtype), xf = x
    in float32 (the cast order of eaas.model.ops.rms_norm and transformers).

    x: [M, H] float32/float16/bfloat16 (unit stride along H). weight: [H] float.
    eps: added to the mean square. block: the H chunk, a power of two (default
    min(next_pow2(H), 8192)); set only to test the chunk loop, since the bits follow it.
    Returns [M, H] in torch.promote_types(weight.dtype, x.dtype), as `weight * ...` gives.
    """
    if x.dim() != 2 or tuple(weight.shape) != (x.shape[1],):
        raise ValueError(
            f"x must be [M, H] and weight [H], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise TypeError(f"x and weight must be of {_DTYPES}, got {x.dtype}, {weight.dtype}")
    if weight.device != x.device:
        raise ValueError("x and weight must be on one device")
    x, weight = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, weight))
    hidden = x.shape[1]
    block = block or min(MAX_NORM_BLOCK, triton.next_power_of_2(max(1, hidden)))
    _pow2("block", block, 1, MAX_NORM_BLOCK)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)  # [M, H]
    if x.shape[0] == 0 or hidden == 0:
        return out
    _rms_norm_kernel[(x.shape[0],)](
        x, weight, out, hidden, x.stride(0), out.stride(0), eps,
        BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )
    return out
