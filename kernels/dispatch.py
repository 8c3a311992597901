"""The one function per kernel that the engine calls: Triton on CUDA, the reference elsewhere.

CUDA tensors go to the Triton kernels; CPU tensors (and any other device) go to the pure-torch
references, so the engine needs neither a GPU nor Triton. The Triton modules are imported on
first CUDA use only. Tests run the Triton path on CPU by calling the `*_triton` functions under
TRITON_INTERPRET=1 (see tests/kernels/conftest.py).
"""

from __future__ import annotations

import torch

from . import reference
from .reference import Routing

__all__ = ["topk_softmax", "topk_grouped_sigmoid", "fused_moe", "expert_rows"]


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
