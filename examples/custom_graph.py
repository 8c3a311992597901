"""A dataflow graph written in YAML: DeepSeek-V3's dense first layer, then MoE layers whose
shared expert runs beside the routed pool. The engine validates it against the checkpoint and
executes it node by node."""

from __future__ import annotations

import tempfile
from pathlib import Path

from eaas import Engine, EngineConfig, SamplingParams
from eaas.model import make_tiny

GRAPH = """
layers:
  - {range: [0, 0], graph: dense}
  - {range: "1-2", graph: moe}
graphs:
  dense:
    nodes: {attn: {kind: attention}, norm: {kind: ffn_norm}, mlp: {kind: dense_mlp},
            out: {kind: combine}}
    edges: [attn.hidden -> norm.hidden, norm.x -> mlp.x, attn.hidden -> out.residual,
            mlp.y -> out.parts]
  moe:
    nodes: {attn: {kind: attention}, norm: {kind: ffn_norm}, router: {kind: router},
            experts: {kind: experts}, shared: {kind: shared_expert}, out: {kind: combine}}
    edges: [attn.hidden -> norm.hidden, norm.x -> router.x, norm.x -> experts.x,
            router.routing -> experts.routing, norm.x -> shared.x,
            attn.hidden -> out.residual, experts.y -> out.parts, shared.y -> out.parts]
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny(f"{tmp}/ds", "deepseek_v3")
        graph = Path(tmp, "graph.yaml")
        graph.write_text(GRAPH)
        cfg = EngineConfig.from_dict({"model": str(model), "graph": str(graph),
                                      "placement": {"server_mode": "inproc"}})
        with Engine(cfg) as engine:
            out = engine.generate("Experts are", SamplingParams(max_tokens=12, temperature=0))
            print(repr(out[0].outputs[0].text), out[0].outputs[0].token_ids)
            print("layer 0 nodes:", [n.name for n in engine.engine.graph.layer(0).order])
            print("layer 1 nodes:", [n.name for n in engine.engine.graph.layer(1).order])


if __name__ == "__main__":
    main()
