"""Tensor names and shapes of each architecture, as the Hugging Face Hub checkpoints spell them.

The per-architecture parts come from `cfg.arch` (eaas.model.archs): that mixtral calls its
experts `block_sparse_moe.experts.{e}.w1/w3/w2` while the others say
`mlp.experts.{e}.gate_proj/up_proj/down_proj`, the shared expert's name and gate, and whether
attention is GQA or MLA. This module knows what they share: the decoder layer's norms, dense MLPs,
the attention kinds' tensors, and that some writers fuse a layer's experts into
`experts.gate_up_proj` [E, 2F, H] + `experts.down_proj` [E, H, F].
"""

from __future__ import annotations

from eaas.model.config import ModelConfig

__all__ = [
    "attention_shapes",
    "expert_names",
    "fused_expert_names",
    "layer_shapes",
    "moe_prefix",
    "non_expert_shapes",
    "shared_expert_gate_name",
    "shared_expert_prefix",
]

Shapes = dict[str, tuple[int, ...]]


def moe_prefix(cfg: ModelConfig, layer_idx: int) -> str:
    """The MoE block of a layer: router `.gate`, `.experts`, shared expert (Hub layout)."""
    return f"model.layers.{layer_idx}.{cfg.arch.moe_block}"


def expert_names(cfg: ModelConfig, layer_idx: int, expert: int) -> dict[str, str]:
    """{"gate", "up", "down"} -> per-expert tensor name (Hub layout)."""
    p = f"{moe_prefix(cfg, layer_idx)}.experts.{expert}"
    gate, up, down = cfg.arch.expert_proj
    return {"gate": f"{p}.{gate}.weight", "up": f"{p}.{up}.weight", "down": f"{p}.{down}.weight"}


def shared_expert_prefix(cfg: ModelConfig, layer_idx: int) -> str:
    """The shared expert MLP of a layer (`.gate_proj/.up_proj/.down_proj.weight`).

    ValueError if the model has none (`cfg.has_shared_expert` false).
    """
    if not cfg.has_shared_expert or cfg.arch.shared_expert is None:
        raise ValueError(f"{cfg.model_type} model has no shared expert")
    return f"{moe_prefix(cfg, layer_idx)}.{cfg.arch.shared_expert}"


def shared_expert_gate_name(cfg: ModelConfig, layer_idx: int) -> str | None:
    """The [1, H] sigmoid gate of a layer's shared expert, or None when it is ungated or absent."""
    if not cfg.shared_expert_gate:
        return None
    assert cfg.arch.shared_expert_gate is not None, cfg.model_type
    return f"{moe_prefix(cfg, layer_idx)}.{cfg.arch.shared_expert_gate}.weight"


def fused_expert_names(cfg: ModelConfig, layer_idx: int) -> tuple[list[str], list[str]]:
    """Candidate names of the fused [E, 2F, H] gate_up and [E, H, F] down tensors of a layer."""
    prefixes = [f"model.layers.{layer_idx}.mlp.experts", f"{moe_prefix(cfg, layer_idx)}.experts"]
    prefixes = list(dict.fromkeys(prefixes))
    return [f"{p}.gate_up_proj" for p in prefixes], [f"{p}.down_proj" for p in prefixes]


def _mlp(prefix: str, hidden: int, inter: int) -> Shapes:
    return {
        f"{prefix}.gate_proj.weight": (inter, hidden),
        f"{prefix}.up_proj.weight": (inter, hidden),
        f"{prefix}.down_proj.weight": (hidden, inter),
    }


def attention_shapes(cfg: ModelConfig, layer_idx: int) -> Shapes:
    """Every tensor of one layer's attention, by `cfg.arch.attention` ("gqa" or "mla")."""
    p = f"model.layers.{layer_idx}.self_attn"
    h, nh, nkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if cfg.is_mla:
        s: Shapes = {}
        if cfg.q_lora_rank is None:
            s[f"{p}.q_proj.weight"] = (nh * d, h)
        else:
            s[f"{p}.q_a_proj.weight"] = (cfg.q_lora_rank, h)
            s[f"{p}.q_a_layernorm.weight"] = (cfg.q_lora_rank,)
            s[f"{p}.q_b_proj.weight"] = (nh * d, cfg.q_lora_rank)
        s[f"{p}.kv_a_proj_with_mqa.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
        s[f"{p}.kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
        s[f"{p}.kv_b_proj.weight"] = (
            nh * (cfg.qk_nope_head_dim + cfg.v_head_dim),
            cfg.kv_lora_rank,
        )
        s[f"{p}.o_proj.weight"] = (h, nh * cfg.v_head_dim)
        if cfg.qkv_bias:
            if cfg.q_lora_rank is not None:
                s[f"{p}.q_a_proj.bias"] = (cfg.q_lora_rank,)
            s[f"{p}.kv_a_proj_with_mqa.bias"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim,)
            s[f"{p}.o_proj.bias"] = (h,)
        return s
    s = {
        f"{p}.q_proj.weight": (nh * d, h),
        f"{p}.k_proj.weight": (nkv * d, h),
        f"{p}.v_proj.weight": (nkv * d, h),
        f"{p}.o_proj.weight": (h, nh * d),
    }
    if cfg.qkv_bias:
        s.update(
            {
                f"{p}.q_proj.bias": (nh * d,),
                f"{p}.k_proj.bias": (nkv * d,),
                f"{p}.v_proj.bias": (nkv * d,),
            }
        )
    if cfg.o_bias:
        s[f"{p}.o_proj.bias"] = (h,)
    if cfg.qk_norm:
        s.update({f"{p}.q_norm.weight": (d,), f"{p}.k_norm.weight": (d,)})
    return s


def layer_shapes(cfg: ModelConfig, layer_idx: int) -> Shapes:
    """Every tensor of one decoder layer except the routed experts."""
    h = cfg.hidden_size
    base = f"model.layers.{layer_idx}"
    s: Shapes = {
        f"{base}.input_layernorm.weight": (h,),
        f"{base}.post_attention_layernorm.weight": (h,),
    }
    s.update(attention_shapes(cfg, layer_idx))
    if not cfg.is_moe_layer(layer_idx):
        s.update(_mlp(f"{base}.mlp", h, cfg.intermediate_size))
        return s
    p = moe_prefix(cfg, layer_idx)
    s[f"{p}.gate.weight"] = (cfg.num_experts, h)
    if cfg.scoring == "sigmoid":
        s[f"{p}.gate.e_score_correction_bias"] = (cfg.num_experts,)
    if cfg.has_shared_expert:
        s.update(_mlp(shared_expert_prefix(cfg, layer_idx), h, cfg.shared_expert_intermediate_size))
    gate = shared_expert_gate_name(cfg, layer_idx)
    if gate is not None:
        s[gate] = (1, h)
    return s


def non_expert_shapes(cfg: ModelConfig) -> Shapes:
    """Every tensor of the model except routed experts, name -> shape."""
    s: Shapes = {
        "model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
        "model.norm.weight": (cfg.hidden_size,),
    }
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    for layer in range(cfg.num_hidden_layers):
        s.update(layer_shapes(cfg, layer))
    return s
