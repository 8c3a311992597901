"""The supported architectures, one module each, and `ARCHS`, the registry by `model_type`.

Each module holds, in one `Arch`, everything specific to its architecture: the config.json
fields it reads and their defaults (`parse`), which layers are MoE, its tensor names, router
scoring, attention kind, and its tiny and full-size config presets. `config.py`, `layout.py` and
`tiny.py` hold what the architectures share and look the rest up here (`get_arch`).

Adding an architecture is one module and one line in `_ALL` below::

    # eaas/model/archs/my_moe.py
    from typing import Any

    from eaas.model.archs.base import Arch, RawConfig

    def parse(r: RawConfig) -> dict[str, Any]:  # the ModelConfig fields config.py leaves
        heads = r.req("num_attention_heads", kind=int)
        return {"num_key_value_heads": r.opt("num_key_value_heads", heads, kind=int), ...}

    ARCH = Arch(model_type="my_moe", attention="gqa", scoring="softmax", parse=parse,
                is_moe_layer=lambda cfg, layer: True, tiny={"num_hidden_layers": 2, ...},
                moe_block="feed_forward", expert_proj=("w1", "w3", "w2"))

    # here
    _ALL = (qwen3_moe.ARCH, qwen2_moe.ARCH, mixtral.ARCH, deepseek_v3.ARCH, my_moe.ARCH)

`ModelConfig`, `Checkpoint`, `make_tiny` and the tests (tests/model/test_archs.py, and every
test parametrised over `eaas.model.ARCHS`; the transformers oracle needs the arch's entry in
tests/model/conftest.py's HF_CONFIGS) then take it up. The forward supports the attention
kinds and ModelConfig options it has today (GQA/MLA, biases, q/k norm, shared experts, ...); an
architecture that needs a new one needs that code too.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from eaas.errors import CheckpointError
from eaas.model.archs import deepseek_v3, mixtral, qwen2_moe, qwen3_moe
from eaas.model.archs.base import Arch, AttentionKind, RawConfig, Scoring

__all__ = ["ARCHS", "Arch", "AttentionKind", "RawConfig", "Scoring", "get_arch"]

_ALL: tuple[Arch, ...] = (qwen3_moe.ARCH, qwen2_moe.ARCH, mixtral.ARCH, deepseek_v3.ARCH)

ARCHS: Mapping[str, Arch] = MappingProxyType({arch.model_type: arch for arch in _ALL})
"""model_type -> Arch, in the order `eaas.model.ARCHS` (the tuple of names) lists them."""


def get_arch(model_type: object) -> Arch:
    """The Arch of `model_type`; CheckpointError naming it and the supported ones otherwise."""
    arch = ARCHS.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        raise CheckpointError(
            f"unknown model_type {model_type!r} (supported: {', '.join(ARCHS)})"
        )
    return arch
