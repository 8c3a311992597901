"""Declarative dataflow graphs of a layer's token flow (attention -> router -> experts -> combine).

Build them in YAML, as a dict, or with :class:`GraphBuilder`; a model is a list of layer graphs
over ranges of layers. See :mod:`eaas.dataflow.graph` and :mod:`eaas.dataflow.model_graph`.
"""

from __future__ import annotations

from eaas.dataflow.defaults import default_model_graph, dense_graph, load_model_graph, moe_graph
from eaas.dataflow.graph import Edge, GraphBuilder, LayerGraph, Node
from eaas.dataflow.kinds import NodeKind, PortType, kind_spec
from eaas.dataflow.model_graph import LayerSpan, ModelConfigLike, ModelGraph

__all__ = [
    "NodeKind", "PortType", "Node", "Edge", "LayerGraph", "ModelGraph", "GraphBuilder",
    "LayerSpan", "ModelConfigLike", "default_model_graph", "load_model_graph", "moe_graph",
    "dense_graph", "kind_spec",
]
