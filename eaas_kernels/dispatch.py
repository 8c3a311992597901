"""The one function per kernel that the engine calls: Triton on CUDA, the reference elsewhere.

CUDA tensors go to the Triton kernels; CPU tensors (and any other device) go to the pure-torch
references, so the engine needs neither a GPU nor Triton. The Triton modules are imported on
first CUDA use only. Tests run the Triton path on CPU by calling the `*_triton` functions under
TRITON_INTERPRET=1 (see tests/kernels/conftest.py).
"""

from __future__ import annotations

import torch

from . import reference
from . import reference_attention as attention_ref
from .reference import Routing

__all__ = [
    "topk_softmax",
    "topk_grouped_sigmoid",
    "fused_moe",
    "expert_rows",
    "paged_decode_gqa",
    "paged_decode_mla",
    "rope_cache_write",
]


def topk_softmax(logits: torch.Tensor, k: int, renormalize: bool) -> Routing:
    """Softmax top-k router (qwen2_moe, qwen3_moe, mixtral).

    logits: [T, E] any float dtype, the router's output. k: experts per token (K).
    renormalize: divide the K weights by their sum (HF `norm_topk_prob`; mixtral always does).
    Returns Routing(topk_weights [T, K] float32, topk_ids [T, K] int64), best first.
    """
    if logits.is_cuda:
        from .topk_gating import topk_softmax_triton

        return topk_softmax_triton(logits, k, renormalize)
    return reference.topk_softmax_ref(logits, k, renormalize)


def topk_grouped_sigmoid(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    renormalize: bool,
) -> Routing:
    """DeepSeek-V3 router: sigmoid scores, bias-steered grouped top-k, scaled weights.

    logits: [T, E] any float dtype. bias: [E] float32 `e_score_correction_bias` (used only to
    choose; None = zeros). k: experts per token. n_group: G groups of E/G experts (E/G >= 2).
    topk_group: groups kept per token, ranked by the sum of their two best biased scores.
    routed_scaling_factor: multiplies the final weights. renormalize: HF `norm_topk_prob`.
    Returns Routing(topk_weights [T, K] float32 (unbiased sigmoid scores), topk_ids [T, K] int64).
    """
    if logits.is_cuda:
        from .topk_gating import topk_grouped_sigmoid_triton

        return topk_grouped_sigmoid_triton(
            logits, bias, k, n_group, topk_group, routed_scaling_factor, renormalize
        )
    return reference.topk_grouped_sigmoid_ref(
        logits, bias, k, n_group, topk_group, routed_scaling_factor, renormalize
    )


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Routed experts of one MoE layer: out[t] = sum_k topk_weights[t, k] * MLP_e(x[t]),
    with e = topk_ids[t, k].

    x: [T, H] float32/float16/bfloat16 hidden states. w_gate_up: [E, 2F, H], same dtype, gate
    rows then up rows of every expert. w_down: [E, H, F], same dtype. topk_ids: [T, K] int
    expert ids in [0, E). topk_weights: [T, K] float router weights.
    MLP_e(v) = w_down[e] @ (silu(w_gate[e] @ v) * (w_up[e] @ v)). Returns [T, H] in x.dtype;
    accumulation in float32. On CUDA: no host sync, CUDA-graph capturable.
    """
    if x.is_cuda:
        from .grouped_gemm import fused_moe_triton

        return fused_moe_triton(x, w_gate_up, w_down, topk_ids, topk_weights)
    return reference.fused_moe_ref(x, w_gate_up, w_down, topk_ids, topk_weights)


def expert_rows(
    x: torch.Tensor, expert_ids: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """What an expert server computes: row n of x through expert expert_ids[n], no weighting.

    x: [N, H] float32/float16/bfloat16 rows (any order, any mix of experts). expert_ids: [N] int
    in [0, E) (local expert index). w_gate_up: [E, 2F, H]; w_down: [E, H, F]; x's dtype.
    Returns [N, H] in x.dtype, row n = MLP_{expert_ids[n]}(x[n]).
    """
    if x.is_cuda:
        from .grouped_gemm import expert_rows_triton

        return expert_rows_triton(x, expert_ids, w_gate_up, w_down)
    return reference.expert_rows_ref(x, expert_ids, w_gate_up, w_down)


def paged_decode_gqa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention (one query token per sequence) over a paged KV cache, GQA.

    q: [B, num_heads, head_dim] float32/float16/bfloat16; query head h reads kv head h // rep
    (num_heads = num_kv_heads * rep). k_cache, v_cache: [num_blocks, block_size, num_kv_heads,
    head_dim], q's dtype; token j of sequence b at [block_tables[b, j // block_size],
    j % block_size]. block_tables: int32 [B, max_blocks] (entries past a row's blocks are never
    read). seq_lens: int32 [B], tokens cached per row including the query's own (the query sits
    at seq_lens[b] - 1); 0 marks a padding row, whose output is zeros. scale: multiplies q.k.
    max_seq_len: host int >= every seq_lens[b] (sizes the grid; no device read). window: sliding
    window, the query at p sees p - window < j <= p (None: all j <= p). out: optional
    [B, num_heads, head_dim] q.dtype result buffer. Returns [B, num_heads, head_dim] in q.dtype;
    float32 softmax. On CUDA: batch-invariant (bitwise) and CUDA-graph capturable.
    """
    if q.is_cuda:
        from .paged_attention import paged_decode_gqa_triton

        return paged_decode_gqa_triton(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                       max_seq_len, window, out)
    return attention_ref.paged_decode_gqa_ref(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                              max_seq_len, window, out)


