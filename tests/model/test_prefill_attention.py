"""Batched prefill attention (fast mode): the multi-row sequences of a step attend in a few padded
groups, and every row comes out as on the per-sequence path (one group per sequence)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from eaas.model import AttentionBatch, Checkpoint, DecoderModel, PagedKVCache, SeqSpan, make_tiny
from eaas.model.prefill_attention import MAX_PADDING, plan_prefill

BLOCK = 4
TOL = 1e-5  # float32 on CPU: the padded and unpadded calls differ only in reduction order
# rows per sequence at each step (None: not in this step); the first step is ragged prompts
# (the 1-token one goes to the decode kernel), the second chunks continuing a cached context
# (start > 0) beside decodes, the third a burst of new prompts beside decodes
STEPS: list[list[int | None]] = [
    [1, 2, 15, 16, 17, 33, None, None],
    [1, 5, 1, 16, 3, 1, None, None],
    [1, 1, 1, 1, 1, 1, 16, 16],
]


def _seqs(lens: list[tuple[int, int]]) -> list[tuple[int, int, int, list[int]]]:
    """(rows, first position) per sequence -> plan_prefill's input (context slots 1000 * i + p)."""
    out, row = [], 0
    for i, (n, p0) in enumerate(lens):
        out.append((row, row + n, p0, [1000 * (i + 1) + p for p in range(p0 + n)]))
        row += n
    return out


def test_plan_of_the_docstring_example_is_one_padded_group():
    (g,) = plan_prefill(_seqs([(16, 0), (16, 0), (3, 30)]), pad_slot=0, device="cpu")
    assert g.row_span is None and g.slots.shape == (3, 48) and g.q_pos.shape == (3, 16)
    assert g.slots[0, :33].tolist() == [3000 + p for p in range(33)]  # longest context first
    assert g.slots[0, 33:].tolist() == [0] * 15  # padded with the scratch slot
    assert g.q_pos[0].tolist() == [30, 31, 32] + [0] * 13
    assert g.rows[0].tolist() == [32, 33, 34] + [32] * 13  # padding repeats the first row
    assert sorted(g.out_rows.tolist()) == list(range(35))


def test_plan_keeps_padding_within_bound_and_covers_every_row():
    rng = random.Random(5)
    lens = [(rng.choice([2, 3, 16, 40, 200]), rng.choice([0, 0, 7, 64])) for _ in range(40)]
    seqs = _seqs(lens)
    groups = plan_prefill(seqs, pad_slot=0, device="cpu")
    assert 1 < len(groups) < len(seqs)
    rows = []
    for g in groups:
        if g.row_span is not None:
            rows += range(*g.row_span)
            continue
        mine = [sq for sq in seqs if sq[0] in g.rows[:, 0].tolist()]
        n, keys, queries = len(mine), [len(sq[3]) for sq in mine], [sq[1] - sq[0] for sq in mine]
        assert n * max(keys) <= MAX_PADDING * sum(keys)
        assert n * max(queries) <= MAX_PADDING * sum(queries)
        assert g.slots.shape[1] % 16 == 0 and g.slots.shape[1] >= max(keys)
        rows += g.out_rows.tolist()
    assert sorted(rows) == list(range(seqs[-1][1]))


def test_mask_is_causal_windowed_and_gives_padding_queries_one_key():
    (g,) = plan_prefill(_seqs([(4, 0), (3, 5)]), pad_slot=0, device="cpu")
    m = g.mask(3, torch.float32)[:, 0] == 0  # [G, L_max, S_max]; the longer context first
    assert m.shape == (2, 4, 16) and not g.causal
    assert m[0, 0].nonzero().flatten().tolist() == [3, 4, 5]  # position 5, window 3
    assert m[0, 3].nonzero().flatten().tolist() == [0]  # a padding query
    assert m[1, 3].nonzero().flatten().tolist() == [1, 2, 3]
    assert (g.mask(None, torch.float32)[1, 0, 3] == 0).nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert g.mask(3, torch.float32) is g.mask(3, torch.float32)  # built once per window


