"""Admission by free KV blocks: requests that cannot get their blocks wait (the pool is never
over-committed) and all finish with the reference's tokens; a request larger than the whole pool
is refused at once; a failed step gives its blocks back."""

from __future__ import annotations

import asyncio

import pytest

from eaas import AsyncEngine, EngineConfig, SamplingParams
from eaas.errors import RequestError
from tests.engine.conftest import final


def _cfg(model_dir: str, num_blocks: int) -> EngineConfig:
    return EngineConfig.from_dict({
        "model": model_dir, "cache": {"block_size": 4, "num_blocks": num_blocks},
        "scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 5},
        "placement": {"num_expert_servers": 2, "expert_replicas": 1, "server_mode": "inproc"}})


async def test_requests_wait_for_blocks_and_never_over_commit(tiny_dirs, reference_greedy):
    d = tiny_dirs["qwen3_moe"]
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [3] * 9, [12, 13, 14]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    # each request needs ceil((prompt + 5) / 4) blocks: 3, 2, 4, 2 = 11 > the pool's 6
    async with AsyncEngine(_cfg(d, 6)) as engine:
        peak = {"used": 0, "waiting": 0}

        async def watch():
            while True:
                s = (await engine.stats())["shard-0"]
                assert s["kv_blocks_used"] <= s["kv_blocks_total"] == 6
                peak["used"] = max(peak["used"], s["kv_blocks_used"])
                peak["waiting"] = max(peak["waiting"], s["waiting"])
                await asyncio.sleep(0.005)

        w = asyncio.create_task(watch())
        outs = await asyncio.gather(*(final(engine, p, params) for p in prompts))
        w.cancel()
        idle = (await engine.stats())["shard-0"]
        snap = engine.snapshot()
    for p, o in zip(prompts, outs):  # the 9-token prompt ran in chunks of <= 5 tokens
        assert o.finish_reason == "length"
        assert o.outputs[0].token_ids == reference_greedy(d, p, 6)
    assert peak["waiting"] >= 1 and peak["used"] > 0
    assert idle["kv_blocks_used"] == 0
    assert [(x["kv_blocks_total"], x["kv_blocks_used"]) for x in snap["shards"]] == [(6, 0)]


async def test_a_request_larger_than_the_pool_is_refused(tiny_dirs):
    async with AsyncEngine(_cfg(tiny_dirs["mixtral"], 4)) as engine:
        with pytest.raises(RequestError, match="needs 5 blocks of 4 tokens .* only 4 blocks"):
            await final(engine, [1, 2, 3], SamplingParams(max_tokens=15, ignore_eos=True))
        ok = await final(engine, [1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
    assert ok.finish_reason in ("length", "stop")


async def test_a_failed_step_gives_its_blocks_back(tiny_dirs, monkeypatch):
    from eaas.engine import shard as shard_mod

    async with AsyncEngine(_cfg(tiny_dirs["qwen2_moe"], 8)) as engine:
        real = shard_mod.AttentionShard._step
        calls = {"n": 0}

        async def broken(self, reqs, lane):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected model error")
            return await real(self, reqs, lane)

        monkeypatch.setattr(shard_mod.AttentionShard, "_step", broken)
        out = await final(engine, [4, 5, 6], SamplingParams(max_tokens=8, ignore_eos=True))
        assert out.finish_reason == "error" and "injected model error" in out.error
        assert (await engine.stats())["shard-0"]["kv_blocks_used"] == 0
        monkeypatch.setattr(shard_mod.AttentionShard, "_step", real)
        again = await final(engine, [4, 5, 6], SamplingParams(max_tokens=3, temperature=0))
    assert again.finish_reason == "length"