def paged_decode_mla(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    rope_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeek MLA decode in the weight-absorbed form over a paged latent cache.

    q_lat: [B, nh, L] (q_nope absorbed through W_UK, L = kv_lora_rank) and q_rope: [B, nh, R]
    (rotated), float32/float16/bfloat16. kv_cache: [num_blocks, block_size, L] compressed
    latents; rope_cache: [num_blocks, block_size, R] rotated k_rope; q_lat's dtype.
    block_tables, seq_lens, max_seq_len, out: as `paged_decode_gqa` (out: [B, nh, L]).
    score_j = scale * (q_lat . kv_j + q_rope . rope_j); returns softmax(score) @ kv, [B, nh, L]
    in q_lat.dtype (apply W_UV after). On CUDA: batch-invariant and CUDA-graph capturable.
    """
    if q_lat.is_cuda:
        from .paged_attention import paged_decode_mla_triton

        return paged_decode_mla_triton(q_lat, q_rope, kv_cache, rope_cache, block_tables,
                                       seq_lens, scale, max_seq_len, out)
    return attention_ref.paged_decode_mla_ref(q_lat, q_rope, kv_cache, rope_cache, block_tables,
                                              seq_lens, scale, max_seq_len, out)


def rope_cache_write(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    slots: torch.Tensor, table: torch.Tensor, q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None, eps: float, k_cache: torch.Tensor, v_cache: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """GQA attention's row preparation: q [T, NH, D], k/v [T, NKV, D] (views of one projection
    are fine: unit stride in D); optional per-head RMSNorm weights q_norm/k_norm [D] (eps);
    RoPE (halves layout) with `table` [P, 2, D/2] = (cos, sin) of each position in q's dtype;
    k (normed, rotated) and v stored to k_cache / v_cache [S, NKV, D] at slots int64 [T].
    Returns the prepared queries [T, NH, D]. One kernel on CUDA (`rope_cache`)."""
    if q.is_cuda:
        from .rope_cache import rope_cache_write_triton

        with torch.cuda.device(q.device):
            return rope_cache_write_triton(q, k, v, positions, slots, table, q_norm, k_norm,
                                           eps, k_cache, v_cache, out)
    return attention_ref.rope_cache_write_ref(q, k, v, positions, slots, table, q_norm, k_norm,
                                              eps, k_cache, v_cache, out)
