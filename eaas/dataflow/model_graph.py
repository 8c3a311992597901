"""A model's dataflow: named layer graphs assigned to ranges of layers, in YAML or a dict.

YAML form (``range`` is inclusive; ``layers: 0`` or ``range: "1-3"`` also work; ``graph`` names
an entry of ``graphs:`` or is an inline ``{nodes, edges}`` mapping)::

    layers:
      - range: [0, 0]
        graph: dense
      - range: [1, 3]
        graph: moe
    graphs:
      dense: {nodes: {...}, edges: [...]}
      moe:
        nodes:
          attn: {kind: attention}
          experts: {kind: experts, params: {timeout_s: 2.0}}
          ...
        edges:
          - attn.hidden -> norm.hidden
          ...

Structural errors (per layer graph, overlapping ranges) are raised on construction; fit to a
checkpoint is :meth:`ModelGraph.validate`. Errors from YAML carry its line numbers (taken from
``yaml.compose`` node marks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml

from eaas.dataflow.graph import Edge, LayerGraph, Node, parse_edge, where
from eaas.dataflow.kinds import NodeKind, parse_kind
from eaas.errors import GraphError

__all__ = ["ModelGraph", "LayerSpan", "ModelConfigLike"]

_Path = tuple[str, ...]


class ModelConfigLike(Protocol):
    """What :meth:`ModelGraph.validate` needs to know about a checkpoint."""

    @property
    def model_type(self) -> str: ...
    @property
    def num_hidden_layers(self) -> int: ...
    @property
    def has_shared_expert(self) -> bool: ...

    def is_moe_layer(self, i: int) -> bool: ...


@dataclass(frozen=True, slots=True)
class LayerSpan:
    """Layers ``start..stop`` (inclusive) run graph ``graph``."""

    start: int
    stop: int
    graph: str
    line: int | None = field(default=None, compare=False)

    def __contains__(self, i: object) -> bool:
        return isinstance(i, int) and self.start <= i <= self.stop

    def describe(self) -> str:
        return f"layers {self.start}-{self.stop}" + (f" (line {self.line})" if self.line else "")


class ModelGraph:
    """A list of layer graphs: ``spans`` map inclusive layer ranges to named ``graphs``."""

    __slots__ = ("graphs", "spans", "source")

    def __init__(self, graphs: Mapping[str, LayerGraph], spans: Sequence[LayerSpan],
                 source: str = "<dict>") -> None:
        self.graphs: dict[str, LayerGraph] = dict(graphs)
        self.spans: tuple[LayerSpan, ...] = tuple(sorted(spans, key=lambda s: s.start))
        self.source = source
        if not self.spans:
            raise GraphError(f"{source}: a model graph needs at least one entry under 'layers'")
        for s in self.spans:
            if s.graph not in self.graphs:
                raise GraphError(f"{s.describe()}: unknown graph {s.graph!r} "
                                 f"(defined: {', '.join(self.graphs) or 'none'})")
            if s.start < 0 or s.stop < s.start:
                raise GraphError(f"{s.describe()}: bad layer range [{s.start}, {s.stop}]")
        for a, b in zip(self.spans, self.spans[1:]):
            if b.start <= a.stop:
                raise GraphError(f"{b.describe()}: overlaps {a.describe()} "
                                 f"(layer {b.start} is assigned twice)")

    # --- queries ------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """One past the highest layer index covered."""
        return self.spans[-1].stop + 1

    def layer(self, i: int) -> LayerGraph:
        """The graph of layer ``i``."""
        for s in self.spans:
            if i in s:
                return self.graphs[s.graph]
        raise GraphError(f"{self.source}: no graph covers layer {i}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModelGraph):
            return NotImplemented
        return (self.graphs, self.spans) == (other.graphs, other.spans)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        spans = ", ".join(f"{s.start}-{s.stop}:{s.graph}" for s in self.spans)
        return f"ModelGraph([{spans}])"

    # --- fit to a checkpoint ------------------------------------------------------------
    def validate(self, model_config: ModelConfigLike) -> ModelGraph:
        """Check that the graph fits ``model_config``; returns ``self``.

        Raises :class:`GraphError` naming the layer index, node and line for: a range outside
        ``[0, num_hidden_layers)``, uncovered layers, an ``experts``/``router`` node on a dense
        layer, a ``dense_mlp`` on a MoE layer (or none on a dense one), a MoE layer without
        experts, a ``shared_expert`` where the model has none, or none where it has one.
        """
        n = int(model_config.num_hidden_layers)
        shared = bool(model_config.has_shared_expert)
        mt = getattr(model_config, "model_type", "?")
        for s in self.spans:
            if s.stop >= n:
                raise GraphError(f"{s.describe()}: layer {s.stop} is outside [0, {n}) "
                                 f"({mt} has {n} layers)")
        covered = {i for s in self.spans for i in range(s.start, s.stop + 1)}
        missing = [i for i in range(n) if i not in covered]
        if missing:
            raise GraphError(f"{self.source}: layer {missing[0]} is not covered by any graph "
                             f"(uncovered: {_ranges(missing)})")
        for s in self.spans:
            g = self.graphs[s.graph]
            for i in range(s.start, s.stop + 1):
                _check_layer(g, i, bool(model_config.is_moe_layer(i)), shared, mt, s)
        return self

    # --- serialization ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [{"range": [s.start, s.stop], "graph": s.graph} for s in self.spans],
            "graphs": {name: g.to_dict() for name, g in self.graphs.items()},
        }

    def to_yaml(self) -> str:
        """YAML text that :meth:`from_yaml` reads back to an equal graph (edges one a line)."""
        return yaml.dump(_flow_leaves(self.to_dict()), Dumper=_Dumper, sort_keys=False,
                         default_flow_style=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>",
                  lines: Mapping[_Path, int] | None = None) -> ModelGraph:
        """Parse the dict form; ``lines`` maps key paths to source lines (used by from_yaml)."""
        return _Parser(source, lines or {}).model(d)

    @classmethod
    def from_yaml(cls, text: str, source: str = "<string>") -> ModelGraph:
        try:
            data = yaml.safe_load(text)
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            raise GraphError(f"{source}: not valid YAML: {exc}") from exc
        lines: dict[_Path, int] = {}
        if root is not None:
            _collect_marks(root, (), lines)
        return cls.from_dict(data if data is not None else {}, source, lines)


def _check_layer(g: LayerGraph, i: int, moe: bool, shared: bool, mt: str, s: LayerSpan) -> None:
    at = f"layer {i} ({s.describe()})"

    def fail(node: Node | None, msg: str) -> GraphError:
        head = where(g.name, node.name, node.line) if node else where(g.name)
        return GraphError(f"{head}, {at}: {msg}")

    kinds = {k: g.nodes_of(k) for k in NodeKind}
    if moe:
        for k in (NodeKind.DENSE_MLP,):
            if kinds[k]:
                raise fail(kinds[k][0], f"{_a(k)} node on a MoE layer of {mt}")
        for k in (NodeKind.ROUTER, NodeKind.EXPERTS):
            if not kinds[k]:
                raise fail(None, f"MoE layer of {mt} but the graph has no {k} node")
        if shared and not kinds[NodeKind.SHARED_EXPERT]:
            raise fail(None, f"{mt} has a shared expert but the graph has no shared_expert node")
    else:
        for k in (NodeKind.EXPERTS, NodeKind.ROUTER, NodeKind.SHARED_EXPERT):
            if kinds[k]:
                raise fail(kinds[k][0], f"{_a(k)} node on a dense layer of {mt}")
        if not kinds[NodeKind.DENSE_MLP]:
            raise fail(None, f"dense layer of {mt} but the graph has no dense_mlp node")
    if not shared and kinds[NodeKind.SHARED_EXPERT]:
        raise fail(kinds[NodeKind.SHARED_EXPERT][0], f"{mt} has no shared expert")


class _Dumper(yaml.SafeDumper):
    pass


class _FlowMap(dict):  # type: ignore[type-arg]
    pass


class _FlowSeq(list):  # type: ignore[type-arg]
    pass


_Dumper.add_representer(_FlowMap, lambda d, v: d.represent_mapping(
    "tag:yaml.org,2002:map", v.items(), flow_style=True))
_Dumper.add_representer(_FlowSeq, lambda d, v: d.represent_sequence(
    "tag:yaml.org,2002:seq", v, flow_style=True))


def _flow_leaves(v: Any) -> Any:
    """Mark node entries and layer ranges for flow style (``{kind: experts}``, ``[1, 3]``)."""
    if isinstance(v, dict):
        if "kind" in v or all(not isinstance(x, (dict, list)) for x in v.values()):
            return _FlowMap({k: _flow_leaves(x) for k, x in v.items()})
        return {k: _flow_leaves(x) for k, x in v.items()}
    if isinstance(v, list):
        if v and all(isinstance(x, int) for x in v):
            return _FlowSeq(v)
        return [_flow_leaves(x) for x in v]
    return v


def _a(kind: NodeKind) -> str:
    return ("an " if kind.value[0] in "aeiou" else "a ") + kind.value


def _ranges(ids: list[int]) -> str:
    out: list[str] = []
    start = prev = ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out)


def _collect_marks(node: yaml.Node, path: _Path, out: dict[_Path, int]) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = (*path, str(k.value))
            _collect_marks(v, key, out)
            out[key] = k.start_mark.line + 1  # the key's line, where a reader looks
    elif isinstance(node, yaml.SequenceNode):
        for idx, v in enumerate(node.value):
            _collect_marks(v, (*path, str(idx)), out)


class _Parser:
    def __init__(self, source: str, lines: Mapping[_Path, int]) -> None:
        self.source, self.lines = source, lines

    def line(self, *path: object) -> int | None:
        return self.lines.get(tuple(str(p) for p in path))

    def err(self, msg: str, *path: object) -> GraphError:
        line = self.line(*path)
        return GraphError(f"{self.source}" + (f" (line {line})" if line else "") + f": {msg}")

    def model(self, d: Mapping[str, Any]) -> ModelGraph:
        if not isinstance(d, Mapping):
            raise self.err(f"expected a mapping with 'layers' and 'graphs', got {type(d).__name__}")
        unknown = set(d) - {"layers", "graphs"}
        if unknown:
            raise self.err(f"unknown top-level key {sorted(map(str, unknown))[0]!r} "
                           "(allowed: layers, graphs)", sorted(map(str, unknown))[0])
        raw_graphs = d.get("graphs") or {}
        if not isinstance(raw_graphs, Mapping):
            raise self.err("'graphs' must map names to {nodes, edges}", "graphs")
        graphs = {str(name): self.graph(str(name), body, ("graphs", name))
                  for name, body in raw_graphs.items()}
        layers = d.get("layers")
        if not isinstance(layers, list) or not layers:
            raise self.err("'layers' must be a non-empty list of {range, graph}", "layers")
        spans = []
        for idx, entry in enumerate(layers):
            span, inline = self.span(entry, ("layers", idx))
            if inline is not None:
                graphs[inline.name] = inline
            spans.append(span)
        return ModelGraph(graphs, spans, self.source)

    def span(self, entry: object, path: _Path) -> tuple[LayerSpan, LayerGraph | None]:
        line = self.line(*path)
        if not isinstance(entry, Mapping) or "graph" not in entry:
            raise self.err("each 'layers' entry needs 'graph' and 'range' (or 'layers')", *path)
        keys = [k for k in ("range", "layers") if k in entry]
        if len(keys) != 1:
            raise self.err("each 'layers' entry needs exactly one of 'range' or 'layers'", *path)
        start, stop = self.layer_range(entry[keys[0]], (*path, keys[0]))
        graph = entry["graph"]
        if isinstance(graph, Mapping):  # inline graph
            name = f"layers {start}-{stop}"
            return LayerSpan(start, stop, name, line), self.graph(name, graph, (*path, "graph"))
        if not isinstance(graph, str):
            raise self.err(f"'graph' must name a graph or be a mapping, got {graph!r}", *path)
        return LayerSpan(start, stop, graph, line), None

    def layer_range(self, v: object, path: _Path) -> tuple[int, int]:
        if isinstance(v, bool):
            raise self.err(f"bad layer range {v!r}", *path)
        if isinstance(v, int):
            return v, v
        if isinstance(v, str):
            parts = v.replace(" ", "").split("-")
            if len(parts) in (1, 2) and all(p.isdigit() for p in parts):
                return int(parts[0]), int(parts[-1])
        if (isinstance(v, (list, tuple)) and len(v) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
            return int(v[0]), int(v[1])
        raise self.err(f"bad layer range {v!r} (use [first, last], \"first-last\" or one index)",
                       *path)

    def graph(self, name: str, body: object, path: _Path) -> LayerGraph:
        if not isinstance(body, Mapping) or not isinstance(body.get("nodes"), Mapping):
            raise GraphError(f"{where(name, line=self.line(*path))}: a graph needs a 'nodes' "
                             "mapping and an 'edges' list")
        nodes = []
        for node_name, spec in body["nodes"].items():
            npath = (*path, "nodes", node_name)
            line = self.line(*npath)
            params: Any = {}
            if isinstance(spec, Mapping):
                kind_raw, params = spec.get("kind"), spec.get("params") or {}
                extra = set(spec) - {"kind", "params"}
                if extra:
                    raise GraphError(f"{where(name, str(node_name), line)}: unknown key "
                                     f"{sorted(map(str, extra))[0]!r} (allowed: kind, params)")
            else:
                kind_raw = spec  # short form `attn: attention`
            kind = parse_kind(kind_raw)
            if kind is None:
                raise GraphError(f"{where(name, str(node_name), line)}: unknown node kind "
                                 f"{kind_raw!r} (allowed: {', '.join(k.value for k in NodeKind)})")
            if not isinstance(params, Mapping):
                raise GraphError(f"{where(name, str(node_name), line)}: params must be a mapping")
            nodes.append(Node(str(node_name), kind, dict(params), line))
        raw_edges = body.get("edges") or []
        if not isinstance(raw_edges, list):
            at = where(name, line=self.line(*path, "edges"))
            raise GraphError(f"{at}: 'edges' must be a list")
        edges: list[Edge] = [parse_edge(e, name, self.line(*path, "edges", i))
                             for i, e in enumerate(raw_edges)]
        return LayerGraph(name, nodes, edges)
