"""vLLM's sampling features through the engine (one in-process engine for the module): logprobs
and prompt logprobs equal the reference model's log_softmax; n shares one prefill and its
first sequence is the n=1 one; best_of keeps the most likely; stop strings, min_tokens, eos
stop_reason; penalties, logit_bias and min_p equal a reference decode loop; a grammar ends
its request."""

from __future__ import annotations

import json

import pytest
import pytest_asyncio
import torch

from eaas import AsyncEngine, EngineConfig, SamplingParams
from eaas.engine.params import StructuredOutputsParams
from eaas.errors import RequestError
from eaas.model import Checkpoint, DecoderModel
from tests.engine.conftest import final

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = [11, 42, 7, 99, 5, 230, 17, 3, 64, 8, 150, 21, 77, 4, 190, 33, 12, 9]  # 18 > a block


@pytest.fixture(scope="module")
def model_dir(tiny_dirs) -> str:
    return tiny_dirs["qwen3_moe"]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(model_dir):
    cfg = EngineConfig.from_dict({"model": model_dir, "placement": {
        "num_expert_servers": 2, "server_mode": "inproc"}})
    async with AsyncEngine(cfg) as eng:
        yield eng


@pytest.fixture(scope="module")
def ref(model_dir):
    return DecoderModel.load(Checkpoint.open(model_dir), torch.float32, batch_invariant=True)


