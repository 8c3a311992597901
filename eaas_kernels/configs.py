"""Block configurations of the fused-MoE kernels: tuned ones as JSON data, and a heuristic.

`eaas_kernels/configs/<card>.json` (card = `torch.cuda.get_device_name()` with spaces as `_`) maps
a layer shape key "E=128,H=2048,F=768,dtype=bfloat16" to {str(T): config dict}; the entry of
the nearest T (|T - T_tuned| smallest) is used, and `default_config` when there is no file or key.
A config dict: {"block_m": 64, "gate_up": {"block_n": 128, "block_k": 64, "group_m": 8,
"num_warps": 4, "num_stages": 4}, "down": {...}}. Both GEMMs share block_m, because they walk
the same block-aligned sorted rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["GemmConfig", "MoEConfig", "default_config", "lookup_config", "shape_key", "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _pow2(name: str, value: int, low: int, high: int) -> None:
    if value < low or value > high or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [{low}, {high}], got {value}")


@dataclass(frozen=True, slots=True)
class GemmConfig:
    """Tile of one grouped GEMM: BLOCK_N output columns x BLOCK_K reduction per step."""

    block_n: int = 64
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        _pow2("block_n", self.block_n, 16, 256)
        _pow2("block_k", self.block_k, 16, 256)
        _pow2("num_warps", self.num_warps, 1, 16)
        if self.group_m < 1:
            raise ValueError(f"group_m must be >= 1, got {self.group_m}")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"num_stages must be in [1, 8], got {self.num_stages}")


@dataclass(frozen=True, slots=True)
class MoEConfig:
    """Both GEMMs of the expert MLP; block_m rows of one expert per program."""

    block_m: int = 64
    gate_up: GemmConfig = GemmConfig()
    down: GemmConfig = GemmConfig()

    def __post_init__(self) -> None:
        _pow2("block_m", self.block_m, 16, 256)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MoEConfig:
        return cls(
            block_m=int(data["block_m"]),
            gate_up=GemmConfig(**data["gate_up"]),
            down=GemmConfig(**data["down"]),
        )


def default_config(num_pairs: int, num_experts: int) -> MoEConfig:
    """Heuristic by the mean rows per expert, read off the H200 sweeps of 2026-11-28 (see
    benchmarks/RESULTS.md): in decode the point is to stream each expert's weights once from many
    SMs (block_m 16, many column blocks); once each expert sees many rows, large tiles feed the
    matrix units, with block_m near the rows per expert so padding stays small."""
    rows_per_expert = num_pairs / max(1, num_experts)
    if rows_per_expert <= 8:
        return MoEConfig(block_m=16, gate_up=GemmConfig(64, 128, 1, 4, 4),
                         down=GemmConfig(128, 128, 1, 4, 3))
    if rows_per_expert <= 48:
        return MoEConfig(block_m=32, gate_up=GemmConfig(128, 128, 1, 4, 3),
                         down=GemmConfig(128, 128, 1, 4, 3))
    if rows_per_expert <= 96:
        return MoEConfig(block_m=64, gate_up=GemmConfig(64, 64, 8, 4, 4),
                         down=GemmConfig(128, 64, 8, 8, 4))
    return MoEConfig(block_m=128, gate_up=GemmConfig(128, 64, 8, 8, 4),
                     down=GemmConfig(256, 64, 8, 8, 4))


def shape_key(num_experts: int, hidden: int, ffn: int, dtype_name: str) -> str:
    """The JSON key of a layer shape, e.g. "E=128,H=2048,F=768,dtype=bfloat16"."""
    return f"E={num_experts},H={hidden},F={ffn},dtype={dtype_name}"


@lru_cache(maxsize=16)
def _load(card: str) -> dict:
    path = CONFIG_DIR / f"{card.replace(' ', '_')}.json"
    if not path.is_file():
        return {}
    with path.open() as f:
        return json.load(f)


def lookup_config(
    card: str, num_experts: int, hidden: int, ffn: int, dtype_name: str, num_tokens: int, top_k: int
) -> MoEConfig:
    """The tuned config of the nearest T for this card and shape, else `default_config`."""
    table = _load(card).get(shape_key(num_experts, hidden, ffn, dtype_name))
    if not table:
        return default_config(num_tokens * top_k, num_experts)
    nearest = min(table, key=lambda t: abs(int(t) - num_tokens))
    return MoEConfig.from_dict(table[nearest])
