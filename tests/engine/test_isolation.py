"""One request's own failure fails that request only: its batch-mates in the same step finish
with the tokens they get without it. Sampling values at the edge of the math are served."""

from __future__ import annotations

import asyncio

from eaas import AsyncEngine, EngineConfig, SamplingParams
from eaas.engine import shard as shard_mod
from tests.engine.conftest import final


def _cfg(d: str) -> EngineConfig:
    return EngineConfig.from_dict({"model": d, "scheduler": {"micro_batches": 1},
                                   "placement": {"num_expert_servers": 2, "expert_replicas": 1,
                                                 "server_mode": "inproc"}})


def _params(i: int) -> SamplingParams:
    if i % 3 == 0:
        return SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    return SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=i, ignore_eos=True)


async def _batch(engine: AsyncEngine, extra: SamplingParams | None) -> list:
    jobs = [final(engine, [3 + i, 4 + i, 5], _params(i)) for i in range(11)]
    if extra is not None:
        jobs.insert(5, final(engine, [1, 2, 3], extra))
    return await asyncio.gather(*jobs)


async def test_a_failing_request_leaves_its_eleven_batch_mates_untouched(tiny_dirs, monkeypatch):
    async with AsyncEngine(_cfg(tiny_dirs["qwen3_moe"])) as engine:
        alone = await _batch(engine, None)
        real = shard_mod.sample

        def sample(logits, params, key, step):
            if params.seed == 666 and step == 3:
                raise RuntimeError("this request's sampler broke")
            return real(logits, params, key, step)

        monkeypatch.setattr(shard_mod, "sample", sample)
        crowd = await _batch(engine, SamplingParams(max_tokens=8, temperature=1.0, seed=666,
                                                    ignore_eos=True))
        steps = (await engine.stats())["shard-0"]["steps"]
    bad = crowd.pop(5)
    assert bad.finish_reason == "error" and "this request's sampler broke" in bad.error
    assert len(bad.outputs[0].token_ids) == 3
    assert [o.outputs[0].token_ids for o in crowd] == [o.outputs[0].token_ids for o in alone]
    assert all(o.finish_reason == "length" for o in crowd)
    assert steps < 40  # they shared steps (one lane): the failure happened inside their batch


async def test_tiny_temperature_is_served_as_the_greedy_limit(tiny_dirs, reference_greedy):
    d = tiny_dirs["mixtral"]
    async with AsyncEngine(_cfg(d)) as engine:
        outs = await asyncio.gather(
            final(engine, [7, 8, 9], SamplingParams(max_tokens=6, temperature=1e-40, seed=1,
                                                    ignore_eos=True)),
            *[final(engine, [7 + i, 9], SamplingParams(max_tokens=6, temperature=0,
                                                       ignore_eos=True)) for i in range(6)])
    assert all(o.finish_reason == "length" for o in outs)
    assert outs[0].outputs[0].token_ids == reference_greedy(d, [7, 8, 9], 6)
