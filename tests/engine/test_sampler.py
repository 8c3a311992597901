"""The batched sampler: rows independent of their batch, the same draw as the one-row host path,
top-k / top-p limits exact, and frequencies that follow the softmax."""

from __future__ import annotations

import torch

from eaas.engine.sampling import SamplingParams, fold_seed, sample, sample_batch, uniform_noise


def _args(b: int, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0):
    return (torch.full((b,), temperature), torch.full((b,), top_k, dtype=torch.long),
            torch.full((b,), top_p), torch.arange(b, dtype=torch.long) * 7919,
            torch.zeros(b, dtype=torch.long))


def test_rows_are_independent_of_the_batch_and_equal_the_host_path():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 50, generator=gen) * 3
    t, k, p, keys, steps = _args(9, 0.8, 20, 0.9)
    batch = sample_batch(logits, t, k, p, keys, steps)
    for i in range(9):
        one = sample_batch(logits[i:i + 1], t[i:i + 1], k[i:i + 1], p[i:i + 1], keys[i:i + 1],
                           steps[i:i + 1])
        assert one[0] == batch[i]
        params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
        assert sample(logits[i], params, int(keys[i]), 0) == int(batch[i])


def test_limits_greedy_and_noise():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 40, generator=gen)
    assert torch.equal(sample_batch(logits, *_args(64, 1.0, 1)), logits.argmax(-1))  # top-k 1
    assert torch.equal(sample_batch(logits, *_args(64, 1.0, -1, 1e-6)), logits.argmax(-1))
    assert torch.equal(sample_batch(logits, *_args(64, 0.0)), logits.argmax(-1))  # greedy
    assert torch.equal(sample_batch(logits, *_args(64, 1e-40)), logits.argmax(-1))  # finite
    top3 = logits.topk(3, dim=-1).indices
    got = sample_batch(logits, *_args(64, 5.0, 3))
    assert bool((top3 == got[:, None]).any(-1).all())
    u = uniform_noise(torch.tensor([fold_seed(-5), fold_seed(2**70)]), torch.tensor([0, 3]),
                      torch.arange(1000).expand(2, 1000))
    assert bool(((u > 0) & (u < 1)).all()) and abs(float(u.mean()) - 0.5) < 0.03


def test_frequencies_follow_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(4000, 4)
    t, k, p, _, _ = _args(4000)
    keys = torch.arange(4000, dtype=torch.long)  # 4000 different requests
    got = sample_batch(logits, t, k, p, keys, torch.zeros(4000, dtype=torch.long))
    freq = torch.bincount(got, minlength=4).float() / 4000
    want = torch.softmax(logits[0], -1)
    assert float((freq - want).abs().max()) < 0.03, (freq, want)
