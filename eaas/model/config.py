"""ModelConfig: one frozen view of a Hugging Face `config.json` for the supported MoE architectures.

The four architectures name the same concepts differently (`num_experts` / `num_local_experts` /
`n_routed_experts`, `rope_theta` / `rope_parameters`, ...). `ModelConfig.from_dict` reads the
fields they share here and the rest through the architecture's `parse` (eaas.model.archs), onto
one vocabulary; every error names the file and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eaas.errors import CheckpointError
from eaas.model.archs import ARCHS as _REGISTRY
from eaas.model.archs import Arch, RawConfig, get_arch

__all__ = ["ARCHS", "ModelConfig"]

ARCHS: tuple[str, ...] = tuple(_REGISTRY)  # the supported model_type names

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
    def arch(self) -> Arch:
        """The architecture's tensor names, router scoring and attention kind (eaas.model.archs)."""
        return _REGISTRY[self.model_type]

    @property
    def is_mla(self) -> bool:
        return self.arch.attention == "mla"

    def is_moe_layer(self, layer_idx: int) -> bool:
        """True when layer `layer_idx` has routed experts (else it has a dense MLP)."""
        if not 0 <= layer_idx < self.num_hidden_layers:
            raise ValueError(f"layer_idx {layer_idx} outside 0..{self.num_hidden_layers - 1}")
        return self.arch.is_moe_layer(self, layer_idx)

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
        try:
            arch = get_arch(raw.get("model_type"))
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from None
        if raw.get("quantization_config"):
            quant = raw["quantization_config"]
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
            raise CheckpointError(
                f"{source}: field 'quantization_config' ({method}): quantized "
                "checkpoints are not supported; use a bf16/fp16/fp32 checkpoint"
            )
        try:
            return cls._build(RawConfig(raw, source), arch)
        except CheckpointError as exc:
            msg = str(exc)
            raise CheckpointError(msg if msg.startswith(source) else f"{source}: {msg}") from None
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{source}: invalid config field ({exc!r})") from None

    @classmethod
    def _build(cls, r: RawConfig, arch: Arch) -> ModelConfig:
        """The fields every architecture shares, then `arch.parse` for the rest."""
        raw = r.raw
        hidden = r.req("hidden_size", kind=int)
        heads = r.req("num_attention_heads", kind=int)
        rope_params: dict[str, Any] = raw.get("rope_parameters") or {}
        if not isinstance(rope_params, dict):
            raise CheckpointError("field 'rope_parameters' must be an object")
        default_theta = rope_params.get("rope_theta", arch.default_rope_theta)
        rope_theta = float(r.opt("rope_theta", default_theta))
        scaling = raw.get("rope_scaling") or rope_params or None
        if scaling is not None:
            scaling = dict(scaling)
            scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        if r.opt("hidden_act", "silu") != "silu":
            raise CheckpointError(
                f"field 'hidden_act' is {raw['hidden_act']!r}; only 'silu' is supported"
            )
        return cls(
            model_type=arch.model_type,
            vocab_size=r.req("vocab_size", kind=int),
            hidden_size=hidden,
            num_hidden_layers=r.req("num_hidden_layers", kind=int),
            num_attention_heads=heads,
            num_experts_per_tok=r.req("num_experts_per_tok", kind=int),
            max_position_embeddings=r.opt("max_position_embeddings", 4096, kind=int),
            rms_norm_eps=r.opt("rms_norm_eps", 1e-6, kind=float),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=r.opt("tie_word_embeddings", False, kind=bool),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            raw=dict(raw),
            scoring=arch.scoring,
            **arch.parse(r),
        )
