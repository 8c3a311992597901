"""Fused MoE grouped GEMM in Triton: gate_up + SiLU(gate)*up, then down, over sorted rows.

Given the `Alignment` of the token-expert pairs (see `moe_align`), block b of BLOCK_M sorted
rows belongs to one expert e = expert_ids[b], so each program reads one expert's weights:

    gate_up kernel:  act[r, f] = silu(x[tok(r)] . Wg[e, f]) * (x[tok(r)] . Wu[e, f])
                     (Wg = w_gate_up[e, :F], Wu = w_gate_up[e, F:]; r a sorted row; act [P, F])
    down kernel:     y[pair(r), h] = act[r] . w_down[e, h]          (y [N, H] in pair order)

then `moe_combine` (fused_moe) sums y over K with the router weights; expert_rows skips that
(K = 1: y is the output). The gather of x rows is fused into the first kernel's loads, the
scatter of y rows into the second kernel's stores. Products accumulate in float32 on the matrix
units (bf16/fp16 operands; float32 operands use exact IEEE float32 products); act and y are
stored in the input dtype. FLOPs: 2*N*H*2F + 2*N*F*H; bytes (decode): the weights of the
experts hit, 3*H*F*itemsize each. Reference: `reference.fused_moe_ref` / `expert_rows_ref`.
Every size is static and nothing syncs with the host, so the path captures into a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import GemmConfig, MoEConfig, lookup_config
from .moe_align import moe_align_block_size_triton, moe_combine_triton
from .reference import Alignment, check_moe_weights

__all__ = [
    "fused_moe_triton",
    "expert_rows_triton",
    "moe_config_for",
    "launch_gate_up",
    "launch_down",
]


@triton.jit
def _tile_ids(NUM_BLOCKS_M, N_COLS, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row blocks (mostly one expert) share a column block in L2."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N_COLS, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(NUM_BLOCKS_M - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % size_m)
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit(do_not_specialize=["NUM_PAIRS", "NUM_BLOCKS_M"])
def _gate_up_kernel(
    x_ptr, w_ptr, act_ptr,  # x [T, H]; w_gate_up [E, 2F, H]; act [P, F]
    sorted_ptr, expert_ids_ptr, num_post_ptr,  # Alignment
    NUM_PAIRS, NUM_BLOCKS_M, H, F,
    stride_xt, stride_we, stride_wn, stride_act,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(NUM_BLOCKS_M, F, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ptr + rows)
    row_ok = pairs < NUM_PAIRS
    tokens = (pairs // TOP_K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :]  # [BM, BK]
    g_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    u_ptrs = g_ptrs + F * stride_wn  # [BK, BN]
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            g = tl.load(g_ptrs, mask=col_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = ks < H - k * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:  # the CPU interpreter gets half-precision products wrong
            a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
        acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    out_ptrs = act_ptr + rows[:, None].to(tl.int64) * stride_act + cols[None, :]
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit(do_not_specialize=["NUM_PAIRS", "NUM_BLOCKS_M"])
def _down_kernel(
    act_ptr, w_ptr, y_ptr,  # act [P, F]; w_down [E, H, F]; y [N, H]
    sorted_ptr, expert_ids_ptr, num_post_ptr,
    NUM_PAIRS, NUM_BLOCKS_M, H, F,
    stride_act, stride_we, stride_wn, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(NUM_BLOCKS_M, H, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ptr + rows)
    row_ok = pairs < NUM_PAIRS
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + rows[:, None].to(tl.int64) * stride_act + ks[None, :]  # [BM, BK]
    b_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(F, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = ks < F - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    out_ptrs = y_ptr + pairs[:, None].to(tl.int64) * stride_y + cols[None, :]
    tl.store(out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def moe_config_for(
    x: torch.Tensor, w_gate_up: torch.Tensor, num_tokens: int, top_k: int
) -> MoEConfig:
    """The block config for this layer shape and card (tuned JSON, else the heuristic)."""
    num_experts, two_f, hidden = w_gate_up.shape
    card = torch.cuda.get_device_name(x.device) if x.is_cuda else "cpu"
    dtype_name = str(x.dtype).removeprefix("torch.")
    return lookup_config(card, num_experts, hidden, two_f // 2, dtype_name, num_tokens, top_k)


def _fit_stages(cfg: GemmConfig, block_m: int, num_b: int, t: torch.Tensor) -> int:
    """Fewer pipeline stages when a tile's buffers would overflow the SM's shared memory (a
    tuned or default config meant for bf16 can be too large for float32)."""
    if not t.is_cuda:
        return cfg.num_stages
    limit = torch.cuda.get_device_properties(t.device).shared_memory_per_block_optin
    per_stage = (block_m + num_b * cfg.block_n) * cfg.block_k * t.element_size()
    stages = cfg.num_stages
    while stages > 1 and stages * per_stage > limit:
        stages -= 1
    return stages


def _launch_args(
    cfg: GemmConfig, reduce_dim: int, x: torch.Tensor, block_m: int, num_b: int
) -> dict:
    return dict(
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=reduce_dim % cfg.block_k == 0, UPCAST=x.device.type == "cpu",
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=_fit_stages(cfg, block_m, num_b, x),
    )


def launch_gate_up(
    x: torch.Tensor, w_gate_up: torch.Tensor, align: Alignment, top_k: int, block_m: int,
    cfg: GemmConfig, act: torch.Tensor,
) -> None:
    """act [P, F] (sorted rows) = silu(x[tok] @ Wg[e].T) * (x[tok] @ Wu[e].T), per block."""
    num_pairs = x.shape[0] * top_k
    hidden, ffn = x.shape[1], w_gate_up.shape[1] // 2
    num_blocks_m = align.sorted_ids.numel() // block_m
    grid = (num_blocks_m * triton.cdiv(ffn, cfg.block_n),)
    _gate_up_kernel[grid](
        x, w_gate_up, act, align.sorted_ids, align.expert_ids, align.num_post_padded,
        num_pairs, num_blocks_m, hidden, ffn,
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), act.stride(0),
        TOP_K=top_k, BLOCK_M=block_m, **_launch_args(cfg, hidden, x, block_m, 2),
    )


def launch_down(
    act: torch.Tensor, w_down: torch.Tensor, align: Alignment, block_m: int, cfg: GemmConfig,
    y: torch.Tensor,
) -> None:
    """y [N, H] (pair order) = act[r] @ w_down[e].T for every real sorted row r."""
    num_experts, hidden, ffn = w_down.shape
    num_blocks_m = align.sorted_ids.numel() // block_m
    grid = (num_blocks_m * triton.cdiv(hidden, cfg.block_n),)
    _down_kernel[grid](
        act, w_down, y, align.sorted_ids, align.expert_ids, align.num_post_padded,
        y.shape[0], num_blocks_m, hidden, ffn,
        act.stride(0), w_down.stride(0), w_down.stride(1), y.stride(0),
        BLOCK_M=block_m, **_launch_args(cfg, ffn, act, block_m, 1),
    )


def _expert_mlp(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, align: Alignment,
    top_k: int, cfg: MoEConfig, y: torch.Tensor,
) -> torch.Tensor:
    """Both grouped GEMMs over aligned pairs; writes y [N, H] in pair order and returns it."""
    total = align.sorted_ids.numel()
    act = torch.empty(total, w_down.shape[2], dtype=x.dtype, device=x.device)  # [P, F]
    launch_gate_up(x, w_gate_up, align, top_k, cfg.block_m, cfg.gate_up, act)
    launch_down(act, w_down, align, cfg.block_m, cfg.down, y)
    return y


def _prepare(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor):
    check_moe_weights(x, w_gate_up, w_down)
    # the kernels assume unit stride along the reduction dim (H for x and w_gate_up, F for w_down)
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in (x, w_gate_up, w_down))


def fused_moe_triton(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """Triton version of `reference.fused_moe_ref`; `config` overrides the tuned/heuristic one."""
    x, w_gate_up, w_down = _prepare(x, w_gate_up, w_down)
    num_tokens, top_k = topk_ids.shape
    if topk_weights.shape != topk_ids.shape or num_tokens != x.shape[0]:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
            f"must both be [T={x.shape[0]}, K]"
        )
    if num_tokens == 0:
        return torch.empty_like(x)
    cfg = config or moe_config_for(x, w_gate_up, num_tokens, top_k)
    align = moe_align_block_size_triton(topk_ids, w_gate_up.shape[0], cfg.block_m)
    y = torch.empty(num_tokens * top_k, x.shape[1], dtype=x.dtype, device=x.device)  # [N, H]
    _expert_mlp(x, w_gate_up, w_down, align, top_k, cfg, y)
    return moe_combine_triton(y, topk_weights)


def expert_rows_triton(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """Triton version of `reference.expert_rows_ref`: row n of x [N, H] through expert_ids[n]."""
    x, w_gate_up, w_down = _prepare(x, w_gate_up, w_down)
    if expert_ids.shape != (x.shape[0],):
        raise ValueError(f"expert_ids must be [N={x.shape[0]}], got {tuple(expert_ids.shape)}")
    out = torch.empty_like(x)  # [N, H]
    if x.shape[0] == 0:
        return out
    cfg = config or moe_config_for(x, w_gate_up, x.shape[0], 1)
    align = moe_align_block_size_triton(expert_ids.view(-1, 1), w_gate_up.shape[0], cfg.block_m)
    return _expert_mlp(x, w_gate_up, w_down, align, 1, cfg, out)
