"""Model graphs: YAML/dict round trips, defaults per architecture, fit to a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from eaas.dataflow import (GraphBuilder, ModelGraph, NodeKind, default_model_graph,
                           load_model_graph)
from eaas.errors import GraphError
from tests.dataflow.conftest import MOE_YAML, FakeConfig


def test_yaml_round_trip(deepseek: FakeConfig) -> None:
    g = ModelGraph.from_yaml(MOE_YAML).validate(deepseek)
    text = g.to_yaml()
    back = ModelGraph.from_yaml(text)
    assert back == g
    assert back.to_yaml() == text
    assert back.layer(2).nodes["experts"].params == {"timeout_s": 2.0}
    assert [s.graph for s in back.spans] == ["dense", "moe"] and back.num_layers == 4


def test_dict_form_and_range_spellings(deepseek: FakeConfig) -> None:
    d = ModelGraph.from_yaml(MOE_YAML).to_dict()
    d["layers"] = [{"layers": 0, "graph": "dense"}, {"range": "1-3", "graph": "moe"}]
    assert ModelGraph.from_dict(d).validate(deepseek) == ModelGraph.from_yaml(MOE_YAML)


def test_inline_graph_and_short_node_form() -> None:
    text = """\
layers:
  - layers: 0
    graph:
      nodes: {attn: attention, norm: ffn_norm, mlp: dense_mlp, out: combine}
      edges: [attn.hidden -> norm.hidden, norm.x -> mlp.x, attn.hidden -> out.residual,
              mlp.y -> out.parts]
