"""The decode step of DecodeGraphs (the co-located fast path): eager on CPU it gives the plain
model's greedy tokens with bucket padding; captured on CUDA it equals the eager step (bitwise in
batch-invariant mode), after other buckets' replays too, and syncs nowhere inside."""

from __future__ import annotations

import pytest
import torch

from eaas.engine.decode_graph import DecodeGraphs, DecodeRow, buckets_for
from eaas.engine.sampling import fold_seed
from eaas.model import ARCHS, AttentionBatch, Checkpoint, DecoderModel, PagedKVCache, SeqSpan
from eaas.model import bank_experts

BLOCK = 4
PROMPTS = [[5, 6, 7, 8], [40], [9, 30, 31, 32, 33, 34, 35]]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _prefilled(model: DecoderModel, prompts, n_new: int, device: str):
    """A pool with each prompt prefilled (block tables 1.., disjoint) and the first tokens."""
    each = -(-(max(map(len, prompts)) + n_new) // BLOCK)
    pool = PagedKVCache(model.config, len(prompts) * each + 1, BLOCK, model.dtype, device)
    tables = [list(range(1 + i * each, 1 + (i + 1) * each)) for i in range(len(prompts))]
    first = []
    with torch.inference_mode():
        for p, t in zip(prompts, tables):
            batch = AttentionBatch.build([SeqSpan(t, 0, len(p))], BLOCK, device)
            h = model.forward_hidden(torch.tensor(p, device=device), pool, batch)
            first.append(int(model.lm_head(model.final_norm(h[-1:])).argmax()))
    return pool, tables, first, each


def _decode(graphs: DecodeGraphs, prompts, tables, first, n_new: int, **sampling):
    toks = [[f] for f in first]
    for _ in range(n_new - 1):
        rows = [DecodeRow(t[-1], len(p) + len(t) - 1, tb, **sampling)
                for p, t, tb in zip(prompts, toks, tables)]
        ids, finite = graphs.step(rows)
        assert bool(finite.all())
        for t, x in zip(toks, ids.tolist()):
            t.append(x)
    return toks


def test_buckets():
    assert buckets_for(1) == [1]
    assert buckets_for(48) == [1, 2, 4, 8, 16, 32, 48]
    assert buckets_for(64) == [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("arch", ARCHS)
def test_eager_decode_step_gives_the_models_greedy_tokens(tiny_dirs, arch):
    model = DecoderModel.load(Checkpoint.open(tiny_dirs[arch]), batch_invariant=True)
    n_new = 6
    pool, tables, first, each = _prefilled(model, PROMPTS, n_new, "cpu")
    graphs = DecodeGraphs(model, pool, max_num_seqs=8, max_blocks=each, experts=bank_experts,
                          captured=False)
    got = _decode(graphs, PROMPTS, tables, first, n_new)  # 3 rows run in bucket 4
    assert got == [model.generate_greedy(p, n_new) for p in PROMPTS]


def test_step_refuses_rows_outside_their_tables(tiny_dirs):
    model = DecoderModel.load(Checkpoint.open(tiny_dirs["mixtral"]))
    pool = PagedKVCache(model.config, 4, BLOCK, model.dtype, "cpu")
    graphs = DecodeGraphs(model, pool, max_num_seqs=2, max_blocks=2, experts=bank_experts,
                          captured=False)
    with pytest.raises(ValueError, match="outside its block table"):
        graphs.step([DecodeRow(1, 8, [1, 2])])
    with pytest.raises(ValueError, match="largest bucket"):
        graphs.step([DecodeRow(1, 0, [1])] * 3)


def _pair(tiny_dirs, arch: str, invariant: bool, dtype=torch.float32):
    ckpt = Checkpoint.open(tiny_dirs[arch])
    model = DecoderModel.load(ckpt, dtype=dtype, device="cuda", batch_invariant=invariant)
    return ckpt, model


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_captured_step_equals_eager_bitwise_and_cpu_tokens(tiny_dirs, arch):
    ckpt, model = _pair(tiny_dirs, arch, invariant=True)
    n_new = 8
    out = {}
    for captured in (False, True):
        pool, tables, first, each = _prefilled(model, PROMPTS, n_new, "cuda")
        graphs = DecodeGraphs(model, pool, max_num_seqs=8, max_blocks=each,
                              experts=bank_experts, captured=captured)
        graphs.capture()
        # a replay of another bucket first: buffers shared by the buckets must not leak
        graphs.step([DecodeRow(1, 0, [pool.num_blocks - 1])] * 5)
        out[captured] = _decode(graphs, PROMPTS, tables, first, n_new)
        out[(captured, "k")] = [k.clone() for k in pool.k]
        assert graphs.replays == (0 if not captured else n_new)
    assert out[True] == out[False]
    for a, b in zip(out[(True, "k")], out[(False, "k")]):
        assert torch.equal(a[1:-1], b[1:-1])  # every sequence's cache, bitwise
    cpu = DecoderModel.load(ckpt, batch_invariant=True)
    assert out[True] == [cpu.generate_greedy(p, n_new) for p in PROMPTS]


@pytest.mark.cuda
@needs_cuda
def test_captured_sampling_equals_eager_and_no_sync_inside_a_step(tiny_dirs):
    ckpt, model = _pair(tiny_dirs, "qwen3_moe", invariant=True)
    n_new = 6
    got = {}
    for captured in (False, True):
        pool, tables, first, each = _prefilled(model, PROMPTS, n_new, "cuda")
        graphs = DecodeGraphs(model, pool, max_num_seqs=4, max_blocks=each,
                              experts=bank_experts, captured=captured)
        graphs.capture()
        got[captured] = _decode(graphs, PROMPTS, tables, first, n_new, temperature=0.8,
                                top_k=20, top_p=0.9, key=fold_seed(7))
    assert got[True] == got[False]
    rows = [DecodeRow(3, len(p) + n_new - 1, t) for p, t in zip(PROMPTS, tables)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside the step raises
    try:
        ids, _ = graphs.step(rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ids.shape == (3,)
