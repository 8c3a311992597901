"""mixtral (Mixtral-8x7B, 8x22B): GQA without biases, softmax router over renormalised top-k,
every layer MoE, experts named `block_sparse_moe.experts.{e}.w1/w3/w2`, one sliding window."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eaas.model.archs.base import Arch, RawConfig

if TYPE_CHECKING:
    from eaas.model.config import ModelConfig

__all__ = ["ARCH"]


def parse(r: RawConfig) -> dict[str, Any]:
    """ModelConfig fields of a mixtral config.json (`intermediate_size` is the expert width)."""
    window = int(r.get("sliding_window") or 0)
    num_layers = r.req("num_hidden_layers", kind=int)
    hidden, heads = r.req("hidden_size", kind=int), r.req("num_attention_heads", kind=int)
    head_dim = r.get("head_dim") or hidden // heads
    return {
        "layer_windows": (window,) * num_layers,
        "num_key_value_heads": r.opt("num_key_value_heads", heads, kind=int),
        "head_dim": int(head_dim),
        "num_experts": r.req("num_local_experts", kind=int),
        "moe_intermediate_size": r.req("intermediate_size", kind=int),
        "intermediate_size": 0,
        "has_shared_expert": False,
        "shared_expert_intermediate_size": 0,
        "shared_expert_gate": False,
        "norm_topk_prob": True,
        "qkv_bias": False,
        "o_bias": False,
        "qk_norm": False,
    }


def _every_layer(cfg: ModelConfig, layer_idx: int) -> bool:
    return True


ARCH = Arch(
    model_type="mixtral",
    attention="gqa",
    scoring="softmax",
    parse=parse,
    is_moe_layer=_every_layer,
    default_rope_theta=1e6,
    moe_block="block_sparse_moe",
    expert_proj=("w1", "w3", "w2"),
    tiny={
        "architectures": ["MixtralForCausalLM"],
        "num_hidden_layers": 2,
        "num_local_experts": 8,
        "intermediate_size": 48,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "router_jitter_noise": 0.0,
    },
)
