"""Layer-graph structure: builder, order, inputs, and one test per structural error."""

from __future__ import annotations

import pytest

from eaas.dataflow import Edge, GraphBuilder, LayerGraph, ModelGraph, Node, NodeKind
from eaas.errors import GraphError
from tests.dataflow.conftest import MOE_YAML


def moe_builder() -> GraphBuilder:
    return (GraphBuilder("moe").node("attn", "attention").node("norm", "ffn_norm")
            .node("router", "router").node("experts", "experts", timeout_s=2.0)
            .node("out", "combine")
            .edge("attn.hidden", "norm.hidden").edge("norm.x", "router.x")
            .edge("norm.x", "experts.x").edge("router.routing", "experts.routing")
            .edge("attn.hidden", "out.residual").edge("experts.y", "out.parts"))


def line_of(text: str) -> int:
    """1-based line of the first line of MOE_YAML's moe graph that contains ``text``."""
    lines = MOE_YAML.splitlines()
    start = lines.index("  moe:")
    return next(i for i in range(start, len(lines)) if text in lines[i]) + 1


def yaml_error(old: str, new: str) -> str:
    assert old in MOE_YAML
    with pytest.raises(GraphError) as info:
        ModelGraph.from_yaml(MOE_YAML.replace(old, new, 1))
    return str(info.value)


def test_builder_order_inputs_and_params() -> None:
    g = moe_builder().build()
    assert [n.name for n in g.order] == ["attn", "norm", "router", "experts", "out"]
    assert g.inputs("experts") == {"x": [("norm", "x")], "routing": [("router", "routing")]}
    assert g.inputs("attn") == {}
    assert g.nodes["experts"].params == {"timeout_s": 2.0}
    assert [n.name for n in g.nodes_of(NodeKind.EXPERTS)] == ["experts"]
    assert g.nodes_of("shared_expert") == []


def test_combine_parts_keep_edge_order() -> None:
    g = (moe_builder().node("shared", "shared_expert").edge("norm.x", "shared.x")
         .edge("shared.y", "out.parts").build())
    assert g.inputs("out")["parts"] == [("experts", "y"), ("shared", "y")]
    assert g.order[-1].name == "out"


def test_yaml_lines_are_kept_on_nodes_and_edges() -> None:
    g = ModelGraph.from_yaml(MOE_YAML).layer(1)
    assert g.nodes["experts"].line == line_of("experts: {kind")
    assert g.edges[3].line == line_of("router.routing -> experts.routing")


def test_unknown_node_kind() -> None:
    msg = yaml_error("experts: {kind: experts,", "experts: {kind: expert_pool,")
    assert f"graph 'moe', node 'experts' (line {line_of('experts: {kind')})" in msg
    assert "unknown node kind 'expert_pool'" in msg


def test_cycle() -> None:
    # norm -> mlp -> out -> norm: combine's output fed back into the layer.
    nodes = [Node("attn", NodeKind.ATTENTION), Node("norm", NodeKind.FFN_NORM, line=3),
             Node("mlp", NodeKind.DENSE_MLP), Node("out", NodeKind.COMBINE)]
    edges = [Edge("attn", "hidden", "out", "residual"), Edge("norm", "x", "mlp", "x"),
             Edge("mlp", "y", "out", "parts"), Edge("out", "hidden", "norm", "hidden")]
    msg = r"node 'norm' \(line 3\): cycle norm -> mlp -> out -> norm"
    with pytest.raises(GraphError, match=msg):
        LayerGraph("g", nodes, edges)


def test_dangling_edge() -> None:
    msg = yaml_error("- shared.y -> out.parts", "- shard.y -> out.parts")
    assert f"node 'shard' (line {line_of('shared.y -> out.parts')})" in msg
    assert "does not exist (dangling edge)" in msg


def test_port_type_mismatch() -> None:
    msg = yaml_error("router.routing -> experts.routing", "norm.x -> experts.routing")
    line = line_of("router.routing -> experts.routing")
    assert msg == (f"graph 'moe', node 'experts' (line {line}): port 'routing' expects Routing "
                   "but edge from 'norm.x' carries Normed")


def test_unknown_port() -> None:
    msg = yaml_error("- experts.y -> out.parts", "- experts.out -> out.parts")
    assert "node 'experts'" in msg and "no output port 'out'" in msg


def test_single_input_port_with_two_edges() -> None:
    with pytest.raises(GraphError, match=r"node 'experts'.*port 'x' takes one edge"):
        moe_builder().node("norm2", "ffn_norm").edge("attn.hidden", "norm2.hidden") \
            .edge("norm2.x", "experts.x").build()


def test_unconnected_required_input() -> None:
    msg = yaml_error("      - router.routing -> experts.routing\n", "")
    assert f"node 'experts' (line {line_of('experts: {kind')})" in msg
    assert "input port 'routing' (Routing) is not connected" in msg


def test_exactly_one_attention() -> None:
    with pytest.raises(GraphError, match=r"node 'attn2'.*exactly one attention node, found 2"):
        moe_builder().node("attn2", "attention").build()


def test_node_that_never_reaches_combine() -> None:
    with pytest.raises(GraphError, match=r"node 'spare'.*never reaches the combine node"):
        moe_builder().node("spare", "shared_expert").edge("norm.x", "spare.x").build()


def test_combine_output_cannot_feed_a_node() -> None:
    with pytest.raises(GraphError, match=r"node 'out'.*sink; its output cannot feed 'n2'"):
        moe_builder().node("n2", "ffn_norm").edge("out.hidden", "n2.hidden").build()


def test_malformed_edge_text() -> None:
    msg = yaml_error("- norm.x -> router.x", "- norm.x => router.x")
    assert f"graph 'moe' (line {line_of('norm.x -> router.x')})" in msg
    assert "not of the form 'node.port -> node.port'" in msg