"""
    cfg = FakeConfig("llama_like", 1, False, frozenset({0}))
    g = load_model_graph(text, cfg)
    assert [n.kind for n in g.layer(0).order][-2:] == [NodeKind.DENSE_MLP, NodeKind.COMBINE]


@pytest.mark.parametrize(("cfg", "spans", "moe_kinds"), [
    (FakeConfig("mixtral", 3, False), [(0, 2, "moe")],
     ["attention", "ffn_norm", "router", "experts", "combine"]),
    (FakeConfig("qwen3_moe", 4, False, frozenset({1, 2})),
     [(0, 0, "moe"), (1, 2, "dense"), (3, 3, "moe")],
     ["attention", "ffn_norm", "router", "experts", "combine"]),
    (FakeConfig("qwen2_moe", 2, True), [(0, 1, "moe")],
     ["attention", "ffn_norm", "router", "experts", "shared_expert", "combine"]),
    (FakeConfig("deepseek_v3", 4, True, frozenset({0})), [(0, 0, "dense"), (1, 3, "moe")],
     ["attention", "ffn_norm", "router", "experts", "shared_expert", "combine"]),
])
def test_default_graphs_per_architecture(cfg: FakeConfig, spans: list, moe_kinds: list) -> None:
    g = default_model_graph(cfg)
    assert [(s.start, s.stop, s.graph) for s in g.spans] == spans
    assert [n.kind.value for n in g.graphs["moe"].order] == moe_kinds
    if "dense" in g.graphs:
        assert [n.kind.value for n in g.graphs["dense"].order] == [
            "attention", "ffn_norm", "dense_mlp", "combine"]


def test_load_from_path(tmp_path: Path, deepseek: FakeConfig) -> None:
    path = tmp_path / "graph.yaml"
    path.write_text(MOE_YAML)
    assert load_model_graph(path, deepseek) == load_model_graph(str(path), deepseek)
    assert load_model_graph(path, deepseek).source == str(path)
    with pytest.raises(GraphError, match="no such graph file"):
        load_model_graph(str(tmp_path / "missing.yaml"), deepseek)


def fit_error(cfg: FakeConfig, text: str = MOE_YAML) -> str:
    with pytest.raises(GraphError) as info:
        load_model_graph(text, cfg)
    return str(info.value)


def test_experts_node_on_a_dense_layer() -> None:
    msg = fit_error(FakeConfig("deepseek_v3", 4, True, frozenset({0, 2})))
    assert "graph 'moe', node 'experts' (line 23), layer 2 (layers 1-3 (line 4))" in msg
    assert "an experts node on a dense layer of deepseek_v3" in msg


def test_dense_mlp_on_a_moe_layer() -> None:
    msg = fit_error(FakeConfig("qwen2_moe", 4, True))
    assert "graph 'dense', node 'mlp' (line 11), layer 0" in msg
    assert "a dense_mlp node on a MoE layer" in msg


def test_shared_expert_when_the_model_has_none() -> None:
    msg = fit_error(FakeConfig("deepseek_like", 4, False, frozenset({0})))
    assert "node 'shared' (line 24), layer 1" in msg and "has no shared expert" in msg


def test_missing_shared_expert_when_the_model_has_one(deepseek: FakeConfig) -> None:
    text = MOE_YAML.replace("      shared: {kind: shared_expert}\n", "").replace(
        "      - norm.x -> shared.x\n", "").replace("      - shared.y -> out.parts\n", "")
    msg = fit_error(deepseek, text)
    assert "graph 'moe', layer 1 (layers 1-3 (line 4))" in msg
    assert "has a shared expert but the graph has no shared_expert node" in msg


def test_range_outside_the_model() -> None:
    msg = fit_error(FakeConfig("deepseek_v3", 3, True, frozenset({0})))
    assert msg == "layers 1-3 (line 4): layer 3 is outside [0, 3) (deepseek_v3 has 3 layers)"


def test_overlapping_ranges() -> None:
    with pytest.raises(GraphError, match=r"layers 0-3 \(line 4\): overlaps layers 0-0 \(line 2\)"):
        ModelGraph.from_yaml(MOE_YAML.replace('range: "1-3"', "range: [0, 3]"))


def test_uncovered_layers(deepseek: FakeConfig) -> None:
    msg = fit_error(FakeConfig("deepseek_v3", 6, True, frozenset({0})))
    assert "layer 4 is not covered by any graph (uncovered: 4-5)" in msg


def test_unknown_graph_name() -> None:
    with pytest.raises(GraphError, match=r"layers 1-3 \(line 4\): unknown graph 'mo'"):
        ModelGraph.from_yaml(MOE_YAML.replace("graph: moe", "graph: mo"))


def test_builder_graph_in_a_model_graph(deepseek: FakeConfig) -> None:
    dense = ModelGraph.from_yaml(MOE_YAML).graphs["dense"]
    moe = ModelGraph.from_yaml(MOE_YAML).graphs["moe"]
    built = (GraphBuilder("moe").node("attn", "attention").node("norm", "ffn_norm")
             .node("router", "router").node("experts", "experts", timeout_s=2.0)
             .node("shared", "shared_expert").node("out", "combine")
             .edge("attn.hidden", "norm.hidden").edge("norm.x", "router.x")
             .edge("norm.x", "experts.x").edge("router.routing", "experts.routing")
             .edge("norm.x", "shared.x").edge("attn.hidden", "out.residual")
             .edge("experts.y", "out.parts").edge("shared.y", "out.parts").build())
    assert built == moe
    assert dense != moe


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"])
def test_default_graph_fits_the_real_tiny_configs(arch: str) -> None:
    from eaas.model.config import ModelConfig
    from eaas.model.tiny import tiny_config

    cfg = ModelConfig.from_dict(tiny_config(arch, 256, 1))
    g = default_model_graph(cfg)
    assert g.num_layers == cfg.num_hidden_layers
    for i in range(cfg.num_hidden_layers):
        kinds = {n.kind for n in g.layer(i).order}
        assert (NodeKind.EXPERTS in kinds) == cfg.is_moe_layer(i)
        assert (NodeKind.DENSE_MLP in kinds) != cfg.is_moe_layer(i)
        assert (NodeKind.SHARED_EXPERT in kinds) == (cfg.is_moe_layer(i) and cfg.has_shared_expert)
    assert ModelGraph.from_yaml(g.to_yaml()).validate(cfg) == g
