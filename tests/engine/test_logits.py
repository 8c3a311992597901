"""The batched logits processors (eaas/engine/logits.py) against plain per-row, per-token
references of their math, over odd sizes (B = 1, 3, 33; V = 7, 100, 385), fixed seeds."""

from __future__ import annotations

import math

import pytest
import torch

from eaas.engine import logits as L

SIZES = [(1, 7), (3, 100), (33, 385)]


def _logits(b: int, v: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def _histories(b: int, v: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, v, (int(torch.randint(0, 12, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(b)]


def _pad(rows: list[list[int]], pad: int) -> torch.Tensor:
    w = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [pad] * (w - len(r)) for r in rows])


@pytest.mark.parametrize("b,v", SIZES)
def test_token_counts_matches_counting(b, v):
    hist = _histories(b, v, 1)
    counts = L.token_counts(_pad(hist, v), v)
    for i, h in enumerate(hist):
        assert counts[i].tolist() == [h.count(t) for t in range(v)]


@pytest.mark.parametrize("b,v", SIZES)
def test_penalties_match_reference(b, v):
    x = _logits(b, v)
    prompt, output = _histories(b, v, 2), _histories(b, v, 3)
    g = torch.Generator().manual_seed(4)
    presence = torch.rand(b, generator=g) * 4 - 2
    frequency = torch.rand(b, generator=g) * 4 - 2
    repetition = torch.rand(b, generator=g) * 2 + 0.2
    got = L.apply_penalties(x, L.token_counts(_pad(prompt, v), v),
                            L.token_counts(_pad(output, v), v), presence, frequency, repetition)
    want = x.clone()
    for i in range(b):
        for t in range(v):
            z = float(x[i, t])
            if t in prompt[i] or t in output[i]:  # vLLM: repetition over prompt + output
                z = z / float(repetition[i]) if z > 0 else z * float(repetition[i])
            n = output[i].count(t)  # frequency and presence: output tokens only
            z -= float(frequency[i]) * n + float(presence[i]) * (n > 0)
            want[i, t] = z
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_neutral_penalties_change_nothing():
    x = _logits(3, 50)
    hist = _pad(_histories(3, 50, 5), 50)
    c = L.token_counts(hist, 50)
    out = L.apply_penalties(x, c, c, torch.zeros(3), torch.zeros(3), torch.ones(3))
    assert torch.equal(out, x)


@pytest.mark.parametrize("b,v", SIZES)
def test_logit_bias_adds_per_row(b, v):
    x = _logits(b, v)
    g = torch.Generator().manual_seed(6)
    biases = [{int(t): float(torch.rand(1, generator=g) * 200 - 100)
               for t in torch.randint(0, v, (i % 4,), generator=g)} for i in range(b)]
    ids = _pad([list(d) for d in biases], 0)
    vals = torch.tensor([list(d.values()) + [0.0] * (ids.shape[1] - len(d)) for d in biases])
    got = L.apply_logit_bias(x, ids, vals)
    want = x.clone()
    for i, d in enumerate(biases):
        for t, bias in d.items():
            want[i, t] += bias
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("b,v", SIZES)
def test_min_tokens_masks_stop_ids_of_active_rows_only(b, v):
    x = _logits(b, v)
    stops = [[0, v - 1], [v // 2], []] * b
    stops = stops[:b]
    active = torch.tensor([i % 2 == 0 for i in range(b)])
    got = L.apply_min_tokens(x, _pad(stops, v), active)
    want = x.clone()
    for i in range(b):
        if active[i]:
            for t in stops[i]:
                want[i, t] = -math.inf
    assert torch.equal(got, want)


@pytest.mark.parametrize("b,v", SIZES)
def test_min_p_matches_probability_threshold(b, v):
    x = _logits(b, v)
    g = torch.Generator().manual_seed(7)
    temperature = torch.rand(b, generator=g) * 2
    temperature[0] = 0.0  # greedy rows are left alone
    min_p = torch.rand(b, generator=g) * 0.5
    if b > 2:
        min_p[2] = 0.0
    got = L.apply_min_p(x, temperature, min_p)
    for i in range(b):
        if temperature[i] == 0 or min_p[i] == 0:
            assert torch.equal(got[i], x[i])
            continue
        p = torch.softmax(x[i] / temperature[i], dim=-1)
        keep = p >= min_p[i] * p.max()
        assert torch.equal(torch.isfinite(got[i]), keep), i
        assert torch.equal(got[i][keep], x[i][keep])


def _bitmask(allowed: list[list[bool]]) -> torch.Tensor:
    v = len(allowed[0])
    words = -(-v // 32)
    out = torch.zeros(len(allowed), words, dtype=torch.int64)
    for i, row in enumerate(allowed):
        for j, ok in enumerate(row):
            if ok:
                out[i, j // 32] |= 1 << (j % 32)
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)  # as int32 bits


@pytest.mark.parametrize("b,v", SIZES)
def test_token_bitmask_masks_exactly_the_zero_bits(b, v):
    g = torch.Generator().manual_seed(8)
    allowed = (torch.rand(b, v, generator=g) < 0.3).tolist()
    allowed[0][v - 1] = True  # the top bit of a word (the int32 sign bit when v % 32 == 0)
    x = _logits(b, v)
    got = L.apply_token_bitmask(x, _bitmask(allowed))
    want = x.masked_fill(~torch.tensor(allowed), -math.inf)
    assert torch.equal(got, want)


def test_token_bitmask_equals_xgrammars_own():
    xgr = pytest.importorskip("xgrammar")
    b, v = 5, 385
    g = torch.Generator().manual_seed(9)
    allowed = (torch.rand(b, v, generator=g) < 0.5).tolist()
    mask = _bitmask(allowed)
    x = _logits(b, v)
    theirs = x.clone()
    xgr.apply_token_bitmask_inplace(theirs, mask)
    assert torch.equal(L.apply_token_bitmask(x, mask), theirs)


@pytest.mark.parametrize("b,v", SIZES)
def test_logprobs_are_log_softmax_with_ranks_and_top(b, v):
    x = _logits(b, v)
    g = torch.Generator().manual_seed(10)
    chosen = torch.randint(0, v, (b,), generator=g)
    n = min(5, v)
    lp, rank, top_lp, top_ids = L.compute_logprobs(x, chosen, n)
    ref = torch.log_softmax(x.double(), dim=-1)
    for i in range(b):
        assert abs(float(lp[i]) - float(ref[i, chosen[i]])) < 1e-5
        assert int(rank[i]) == 1 + int((ref[i] > ref[i, chosen[i]]).sum())
        order = ref[i].argsort(descending=True)[:n]
        assert top_ids[i].tolist() == order.tolist()
        torch.testing.assert_close(top_lp[i].double(), ref[i, order], atol=1e-5, rtol=0)
