"""The co-located decode step is launched before the previous step's ids reach the host (async
scheduling: its rows feed those tokens on the device) and settles them (text, stop strings,
finishing, publishing) while it runs: the outputs must be exactly those of the plain dispatch
path — every token, text, finish and stop reason — for requests that end at different steps and
for every way of ending (max_tokens, a stop id, a stop string, an abort), greedy and sampled.

On CPU the co-located path is the same code with the step run eagerly (DecodeGraphs with
captured=False); it is taken here by declaring every expert local (`_colocated`), since a CPU
engine otherwise dispatches to its servers."""

from __future__ import annotations

import asyncio

import pytest

from eaas import AsyncEngine, EngineConfig, SamplingParams
from eaas.engine.shard import AttentionShard

PROMPTS = [[5, 6, 7, 8], [40], [9, 30, 31, 32, 33], [100, 3, 9], [77, 78]]


def _cfg(model_dir: str) -> EngineConfig:
    return EngineConfig.from_dict({"model": model_dir, "device": "cpu", "placement": {
        "num_expert_servers": 2, "expert_replicas": 1, "server_mode": "inproc"},
        "scheduler": {"max_num_seqs": 8}})


async def _run(model_dir: str, params: list[SamplingParams], abort_after: int | None = None):
    async with AsyncEngine(_cfg(model_dir)) as engine:
        async def one(i: int, p: list[int], sp: SamplingParams):
            last, seen = None, []
            async for out in engine.generate(p, sp, request_id=f"r{i}"):
                last = out
                seen.append(len(out.outputs[0].token_ids))
                if i == 0 and abort_after is not None and seen[-1] >= abort_after:
                    await engine.abort(f"r{i}")
            return last, seen

        res = await asyncio.gather(*(one(i, p, sp) for i, (p, sp) in
                                     enumerate(zip(PROMPTS, params))))
        paths = [s["data_path"] for s in engine.snapshot()["shards"]]
    return res, paths


def _summary(out):
    c = out.outputs[0]
    return (c.token_ids, c.text, c.finish_reason, c.stop_reason, out.finished)


@pytest.fixture
def params(tiny_dirs, reference_greedy) -> list[SamplingParams]:
    """Five requests ending at different steps, by max_tokens, a stop id and a stop string
    (both taken from the reference's own output, so they do end the request)."""
    d = tiny_dirs["qwen3_moe"]
    ref = reference_greedy(d, PROMPTS[2], 12)
    from pathlib import Path

    from eaas.model import Tokenizer

    text = Tokenizer(Path(d) / "tokenizer.json").decode(reference_greedy(d, PROMPTS[3], 12))
    stop = text[len(text) // 2:len(text) // 2 + 2] or text[:1]
    return [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (9, 3)] + [
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                       stop_token_ids=(ref[5],)),
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=(stop,)),
        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)]


def test_local_decode_outputs_equal_the_dispatch_path(tiny_dirs, params, monkeypatch):
    d = tiny_dirs["qwen3_moe"]
    want, paths = asyncio.run(_run(d, params))
    assert paths == ["dispatch"]
    monkeypatch.setattr(AttentionShard, "_colocated", lambda self, snap: True)
    got, paths = asyncio.run(_run(d, params))
    assert paths == ["local"]
    assert [_summary(o) for o, _ in got] == [_summary(o) for o, _ in want]
    assert [o.outputs[0].finish_reason for o, _ in got] == ["length", "length", "stop", "stop",
                                                             "length"]
    for (o, seen), sp in zip(got, params):  # streamed cumulatively, one token at a time
        n = len(o.outputs[0].token_ids)
        assert seen == list(range(1, n + 1)) or seen[-1] == n and seen == sorted(seen)


def test_steps_launch_before_the_previous_tokens_land(tiny_dirs, params, monkeypatch):
    """White box: most decode steps feed at least one token the host does not have yet, and at
    each launch those rows' requests have one token fewer on the host than the step counts."""
    from eaas.engine.decode_graph import DecodeGraphs

    monkeypatch.setattr(AttentionShard, "_colocated", lambda self, snap: True)
    launches: list[tuple[int, int]] = []  # (rows, rows fed from the device)
    run = DecodeGraphs.run

    def spy(self, rows, prev=None):
        ahead = [r for r in rows if r.src >= 0]
        assert all(r.token == 0 for r in ahead)  # the host does not know it
        launches.append((len(rows), len(ahead)))
        return run(self, rows, prev)

    monkeypatch.setattr(DecodeGraphs, "run", spy)
    got, _ = asyncio.run(_run(tiny_dirs["qwen3_moe"], params))
    fed = [a for _, a in launches]
    assert len(launches) >= 8 and sum(1 for a in fed if a) >= len(launches) - 2, launches
    assert [o.outputs[0].finish_reason for o, _ in got] == ["length", "length", "stop", "stop",
                                                             "length"]


def test_sampled_requests_equal_the_dispatch_path(tiny_dirs, monkeypatch):
    """Seeded sampling: the step index of a row fed from the device counts its pending token."""
    d = tiny_dirs["qwen3_moe"]
    params = [SamplingParams(max_tokens=n, temperature=0.9, top_p=0.9, top_k=20, seed=s,
                             ignore_eos=True) for n, s in zip((9, 3, 12, 6, 1), range(5))]
    want, _ = asyncio.run(_run(d, params))
    monkeypatch.setattr(AttentionShard, "_colocated", lambda self, snap: True)
    got, paths = asyncio.run(_run(d, params))
    assert paths == ["local"]
    assert [_summary(o) for o, _ in got] == [_summary(o) for o, _ in want]


def test_abort_while_a_token_is_unsettled(tiny_dirs, params, monkeypatch):
    monkeypatch.setattr(AttentionShard, "_colocated", lambda self, snap: True)
    d = tiny_dirs["qwen3_moe"]
    params = [SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)] + params[1:]
    got, _ = asyncio.run(_run(d, params, abort_after=2))
    first = got[0][0]
    assert first.finished and first.outputs[0].finish_reason == "abort"
    assert len(first.outputs[0].token_ids) < 300
    want, _ = asyncio.run(_run(d, params))
    assert [_summary(o) for o, _ in got[1:]] == [_summary(o) for o, _ in want[1:]]
