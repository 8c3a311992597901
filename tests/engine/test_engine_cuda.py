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
