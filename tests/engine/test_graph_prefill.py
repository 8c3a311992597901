"""Short prompts ride the captured decode step (fast mode): a step with prompts whose chunks fit
the largest bucket beside the decodes runs each prompt token as a row of the step
(`DecodeGraphs.rows_of(..., chunks)`), not as an eager step of the whole batch. The tokens must
be the reference model's, every way a request can end must behave as on the dispatch path, and
the steps that need the eager path (prompt logprobs, n > 1, batch-invariant mode, a chunk over
the bucket) must still take it.

On CPU the co-located path is the same code with the step run eagerly (DecodeGraphs with
captured=False); it is taken here by declaring every expert local (`_colocated`)."""

from __future__ import annotations

import asyncio

import pytest

from eaas import AsyncEngine, EngineConfig, SamplingParams
from eaas.engine.decode_graph import DecodeGraphs
from eaas.engine.shard import AttentionShard

PROMPTS = [[5, 6, 7, 8], [40], [9, 30, 31, 32, 33, 34, 35], [100, 3, 9], [77, 78]]


def _cfg(model_dir: str, invariant: bool = False, **scheduler) -> EngineConfig:
    return EngineConfig.from_dict({
        "model": model_dir, "device": "cpu", "batch_invariant": invariant,
        "placement": {"num_expert_servers": 2, "expert_replicas": 1, "server_mode": "inproc"},
        "scheduler": {"max_num_seqs": 8, **scheduler}})


async def _run(cfg: EngineConfig, params: list[SamplingParams], prompts=PROMPTS,
               stagger_s: float = 0.0):
    async with AsyncEngine(cfg) as engine:
        async def one(i: int, p: list[int], sp: SamplingParams):
            await asyncio.sleep(i * stagger_s)  # later prompts arrive while others decode
            last = None
            async for out in engine.generate(p, sp, request_id=f"r{i}"):
                last = out
            return last

        res = await asyncio.gather(*(one(i, p, sp) for i, (p, sp) in
                                     enumerate(zip(prompts, params))))
    return res


def _summary(out):
    c = out.outputs[0]
    return (c.token_ids, c.text, c.finish_reason, c.stop_reason, out.finished)


@pytest.fixture
def spy(monkeypatch):
    """Every co-located step's rows: [(rows, prompt rows)] (a prompt row feeds a prompt token
    at a position below its prompt's length); the eager steps are counted apart."""
    monkeypatch.setattr(AttentionShard, "_colocated", lambda self, snap: True)
    seen = {"graph": [], "eager": 0}
    run = DecodeGraphs.run

    def graph_run(self, rows, prev=None):
        seen["graph"].append(len(rows))
        return run(self, rows, prev)

    step = AttentionShard._step

    async def counted(self, reqs, lane):
        if self.graphs is None:
            seen["eager"] += 1
        else:
            planned, chunks = self._plan(reqs)
            if chunks is None and not all(r.prefilled for r in planned):
                seen["eager"] += 1
        return await step(self, reqs, lane)

    monkeypatch.setattr(DecodeGraphs, "run", graph_run)
    monkeypatch.setattr(AttentionShard, "_step", counted)
    return seen


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"])
def test_prompts_on_the_captured_step_give_the_reference_tokens(tiny_dirs, reference_greedy,
                                                                 spy, arch):
    """Prompts arriving one after another while the earlier ones decode: every step is a
    graph step (no eager step at all), and every request's greedy tokens are the reference's."""
    d = tiny_dirs[arch]
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True) for _ in PROMPTS]
    got = asyncio.run(_run(_cfg(d), params, stagger_s=0.05))
    for p, o in zip(PROMPTS, got):
        assert o.outputs[0].token_ids == reference_greedy(d, p, 6), p
    assert spy["eager"] == 0 and spy["graph"]


