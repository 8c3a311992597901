"""Build a disaggregated engine on a tiny checkpoint: 2 attention shards, 3 expert servers,
expert 0 of every layer replicated on all three, and generate."""

from __future__ import annotations

import sys
import tempfile

from eaas import Engine, EngineConfig, SamplingParams
from eaas.model import make_tiny


def main(arch: str = "qwen3_moe") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(f"{tmp}/{arch}", arch, seed=0)
        config = EngineConfig.from_dict({
            "model": str(model_dir),
            "placement": {
                "num_attention_shards": 2,
                "num_expert_servers": 3,
                # server index -> expert ids it hosts (every MoE layer); expert 0 on all three
                "strategy": "explicit",
                "explicit_map": {0: [0, 1, 2, 3], 1: [0, 4, 5], 2: [0, 6, 7]},
            },
            "batching": {"max_batch_tokens": 64, "max_wait_us": 200},
        })
        prompts = ["The quick brown fox", "Experts are stateless", [5, 17, 42]]
        with Engine(config) as engine:
            outputs = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0))
            topology = engine.engine.snapshot()
        for prompt, out in zip(prompts, outputs):
            print(f"{prompt!r} -> {out.outputs[0].text!r} ({out.finish_reason})")
        print("servers:", {s["name"]: s["experts"] for s in topology["servers"]})


if __name__ == "__main__":
    main(*sys.argv[1:])
