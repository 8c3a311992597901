"""deepseek_v3 (DeepSeek-V3, R1, Kimi-K2 layout): multi-head latent attention (MLA), sigmoid
router with `e_score_correction_bias` and grouped top-k, ungated shared experts, the first
`first_k_dense_replace` layers dense, yarn rope."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eaas.model.archs.base import Arch, RawConfig

if TYPE_CHECKING:
    from eaas.model.config import ModelConfig

__all__ = ["ARCH"]


def parse(r: RawConfig) -> dict[str, Any]:
    """ModelConfig fields of a deepseek_v3 config.json (head_dim = qk_nope + qk_rope; the shared
    experts are one MLP of width n_shared_experts x moe_intermediate_size)."""
    num_layers = r.req("num_hidden_layers", kind=int)
    heads = r.req("num_attention_heads", kind=int)
    moe_f = r.req("moe_intermediate_size", kind=int)
    n_shared = r.opt("n_shared_experts", 0, kind=int)
    nope, rope = r.opt("qk_nope_head_dim", 128, kind=int), r.opt("qk_rope_head_dim", 64, kind=int)
    q_lora = r.get("q_lora_rank")
    bias = r.opt("attention_bias", False, kind=bool)
    return {
        "layer_windows": (0,) * num_layers,
        "num_key_value_heads": r.opt("num_key_value_heads", heads, kind=int),
        "head_dim": nope + rope,
        "num_experts": r.req("n_routed_experts", kind=int),
        "moe_intermediate_size": moe_f,
        "intermediate_size": r.req("intermediate_size", kind=int),
        "has_shared_expert": n_shared > 0,
        "shared_expert_intermediate_size": moe_f * n_shared,
        "shared_expert_gate": False,
        "norm_topk_prob": r.opt("norm_topk_prob", True, kind=bool),
        "qkv_bias": bias,
        "o_bias": bias,
        "qk_norm": False,
        "first_k_dense_replace": r.opt("first_k_dense_replace", 0, kind=int),
        "n_group": r.opt("n_group", 1, kind=int),
        "topk_group": r.opt("topk_group", 1, kind=int),
        "routed_scaling_factor": r.opt("routed_scaling_factor", 1.0, kind=float),
        "q_lora_rank": None if q_lora is None else int(q_lora),
        "kv_lora_rank": r.req("kv_lora_rank", kind=int),
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope,
        "v_head_dim": r.opt("v_head_dim", 128, kind=int),
        "rope_interleave": r.opt("rope_interleave", True, kind=bool),
    }


def _after_first_k_dense(cfg: ModelConfig, layer_idx: int) -> bool:
    return layer_idx >= cfg.first_k_dense_replace


ARCH = Arch(
    model_type="deepseek_v3",
    attention="mla",
    scoring="sigmoid",
    parse=parse,
    is_moe_layer=_after_first_k_dense,
    shared_expert="shared_experts",
    tiny={
        "architectures": ["DeepseekV3ForCausalLM"],
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "moe_intermediate_size": 32,
        "intermediate_size": 96,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "kv_lora_rank": 32,
        "q_lora_rank": 48,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "attention_bias": False,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
    },
)
