"""The engine on a CUDA device (shards and in-process expert servers on the GPU, expert compute
through the Triton kernel) gives the CPU reference's greedy tokens."""

from __future__ import annotations

import pytest
import torch

from eaas import Engine, EngineConfig, SamplingParams
from eaas.model import ARCHS

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_on_cuda_equals_cpu_reference(arch, tiny_dirs, reference_greedy):
    cfg = EngineConfig.from_dict({"model": tiny_dirs[arch], "device": "cuda:0", "placement": {
        "num_attention_shards": 2, "num_expert_servers": 3, "expert_replicas": 2,
        "server_mode": "inproc"}})
    prompts = [[5, 6, 7, 8], [40, 41], [100, 3, 9, 27, 81, 243 % 300]]
    with Engine(cfg) as engine:
        outs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0,
                                                       ignore_eos=True))
        snap = engine.engine.snapshot()
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_greedy(tiny_dirs[arch], p, 12)
    assert snap["gpu"]["available"] and snap["gpu"]["gpus"]
    # every expert has an in-process server on the shards' GPU: decode steps replay graphs
    assert [s["data_path"] for s in snap["shards"]] == ["captured", "captured"]
    assert sum(s["graph_replays"] for s in snap["shards"]) >= 11
    assert all(0 <= s["kv_blocks_used"] <= s["kv_blocks_total"] for s in snap["shards"])
    assert all(s["kv_blocks_total"] > 0 for s in snap["shards"])


@pytest.mark.parametrize(("enforce_eager", "mode", "path"), [
    (True, "inproc", "local"), (False, "process", "dispatch")])
def test_engine_data_paths_on_cuda(tiny_dirs, reference_greedy, enforce_eager, mode, path):
    """enforce_eager keeps the experts local but runs every step eagerly; expert servers in
    other processes are reached through the dispatcher. Same tokens either way."""
    d = tiny_dirs["qwen2_moe"]
    cfg = EngineConfig.from_dict({"model": d, "device": "cuda:0", "enforce_eager": enforce_eager,
                                  "placement": {"num_expert_servers": 2, "expert_replicas": 1,
                                                "server_mode": mode, "transport": "cudaipc"}})
    with Engine(cfg) as engine:
        out = engine.generate([[7, 8, 9]], SamplingParams(max_tokens=10, temperature=0,
                                                          ignore_eos=True))[0]
        snap = engine.engine.snapshot()
    assert out.outputs[0].token_ids == reference_greedy(d, [7, 8, 9], 10)
    assert [s["data_path"] for s in snap["shards"]] == [path]
    assert snap["shards"][0]["graph_replays"] == 0


def test_seeded_sampling_on_cuda_matches_cpu(tiny_dirs):
    """The sampler's noise is a pure function of (seed, step, token): a seeded request gives the
    same tokens on a GPU shard (sampling inside the captured decode graph) as on the CPU (the
    host sampler)."""
    params = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, top_k=20, seed=1234,
                            ignore_eos=True)
    prompts = [[5, 6, 7, 8], [40, 41]]
    runs = {}
    for device in ("cpu", "cuda:0"):
        cfg = EngineConfig.from_dict({"model": tiny_dirs["qwen3_moe"], "device": device,
                                      "batch_invariant": True, "placement": {
                                          "num_attention_shards": 1, "num_expert_servers": 2,
                                          "expert_replicas": 1, "server_mode": "inproc"}})
        with Engine(cfg) as engine:
            runs[device] = engine.generate(prompts, params)
    for cpu, gpu in zip(runs["cpu"], runs["cuda:0"]):
        assert gpu.finish_reason == "length", gpu.outputs[0]
        assert len(gpu.outputs[0].token_ids) == 10
        # float32 logits may differ in the last bits between devices; a different draw would
        # show up as a different token almost at once, so compare the first few
        assert gpu.outputs[0].token_ids[:3] == cpu.outputs[0].token_ids[:3]
