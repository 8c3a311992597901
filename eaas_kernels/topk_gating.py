"""Router top-k gating: pure-torch references and Triton kernels.

Softmax top-k (qwen2_moe / qwen3_moe / mixtral, as Hugging Face computes it):

    p[t, :]        = softmax(logits[t, :])                 (float32, over all E experts)
    topk_ids[t]    = the K experts of largest p[t, e]      (descending)
    topk_weights[t] = p[t, topk_ids[t]]  /  sum_k p[t, topk_ids[t, k]]   if renormalize

Grouped sigmoid top-k (deepseek_v3, `DeepseekV3TopkRouter.forward`):

    s[t, e]     = sigmoid(logits[t, e])                    (float32)
    c[t, e]     = s[t, e] + bias[e]                        (bias only steers the choice)
    g[t, j]     = sum of the 2 largest c[t, e] in group j  (E/G experts per group, G groups)
    keep the topk_group groups of largest g[t, j]; topk_ids = the K largest c among their experts
    topk_weights = s[t, topk_ids] (/ (sum + 1e-20) if renormalize) * routed_scaling_factor

References: `reference.topk_softmax_ref` and `reference.topk_grouped_sigmoid_ref`.
Both return `Routing(topk_weights [T, K] float32, topk_ids [T, K] int64)`. The kernels run one
program per BLOCK_T rows with all E logits of a row in registers (E <= 1024), and pick the K
winners by K rounds of argmax-and-mask, so ties go to the lower expert id.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import Routing, check_grouped_args, check_logits

__all__ = ["topk_softmax_triton", "topk_grouped_sigmoid_triton"]

MAX_EXPERTS = 1024

# --- Triton kernels --------------------------------------------------------------------------
@triton.jit
def _topk_store(
    w_ptr, id_ptr, weights, ids, rows, T,
    K: tl.constexpr, BLOCK_K: tl.constexpr, RENORM: tl.constexpr,
):
    kcols = tl.arange(0, BLOCK_K)
    if RENORM:
        weights = weights / tl.sum(weights, axis=1)[:, None]
    mask = (rows[:, None] < T) & (kcols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + kcols[None, :]
    tl.store(w_ptr + offs, weights, mask=mask)
    tl.store(id_ptr + offs, ids.to(tl.int64), mask=mask)


@triton.jit
def _topk_softmax_kernel(
    logits_ptr, w_ptr, id_ptr,  # logits [T, E] any float; out [T, K] f32 / int64
    T, E, stride_t,
    K: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    valid = (rows[:, None] < T) & (cols[None, :] < E)
    ptrs = logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :]
    x = tl.load(ptrs, mask=valid, other=float("-inf")).to(tl.float32)  # [BT, BE]
    x = tl.where(rows[:, None] < T, x, tl.where(cols[None, :] < E, 0.0, float("-inf")))
    x = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = x / tl.sum(x, axis=1)[:, None]
    p = tl.where(cols[None, :] < E, p, -1.0)  # padding never wins
    weights = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for i in tl.static_range(K):
        best = tl.argmax(p, axis=1, tie_break_left=True)  # [BT]
        pick = cols[None, :] == best[:, None]
        val = tl.max(tl.where(pick, p, -1.0), axis=1)
        weights = tl.where(kcols[None, :] == i, val[:, None], weights)
        ids = tl.where(kcols[None, :] == i, best[:, None], ids)
        p = tl.where(pick, -2.0, p)
    _topk_store(w_ptr, id_ptr, weights, ids, rows, T, K, BLOCK_K, RENORM)


@triton.jit
def _topk_grouped_sigmoid_kernel(
    logits_ptr, bias_ptr, w_ptr, id_ptr,  # logits [T, E]; bias [E] f32; out [T, K]
    T, E, stride_t, scale,
    K: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
):
    NEG: tl.constexpr = float("-inf")
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    gcols = tl.arange(0, BLOCK_G)
    kcols = tl.arange(0, BLOCK_K)
    valid = (rows[:, None] < T) & (cols[None, :] < E)
    ptrs = logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :]
    x = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)  # [BT, BE]
    scores = tl.sigmoid(x)
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(cols[None, :] < E, choice, NEG)
    col_group = cols // GROUP_SIZE
    # group score = sum of the two largest biased scores in the group
    gscore = tl.full([BLOCK_T, BLOCK_G], NEG, tl.float32)
    for g in tl.static_range(G):
        v = tl.where(col_group[None, :] == g, choice, NEG)
        first = tl.argmax(v, axis=1, tie_break_left=True)
        m1 = tl.max(v, axis=1)
        m2 = tl.max(tl.where(cols[None, :] == first[:, None], NEG, v), axis=1)
        gscore = tl.where(gcols[None, :] == g, (m1 + m2)[:, None], gscore)
    keep_group = tl.zeros([BLOCK_T, BLOCK_G], dtype=tl.int32)
    for _ in tl.static_range(TOPK_GROUP):
        gbest = tl.argmax(gscore, axis=1, tie_break_left=True)
        hit = gcols[None, :] == gbest[:, None]
        keep_group = tl.where(hit, 1, keep_group)
        gscore = tl.where(hit, NEG, gscore)
    keep = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    for g in tl.static_range(G):
        kept_g = tl.max(tl.where(gcols[None, :] == g, keep_group, 0), axis=1)  # [BT]
        keep = tl.where((col_group[None, :] == g) & (kept_g[:, None] > 0), 1, keep)
    choice = tl.where(keep > 0, choice, NEG)
    weights = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for i in tl.static_range(K):
        best = tl.argmax(choice, axis=1, tie_break_left=True)
        pick = cols[None, :] == best[:, None]
        val = tl.sum(tl.where(pick, scores, 0.0), axis=1)
        weights = tl.where(kcols[None, :] == i, val[:, None], weights)
        ids = tl.where(kcols[None, :] == i, best[:, None], ids)
        choice = tl.where(pick, NEG, choice)
    if RENORM:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + 1e-20)
    weights = weights * scale
    _topk_store(w_ptr, id_ptr, weights, ids, rows, T, K, BLOCK_K, False)


def _launch_shape(logits: torch.Tensor) -> tuple[int, int, int]:
    num_tokens, num_experts = logits.shape
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"the Triton router supports E <= {MAX_EXPERTS}, got {num_experts}")
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(16, 4096 // block_e, triton.next_power_of_2(num_tokens)))
    return block_t, block_e, triton.cdiv(num_tokens, block_t)


def topk_softmax_triton(logits: torch.Tensor, k: int, renormalize: bool) -> Routing:
    """Triton version of `topk_softmax_ref` (same arguments and result)."""
    check_logits(logits, k)
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, k, dtype=torch.float32, device=logits.device)  # [T, K]
    ids = torch.empty(num_tokens, k, dtype=torch.int64, device=logits.device)  # [T, K]
    if num_tokens == 0:
        return Routing(weights, ids)
    block_t, block_e, grid = _launch_shape(logits)
    _topk_softmax_kernel[(grid,)](
        logits, weights, ids, num_tokens, num_experts, logits.stride(0),
        K=k, RENORM=renormalize, BLOCK_T=block_t, BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(k), num_warps=4 if block_e <= 256 else 8,
    )
    return Routing(weights, ids)


def topk_grouped_sigmoid_triton(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    renormalize: bool,
) -> Routing:
    """Triton version of `topk_grouped_sigmoid_ref` (same arguments and result)."""
    check_grouped_args(logits, bias, k, n_group, topk_group)
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, k, dtype=torch.float32, device=logits.device)  # [T, K]
    ids = torch.empty(num_tokens, k, dtype=torch.int64, device=logits.device)  # [T, K]
    if num_tokens == 0:
        return Routing(weights, ids)
    bias_arg = logits if bias is None else bias.contiguous()
    block_t, block_e, grid = _launch_shape(logits)
    _topk_grouped_sigmoid_kernel[(grid,)](
        logits, bias_arg, weights, ids, num_tokens, num_experts, logits.stride(0),
        float(routed_scaling_factor),
        K=k, G=n_group, TOPK_GROUP=topk_group, GROUP_SIZE=num_experts // n_group,
        HAS_BIAS=bias is not None, RENORM=renormalize, BLOCK_T=block_t, BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(k), BLOCK_G=triton.next_power_of_2(n_group),
        num_warps=4 if block_e <= 256 else 8,
    )
    return Routing(weights, ids)
