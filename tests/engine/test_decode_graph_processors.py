"""The decode step's processors variant (DecodeGraphs, run eagerly on CPU: the step a graph
records): penalties, min_tokens, logit_bias, min_p and logprobs give the tokens and log
probabilities of the eager step's `sample_rows` over the same logits; and through a whole
co-located engine, such requests decode on the graph path with the outputs of the eager path."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from eaas import AsyncEngine, EngineConfig, SamplingParams
from eaas.engine.batch_sampling import sample_rows
from eaas.engine.decode_graph import DecodeGraphs
from eaas.engine.sampling import fold_seed
from eaas.engine.shard import AttentionShard
from eaas.model import AttentionBatch, Checkpoint, DecoderModel, PagedKVCache, SeqSpan
from eaas.model import bank_experts

BLOCK = 4
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = [[5, 6, 7, 8], [40], [9, 30, 31, 32, 33, 34, 35], [100, 3, 9], [77, 78]]


def _params(second: list[int]) -> list[SamplingParams]:
    """One request per processor (the last, best_of: ranked by cumulative logprobs that the
    graph step computes); min_tokens bans, and logit_bias pushes away, the token the
    model would pick second (`second`: each prompt's second greedy token)."""
    common = {"max_tokens": 12, "ignore_eos": True}
    return [SamplingParams(temperature=0, repetition_penalty=1.8, logprobs=3, **common),
            SamplingParams(temperature=0.9, presence_penalty=1.2, frequency_penalty=0.8,
                           seed=3, **common),
            SamplingParams(temperature=0, min_tokens=4, stop_token_ids=(second[2],),
                           logprobs=0, **common),
            SamplingParams(temperature=0.8, logit_bias={second[3]: -100.0, 17: 4.0}, seed=5,
                           logprobs=20, **common),
            SamplingParams(temperature=1.1, min_p=0.3, top_k=40, seed=9, best_of=2, **common)]


def _prefilled(model: DecoderModel, device: str):
    """A pool with each prompt prefilled and request stand-ins (one per `_params`) holding the
    first token; returns (pool, requests, blocks per table, each prompt's second token)."""
    each = -(-(max(map(len, PROMPTS)) + 8) // BLOCK)
    pool = PagedKVCache(model.config, len(PROMPTS) * each + 1, BLOCK, model.dtype, device)
    second = [model.generate_greedy(p, 2)[1] for p in PROMPTS]
    reqs = []
    with torch.inference_mode():
        for i, (p, sp) in enumerate(zip(PROMPTS, _params(second))):
            t = list(range(1 + i * each, 1 + (i + 1) * each))
            h = model.forward_hidden(torch.tensor(p, device=device), pool,
                                     AttentionBatch.build([SeqSpan(t, 0, len(p))], BLOCK, device))
            first = int(model.lm_head(model.final_norm(h[-1:])).argmax())
            reqs.append(SimpleNamespace(
                params=sp, prompt_ids=p, output_ids=[first], num_computed=len(p),
                finished=False, blocks=SimpleNamespace(block_ids=tuple(t)),
                noise_key=fold_seed(i), stop_ids=frozenset(sp.stop_token_ids), grammar=None))
    return pool, reqs, each, second


def _advance(reqs, ids: torch.Tensor) -> None:
    for r, t in zip(reqs, ids.tolist()):
        r.output_ids.append(t)
        r.num_computed += 1


def test_processors_step_equals_sample_rows(tiny_dirs):
    model = DecoderModel.load(Checkpoint.open(tiny_dirs["qwen3_moe"]), batch_invariant=True)
    pool, reqs, each, second = _prefilled(model, "cpu")
    graphs = DecodeGraphs(model, pool, max_num_seqs=8, max_blocks=each, experts=bank_experts,
                          captured=False)
    seen: list[torch.Tensor] = []
    head = model.lm_head
    model.lm_head = lambda h, float32=True: seen.append(head(h, float32)) or seen[-1]
    for step in range(6):
        out = graphs.run(graphs.rows_of(reqs))
        want = sample_rows(seen[-1][:len(reqs)], reqs, list(range(len(reqs))))
        assert out.ids.tolist() == want.ids.tolist(), step
        n = want.logprobs[2].shape[1]
        got = (*out.logprobs[:2], out.logprobs[2][:, :n], out.logprobs[3][:, :n])
        for a, b in zip(got, want.logprobs):
            assert torch.equal(a, b), step
        _advance(reqs, out.ids)
    assert graphs.processor_steps == graphs.steps == 6
    assert second[2] not in reqs[2].output_ids[1:4]  # min_tokens held the stop id back
    assert second[3] not in reqs[3].output_ids[1:]  # its logit bias of -100
    assert graphs.slots.num_held == 4  # every request but min_p's holds a slot


@pytest.mark.cuda
@needs_cuda
def test_captured_processors_equal_eager_and_no_sync_inside_a_step(tiny_dirs):
    model = DecoderModel.load(Checkpoint.open(tiny_dirs["qwen3_moe"]), device="cuda",
                              batch_invariant=True)
    got = {}
    for captured in (False, True):
        pool, reqs, each, _ = _prefilled(model, "cuda")
        graphs = DecodeGraphs(model, pool, max_num_seqs=8, max_blocks=each,
                              experts=bank_experts, captured=captured)
        graphs.capture()
        steps = []
        for step in range(5):
            rows = graphs.rows_of(reqs)
            if captured and step == 4:  # slots taken: nothing to upload but the packed rows
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
            try:
                out = graphs.run(rows)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            steps.append([t.cpu() for t in out.tensors()])
            _advance(reqs, out.ids)
        assert graphs.replays == (5 if captured else 0)
        got[captured] = steps
    for a, b in zip(got[True], got[False]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


# ---- through the engine ------------------------------------------------------------------------
def _cfg(model_dir: str) -> EngineConfig:
    return EngineConfig.from_dict({"model": model_dir, "device": "cpu", "placement": {
        "num_expert_servers": 2, "expert_replicas": 1, "server_mode": "inproc"},
        "scheduler": {"max_num_seqs": 6}})  # 6 sampling slots


async def _run(model_dir: str, params: list[SamplingParams], rounds: int = 1):
    """Each round runs the requests together; a second round needs freed slots (4 of 6 each)."""
    async with AsyncEngine(_cfg(model_dir)) as engine:
        async def one(i: int, p: list[int], sp: SamplingParams):
            out = None
            async for out in engine.generate(p, sp, request_id=f"r{i}"):
                pass
            return out

        outs = []
        for _ in range(rounds):
            outs.append(await asyncio.gather(*(one(i, p, sp) for i, (p, sp) in
                                               enumerate(zip(PROMPTS, params)))))
        graphs = [s.graphs for s in engine._shard_deps.shards.values()]
        used = sum(g.processor_steps for g in graphs if g is not None)
    return outs, used


def _summary(out):
    c = out.outputs[0]
    lps = [[(t, round(lp.logprob, 5), lp.rank) for t, lp in e.items()] for e in c.logprobs or []]
    cum = None if c.cumulative_logprob is None else round(c.cumulative_logprob, 4)
    return c.token_ids, c.text, c.finish_reason, lps, cum


def test_engine_decodes_processors_on_the_graph_path(tiny_dirs, reference_greedy, monkeypatch):
    d = tiny_dirs["qwen3_moe"]
    second = [reference_greedy(d, p, 2)[1] for p in PROMPTS]
    params = _params(second)
    monkeypatch.setattr(AttentionShard, "_colocated", lambda self, snap: True)
    (got, again), used = asyncio.run(_run(d, params, rounds=2))
    assert used > 0  # decode steps with these requests ran on the processors variant
    assert [_summary(o) for o in again] == [_summary(o) for o in got]  # slots freed, reset
    # the eager path: every step through `_step`, sampled by `sample_rows`
    monkeypatch.setattr(AttentionShard, "_capture", lambda self: None)  # no DecodeGraphs
    (want,), used_eager = asyncio.run(_run(d, params))
    assert used_eager == 0
    assert [_summary(o) for o in got] == [_summary(o) for o in want]
    assert [len(o.outputs[0].logprobs) if o.outputs[0].logprobs is not None else None
            for o in got] == [len(o.outputs[0].token_ids) if sp.logprobs is not None else None
                              for o, sp in zip(got, params)]
    assert second[2] not in got[2].outputs[0].token_ids[:4]


async def _run_joined(model_dir: str, params: list[SamplingParams], late: list[int]):
    """The requests together, and a late one (greedy) submitted once r0 has 3 tokens: its
    prefill makes an eager step in the middle of the others' graph steps."""
    async with AsyncEngine(_cfg(model_dir)) as engine:
        joined = asyncio.Event()

        async def one(i: int, p: list[int], sp: SamplingParams):
            out = None
            try:
                async for out in engine.generate(p, sp, request_id=f"r{i}"):
                    if i == 0 and len(out.outputs[0].token_ids) >= 3:
                        joined.set()
            finally:
                joined.set()  # r0 ended early (or failed): the late request still runs
            return out

        async def later():
            await joined.wait()
            sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
            async for _ in engine.generate(late, sp, request_id="late"):
                pass

        outs = await asyncio.gather(*(one(i, p, sp) for i, (p, sp) in
                                      enumerate(zip(PROMPTS, params))), later())
    return outs[:-1]


def test_slot_counts_survive_an_eager_step_between_async_steps(tiny_dirs, reference_greedy,
                                                               monkeypatch):
    """A prefill joining mid-decode lands the step in flight and runs eagerly: the penalised
    requests' outputs equal the all-eager run's. (The slot counts' bookkeeping around a pending
    token is pinned down exactly by test_sampling_slots; these tiny-model penalties need not
    flip a token when a count is off by one.)"""
    d = tiny_dirs["qwen3_moe"]
    params = _params([reference_greedy(d, p, 2)[1] for p in PROMPTS])[:4]  # 4 seats of 6
    monkeypatch.setattr(AttentionShard, "_colocated", lambda self, snap: True)
    got = asyncio.run(_run_joined(d, params, [7, 8, 9, 10, 11, 12]))
    monkeypatch.setattr(AttentionShard, "_capture", lambda self: None)  # no DecodeGraphs
    want = asyncio.run(_run_joined(d, params, [7, 8, 9, 10, 11, 12]))
    assert [_summary(o) for o in got] == [_summary(o) for o in want]


def test_grammar_requests_decode_on_the_graph_path(tiny_dirs, monkeypatch):
    """A JSON-schema request's bitmask is filled on the host and applied inside the step: the
    same text as the eager step, valid JSON, on the processors variant; a plain request beside
    it is unchanged."""
    import json

    from eaas.engine.params import StructuredOutputsParams

    pytest.importorskip("xgrammar")  # the serve extra's grammar library
    d = tiny_dirs["qwen3_moe"]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    so = StructuredOutputsParams(json=schema)
    params = [SamplingParams(max_tokens=30, temperature=1.0, seed=s, structured_outputs=so)
              for s in range(2)] + [SamplingParams(max_tokens=8, temperature=0,
                                                   ignore_eos=True)]
    monkeypatch.setattr(AttentionShard, "_colocated", lambda self, snap: True)
    (got,), used = asyncio.run(_run(d, params))
    assert used > 0
    for o in got[:2]:
        assert o.outputs[0].finish_reason == "stop"
        assert set(json.loads(o.outputs[0].text)) == {"ok"}
    monkeypatch.setattr(AttentionShard, "_capture", lambda self: None)  # no DecodeGraphs
    (want,), used_eager = asyncio.run(_run(d, params))
    assert used_eager == 0
    assert [_summary(o) for o in got] == [_summary(o) for o in want]
