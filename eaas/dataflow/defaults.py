"""Default layer graphs per architecture, and loading a user's graph file.

- mixtral, qwen3_moe:      attention -> ffn_norm -> router -> experts -> combine
- qwen2_moe, deepseek_v3:  the same, plus a shared_expert beside the routed pool
- dense layers (deepseek_v3 ``first_k_dense_replace``, qwen3_moe ``mlp_only_layers`` /
  ``decoder_sparse_step``): attention -> ffn_norm -> dense_mlp -> combine

The choice rests only on the config's ``is_moe_layer(i)`` and ``has_shared_expert``, so any
architecture that answers them gets a correct default. Consecutive layers with the same graph
share one span.
"""

from __future__ import annotations

from pathlib import Path

from eaas.dataflow.graph import GraphBuilder, LayerGraph
from eaas.dataflow.model_graph import LayerSpan, ModelConfigLike, ModelGraph
from eaas.errors import GraphError

__all__ = ["default_model_graph", "load_model_graph", "moe_graph", "dense_graph"]


def moe_graph(shared_expert: bool, name: str = "moe") -> LayerGraph:
    """attention -> ffn_norm -> router -> experts (+ shared_expert) -> combine."""
    b = (GraphBuilder(name).node("attn", "attention").node("norm", "ffn_norm")
         .node("router", "router").node("experts", "experts"))
    if shared_expert:
        b.node("shared", "shared_expert")
    b.node("out", "combine")
    b.edge("attn.hidden", "norm.hidden").edge("norm.x", "router.x").edge("norm.x", "experts.x")
    b.edge("router.routing", "experts.routing")
    if shared_expert:
        b.edge("norm.x", "shared.x")
    b.edge("attn.hidden", "out.residual").edge("experts.y", "out.parts")
    if shared_expert:
        b.edge("shared.y", "out.parts")
    return b.build()


def dense_graph(name: str = "dense") -> LayerGraph:
    """attention -> ffn_norm -> dense_mlp -> combine."""
    return (GraphBuilder(name).node("attn", "attention").node("norm", "ffn_norm")
            .node("mlp", "dense_mlp").node("out", "combine")
            .edge("attn.hidden", "norm.hidden").edge("norm.x", "mlp.x")
            .edge("attn.hidden", "out.residual").edge("mlp.y", "out.parts")
            .build())


def default_model_graph(model_config: ModelConfigLike) -> ModelGraph:
    """The architecture's default graph for every layer of ``model_config``, validated."""
    n = int(model_config.num_hidden_layers)
    shared = bool(model_config.has_shared_expert)
    kinds = ["moe" if model_config.is_moe_layer(i) else "dense" for i in range(n)]
    spans: list[LayerSpan] = []
    for i, k in enumerate(kinds):
        if spans and spans[-1].graph == k and spans[-1].stop == i - 1:
            spans[-1] = LayerSpan(spans[-1].start, i, k)
        else:
            spans.append(LayerSpan(i, i, k))
    graphs = {}
    if "dense" in kinds:
        graphs["dense"] = dense_graph()
    if "moe" in kinds:
        graphs["moe"] = moe_graph(shared)
    source = f"<default {getattr(model_config, 'model_type', '?')}>"
    return ModelGraph(graphs, spans, source).validate(model_config)


def load_model_graph(path_or_yaml_text: str | Path, model_config: ModelConfigLike) -> ModelGraph:
    """Parse a YAML graph (a file path, or the YAML text itself) and validate it."""
    if isinstance(path_or_yaml_text, Path) or (
            "\n" not in str(path_or_yaml_text) and Path(str(path_or_yaml_text)).is_file()):
        path = Path(path_or_yaml_text)
        if not path.is_file():
            raise GraphError(f"{path}: no such graph file")
        return ModelGraph.from_yaml(path.read_text(), source=str(path)).validate(model_config)
    text = str(path_or_yaml_text)
    if "\n" not in text and text.endswith((".yaml", ".yml")):
        raise GraphError(f"{text}: no such graph file")
    return ModelGraph.from_yaml(text).validate(model_config)
