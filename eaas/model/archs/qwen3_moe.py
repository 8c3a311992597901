"""qwen3_moe (Qwen3-30B-A3B, Qwen3-235B-A22B): GQA with q/k RMSNorm, softmax router, no shared
expert; dense layers as qwen2_moe (`mlp_only_layers`, `decoder_sparse_step`)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from eaas.model.archs.base import Arch, RawConfig
from eaas.model.archs.qwen2_moe import is_sparse_step_layer

__all__ = ["ARCH", "QWEN3_30B_A3B"]

# Qwen3-30B-A3B's shape (Hub config.json), every layer MoE. Pass num_hidden_layers=4..8 to fit
# one GPU's memory: a layer holds 128 experts x 3 x 2048 x 768 bf16 = 1.2 GB.
QWEN3_30B_A3B: MappingProxyType[str, Any] = MappingProxyType(dict(
    hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
    num_hidden_layers=48, mlp_only_layers=[], decoder_sparse_step=1,
    max_position_embeddings=4096,
))


def parse(r: RawConfig) -> dict[str, Any]:
    """ModelConfig fields of a qwen3_moe config.json (`attention_bias` covers q/k/v and o)."""
    window = int(r.get("sliding_window") or 0)
    num_layers = r.req("num_hidden_layers", kind=int)
    bias = r.opt("attention_bias", False, kind=bool)
    hidden, heads = r.req("hidden_size", kind=int), r.req("num_attention_heads", kind=int)
    return {
        "layer_windows": (window if r.get("use_sliding_window") else 0,) * num_layers,
        "num_key_value_heads": r.opt("num_key_value_heads", heads, kind=int),
        "head_dim": r.opt("head_dim", hidden // heads, kind=int),
        "num_experts": r.req("num_experts", "num_local_experts", kind=int),
        "moe_intermediate_size": r.req("moe_intermediate_size", kind=int),
        "intermediate_size": r.opt("intermediate_size", 0, kind=int),
        "has_shared_expert": False,
        "shared_expert_intermediate_size": 0,
        "shared_expert_gate": False,
        "norm_topk_prob": r.opt("norm_topk_prob", False, kind=bool),
        "qkv_bias": bias,
        "o_bias": bias,
        "qk_norm": True,
        "mlp_only_layers": tuple(int(i) for i in r.opt("mlp_only_layers", [])),
        "decoder_sparse_step": r.opt("decoder_sparse_step", 1, kind=int),
    }


ARCH = Arch(
    model_type="qwen3_moe",
    attention="gqa",
    scoring="softmax",
    parse=parse,
    is_moe_layer=is_sparse_step_layer,
    presets=MappingProxyType({"Qwen/Qwen3-30B-A3B": QWEN3_30B_A3B}),
    tiny={
        "architectures": ["Qwen3MoeForCausalLM"],
        "num_hidden_layers": 3,
        "head_dim": 16,
        "num_experts": 8,
        "moe_intermediate_size": 32,
        "intermediate_size": 64,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "sliding_window": None,
        "use_sliding_window": False,
    },
)
