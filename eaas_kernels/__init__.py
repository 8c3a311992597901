"""eaas_kernels: Triton kernels for the MoE expert path, each beside a pure-torch reference.

The folder is named for its import name, so it never shadows the PyPI package `kernels` that
transformers imports. The entry points dispatch on the device: CUDA tensors
run Triton kernels, anything else runs the references in `eaas_kernels.reference` and
`eaas_kernels.reference_attention`.

    from eaas_kernels import topk_softmax, fused_moe
    weights, ids = topk_softmax(router_logits, k=8, renormalize=True)  # [T, K] each
    out = fused_moe(x, w_gate_up, w_down, ids, weights)                 # [T, H]
    o = paged_decode_gqa(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len)

The batch-invariant matmul and RMSNorm (`eaas_kernels.invariant.matmul` / `.rms_norm`, CUDA
only; references `reference.matmul_ref` / `rms_norm_ref`) are reached through
`eaas.model.ops.linear` / `ops.rms_norm` with batch_invariant=True, which import them on first
CUDA use (the module needs Triton), so they are not re-exported here.
"""

from .configs import GemmConfig, MoEConfig
from .dispatch import (
    expert_rows,
    fused_moe,
    paged_decode_gqa,
    paged_decode_mla,
    rope_cache_write,
    topk_grouped_sigmoid,
    topk_softmax,
)
from .reference import Alignment, Routing

__all__ = [
    "topk_softmax",
    "topk_grouped_sigmoid",
    "fused_moe",
    "expert_rows",
    "paged_decode_gqa",
    "paged_decode_mla",
    "rope_cache_write",
    "Routing",
    "Alignment",
    "MoEConfig",
    "GemmConfig",
]
