"""Node kinds of a layer graph and their typed ports.

A layer graph describes how one decoder layer's tokens flow. Every edge joins an output port
to an input port of the same :class:`PortType`:

    kind            inputs                                  outputs
    attention       (reads the layer's input residual)      hidden: Hidden  (after residual add)
    ffn_norm        hidden: Hidden                          x: Normed
    router          x: Normed                               routing: Routing
    experts         x: Normed, routing: Routing             y: Partial      (remote pool)
    shared_expert   x: Normed                               y: Partial
    dense_mlp       x: Normed                               y: Partial
    combine         residual: Hidden, parts: Partial (>=1)  hidden: Hidden  (the layer output)

``combine.parts`` is the only multi-input port: its edges are summed in edge order. Every
other input port takes exactly one edge.

Node params (checked when a graph is built; anything else is an error):

    kind      param               meaning
    experts   timeout_s           this layer's work-unit deadline (default fault.unit_timeout_s)
    experts   no_replica_policy   fail | wait | degrade for this layer (default fault's)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["PortType", "NodeKind", "PortSpec", "KindSpec", "ParamSpec", "kind_spec", "parse_kind",
           "check_params"]


class PortType(enum.Enum):
    """What a port carries (all are [T, H] tensors; the type says what they mean)."""

    HIDDEN = "Hidden"    # residual stream
    NORMED = "Normed"    # normalized FFN input
    ROUTING = "Routing"  # (topk_ids [T, K], topk_weights [T, K])
    PARTIAL = "Partial"  # one FFN branch's output, to be summed into the residual

    def __str__(self) -> str:
        return self.value


class NodeKind(enum.Enum):
    """The kinds of node a layer graph may hold."""

    ATTENTION = "attention"
    FFN_NORM = "ffn_norm"
    ROUTER = "router"
    EXPERTS = "experts"
    SHARED_EXPERT = "shared_expert"
    DENSE_MLP = "dense_mlp"
    COMBINE = "combine"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class PortSpec:
    """One port: its name, type, and (inputs only) whether it takes several edges."""

    name: str
    type: PortType
    multi: bool = False


@dataclass(frozen=True, slots=True)
class KindSpec:
    """The ports of one node kind."""

    inputs: tuple[PortSpec, ...]
    outputs: tuple[PortSpec, ...]

    def input(self, name: str) -> PortSpec | None:
        return next((p for p in self.inputs if p.name == name), None)

    def output(self, name: str) -> PortSpec | None:
        return next((p for p in self.outputs if p.name == name), None)


_H, _N, _R, _P = PortType.HIDDEN, PortType.NORMED, PortType.ROUTING, PortType.PARTIAL

_SPECS: dict[NodeKind, KindSpec] = {
    NodeKind.ATTENTION: KindSpec((), (PortSpec("hidden", _H),)),
    NodeKind.FFN_NORM: KindSpec((PortSpec("hidden", _H),), (PortSpec("x", _N),)),
    NodeKind.ROUTER: KindSpec((PortSpec("x", _N),), (PortSpec("routing", _R),)),
    NodeKind.EXPERTS: KindSpec((PortSpec("x", _N), PortSpec("routing", _R)), (PortSpec("y", _P),)),
    NodeKind.SHARED_EXPERT: KindSpec((PortSpec("x", _N),), (PortSpec("y", _P),)),
    NodeKind.DENSE_MLP: KindSpec((PortSpec("x", _N),), (PortSpec("y", _P),)),
    NodeKind.COMBINE: KindSpec(
        (PortSpec("residual", _H), PortSpec("parts", _P, multi=True)), (PortSpec("hidden", _H),)
    ),
}


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """One node param: a check of its value and what is allowed (for the error)."""

    name: str
    allowed: str

    def ok(self, value: object) -> bool:
        if self.name == "timeout_s":
            return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if self.name == "no_replica_policy":
            return value in ("fail", "wait", "degrade")
        return False


_PARAMS: dict[NodeKind, tuple[ParamSpec, ...]] = {
    NodeKind.EXPERTS: (ParamSpec("timeout_s", "a number of seconds > 0"),
                       ParamSpec("no_replica_policy", "one of fail, wait, degrade")),
}


def check_params(kind: NodeKind, params: dict) -> str | None:
    """None if ``params`` fit ``kind``; else what is wrong and what is allowed."""
    specs = {p.name: p for p in _PARAMS.get(kind, ())}
    for name, value in params.items():
        spec = specs.get(name)
        if spec is None:
            allowed = ", ".join(specs) or "none"
            return f"unknown param {name!r} for a {kind} node (allowed: {allowed})"
        if not spec.ok(value):
            return f"param {name!r} is {value!r}; allowed: {spec.allowed}"
    return None


def kind_spec(kind: NodeKind) -> KindSpec:
    """The ports of ``kind``."""
    return _SPECS[kind]


def parse_kind(value: object) -> NodeKind | None:
    """``NodeKind`` for a kind name (or a ``NodeKind``); ``None`` when it is no known kind."""
    if isinstance(value, NodeKind):
        return value
    if isinstance(value, str):
        try:
            return NodeKind(value)
        except ValueError:
            return None
    return None
