"""`Arch`, what eaas knows about one Hugging Face `model_type`, and `RawConfig`, the typed reads
of a config.json dict that each architecture's `parse` uses."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from eaas.errors import CheckpointError

if TYPE_CHECKING:
    from eaas.model.config import ModelConfig

__all__ = ["ATTENTION_KINDS", "SCORINGS", "Arch", "AttentionKind", "RawConfig", "Scoring"]

AttentionKind = Literal["gqa", "mla"]
Scoring = Literal["softmax", "sigmoid"]
ATTENTION_KINDS: tuple[str, ...] = ("gqa", "mla")
SCORINGS: tuple[str, ...] = ("softmax", "sigmoid")


@dataclass(frozen=True, slots=True)
class RawConfig:
    """A config.json dict with typed field reads; every error names `source` and the field.

    A field set to null counts as absent. `kind` (int, float, bool) converts the value; bool
    accepts only true/false.
    """

    raw: Mapping[str, Any]
    source: str = "config.json"

    def get(self, name: str) -> Any:
        """The raw value of `name` (None when absent), unconverted."""
        return self.raw.get(name)

    def req(self, name: str, *alts: str, kind: type | None = None) -> Any:
        """The first of `name`, `*alts` that is set, as `kind`; CheckpointError if none is."""
        for key in (name, *alts):
            if self.raw.get(key) is not None:
                return self._convert(key, self.raw[key], kind)
        raise CheckpointError(f"{self.source}: missing config field {name!r}")

    def opt(self, name: str, default: Any, kind: type | None = None) -> Any:
        """Field `name` as `kind`, or `default` (not converted) when it is absent."""
        value = self.raw.get(name)
        return default if value is None else self._convert(name, value, kind)

    def _convert(self, name: str, value: Any, kind: type | None) -> Any:
        if kind is None:
            return value
        if kind is bool and not isinstance(value, bool):
            raise CheckpointError(
                f"{self.source}: field {name!r} must be true/false, got {value!r}"
            )
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise CheckpointError(
                f"{self.source}: field {name!r} must be {kind.__name__}, got {value!r}"
            ) from None


@dataclass(frozen=True, slots=True, eq=False)
class Arch:
    """One supported architecture: its config.json fields, tensor names, router and attention.

    `parse(raw)` returns every ModelConfig field that config.py does not read itself (config.py
    reads the fields all architectures share: vocab, hidden size, layers, heads, top-k, norms,
    rope, tokens); `is_moe_layer(cfg, layer)` says whether a layer has routed experts (else a
    dense MLP). Tensor names are relative to `model.layers.{l}.`: the MoE block
    `{moe_block}` holds `gate` (the router), `experts.{e}.{gate|up|down proj}.weight`, the
    shared expert MLP `{shared_expert}` and its gate `{shared_expert_gate}`; attention tensors
    follow from `attention` ("gqa": q/k/v/o_proj, "mla": DeepSeek's low-rank q/kv projections).
    `tiny` is the config.json of `make_tiny`'s model over tiny.py's fields common to all
    architectures; `presets` are full-size shapes by Hub name (config.json overrides for
    `make_random`).
    """

    model_type: str
    attention: AttentionKind
    scoring: Scoring  # router: "softmax", or "sigmoid" with gate.e_score_correction_bias
    parse: Callable[[RawConfig], dict[str, Any]]
    is_moe_layer: Callable[[ModelConfig, int], bool]
    tiny: Mapping[str, Any]
    default_rope_theta: float = 10000.0
    moe_block: str = "mlp"
    expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_expert: str | None = None  # None: the architecture has no shared expert
    shared_expert_gate: str | None = None  # None: an ungated shared expert (or none)
    presets: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "tiny", MappingProxyType(dict(self.tiny)))  # read-only view
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(
                f"Arch {self.model_type!r}: attention {self.attention!r} is not one of "
                f"{ATTENTION_KINDS}"
            )
        if self.scoring not in SCORINGS:
            raise ValueError(
                f"Arch {self.model_type!r}: scoring {self.scoring!r} is not one of {SCORINGS}"
            )
        if len(self.expert_proj) != 3 or not all(self.expert_proj):
            raise ValueError(
                f"Arch {self.model_type!r}: expert_proj {self.expert_proj!r} must name the "
                "gate, up and down projections"
            )
