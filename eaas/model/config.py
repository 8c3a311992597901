"""ModelConfig: one frozen view of a Hugging Face `config.json` for the supported MoE architectures.

The four architectures name the same concepts differently (`num_experts` / `num_local_experts` /
`n_routed_experts`, `rope_theta` / `rope_parameters`, ...). `ModelConfig.from_dict` maps each
onto one vocabulary; every error names the file and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eaas.errors import CheckpointError

__all__ = ["ARCHS", "ModelConfig"]

ARCHS: tuple[str, ...] = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3")

_ROPE_TYPES = ("default", "linear", "yarn")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture hyper-parameters, named one way for all supported architectures.

    `head_dim` is the query/key head width (for MLA: qk_nope_head_dim + qk_rope_head_dim).
    `num_experts` counts routed experts; `moe_intermediate_size` is F, the routed expert FFN width.
    `scoring` is "softmax" (qwen, mixtral) or "sigmoid" (deepseek_v3, with e_score_correction_bias).
    `raw` is the original config.json.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    intermediate_size: int
    has_shared_expert: bool
    shared_expert_intermediate_size: int
    shared_expert_gate: bool
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = field(hash=False)
    tie_word_embeddings: bool
    norm_topk_prob: bool
    scoring: str
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    mlp_only_layers: tuple[int, ...] = ()
    decoder_sparse_step: int = 1
    first_k_dense_replace: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    layer_windows: tuple[int, ...] = ()  # per layer: sliding-window length, 0 = full attention
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in ARCHS:
            raise CheckpointError(f"model_type {self.model_type!r} is not one of {ARCHS}")
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_experts",
            "num_experts_per_tok",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise CheckpointError(f"field {name!r} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise CheckpointError(
                f"num_experts_per_tok {self.num_experts_per_tok} > experts {self.num_experts}"
            )
        if self.num_experts % self.n_group or (self.topk_group > self.n_group):
            raise CheckpointError(
                f"n_group {self.n_group} / topk_group {self.topk_group} do not fit "
                f"{self.num_experts} experts"
            )
        dense = [i for i in range(self.num_hidden_layers) if not self.is_moe_layer(i)]
        if dense and self.intermediate_size <= 0:
            raise CheckpointError(
                f"field 'intermediate_size' must be > 0: layers {dense} have a dense MLP"
            )
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in _ROPE_TYPES:
            raise CheckpointError(
                f"rope_scaling type {self.rope_scaling.get('rope_type')!r} is not "
                f"supported (allowed: {_ROPE_TYPES})"
            )

    def sliding_window(self, layer_idx: int) -> int | None:
        """Attention window of layer `layer_idx` (a query sees its last `window` positions),
        or None."""
        window = self.layer_windows[layer_idx] if self.layer_windows else 0
        return window or None

    @property
    def is_mla(self) -> bool:
        return self.model_type == "deepseek_v3"

    def is_moe_layer(self, layer_idx: int) -> bool:
        """True when layer `layer_idx` has routed experts (else it has a dense MLP)."""
        if not 0 <= layer_idx < self.num_hidden_layers:
            raise ValueError(f"layer_idx {layer_idx} outside 0..{self.num_hidden_layers - 1}")
        if self.model_type == "deepseek_v3":
            return layer_idx >= self.first_k_dense_replace
        if self.model_type in ("qwen2_moe", "qwen3_moe"):
            return (
                layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0
            )
        return True

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: config.json not found") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read config.json ({exc})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: config.json must hold a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a config.json dict; CheckpointError names `source` and the field."""

        def convert(name: str, value: Any, kind: Any) -> Any:
            if kind is None or value is None:
                return value
            if kind is bool and not isinstance(value, bool):
                raise CheckpointError(f"{source}: field {name!r} must be true/false, got {value!r}")
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise CheckpointError(
                    f"{source}: field {name!r} must be {kind.__name__}, got {value!r}"
                ) from None

        def req(name: str, *alts: str, kind: Any = None) -> Any:
            for key in (name, *alts):
                if raw.get(key) is not None:
                    return convert(key, raw[key], kind)
            raise CheckpointError(f"{source}: missing config field {name!r}")

        def opt(name: str, default: Any, kind: Any = None) -> Any:
            value = raw.get(name)
            return default if value is None else convert(name, value, kind)

        model_type = raw.get("model_type")
        if model_type not in ARCHS:
            raise CheckpointError(
                f"{source}: unknown model_type {model_type!r} (supported: {', '.join(ARCHS)})"
            )
        if raw.get("quantization_config"):
            quant = raw["quantization_config"]
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
            raise CheckpointError(
                f"{source}: field 'quantization_config' ({method}): quantized "
                "checkpoints are not supported; use a bf16/fp16/fp32 checkpoint"
            )
        try:
            return cls._build(raw, model_type, req, opt)
        except CheckpointError as exc:
            msg = str(exc)
            raise CheckpointError(msg if msg.startswith(source) else f"{source}: {msg}") from None
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{source}: invalid config field ({exc!r})") from None

    @classmethod
    def _build(cls, raw: dict[str, Any], model_type: str, req: Any, opt: Any) -> ModelConfig:
        hidden = req("hidden_size", kind=int)
        heads = req("num_attention_heads", kind=int)
        rope_params: dict[str, Any] = raw.get("rope_parameters") or {}
        if not isinstance(rope_params, dict):
            raise CheckpointError("field 'rope_parameters' must be an object")
        default_theta = 1e6 if model_type == "mixtral" else 10000.0
        rope_theta = float(opt("rope_theta", rope_params.get("rope_theta", default_theta)))
        scaling = raw.get("rope_scaling") or rope_params or None
        if scaling is not None:
            scaling = dict(scaling)
            scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        if opt("hidden_act", "silu") != "silu":
            raise CheckpointError(
                f"field 'hidden_act' is {raw['hidden_act']!r}; only 'silu' is supported"
            )
        common: dict[str, Any] = {
            "model_type": model_type,
            "vocab_size": req("vocab_size", kind=int),
            "hidden_size": hidden,
            "num_hidden_layers": req("num_hidden_layers", kind=int),
            "num_attention_heads": heads,
            "num_experts_per_tok": req("num_experts_per_tok", kind=int),
            "max_position_embeddings": opt("max_position_embeddings", 4096, kind=int),
            "rms_norm_eps": opt("rms_norm_eps", 1e-6, kind=float),
            "rope_theta": rope_theta,
            "rope_scaling": scaling,
            "tie_word_embeddings": opt("tie_word_embeddings", False, kind=bool),
            "bos_token_id": raw.get("bos_token_id"),
            "eos_token_ids": eos_ids,
            "raw": dict(raw),
        }
        common["layer_windows"] = _layer_windows(raw, model_type, common["num_hidden_layers"])
        if model_type in ("qwen3_moe", "qwen2_moe"):
            qwen3 = model_type == "qwen3_moe"
            shared = 0 if qwen3 else req("shared_expert_intermediate_size", kind=int)
            bias = (
                opt("attention_bias", False, kind=bool)
                if qwen3
                else opt("qkv_bias", True, kind=bool)
            )
            return cls(
                **common,
                num_key_value_heads=opt("num_key_value_heads", heads, kind=int),
                head_dim=opt("head_dim", hidden // heads, kind=int) if qwen3 else hidden // heads,
                num_experts=req("num_experts", "num_local_experts", kind=int),
                moe_intermediate_size=req("moe_intermediate_size", kind=int),
                intermediate_size=opt("intermediate_size", 0, kind=int),
                has_shared_expert=shared > 0,
                shared_expert_intermediate_size=shared,
                shared_expert_gate=shared > 0,
                norm_topk_prob=opt("norm_topk_prob", False, kind=bool),
                scoring="softmax",
                qkv_bias=bias,
                o_bias=bias and qwen3,
                qk_norm=qwen3,
                mlp_only_layers=tuple(int(i) for i in opt("mlp_only_layers", [])),
                decoder_sparse_step=opt("decoder_sparse_step", 1, kind=int),
            )
        if model_type == "mixtral":
            head_dim = raw.get("head_dim") or hidden // heads
            return cls(
                **common,
                num_key_value_heads=opt("num_key_value_heads", heads, kind=int),
                head_dim=int(head_dim),
                num_experts=req("num_local_experts", kind=int),
                moe_intermediate_size=req("intermediate_size", kind=int),
                intermediate_size=0,
                has_shared_expert=False,
                shared_expert_intermediate_size=0,
                shared_expert_gate=False,
                norm_topk_prob=True,
                scoring="softmax",
                qkv_bias=False,
                o_bias=False,
                qk_norm=False,
            )
        # deepseek_v3 (MLA + sigmoid grouped router)
        moe_f = req("moe_intermediate_size", kind=int)
        n_shared = opt("n_shared_experts", 0, kind=int)
        nope, rope = opt("qk_nope_head_dim", 128, kind=int), opt("qk_rope_head_dim", 64, kind=int)
        q_lora = raw.get("q_lora_rank")
        bias = opt("attention_bias", False, kind=bool)
        return cls(
            **common,
            num_key_value_heads=opt("num_key_value_heads", heads, kind=int),
            head_dim=nope + rope,
            num_experts=req("n_routed_experts", kind=int),
            moe_intermediate_size=moe_f,
            intermediate_size=req("intermediate_size", kind=int),
            has_shared_expert=n_shared > 0,
            shared_expert_intermediate_size=moe_f * n_shared,
            shared_expert_gate=False,
            norm_topk_prob=opt("norm_topk_prob", True, kind=bool),
            scoring="sigmoid",
            qkv_bias=bias,
            o_bias=bias,
            qk_norm=False,
            first_k_dense_replace=opt("first_k_dense_replace", 0, kind=int),
            n_group=opt("n_group", 1, kind=int),
            topk_group=opt("topk_group", 1, kind=int),
            routed_scaling_factor=opt("routed_scaling_factor", 1.0, kind=float),
            q_lora_rank=None if q_lora is None else int(q_lora),
            kv_lora_rank=req("kv_lora_rank", kind=int),
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope,
            v_head_dim=opt("v_head_dim", 128, kind=int),
            rope_interleave=opt("rope_interleave", True, kind=bool),
        )


def _layer_windows(raw: dict[str, Any], model_type: str, num_layers: int) -> tuple[int, ...]:
    """Per-layer sliding windows as transformers derives them (0 = full attention)."""
    window = int(raw.get("sliding_window") or 0)
    if model_type == "mixtral":
        return (window,) * num_layers
    if model_type == "deepseek_v3" or not raw.get("use_sliding_window", False):
        return (0,) * num_layers
    if model_type == "qwen3_moe":
        return (window,) * num_layers
    types = raw.get("layer_types")
    if not isinstance(types, list) or len(types) != num_layers:
        max_window = int(raw.get("max_window_layers", 28))
        types = [
            "sliding_attention" if (i + 1) % 2 and i < max_window else "full_attention"
            for i in range(num_layers)
        ]
    return tuple(window if t == "sliding_attention" else 0 for t in types)
