"""Pure-torch references of the MoE and linear kernels (CPU or any device, any float dtype).

The engine runs on these alone on CPU; the Triton kernels in `topk_gating`, `moe_align`,
`grouped_gemm` and `invariant` are checked against them (the attention kernels' references are
in `reference_attention`). Routing follows Hugging Face exactly (see `topk_gating` for the
math); the expert MLP is `down(silu(gate(x)) * up(x))` with `w_gate_up [E, 2F, H]` (gate rows
first, then up rows) and `w_down [E, H, F]`, the layout of transformers' fused `*Experts`
modules.

Rounding points, shared with the kernels: products accumulate in float32; the activation
`silu(gate) * up` and each expert's output row are rounded to the input dtype (the kernels store
them in that dtype); the weighted sum over K accumulates in float32.
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
