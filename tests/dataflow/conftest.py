from __future__ import annotations

from dataclasses import dataclass, field

import pytest


@dataclass(frozen=True)
class FakeConfig:
    """The four things ModelGraph.validate reads from a checkpoint config."""

    model_type: str = "qwen2_moe"
    num_hidden_layers: int = 4
    has_shared_expert: bool = True
    dense_layers: frozenset[int] = field(default_factory=frozenset)

    def is_moe_layer(self, i: int) -> bool:
        return i not in self.dense_layers


@pytest.fixture
def deepseek() -> FakeConfig:
    return FakeConfig("deepseek_v3", 4, True, frozenset({0}))


MOE_YAML = """\
layers:
  - range: [0, 0]          # inclusive
    graph: dense
  - range: "1-3"
    graph: moe
graphs:
  dense:
    nodes:
      attn: {kind: attention}
      norm: {kind: ffn_norm}
      mlp: {kind: dense_mlp}
      out: {kind: combine}
    edges:
      - attn.hidden -> norm.hidden
      - norm.x -> mlp.x
      - attn.hidden -> out.residual
      - mlp.y -> out.parts
  moe:
    nodes:
      attn: {kind: attention}
      norm: {kind: ffn_norm}
      router: {kind: router}
      experts: {kind: experts, params: {timeout_s: 2.0}}
      shared: {kind: shared_expert}
      out: {kind: combine}
    edges:
      - attn.hidden -> norm.hidden
      - norm.x -> router.x
      - norm.x -> experts.x
      - router.routing -> experts.routing
      - norm.x -> shared.x
      - attn.hidden -> out.residual
      - experts.y -> out.parts
      - shared.y -> out.parts
"""