def test_chunked_prompts_and_every_ending_equal_the_dispatch_path(tiny_dirs, reference_greedy,
                                                                  spy, monkeypatch):
    """A budget of 3 tokens a step splits the longer prompts over several steps (chunks that
    do not end their prompt sample nothing); max_tokens, a stop id and a stop string end
    requests at different steps; seeded sampling and logprobs on the first token too."""
    d = tiny_dirs["qwen3_moe"]
    ref = reference_greedy(d, PROMPTS[2], 12)
    params = [SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                             stop_token_ids=(ref[5],)),
              SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=3,
                             ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, stop=("zz",),
                             presence_penalty=0.5)]
    cfg = _cfg(d, max_num_batched_tokens=3)
    got = asyncio.run(_run(cfg, params))
    assert spy["eager"] == 0
    assert max(spy["graph"]) <= 3 + len(PROMPTS)  # the budget holds on the graph path too
    monkeypatch.undo()  # the dispatch path (servers in-process, eager steps)
    want = asyncio.run(_run(cfg, params))
    assert [_summary(o) for o in got] == [_summary(o) for o in want]
    assert got[2].outputs[0].finish_reason == "stop" and got[2].outputs[0].stop_reason == ref[5]
    lp, want_lp = got[3].outputs[0].logprobs, want[3].outputs[0].logprobs
    assert len(lp) == 12 and [set(e) for e in lp] == [set(e) for e in want_lp]
    for e, w in zip(lp, want_lp):
        for t in e:
            assert e[t].logprob == pytest.approx(w[t].logprob, abs=1e-4)


def test_steps_that_need_the_eager_path_still_take_it(tiny_dirs, reference_greedy, spy):
    """prompt_logprobs, n > 1 (the group forks at its prompt's end) and a prompt longer than the
    largest bucket go eagerly; a step of only decodes after them is a graph step again."""
    d = tiny_dirs["qwen3_moe"]
    long_prompt = list(range(3, 3 + 20))  # 20 rows > the largest bucket (8)
    params = [SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=1),
              SamplingParams(max_tokens=3, temperature=0.8, seed=1, n=2, ignore_eos=True),
              SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)]
    got = asyncio.run(_run(_cfg(d), params, prompts=[PROMPTS[0], PROMPTS[2], long_prompt],
                           stagger_s=0.3))
    assert spy["eager"] >= 3 and spy["graph"]
    assert got[0].prompt_logprobs is not None and len(got[0].prompt_logprobs) == 4
    assert len(got[1].outputs) == 2
    assert got[2].outputs[0].token_ids == reference_greedy(d, long_prompt, 3)


def test_batch_invariant_mode_keeps_prompts_on_the_eager_step(tiny_dirs, spy):
    """Batch-invariant mode prefills every prompt eagerly (as the dispatch path does: their
    tokens stay equal bit for bit); its decode-only steps are graph steps."""
    d = tiny_dirs["qwen3_moe"]
    params = [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True) for _ in PROMPTS]
    asyncio.run(_run(_cfg(d, invariant=True), params))
    assert spy["eager"] >= 1 and spy["graph"]


def test_a_prompt_that_needs_the_eager_step_runs_without_the_row_prompts(tiny_dirs,
                                                                          reference_greedy,
                                                                          monkeypatch, spy):
    """Fast mode: a step with a prompt over the largest bucket is eager and leaves the short
    prompts of its lane for the next captured step; every request still gets the reference's
    tokens."""
    d = tiny_dirs["qwen3_moe"]
    eager_steps: list[list[int]] = []
    step = AttentionShard._step

    async def watch(self, reqs, lane):
        planned, chunks = self._plan(reqs)
        if chunks is None and not all(r.prefilled for r in planned):
            eager_steps.append(sorted(len(r.prompt_ids) for r in planned if not r.prefilled))
        return await step(self, reqs, lane)

    monkeypatch.setattr(AttentionShard, "_step", watch)
    long_prompt = list(range(3, 3 + 20))  # over the largest bucket (8)
    prompts = [long_prompt, PROMPTS[3], PROMPTS[2], PROMPTS[4]]  # lanes in turn: 0, 1, 0, 1
    params = [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True) for _ in prompts]
    got = asyncio.run(_run(_cfg(d), params, prompts=prompts))
    assert eager_steps and all(s == [20] for s in eager_steps), eager_steps
    for p, o in zip(prompts, got):
        assert o.outputs[0].token_ids == reference_greedy(d, p, 4), p
