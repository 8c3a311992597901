"""Batched steps over one shared paged KV cache against one sequence at a time.

The batch of a step mixes prefill chunks (several rows of one sequence) and decodes (one row),
as the shard schedules them; every sequence's rows must come out as when it runs alone
(bitwise in batch-invariant mode), whatever its neighbours and its block table.
"""

from __future__ import annotations

import random

import pytest
import torch

from eaas.model import ARCHS, AttentionBatch, Checkpoint, DecoderModel, PagedKVCache, SeqSpan
from tests.model.conftest import save_hf_tiny

BLOCK = 4
# Rows per sequence at each step (None: not in this step; the first number is a prefill chunk).
# Mixed prefill + decode, a one-token prompt, a long prompt arriving late in 2 chunks, a 2-row
# continuation; contexts cross several block edges.
SCHEDULE: list[list[int | None]] = [
    [5, 1, 8, None],
    [1, 1, 1, None],
    [1, 3, 1, 6],
    [1, 1, 1, 3],
    [2, 1, 1, 1],
] + [[1, 1, 1, 1]] * 7


def _tables(n_seq: int, blocks_each: int, seed: int) -> list[list[int]]:
    """Disjoint, shuffled block tables (block 0 is scratch)."""
    ids = list(range(1, n_seq * blocks_each + 1))
    random.Random(seed).shuffle(ids)
    return [ids[i * blocks_each:(i + 1) * blocks_each] for i in range(n_seq)]


def _run(model: DecoderModel, schedule, exact: bool, tol: float = 1e-5) -> None:
    dev = model.device
    """Steps `schedule` batched on one pool and each sequence alone on its own pool, comparing
    every step's final hidden rows (bitwise when `exact`)."""
    cfg, n_seq = model.config, len(schedule[0])
    total = [sum(x or 0 for x in col) for col in zip(*schedule)]
    each = -(-max(total) // BLOCK)
    shared = PagedKVCache(cfg, n_seq * each + 1, BLOCK, model.dtype, dev)
    tables = _tables(n_seq, each, seed=3)
    alone = [model.new_cache(max(total)) for _ in range(n_seq)]
    pos = [0] * n_seq
    gen = torch.Generator().manual_seed(7)
    for step, lens in enumerate(schedule):
        active = [i for i, n in enumerate(lens) if n is not None]
        ids = [torch.randint(0, cfg.vocab_size, (lens[i],), generator=gen).to(dev)
               for i in active]
        spans = [SeqSpan(tables[i], pos[i], lens[i]) for i in active]
        batch = AttentionBatch.build(spans, BLOCK, dev)
        with torch.inference_mode():
            got = model.forward_hidden(torch.cat(ids), shared, batch)
            want = []
            for i, x in zip(active, ids):
                c = alone[i]
                b = AttentionBatch.build([c.span(len(x))], c.pool.block_size, dev)
                want.append(model.forward_hidden(x, c.pool, b))
                c.seq_len += len(x)
        want_t = torch.cat(want)
        where = f"step {step}, rows per sequence {lens}"
        if exact:
            assert torch.equal(got, want_t), f"batch_invariant path not bitwise equal: {where}"
        else:
            torch.testing.assert_close(got, want_t, rtol=tol, atol=tol, msg=where)
        for i in active:
            pos[i] += lens[i]


@pytest.mark.parametrize("batch_invariant", [False, True], ids=["fast", "invariant"])
@pytest.mark.parametrize("arch", ARCHS)
def test_batch_equals_each_sequence_alone(tiny_dir, arch, batch_invariant):
    model = DecoderModel.load(Checkpoint.open(tiny_dir(arch)), batch_invariant=batch_invariant)
    _run(model, SCHEDULE, exact=batch_invariant)


@pytest.mark.parametrize(
    ("arch", "extra"),
    [
        ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 4}),
        ("mixtral", {"sliding_window": 5}),
    ],
)
def test_batch_equals_each_sequence_with_sliding_window(tmp_path, arch, extra):
    path = save_hf_tiny(tmp_path / arch, arch, seed=3, vocab_size=320, **extra)
    model = DecoderModel.load(Checkpoint.open(path))
    assert all(model.config.sliding_window(i) for i in range(model.config.num_hidden_layers))
    _run(model, SCHEDULE[:8], exact=False)  # contexts reach 13..16 > window


