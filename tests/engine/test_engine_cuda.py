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
        gpu = engine.engine.snapshot()["gpu"]
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_greedy(tiny_dirs[arch], p, 12)
    assert gpu["available"] and gpu["gpus"]


def test_seeded_sampling_on_cuda_matches_cpu(tiny_dirs):
    """Request generators are CPU generators: sampling runs on the host, so a seeded request
    gives the same tokens on a GPU shard as on the CPU (before, torch.multinomial refused the
    CPU generator for CUDA logits and the request ended in an error)."""
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
