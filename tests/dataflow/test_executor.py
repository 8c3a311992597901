"""The layer executor: graphs compile to operations, node params are checked, the experts step
is pluggable and may defer its result."""

from __future__ import annotations

import asyncio

import pytest
import torch

from eaas.dataflow import GraphBuilder, moe_graph
from eaas.dataflow.executor import LayerProgram, StepContext, run_sync
from eaas.errors import GraphError


class _Layer:
    """Stand-in pieces that record the order they run in (the executor's contract is only the
    piece names)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def attention_block(self, h, cache, batch):
        self.calls.append("attention")
        return h + 1

    def ffn_input(self, h):
        self.calls.append("ffn_norm")
        return h * 2

    def router(self, x):
        self.calls.append("router")
        return torch.zeros(x.shape[0], 2, dtype=torch.long), torch.ones(x.shape[0], 2)

    def shared_expert(self, x):
        self.calls.append("shared")
        return x * 10

    def dense_mlp(self, x):
        self.calls.append("dense")
        return -x


def test_moe_graph_runs_in_order_and_sums_parts():
    layer, seen = _Layer(), {}

    def experts(lay, x, ids, w, params):
        seen["params"] = params
        lay.calls.append("experts")
        return x * 100

    prog = LayerProgram(moe_graph(shared_expert=True))
    h = torch.ones(3, 4)
    out = run_sync(prog.run(layer, h, StepContext(None, None, experts)))
    # hidden = h + 1 = 2; x = 4; out = hidden + 100x + 10x = 2 + 440
    assert torch.equal(out, torch.full((3, 4), 442.0))
    assert layer.calls == ["attention", "ffn_norm", "router", "experts", "shared"]
    assert seen["params"] == {}


def test_deferred_experts_result_is_awaited_at_combine_after_the_shared_expert():
    layer = _Layer()

    class Later:
        def __init__(self, x):
            self.x = x

        async def wait(self):
            await asyncio.sleep(0)  # really suspends: only the async run can take it
            layer.calls.append("experts-back")
            return self.x * 100

    def experts(lay, x, ids, w, params):
        lay.calls.append("experts-sent")
        return Later(x)

    prog = LayerProgram(moe_graph(shared_expert=True))
    step = StepContext(None, None, experts)
    out = asyncio.run(prog.run(layer, torch.ones(2, 2), step))
    assert torch.equal(out, torch.full((2, 2), 442.0))
    assert layer.calls == ["attention", "ffn_norm", "router", "experts-sent", "shared",
                           "experts-back"]
    with pytest.raises(RuntimeError, match="synchronous"):
        run_sync(prog.run(_Layer(), torch.ones(2, 2), step))


def test_node_params_reach_the_experts_step():
    g = (GraphBuilder("moe").node("attn", "attention").node("norm", "ffn_norm")
         .node("router", "router")
         .node("experts", "experts", timeout_s=0.5, no_replica_policy="degrade")
         .node("out", "combine")
         .edge("attn.hidden", "norm.hidden").edge("norm.x", "router.x")
         .edge("norm.x", "experts.x").edge("router.routing", "experts.routing")
         .edge("attn.hidden", "out.residual").edge("experts.y", "out.parts").build())
    got = {}

    def experts(lay, x, ids, w, params):
        got.update(params)
        return torch.zeros_like(x)

    run_sync(LayerProgram(g).run(_Layer(), torch.ones(1, 2), StepContext(None, None, experts)))
    assert got == {"timeout_s": 0.5, "no_replica_policy": "degrade"}


@pytest.mark.parametrize(("kind", "params", "msg"), [
    ("experts", {"timeout": 1.0}, "unknown param 'timeout' for a experts node"),
    ("experts", {"timeout_s": -1}, "allowed: a number of seconds > 0"),
    ("experts", {"no_replica_policy": "retry"}, "one of fail, wait, degrade"),
    ("router", {"top_k": 4}, r"allowed: none"),
])
def test_bad_node_params_are_refused_when_the_graph_is_built(kind, params, msg):
    b = GraphBuilder("g").node("n", kind, params)
    with pytest.raises(GraphError, match=msg):
        b.build()