def _ref_log_softmax(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = ref.forward(torch.tensor(ids), ref.new_cache(len(ids) + 1))  # [T, V]
    return torch.log_softmax(logits.double(), dim=-1)


async def test_logprobs_and_prompt_logprobs_equal_reference_log_softmax(engine, ref):
    out = await final(engine, PROMPT, SamplingParams(max_tokens=6, temperature=0, logprobs=3,
                                                     prompt_logprobs=2, ignore_eos=True))
    comp = out.outputs[0]
    lsm = _ref_log_softmax(ref, PROMPT + comp.token_ids[:-1])
    assert len(comp.logprobs) == len(comp.token_ids) == 6
    for k, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = lsm[len(PROMPT) - 1 + k]
        assert next(iter(entry)) == tok  # the sampled token first
        assert abs(entry[tok].logprob - float(row[tok])) < 1e-4
        assert entry[tok].rank == 1  # greedy
        top = row.argsort(descending=True)[:3].tolist()
        assert set(entry) == set(top)
        for t in top:
            assert abs(entry[t].logprob - float(row[t])) < 1e-4
    plp = out.prompt_logprobs
    assert plp[0] is None and len(plp) == len(PROMPT)
    for p in range(1, len(PROMPT)):
        row = lsm[p - 1]
        tok = PROMPT[p]
        assert next(iter(plp[p])) == tok
        assert abs(plp[p][tok].logprob - float(row[tok])) < 1e-4
        assert plp[p][tok].rank == 1 + int((row > row[tok]).sum())
    assert abs(comp.cumulative_logprob - sum(e[t].logprob for t, e in
                                             zip(comp.token_ids, comp.logprobs))) < 1e-6


async def test_n_shares_one_prefill_and_its_first_sequence_is_n1(engine):
    shard = next(iter(engine._shard_deps.shards.values()))
    fed: list[int] = []
    real_embed = shard.model.embed

    def counting_embed(ids, host_ids=None):
        fed.append(len(host_ids) if host_ids is not None else int(ids.numel()))
        return real_embed(ids, host_ids=host_ids)

    p = dict(max_tokens=5, temperature=1.0, seed=11, ignore_eos=True)
    one = await final(engine, PROMPT, SamplingParams(**p))
    shard.model.embed = counting_embed
    try:
        four = await final(engine, PROMPT, SamplingParams(n=4, **p))
    finally:
        shard.model.embed = real_embed
    assert sum(fed) == len(PROMPT) + 4 * (5 - 1)  # the prompt went through the model once
    assert [c.index for c in four.outputs] == [0, 1, 2, 3]
    assert four.outputs[0].token_ids == one.outputs[0].token_ids
    assert len({tuple(c.token_ids) for c in four.outputs}) == 4  # per-choice seeds differ
    assert shard.blocks.num_used == 0 and not shard._unforked  # shared blocks all came back


async def test_n_sequences_reproduce_with_their_seed(engine):
    p = SamplingParams(n=3, max_tokens=4, temperature=1.2, top_p=0.9, seed=5, ignore_eos=True)
    a = await final(engine, PROMPT[:5], p)
    b = await final(engine, PROMPT[:5], p)
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


async def test_best_of_keeps_the_most_likely(engine):
    p = dict(max_tokens=4, temperature=1.0, seed=3, ignore_eos=True)
    every = await final(engine, PROMPT[:7], SamplingParams(n=4, logprobs=0, **p))
    best = await final(engine, PROMPT[:7], SamplingParams(n=2, best_of=4, **p))
    ranked = sorted(every.outputs, key=lambda c: -c.cumulative_logprob)[:2]
    assert [c.token_ids for c in best.outputs] == [c.token_ids for c in ranked]
    assert [c.index for c in best.outputs] == [0, 1]
    assert best.outputs[0].cumulative_logprob >= best.outputs[1].cumulative_logprob


async def test_stop_strings_cut_the_text(engine):
    greedy = await final(engine, "The quick brown", SamplingParams(max_tokens=12, temperature=0,
                                                                   ignore_eos=True))
    text = greedy.outputs[0].text
    at = next(i for i in range(2, len(text) - 2) if text.find(text[i:i + 2]) == i
              and "\ufffd" not in text[:i + 2])  # the first occurrence of a 2-char stop
    stop = text[at:at + 2]
    cut = await final(engine, "The quick brown", SamplingParams(
        max_tokens=12, temperature=0, ignore_eos=True, stop=[stop, "never-there"]))
    kept = await final(engine, "The quick brown", SamplingParams(
        max_tokens=12, temperature=0, ignore_eos=True, stop=stop,
        include_stop_str_in_output=True))
    assert cut.outputs[0].text == text[:at] and cut.outputs[0].stop_reason == stop
    assert cut.finish_reason == "stop"
    assert kept.outputs[0].text == text[:at + 2] and kept.outputs[0].stop_reason == stop
    assert text.startswith(cut.outputs[0].text)


async def test_eos_stop_reason_is_none_and_min_tokens_holds_it_off(engine):
    eos = engine.checkpoint.eos_token_ids[0]
    bias = {eos: 100.0}  # eos is all but certain
    early = await final(engine, PROMPT, SamplingParams(max_tokens=8, temperature=0,
                                                       logit_bias=bias))
    late = await final(engine, PROMPT, SamplingParams(max_tokens=8, temperature=0,
                                                      logit_bias=bias, min_tokens=3))
    assert early.outputs[0].token_ids == [eos] and early.finish_reason == "stop"
    assert early.outputs[0].stop_reason is None  # eos, as vLLM: not the token id
    assert len(late.outputs[0].token_ids) == 4 and late.outputs[0].token_ids[-1] == eos
    assert eos not in late.outputs[0].token_ids[:3]
    other = await final(engine, PROMPT, SamplingParams(max_tokens=8, temperature=0,
                                                       logit_bias={5: 100.0},
                                                       stop_token_ids=[5]))
    assert other.outputs[0].stop_reason == 5  # a stop_token_ids match names its id


def _ref_processed_greedy(ref, prompt: list[int], n: int, p: SamplingParams) -> list[int]:
    """A plain decode loop over the reference model applying vLLM's penalty, bias and min_p
    math token by token (no batching, no eaas.engine.logits)."""
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = ref.forward(torch.tensor(prompt + out), ref.new_cache(len(prompt) + n))[-1]
        z = logits.double().clone()
        for t, b in (p.logit_bias or {}).items():
            z[t] += b
        for t in range(z.numel()):
            if t in prompt or t in out:
                z[t] = z[t] / p.repetition_penalty if z[t] > 0 else z[t] * p.repetition_penalty
            c = out.count(t)
            z[t] -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
        out.append(int(z.argmax()))
    return out


async def test_penalties_and_logit_bias_equal_a_reference_decode(engine, ref):
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, repetition_penalty=1.7,
                       presence_penalty=1.5, frequency_penalty=0.7, logit_bias={9: 2.5, 64: -3.0},
                       min_p=0.2)  # min_p never changes a greedy pick
    got = await final(engine, PROMPT[:6], p)
    assert got.outputs[0].token_ids == _ref_processed_greedy(ref, PROMPT[:6], 8, p)
    plain = await final(engine, PROMPT[:6], SamplingParams(max_tokens=8, temperature=0,
                                                           ignore_eos=True))
    assert plain.outputs[0].token_ids != got.outputs[0].token_ids  # the penalties did act


async def test_min_p_one_samples_the_top_token(engine):
    greedy = await final(engine, PROMPT[:4], SamplingParams(max_tokens=6, temperature=0,
                                                            ignore_eos=True))
    hot = await final(engine, PROMPT[:4], SamplingParams(max_tokens=6, temperature=5.0,
                                                         min_p=1.0, seed=1, ignore_eos=True))
    assert hot.outputs[0].token_ids == greedy.outputs[0].token_ids


async def test_a_json_schema_grammar_ends_the_request_with_valid_json(engine):
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    so = StructuredOutputsParams(json=schema)
    for seed in range(3):
        out = await final(engine, PROMPT[:3], SamplingParams(max_tokens=40, temperature=1.0,
                                                             seed=seed, structured_outputs=so))
        obj = json.loads(out.outputs[0].text)
        assert set(obj) == {"ok", "n"} and obj["n"] in (1, 2, 3) and out.finish_reason == "stop"
    with pytest.raises(RequestError, match="regex"):
        await final(engine, PROMPT[:3], SamplingParams(
            structured_outputs=StructuredOutputsParams(regex="(unclosed")))
