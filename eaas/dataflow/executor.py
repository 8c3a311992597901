"""The layer executor: each layer's dataflow graph, turned into a sequence of operations.

A layer is written once, as its graph. Every path that runs one — the plain model
(`DecoderModel.forward`), the attention shard's eager step and the captured CUDA-graph step — runs
it through `LayerProgram.run`, which walks the graph's nodes in topological order and applies one
operation per node kind (the `_OPS` table) to the layer's pieces:

    attention      layer.attention_block(h, cache, batch)        -> hidden (residual added)
    ffn_norm       layer.ffn_input(hidden)                       -> x
    router         layer.router(x)                               -> (topk_ids, topk_weights)
    experts        step.experts(layer, x, topk_ids, weights, p)  -> y [T, H], already combined
    shared_expert  layer.shared_expert(x)                        -> y
    dense_mlp      layer.dense_mlp(x)                            -> y
    combine        residual + sum(parts, in edge order)          -> the layer's output

The experts operation is pluggable (`ExpertsStep`): the layer's own expert bank (the plain model,
the captured step), or the shard's dispatch to expert servers. A step may return its result
later: an object with `async wait() -> Tensor` (a `Deferred`), awaited where a node consumes it,
so the nodes between (a shared expert) run while the rows are out. `p` is the node's params.

`run_sync` drives the same coroutine without an event loop, for steps that never suspend (the
plain model, the captured step).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from eaas.dataflow.graph import LayerGraph
from eaas.dataflow.kinds import NodeKind
from eaas.dataflow.model_graph import ModelGraph
from eaas.errors import GraphError

__all__ = ["Deferred", "ExpertsStep", "LayerProgram", "ModelProgram", "StepContext", "run_sync"]


@runtime_checkable
class Deferred(Protocol):
    """A value computed elsewhere (expert rows out on servers); `wait()` returns it."""

    async def wait(self) -> torch.Tensor: ...


# (layer, x [T, H], topk_ids [T, K], topk_weights [T, K], node params) -> y [T, H] | Deferred,
# or an awaitable of either
ExpertsStep = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor, Mapping[str, Any]], Any]


@dataclass(slots=True)
class StepContext:
    """What the operations of one step share: the KV cache and this step's attention batch
    (eaas.model.kv_cache), and the experts step."""

    cache: Any
    batch: Any
    experts: ExpertsStep


@dataclass(frozen=True, slots=True)
class _Op:
    node: str
    kind: NodeKind
    inputs: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]  # port -> sources, edge order
    params: Mapping[str, Any]


async def _value(v: Any) -> Any:
    if isinstance(v, torch.Tensor):  # the common case, before the slow Protocol check
        return v
    return await v.wait() if isinstance(v, Deferred) else v


async def _attention(layer: Any, step: StepContext, a: dict, p: Mapping[str, Any]) -> Any:
    return layer.attention_block(a["h"], step.cache, step.batch)


async def _ffn_norm(layer: Any, step: StepContext, a: dict, p: Mapping[str, Any]) -> Any:
    return layer.ffn_input(await _value(a["hidden"]))


async def _router(layer: Any, step: StepContext, a: dict, p: Mapping[str, Any]) -> Any:
    return layer.router(await _value(a["x"]))


async def _experts(layer: Any, step: StepContext, a: dict, p: Mapping[str, Any]) -> Any:
    topk_ids, topk_weights = a["routing"]
    out = step.experts(layer, await _value(a["x"]), topk_ids, topk_weights, p)
    if not isinstance(out, torch.Tensor) and isinstance(out, Awaitable) \
            and not isinstance(out, Deferred):
        out = await out
    return out


async def _shared(layer: Any, step: StepContext, a: dict, p: Mapping[str, Any]) -> Any:
    return layer.shared_expert(await _value(a["x"]))


async def _dense(layer: Any, step: StepContext, a: dict, p: Mapping[str, Any]) -> Any:
    return layer.dense_mlp(await _value(a["x"]))


async def _combine(layer: Any, step: StepContext, a: dict, p: Mapping[str, Any]) -> Any:
    out = None
    for part in a["parts"]:
        v = await _value(part)
        out = v if out is None else out + v
    return await _value(a["residual"]) + out


_OPS: dict[NodeKind, Callable[..., Awaitable[Any]]] = {
    NodeKind.ATTENTION: _attention,
    NodeKind.FFN_NORM: _ffn_norm,
    NodeKind.ROUTER: _router,
    NodeKind.EXPERTS: _experts,
    NodeKind.SHARED_EXPERT: _shared,
    NodeKind.DENSE_MLP: _dense,
    NodeKind.COMBINE: _combine,
}
_OUT_PORT = {NodeKind.ATTENTION: "hidden", NodeKind.FFN_NORM: "x", NodeKind.ROUTER: "routing",
             NodeKind.COMBINE: "hidden"}  # every other kind's output port is "y"


class LayerProgram:
    """One layer graph compiled to operations. `await prog.run(layer, h, step)` -> [T, H]."""

    __slots__ = ("graph", "ops")

    def __init__(self, graph: LayerGraph) -> None:
        self.graph = graph
        ops = []
        for node in graph.order:
            if node.kind not in _OPS:
                raise GraphError(f"graph {graph.name!r}, node {node.name!r}: kind {node.kind} "
                                 "has no operation in the executor")
            ins = tuple((port, tuple(srcs)) for port, srcs in graph.inputs(node.name).items())
            ops.append(_Op(node.name, node.kind, ins, dict(node.params)))
        self.ops: tuple[_Op, ...] = tuple(ops)

    async def run(self, layer: Any, h: torch.Tensor, step: StepContext) -> torch.Tensor:
        """h: [T, H] the layer's input residual -> [T, H] its output."""
        vals: dict[tuple[str, str], Any] = {}
        for op in self.ops:
            args: dict[str, Any] = {"h": h}
            for port, srcs in op.inputs:
                got = [vals[s] for s in srcs]
                args[port] = got if port == "parts" else got[0]
            out = await _OPS[op.kind](layer, step, args, op.params)
            if op.kind is NodeKind.COMBINE:
                return out
            vals[(op.node, _OUT_PORT.get(op.kind, "y"))] = out
        raise GraphError(f"graph {self.graph.name!r} has no combine node")  # graphs forbid it


class ModelProgram:
    """Every layer's program (one per distinct layer graph, shared by the layers it covers)."""

    __slots__ = ("graph", "layers")

    def __init__(self, graph: ModelGraph, num_layers: int) -> None:
        self.graph = graph
        compiled: dict[int, LayerProgram] = {}
        self.layers: list[LayerProgram] = []
        for i in range(num_layers):
            g = graph.layer(i)
            prog = compiled.get(id(g))
            if prog is None:
                prog = compiled[id(g)] = LayerProgram(g)
            self.layers.append(prog)

    def __getitem__(self, layer_idx: int) -> LayerProgram:
        return self.layers[layer_idx]


def run_sync(coro: Any) -> Any:
    """Run a coroutine that never suspends (no real await inside) to its result."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("a synchronous layer run was asked to wait (its experts step returned "
                       "an awaitable that suspends); run it with `await program.run(...)`")
