"""One layer's dataflow graph: nodes, typed edges, structural validation, a builder.

Example (a Mixtral-style MoE layer)::

    g = (GraphBuilder("moe")
         .node("attn", "attention").node("norm", "ffn_norm").node("router", "router")
         .node("experts", "experts", timeout_s=2.0).node("out", "combine")
         .edge("attn.hidden", "norm.hidden").edge("norm.x", "router.x")
         .edge("norm.x", "experts.x").edge("router.routing", "experts.routing")
         .edge("attn.hidden", "out.residual").edge("experts.y", "out.parts")
         .build())
    [n.name for n in g.order]  # ['attn', 'norm', 'router', 'experts', 'out']

A graph is checked when it is built: known kinds, edges between existing ports of the same
type, one edge per single-input port, every required input connected, exactly one
``attention`` and one ``combine``, no cycle, and every node reaching ``combine``. Each
:class:`~eaas.errors.GraphError` names the graph, the node and (when known) the source line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from eaas.dataflow.kinds import NodeKind, check_params, kind_spec, parse_kind
from eaas.errors import GraphError

__all__ = ["Node", "Edge", "LayerGraph", "GraphBuilder", "parse_edge", "where"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EDGE = re.compile(r"^\s*([^\s.]+)\.([^\s.]+)\s*->\s*([^\s.]+)\.([^\s.]+)\s*$")


def where(graph: str, node: str | None = None, line: int | None = None) -> str:
    """Error-message prefix: ``graph 'moe', node 'experts' (line 14)``."""
    text = f"graph {graph!r}"
    if node is not None:
        text += f", node {node!r}"
    if line is not None:
        text += f" (line {line})"
    return text


@dataclass(frozen=True, slots=True)
class Node:
    """A node: its unique name in the graph, its kind, free-form params kept for the compiler,
    and the source line it was declared on (``None`` when not from YAML; not compared)."""

    name: str
    kind: NodeKind
    params: dict[str, Any] = field(default_factory=dict)
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Edge:
    """An edge from output port ``src.src_port`` to input port ``dst.dst_port``."""

    src: str
    src_port: str
    dst: str
    dst_port: str
    line: int | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.src}.{self.src_port} -> {self.dst}.{self.dst_port}"


def parse_edge(spec: object, graph: str, line: int | None = None) -> Edge:
    """An :class:`Edge` from ``"a.p -> b.q"``, ``["a.p", "b.q"]`` or ``{src: a.p, dst: b.q}``."""
    if isinstance(spec, Edge):
        return spec
    text: object = spec
    if isinstance(spec, Mapping) and set(spec) == {"src", "dst"}:
        text = f"{spec['src']} -> {spec['dst']}"
    elif isinstance(spec, (list, tuple)) and len(spec) == 2:
        text = f"{spec[0]} -> {spec[1]}"
    m = _EDGE.match(text) if isinstance(text, str) else None
    if m is None:
        raise GraphError(
            f"{where(graph, line=line)}: edge {spec!r} is not of the form 'node.port -> node.port'"
        )
    return Edge(m[1], m[2], m[3], m[4], line)


class LayerGraph:
    """A validated dataflow graph of one layer (immutable after construction).

    Attributes:
        name: the graph's name (the key under ``graphs:`` in YAML).
        nodes: name -> :class:`Node`, in declaration order.
        edges: all edges, in declaration order (``combine.parts`` sums them in this order).
        order: a topological order of the nodes; ``attention`` first, ``combine`` last.
    """

    __slots__ = ("name", "nodes", "edges", "order", "_inputs")

    def __init__(self, name: str, nodes: Iterable[Node], edges: Iterable[Edge]) -> None:
        self.name = name
        table: dict[str, Node] = {}
        for node in nodes:
            kind = parse_kind(node.kind)
            if kind is None:
                raise GraphError(f"{where(name, node.name, node.line)}: unknown node kind "
                                 f"{node.kind!r} (allowed: {', '.join(k.value for k in NodeKind)})")
            if kind is not node.kind:  # Node("x", "experts"): keep the enum
                node = Node(node.name, kind, node.params, node.line)
            if node.name in table:
                raise GraphError(f"{where(name, node.name, node.line)}: duplicate node name")
            bad = check_params(kind, dict(node.params))
            if bad:
                raise GraphError(f"{where(name, node.name, node.line)}: {bad}")
            if not _NAME.match(node.name):
                raise GraphError(f"{where(name, node.name, node.line)}: node names must be "
                                 "identifiers (letters, digits, '_')")
            table[node.name] = node
        self.nodes: dict[str, Node] = table
        self.edges: tuple[Edge, ...] = tuple(edges)
        self._inputs: dict[str, dict[str, list[tuple[str, str]]]] = {n: {} for n in table}
        self._check_edges()
        self._check_shape()
        self.order: tuple[Node, ...] = self._topological_order()
        for e in self.edges:
            if self.nodes[e.src].kind is NodeKind.COMBINE:
                raise GraphError(f"{where(self.name, e.src, e.line or self.nodes[e.src].line)}: "
                                 f"combine is the layer's sink; its output cannot feed '{e.dst}'")
        self._check_reaches_combine()

    # --- queries ------------------------------------------------------------------------
    def inputs(self, node_name: str) -> dict[str, list[tuple[str, str]]]:
        """Input port -> ``[(src node, src port), ...]`` in edge order, for ``node_name``."""
        if node_name not in self.nodes:
            raise KeyError(f"graph {self.name!r} has no node {node_name!r}")
        return {port: list(srcs) for port, srcs in self._inputs[node_name].items()}

    def nodes_of(self, kind: NodeKind | str) -> list[Node]:
        """The nodes of ``kind``, in declaration order."""
        k = parse_kind(kind)
        if k is None:
            raise ValueError(f"unknown node kind {kind!r}")
        return [n for n in self.nodes.values() if n.kind is k]

    @property
    def combine(self) -> Node:
        """The sink node (the layer output)."""
        return self.order[-1]

    def to_dict(self) -> dict[str, Any]:
        """``{nodes: {name: {kind, params?}}, edges: ["a.p -> b.q", ...]}``."""
        nodes: dict[str, Any] = {}
        for n in self.nodes.values():
            entry: dict[str, Any] = {"kind": n.kind.value}
            if n.params:
                entry["params"] = dict(n.params)
            nodes[n.name] = entry
        return {"nodes": nodes, "edges": [str(e) for e in self.edges]}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LayerGraph):
            return NotImplemented
        return (self.name, self.nodes, self.edges) == (other.name, other.nodes, other.edges)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LayerGraph({self.name!r}, order=[{', '.join(n.name for n in self.order)}])"

    # --- validation ---------------------------------------------------------------------
    def _check_edges(self) -> None:
        seen: set[Edge] = set()
        for e in self.edges:
            src, dst = self.nodes.get(e.src), self.nodes.get(e.dst)
            for end, node in ((e.src, src), (e.dst, dst)):
                if node is None:
                    raise GraphError(f"{where(self.name, end, e.line)}: edge '{e}' refers to a "
                                     f"node that does not exist (dangling edge)")
            assert src is not None and dst is not None
            out = kind_spec(src.kind).output(e.src_port)
            if out is None:
                raise GraphError(
                    f"{where(self.name, src.name, e.line or src.line)}: edge '{e}': a {src.kind} "
                    f"node has no output port {e.src_port!r} (outputs: "
                    f"{_names(kind_spec(src.kind).outputs)})")
            inp = kind_spec(dst.kind).input(e.dst_port)
            if inp is None:
                raise GraphError(
                    f"{where(self.name, dst.name, e.line or dst.line)}: edge '{e}': a {dst.kind} "
                    f"node has no input port {e.dst_port!r} (inputs: "
                    f"{_names(kind_spec(dst.kind).inputs)})")
            if out.type is not inp.type:
                raise GraphError(
                    f"{where(self.name, dst.name, e.line or dst.line)}: port {inp.name!r} expects "
                    f"{inp.type} but edge from '{e.src}.{e.src_port}' carries {out.type}")
            if e in seen:
                raise GraphError(f"{where(self.name, dst.name, e.line)}: duplicate edge '{e}'")
            seen.add(e)
            srcs = self._inputs[dst.name].setdefault(inp.name, [])
            if srcs and not inp.multi:
                raise GraphError(
                    f"{where(self.name, dst.name, e.line or dst.line)}: port {inp.name!r} takes "
                    f"one edge but has several (from '{srcs[0][0]}.{srcs[0][1]}' and "
                    f"'{e.src}.{e.src_port}')")
            srcs.append((e.src, e.src_port))

    def _check_shape(self) -> None:
        for kind in (NodeKind.ATTENTION, NodeKind.COMBINE):
            found = self.nodes_of(kind)
            if len(found) != 1:
                extra = found[1] if found[1:] else None
                at = where(self.name, extra.name, extra.line) if extra else where(self.name)
                raise GraphError(
                    f"{at}: a layer graph needs exactly one {kind} node, found {len(found)}"
                    + (f" ({', '.join(n.name for n in found)})" if found else ""))
        for node in self.nodes.values():
            for port in kind_spec(node.kind).inputs:
                if port.name not in self._inputs[node.name]:
                    raise GraphError(f"{where(self.name, node.name, node.line)}: input port "
                                     f"{port.name!r} ({port.type}) is not connected")

    def _topological_order(self) -> tuple[Node, ...]:
        indegree = {n: 0 for n in self.nodes}
        succ: dict[str, list[str]] = {n: [] for n in self.nodes}
        for e in self.edges:
            indegree[e.dst] += 1
            succ[e.src].append(e.dst)
        rank = {n: i for i, n in enumerate(self.nodes)}  # ties keep declaration order
        ready = sorted((n for n, d in indegree.items() if d == 0), key=rank.__getitem__)
        order: list[str] = []
        while ready:
            n = ready.pop(0)
            order.append(n)
            for m in succ[n]:
                indegree[m] -= 1
                if indegree[m] == 0:
                    ready.append(m)
                    ready.sort(key=rank.__getitem__)
        if len(order) < len(self.nodes):
            cycle = self._find_cycle({n for n, d in indegree.items() if d > 0})
            first = self.nodes[cycle[0]]
            raise GraphError(f"{where(self.name, first.name, first.line)}: cycle "
                             f"{' -> '.join(cycle + [cycle[0]])}")
        return tuple(self.nodes[n] for n in order)

    def _find_cycle(self, left: set[str]) -> list[str]:
        # Every node left by Kahn's algorithm has a predecessor also left; walk predecessors.
        pred = {n: [e.src for e in self.edges if e.dst == n and e.src in left] for n in left}
        rank = {n: i for i, n in enumerate(self.nodes)}
        start = min(left, key=rank.__getitem__)
        path, pos = [start], {start: 0}
        while True:
            nxt = pred[path[-1]][0]
            if nxt in pos:
                cycle = list(reversed(path[pos[nxt]:]))
                first = min(range(len(cycle)), key=lambda i: rank[cycle[i]])
                return cycle[first:] + cycle[:first]  # start at the first declared node
            pos[nxt] = len(path)
            path.append(nxt)

    def _check_reaches_combine(self) -> None:
        reach = {self.nodes_of(NodeKind.COMBINE)[0].name}
        for node in reversed(self.order):
            if any(e.dst in reach for e in self.edges if e.src == node.name):
                reach.add(node.name)
        for node in self.order:
            if node.name not in reach:
                raise GraphError(f"{where(self.name, node.name, node.line)}: the node's output "
                                 "never reaches the combine node")


def _names(ports: Iterable[Any]) -> str:
    return ", ".join(p.name for p in ports) or "none"


class GraphBuilder:
    """Builds a :class:`LayerGraph` in Python; ``build()`` validates it."""

    def __init__(self, name: str = "layer") -> None:
        self._name = name
        self._nodes: list[Node] = []
        self._edges: list[Edge] = []

    def node(self, name: str, kind: NodeKind | str, params: Mapping[str, Any] | None = None,
             **more: Any) -> GraphBuilder:
        """Add node ``name`` of ``kind``; params from ``params`` and keyword arguments."""
        k = parse_kind(kind)
        if k is None:
            raise GraphError(f"{where(self._name, name)}: unknown node kind {kind!r} "
                             f"(allowed: {', '.join(x.value for x in NodeKind)})")
        self._nodes.append(Node(name, k, {**(params or {}), **more}))
        return self

    def edge(self, src: str, dst: str) -> GraphBuilder:
        """Add an edge ``"node.port"`` -> ``"node.port"``."""
        self._edges.append(parse_edge(f"{src} -> {dst}", self._name))
        return self

    def build(self) -> LayerGraph:
        return LayerGraph(self._name, self._nodes, self._edges)