def _per_sequence(batch: AttentionBatch) -> AttentionBatch:
    """`batch` with each multi-row sequence in a group of its own (today's per-sequence path)."""
    pad, seqs = batch._multi_host
    batch._groups = [g for sq in seqs for g in plan_prefill([sq], pad, "cpu")]
    return batch


def _check(model: DecoderModel, steps: list[list[int | None]]) -> None:
    cfg, n_seq = model.config, len(steps[0])
    total = [sum(x or 0 for x in col) for col in zip(*steps)]
    each = -(-max(total) // BLOCK)
    ids = list(range(1, n_seq * each + 1))
    random.Random(3).shuffle(ids)
    tables = [ids[i * each:(i + 1) * each] for i in range(n_seq)]
    pools = [PagedKVCache(cfg, n_seq * each + 1, BLOCK, model.dtype, "cpu") for _ in range(2)]
    pos, gen = [0] * n_seq, torch.Generator().manual_seed(7)
    for step, lens in enumerate(steps):
        active = [i for i, n in enumerate(lens) if n is not None]
        x = torch.randint(0, cfg.vocab_size, (sum(lens[i] for i in active),), generator=gen)
        spans = [SeqSpan(tables[i], pos[i], lens[i]) for i in active]
        batched = AttentionBatch.build(spans, BLOCK, "cpu")
        assert len(batched.prefill_groups()) < len(batched.multi), "nothing was batched"
        with torch.inference_mode():
            got = model.forward_hidden(x, pools[0], batched)
            want = model.forward_hidden(x, pools[1], _per_sequence(
                AttentionBatch.build(spans, BLOCK, "cpu")))
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL, msg=f"step {step}: {lens}")
        for i in active:
            pos[i] += lens[i]


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_batched_prefill_equals_per_sequence_path(tiny_dir, arch):
    _check(DecoderModel.load(Checkpoint.open(tiny_dir(arch))), STEPS)


def test_batched_prefill_with_sliding_window_equals_per_sequence_path(tmp_path):
    path = make_tiny(tmp_path / "mixtral", "mixtral", seed=2)
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "sliding_window": 5}))
    model = DecoderModel.load(Checkpoint.open(path))
    assert model.config.sliding_window(0) == 5
    _check(model, STEPS)


@pytest.mark.parametrize(("lens", "causal"), [([16] * 12, True), ([14, 15, 16, 17] * 3, False)],
                         ids=["equal", "ragged"])
def test_burst_of_prompts_makes_one_attention_call_per_layer(tiny_dir, monkeypatch, lens, causal):
    model = DecoderModel.load(Checkpoint.open(tiny_dir("qwen3_moe")))
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k))
    pool = PagedKVCache(model.config, len(lens) * 5 + 1, BLOCK, model.dtype, "cpu")
    spans = [SeqSpan(range(1 + i * 5, 6 + i * 5), 0, n) for i, n in enumerate(lens)]
    batch = AttentionBatch.build(spans, BLOCK, "cpu")
    with torch.inference_mode():
        model.forward_hidden(torch.arange(sum(lens)) % 50, pool, batch)
    assert [g.causal for g in batch.prefill_groups()] == [causal]  # flash when no padding
    assert len(calls) == model.config.num_hidden_layers
    assert all(shape[0] == len(lens) for shape in calls)  # [G, heads, L, d]


def test_invariant_mode_keeps_one_call_per_sequence(tiny_dir, monkeypatch):
    model = DecoderModel.load(Checkpoint.open(tiny_dir("qwen3_moe")), batch_invariant=True)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k))
    pool = PagedKVCache(model.config, 9, BLOCK, model.dtype, "cpu")
    spans = [SeqSpan([1, 2, 3, 4], 0, 16), SeqSpan([5, 6, 7, 8], 0, 16)]
    with torch.inference_mode():
        model.forward_hidden(torch.arange(32) % 50, pool, AttentionBatch.build(spans, BLOCK, "cpu"))
    assert len(calls) == 2 * model.config.num_hidden_layers
