"""Sampling slots (eaas/engine/sampling_slots.py): the captured step's processors
(`sample_processed`, reading per-slot device state it updates itself) give the same tokens and
log probabilities as the eager step's `sample_rows` over the same logits, step after step, with
tokens sampled off the graph in between; rows without processors sample exactly as
`sample_batch`; slots are freed and reset for their next owner."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from eaas.engine.batch_sampling import sample_rows
from eaas.engine.params import MAX_LOGPROBS, SamplingParams
from eaas.engine.sampling import fold_seed, sample_batch
from eaas.engine.sampling_slots import SamplingSlots, table_bytes, uses_slot

V = 37
PROMPT = [3, 5, 5, 8, 30]


def _req(params: SamplingParams, i: int, stop: tuple[int, ...] = (2,)) -> SimpleNamespace:
    return SimpleNamespace(params=params, prompt_ids=list(PROMPT), output_ids=[(10 + i) % V],
                           stop_ids=frozenset(stop), noise_key=fold_seed(100 + i), grammar=None,
                           finished=False)


# every processor, alone and mixed, greedy and sampled, beside rows that use none
PARAMS = [
    SamplingParams(temperature=0, repetition_penalty=1.7),
    SamplingParams(temperature=0.9, presence_penalty=1.5, frequency_penalty=0.7, logprobs=5),
    SamplingParams(temperature=0, min_tokens=5, logprobs=0),
    SamplingParams(temperature=0.8, top_k=9, logit_bias={4: 5.0, 7: -100.0, 36: 2.5}),
    SamplingParams(temperature=1.2, min_p=0.2, top_p=0.9),
    SamplingParams(temperature=0.7, top_k=5),  # no processor
    SamplingParams(temperature=0),  # no processor
    SamplingParams(temperature=1.0, repetition_penalty=0.6, min_tokens=3, min_p=0.05,
                   logit_bias={2: 3.0}, frequency_penalty=-0.5, logprobs=MAX_LOGPROBS),
]


def _graph_side(slots: SamplingSlots, logits: torch.Tensor, reqs, slot_ids: list[int]):
    ps = [r.params for r in reqs]
    f = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    i = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return slots.sample_processed(
        logits, f([p.temperature for p in ps]), i([p.top_k for p in ps]),
        f([p.top_p for p in ps]), i([r.noise_key for r in reqs]),
        i([len(r.output_ids) for r in reqs]), i(slot_ids), i([p.min_tokens for p in ps]),
        (f([p.presence_penalty for p in ps]), f([p.frequency_penalty for p in ps]),
         f([p.repetition_penalty for p in ps])), f([p.min_p for p in ps]),
        (torch.zeros(len(reqs), -(-V // 32), dtype=torch.int32),
         torch.zeros(len(reqs), dtype=torch.bool)), MAX_LOGPROBS)


def _logits(step: int, b: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return torch.randn(b, V, generator=g) * 1.5  # small scale: penalties change choices


def test_graph_side_equals_sample_rows_over_many_steps():
    reqs = [_req(p, i) for i, p in enumerate(PARAMS)]
    slots = SamplingSlots(len(reqs), V, "cpu")
    changed = 0
    for step in range(9):
        logits = _logits(step, len(reqs))
        want = sample_rows(logits, reqs, list(range(len(reqs))))
        if step == 4:  # an eager step (a prefill beside it): the slots catch up next time
            for r, t in zip(reqs, want.ids.tolist()):
                r.output_ids.append(t)
            continue
        ids, lp = _graph_side(slots, logits, reqs, [slots.slot_of(r) for r in reqs])
        assert ids.tolist() == want.ids.tolist(), step
        chosen, rank, top_lp, top_ids = lp
        w_chosen, w_rank, w_top_lp, w_top_ids = want.logprobs
        n = w_top_lp.shape[1]
        assert torch.equal(chosen, w_chosen) and torch.equal(rank, w_rank)
        assert torch.equal(top_lp[:, :n], w_top_lp) and torch.equal(top_ids[:, :n], w_top_ids)
        plain = sample_batch(logits, *(torch.tensor(x) for x in (
            [float(p.temperature) for p in PARAMS], [p.top_k for p in PARAMS],
            [float(p.top_p) for p in PARAMS], [r.noise_key for r in reqs],
            [len(r.output_ids) for r in reqs])))
        changed += int((plain != ids).sum())
        assert torch.equal(plain[5:7], ids[5:7])  # rows without processors: sample_batch
        for r, t in zip(reqs, ids.tolist()):
            r.output_ids.append(t)
    assert changed >= 5  # the processors did change choices (the test can fail)
    # min_tokens held the stop id back while the output was short
    assert 2 not in reqs[2].output_ids[:5] and 2 not in reqs[7].output_ids[:3]


def test_slot_counts_equal_the_histories():
    reqs = [_req(p, i, stop=(2, 11)) for i, p in enumerate(PARAMS)]
    slots = SamplingSlots(8, V, "cpu")
    for step in range(3):
        ids, _ = _graph_side(slots, _logits(step, len(reqs)), reqs,
                             [slots.slot_of(r) for r in reqs])
        for r, t in zip(reqs, ids.tolist()):
            r.output_ids.append(t)
    for r in reqs:
        s = slots.slot_of(r)
        if not uses_slot(r.params):
            assert s == 0
            continue
        row = slots.table[s]
        assert (row & 0x1FFF_FFFF).tolist() == [r.output_ids.count(t) for t in range(V)]
        assert ((row >> 30) & 1).tolist() == [int(t in PROMPT) for t in range(V)]
        assert ((row >> 29) & 1).tolist() == [int(t in (2, 11)) for t in range(V)]
    assert not slots.table[0].any()  # the scratch slot of rows without one stays zero


def test_counts_with_a_pending_token_and_an_eager_step_between():
    """Async steps: a step launched while the previous token is still on its way (pending=1),
    then an eager step's token (counted on the host only): the table holds each token once."""
    reqs = [_req(p, i, stop=(2, 11)) for i, p in enumerate(PARAMS)]
    used = [r for r in reqs if uses_slot(r.params)]
    slots = SamplingSlots(8, V, "cpu")
    in_flight: list[int] = []
    for step in range(4):  # step k+1 launches before step k's ids are on the host
        ids, _ = _graph_side(slots, _logits(step, len(used)), used,
                             [slots.slot_of(r, pending=int(step > 0)) for r in used])
        if in_flight:
            for r, t in zip(used, in_flight):
                r.output_ids.append(t)
        in_flight = ids.tolist()
    for r, t in zip(used, in_flight):  # the last step lands, then an eager step's token
        r.output_ids.extend((t, 5))
    for r in used:
        row = slots.table[slots.slot_of(r)]
        assert (row & 0x1FFF_FFFF).tolist() == [r.output_ids.count(t) for t in range(V)]


