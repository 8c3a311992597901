"""qwen2_moe (Qwen1.5-MoE, Qwen2-57B-A14B): GQA with q/k/v biases, softmax router, a shared
expert behind a sigmoid gate, optional dense layers (`mlp_only_layers`, `decoder_sparse_step`)
and per-layer sliding windows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eaas.model.archs.base import Arch, RawConfig

if TYPE_CHECKING:
    from eaas.model.config import ModelConfig

__all__ = ["ARCH", "is_sparse_step_layer"]


def parse(r: RawConfig) -> dict[str, Any]:
    """ModelConfig fields of a qwen2_moe config.json (head_dim is always hidden / heads)."""
    windows = _layer_windows(r)
    shared = r.req("shared_expert_intermediate_size", kind=int)
    bias = r.opt("qkv_bias", True, kind=bool)
    hidden, heads = r.req("hidden_size", kind=int), r.req("num_attention_heads", kind=int)
    return {
        "layer_windows": windows,
        "num_key_value_heads": r.opt("num_key_value_heads", heads, kind=int),
        "head_dim": hidden // heads,
        "num_experts": r.req("num_experts", "num_local_experts", kind=int),
        "moe_intermediate_size": r.req("moe_intermediate_size", kind=int),
        "intermediate_size": r.opt("intermediate_size", 0, kind=int),
        "has_shared_expert": shared > 0,
        "shared_expert_intermediate_size": shared,
        "shared_expert_gate": shared > 0,
        "norm_topk_prob": r.opt("norm_topk_prob", False, kind=bool),
        "qkv_bias": bias,
        "o_bias": False,
        "qk_norm": False,
        "mlp_only_layers": tuple(int(i) for i in r.opt("mlp_only_layers", [])),
        "decoder_sparse_step": r.opt("decoder_sparse_step", 1, kind=int),
    }


def _layer_windows(r: RawConfig) -> tuple[int, ...]:
    """As transformers derives them: `layer_types`, else every odd layer (1st, 3rd, ...) below
    `max_window_layers` slides; nothing slides unless `use_sliding_window`. 0 = full."""
    window = int(r.get("sliding_window") or 0)
    num_layers = r.req("num_hidden_layers", kind=int)
    if not r.get("use_sliding_window"):
        return (0,) * num_layers
    types = r.get("layer_types")
    if not isinstance(types, list) or len(types) != num_layers:
        max_window = int(r.raw.get("max_window_layers", 28))
        types = [
            "sliding_attention" if (i + 1) % 2 and i < max_window else "full_attention"
            for i in range(num_layers)
        ]
    return tuple(window if t == "sliding_attention" else 0 for t in types)


def is_sparse_step_layer(cfg: ModelConfig, layer_idx: int) -> bool:
    """MoE unless listed in `mlp_only_layers` or off the `decoder_sparse_step` grid."""
    return (
        layer_idx not in cfg.mlp_only_layers and (layer_idx + 1) % cfg.decoder_sparse_step == 0
    )


ARCH = Arch(
    model_type="qwen2_moe",
    attention="gqa",
    scoring="softmax",
    parse=parse,
    is_moe_layer=is_sparse_step_layer,
    shared_expert="shared_expert",
    shared_expert_gate="shared_expert_gate",
    tiny={
        "architectures": ["Qwen2MoeForCausalLM"],
        "num_hidden_layers": 2,
        "num_experts": 8,
        "moe_intermediate_size": 32,
        "intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "qkv_bias": True,
        "sliding_window": None,
        "use_sliding_window": False,
        "max_window_layers": 2,
    },
)
