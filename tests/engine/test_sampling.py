"""Sampling through the engine: seeded sampling is reproducible whatever shares the batch;
top-k 1 / tiny top-p equal greedy; stop ids and max_tokens end requests; bad params are named."""

from __future__ import annotations

import asyncio

import pytest

from eaas import AsyncEngine, EngineConfig, SamplingParams
from eaas.errors import RequestError
from tests.engine.conftest import final


def _cfg(d: str) -> EngineConfig:
    return EngineConfig.from_dict({"model": d, "placement": {
        "num_attention_shards": 2, "num_expert_servers": 2, "server_mode": "inproc"}})


_gen = final


async def test_seeded_sampling_is_reproducible_across_batching(tiny_dirs):
    async with AsyncEngine(_cfg(tiny_dirs["mixtral"])) as engine:
        p = SamplingParams(max_tokens=12, temperature=1.3, top_p=0.9, top_k=50, seed=123,
                           ignore_eos=True)
        alone = await _gen(engine, "Hello world", p)
        crowd = await asyncio.gather(*[_gen(engine, "Hello world", p) for _ in range(6)],
                                     *[_gen(engine, [5, 6, 7], SamplingParams(
                                         max_tokens=12, temperature=1.0, seed=i, ignore_eos=True))
                                       for i in range(6)])
        other_seed = await _gen(engine, "Hello world", SamplingParams(
            max_tokens=12, temperature=1.3, top_p=0.9, top_k=50, seed=124, ignore_eos=True))
    assert all(o.outputs[0].token_ids == alone.outputs[0].token_ids for o in crowd[:6])
    assert other_seed.outputs[0].token_ids != alone.outputs[0].token_ids


async def test_top_k_1_and_tiny_top_p_are_greedy(tiny_dirs, reference_greedy):
    d = tiny_dirs["qwen2_moe"]
    async with AsyncEngine(_cfg(d)) as engine:
        k1 = await _gen(engine, [9, 8, 7], SamplingParams(max_tokens=8, temperature=2.0, top_k=1,
                                                          seed=1, ignore_eos=True))
        p0 = await _gen(engine, [9, 8, 7], SamplingParams(max_tokens=8, temperature=2.0,
                                                          top_p=1e-6, seed=2, ignore_eos=True))
    greedy = reference_greedy(d, [9, 8, 7], 8)
    assert k1.outputs[0].token_ids == greedy and p0.outputs[0].token_ids == greedy


async def test_stop_token_ids_and_max_tokens(tiny_dirs, reference_greedy):
    d = tiny_dirs["qwen3_moe"]
    greedy = reference_greedy(d, [4, 5, 6], 10)
    stop = greedy[3]
    async with AsyncEngine(_cfg(d)) as engine:
        out = await _gen(engine, [4, 5, 6], SamplingParams(max_tokens=10, temperature=0,
                                                           stop_token_ids=[stop], ignore_eos=True))
        short = await _gen(engine, [4, 5, 6], SamplingParams(max_tokens=3, temperature=0,
                                                             ignore_eos=True))
        text = await _gen(engine, "The quick brown", SamplingParams(max_tokens=5, temperature=0))
    first = greedy.index(stop)
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.outputs[0].token_ids == greedy[:first + 1]  # the stop id is kept, as vLLM does
    assert short.finish_reason == "length" and short.outputs[0].token_ids == greedy[:3]
    assert text.prompt == "The quick brown" and isinstance(text.outputs[0].text, str)


@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"seed": "x"}, "seed"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(RequestError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


async def test_bad_prompts_are_rejected_and_engine_keeps_serving(tiny_dirs):
    async with AsyncEngine(_cfg(tiny_dirs["qwen3_moe"])) as engine:
        for bad, msg in [("", "empty"), ([], "empty"), ([10**9], "token ids"),
                         ([1, "a"], "token ids"), (3.5, "string or a list"),
                         ([1] * (engine.max_model_len + 1), "max_model_len")]:
            with pytest.raises(RequestError, match=msg):
                await _gen(engine, bad, SamplingParams(max_tokens=2))
        ok = await _gen(engine, [1, 2], SamplingParams(max_tokens=2, temperature=0))
    assert ok.finish_reason == "length"