def test_finished_slots_are_freed_and_reset():
    slots = SamplingSlots(2, V, "cpu")
    a = _req(SamplingParams(presence_penalty=1.0, logit_bias={9: 1.0}), 0)
    b = _req(SamplingParams(min_tokens=2), 1)
    assert (slots.slot_of(a), slots.slot_of(b)) == (1, 2)
    with pytest.raises(RuntimeError, match="sampling slots are held"):
        slots.slot_of(_req(SamplingParams(repetition_penalty=2.0), 2))
    a.finished = True
    slots.release_finished()
    assert slots.num_held == 1
    c = _req(SamplingParams(repetition_penalty=2.0), 3)
    c.prompt_ids = [1]
    assert slots.slot_of(c) == 1
    assert slots.table[1].tolist() == [(1 << 30) * (t == 1) + (1 << 29) * (t == 2)
                                       + (t == 13) for t in range(V)]
    assert not slots.bias_ids[1].any() and not slots.bias_values[1].any()


def test_table_bytes_at_qwen3_30b():
    # Qwen3-30B-A3B: V = 151936, max_num_seqs 256 -> about 159 MB of slot tables
    assert table_bytes(256, 151936) == 257 * (4 * 151936 + 12 * 1024)
    assert 158e6 < table_bytes(256, 151936) < 160e6


def test_a_replayed_step_forgets_the_tokens_its_failed_attempt_counted():
    """A step whose tokens were counted on the device but never taken (the step ledger replays
    it): after `forget`, the next step's slot holds exactly the host's history, as a request that
    never ran the failed attempt would."""
    reqs = [_req(p, i) for i, p in enumerate(PARAMS[:2])]
    slots = SamplingSlots(4, V, "cpu")
    clean = SamplingSlots(4, V, "cpu")
    _graph_side(slots, _logits(0, 2), reqs, [slots.slot_of(r) for r in reqs])  # failed attempt
    for r in reqs:
        slots.forget(r)
    got = [slots.table[slots.slot_of(r)].clone() for r in reqs]
    want = [clean.table[clean.slot_of(r)].clone() for r in reqs]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert slots.num_held == 2
