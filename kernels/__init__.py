"""eaas_kernels: Triton kernels for the MoE expert path, each beside a pure-torch reference.

Installed from the top-level folder `kernels/` under the import name `eaas_kernels` (so it never
shadows the PyPI package `kernels`). The four entry points dispatch on the device: CUDA tensors
run Triton kernels, anything else runs the references in `eaas_kernels.reference`.

    from eaas_kernels import topk_softmax, fused_moe
    weights, ids = topk_softmax(router_logits, k=8, renormalize=True)  # [T, K] each
    out = fused_moe(x, w_gate_up, w_down, ids, weights)                 # [T, H]
"""

from .configs import GemmConfig, MoEConfig
from .dispatch import expert_rows, fused_moe, topk_grouped_sigmoid, topk_softmax
from .reference import Alignment, Routing

__all__ = [
    "topk_softmax",
    "topk_grouped_sigmoid",
    "fused_moe",
    "expert_rows",
    "Routing",
    "Alignment",
    "MoEConfig",
    "GemmConfig",
]
