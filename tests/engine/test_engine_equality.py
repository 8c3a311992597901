"""The disaggregated engine returns exactly the monolithic reference's greedy tokens."""

from __future__ import annotations

import asyncio

import pytest

from eaas import AsyncEngine, EngineConfig, SamplingParams
from tests.engine.conftest import final, prompts_of

# (arch, placement, batching): several shards x several servers, uneven splits, replicas,
# tiny and large batching windows.
LAYOUTS = [
    ("qwen3_moe", dict(num_attention_shards=2, num_expert_servers=3, expert_replicas=2,
                       server_mode="inproc"),
     dict(max_batch_tokens=1, max_wait_us=0)),
    ("qwen2_moe", dict(num_attention_shards=1, num_expert_servers=4, expert_replicas=1,
                       strategy="contiguous", server_mode="inproc"),
     dict(max_batch_tokens=4096, max_wait_us=5000)),
    ("mixtral", dict(num_attention_shards=2, num_expert_servers=2, expert_replicas=1,
                     strategy="explicit", explicit_map={0: [0, 1, 2, 3, 4, 5], 1: [5, 6, 7]},
                     server_mode="inproc"),
     dict(max_batch_tokens=7, max_wait_us=100)),
    ("deepseek_v3", dict(num_attention_shards=3, num_expert_servers=3, expert_replicas=3,
                         server_mode="process", transport="shm"),
     dict(max_batch_tokens=64, max_wait_us=300)),
]


@pytest.mark.parametrize("arch,placement,batching", LAYOUTS, ids=[l[0] for l in LAYOUTS])
async def test_disaggregated_equals_reference(arch, placement, batching, tiny_dirs,
                                              reference_greedy):
    cfg = EngineConfig.from_dict({"model": tiny_dirs[arch], "placement": placement,
                                  "batching": batching})
    n_tokens = 12
    async with AsyncEngine(cfg) as engine:
        prompts = prompts_of(engine.tokenizer, 32, seed=sum(map(ord, arch)))
        params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)

        run = lambda p: final(engine, p, params)  # noqa: E731

        # half now; the other half arrives while the first half decodes
        first = [asyncio.create_task(run(p)) for p in prompts[:16]]
        while engine.counters.get("tokens_generated", 0) < 16:
            await asyncio.sleep(0.005)
        second = [asyncio.create_task(run(p)) for p in prompts[16:]]
        outs = await asyncio.gather(*first, *second)
        stats = await engine.stats()
    for p, out in zip(prompts, outs):
        assert out.finished and out.finish_reason == "length"
        assert out.outputs[0].token_ids == reference_greedy(tiny_dirs[arch], p, n_tokens), p
    # the work really was spread over every server (it is not a monolithic run in disguise)
    calls = {name: s["calls"] for name, s in stats.items() if name.startswith("expert-")}
    assert len(calls) == placement["num_expert_servers"] and all(c > 0 for c in calls.values())