@pytest.mark.parametrize("batch_invariant", [False, True], ids=["fast", "invariant"])
def test_rows_without_blocks_touch_no_sequence(tiny_dir, batch_invariant):
    """A row with no block table (a request aborted mid-step, a padding row) writes the scratch
    block only: the other sequences' results and caches are those of a batch without it."""
    model = DecoderModel.load(Checkpoint.open(tiny_dir("deepseek_v3")),
                              batch_invariant=batch_invariant)
    cfg = model.config
    pool_a = PagedKVCache(cfg, 8, BLOCK, model.dtype, "cpu")
    pool_b = PagedKVCache(cfg, 8, BLOCK, model.dtype, "cpu")
    ids = torch.tensor([3, 4, 5, 6, 7, 8])
    with_dead = [SeqSpan([1, 2], 0, 2), SeqSpan(None, 0, 1), SeqSpan([3, 4], 0, 2),
                 SeqSpan(None, 5, 1)]
    live = [SeqSpan([1, 2], 0, 2), SeqSpan([3, 4], 0, 2)]
    with torch.inference_mode():
        got = model.forward_hidden(ids, pool_a, AttentionBatch.build(with_dead, BLOCK, "cpu"))
        want = model.forward_hidden(ids[[0, 1, 3, 4]], pool_b,
                                    AttentionBatch.build(live, BLOCK, "cpu"))
    torch.testing.assert_close(got[[0, 1, 3, 4]], want, rtol=1e-5, atol=1e-5)
    for layer in range(cfg.num_hidden_layers):
        for a, b in ((pool_a.k[layer][1:], pool_b.k[layer][1:]),
                     (pool_a.v[layer][1:], pool_b.v[layer][1:])):
            if batch_invariant:
                assert torch.equal(a, b), layer
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_batched_decoding_gives_reference_greedy_tokens(tiny_dir):
    """Whole model stepped batched over 3 prompts on one pool = generate_greedy each."""
    for arch in ARCHS:
        model = DecoderModel.load(Checkpoint.open(tiny_dir(arch)))
        prompts, n_new = [[5, 6, 7, 8], [40], [9, 30, 31, 32, 33, 34, 35]], 6
        pool = PagedKVCache(model.config, 16, BLOCK, model.dtype, "cpu")
        tables = _tables(3, 5, seed=1)
        inputs, outs, pos = [list(p) for p in prompts], [[] for _ in prompts], [0, 0, 0]
        for _ in range(n_new):
            spans = [SeqSpan(t, p, len(x)) for t, p, x in zip(tables, pos, inputs)]
            ends = torch.tensor(list(torch.tensor([len(x) for x in inputs]).cumsum(0) - 1))
            with torch.inference_mode():
                h = model.forward_hidden(torch.tensor([t for x in inputs for t in x]), pool,
                                         AttentionBatch.build(spans, BLOCK, "cpu"))
                logits = model.lm_head(model.final_norm(h[ends]))
            pos = [p + len(x) for p, x in zip(pos, inputs)]
            inputs = [[int(t)] for t in logits.argmax(-1)]
            for o, x in zip(outs, inputs):
                o.extend(x)
        assert outs == [model.generate_greedy(p, n_new) for p in prompts], arch


def test_block_tables_must_cover_the_rows(tiny_dir):
    with pytest.raises(ValueError, match="needs 3 blocks of 4"):
        AttentionBatch.build([SeqSpan([1, 2], 7, 2)], BLOCK, "cpu")


def test_sequence_cache_refuses_to_overflow(tiny_dir):
    model = DecoderModel.load(Checkpoint.open(tiny_dir("mixtral")))
    cache = model.new_cache(5)
    model.forward(torch.tensor([1, 2, 3, 4]), cache)
    with pytest.raises(ValueError, match="holds 5"):
        model.forward(torch.tensor([1, 2]), cache)
    cache.truncate(2)
    assert cache.seq_len == 2
