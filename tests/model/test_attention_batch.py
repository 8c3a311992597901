"""DecoderLayer.attention_block_batch against per-request attention_block; KVCache storage."""

from __future__ import annotations

import pytest
import torch

from eaas.model import ARCHS, Checkpoint, KVCache, ReferenceModel
from tests.model.conftest import save_hf_tiny

# Rows per request at each step (None: the request is not in this step's batch; 0 first appears
# as a prefill). Mixed prefill + decode, a one-token prompt, a request joining late with a long
# prompt, a 2-row continuation, and enough steps that 8-row storage doubles (8 -> 16 -> 32).
SCHEDULE: list[list[int | None]] = [
    [5, 1, 8, None],
    [1, 1, 1, None],
    [1, 3, 1, 9],
    [1, 1, 1, 1],
    [2, 1, 1, 1],
] + [[1, 1, 1, 1]] * 13


def _spans(lens: list[int]) -> list[tuple[int, int]]:
    out, at = [], 0
    for n in lens:
        out.append((at, at + n))
        at += n
    return out


def _run_schedule(
    model: ReferenceModel, schedule, exact: bool, device: str = "cpu", tol: float = 1e-5
) -> list[KVCache]:
    """Steps `schedule` through every layer with both paths, comparing each layer's output
    (bitwise when `exact`, else at rtol = atol = `tol`)."""
    n_req = len(schedule[0])
    per_req = [model.new_cache() for _ in range(n_req)]
    batched = [model.new_cache() for _ in range(n_req)]
    gen = torch.Generator().manual_seed(7)
    for step, lens in enumerate(schedule):
        active = [i for i, n in enumerate(lens) if n is not None]
        spans = _spans([lens[i] for i in active])
        h = torch.randn(spans[-1][1], model.config.hidden_size, generator=gen).to(device)  # [T, H]
        for layer in model.layers:
            want = torch.cat(
                [layer.attention_block(h[s:e], per_req[i]) for i, (s, e) in zip(active, spans)]
            )
            got = layer.attention_block_batch(h, [batched[i] for i in active], spans)
            where = f"step {step}, layer {layer.layer_idx}, rows per request {lens}"
            if exact:
                assert torch.equal(got, want), f"batch_invariant path not bitwise equal: {where}"
            else:
                torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=where)
            h = want
    for a, b in zip(per_req, batched):
        assert a.seq_len == b.seq_len
    return batched


@pytest.mark.parametrize("batch_invariant", [False, True], ids=["fast", "invariant"])
@pytest.mark.parametrize("arch", ARCHS)
def test_batch_equals_per_request(tiny_dir, arch, batch_invariant):
    model = ReferenceModel.load(
        Checkpoint.open(tiny_dir(arch)), load_experts=False, batch_invariant=batch_invariant
    )
    caches = _run_schedule(model, SCHEDULE, exact=batch_invariant)
    assert caches[2].seq_len == 8 + 17 and caches[2].capacity(0) == 32  # grew twice


@pytest.mark.parametrize(
    ("arch", "extra"),
    [
        ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 4}),
        ("mixtral", {"sliding_window": 5}),
    ],
)
def test_batch_equals_per_request_with_sliding_window(tmp_path, arch, extra):
    path = save_hf_tiny(tmp_path / arch, arch, seed=3, vocab_size=320, **extra)
    model = ReferenceModel.load(Checkpoint.open(path), load_experts=False)
    assert all(model.config.sliding_window(i) for i in range(model.config.num_hidden_layers))
    _run_schedule(model, SCHEDULE[:8], exact=False)  # contexts reach 13..16 > window


@pytest.mark.parametrize("batch_invariant", [False, True], ids=["fast", "invariant"])
def test_requests_without_cache_pass_through(tiny_dir, batch_invariant):
    ckpt = Checkpoint.open(tiny_dir("deepseek_v3"))
    model = ReferenceModel.load(ckpt, load_experts=False, batch_invariant=batch_invariant)
    layer, h = model.layers[0], torch.randn(6, model.config.hidden_size)
    live = [model.new_cache(), model.new_cache()]
    spans = [(0, 2), (2, 3), (3, 5), (5, 6)]
    got = layer.attention_block_batch(h, [live[0], None, live[1], None], spans)
    assert torch.equal(got[2:3], h[2:3]) and torch.equal(got[5:], h[5:])
    ref = [model.new_cache(), model.new_cache()]
    want = torch.cat([layer.attention_block(h[0:2], ref[0]), layer.attention_block(h[3:5], ref[1])])
    torch.testing.assert_close(torch.cat([got[0:2], got[3:5]]), want, rtol=1e-5, atol=1e-5)
    assert [c.layer_len(0) for c in live] == [2, 2]
    assert torch.equal(layer.attention_block_batch(h, [None] * 4, spans), h)


def test_batched_decoding_gives_reference_greedy_tokens(tiny_dir):
    """Whole model stepped with attention_block_batch over 3 prompts = generate_greedy each."""
    for arch in ARCHS:
        model = ReferenceModel.load(Checkpoint.open(tiny_dir(arch)))
        prompts, n_new = [[5, 6, 7, 8], [40], [9, 30, 31, 32, 33, 34, 35]], 6
        caches = [model.new_cache() for _ in prompts]
        inputs, outs = [list(p) for p in prompts], [[] for _ in prompts]
        for _ in range(n_new):
            spans = _spans([len(x) for x in inputs])
            h = model.embed(torch.tensor([t for x in inputs for t in x]))
            with torch.inference_mode():
                for layer in model.layers:
                    h = layer.attention_block_batch(h, caches, spans)
                    h = h + layer.ffn(layer.ffn_input(h))
                logits = model.lm_head(model.final_norm(h[[e - 1 for _, e in spans]]))
            inputs = [[int(t)] for t in logits.argmax(-1)]
            for o, x in zip(outs, inputs):
                o.extend(x)
        assert outs == [model.generate_greedy(p, n_new) for p in prompts], arch


def test_spans_must_tile_the_rows(tiny_dir):
    model = ReferenceModel.load(Checkpoint.open(tiny_dir("mixtral")), load_experts=False)
    layer, h, c = model.layers[0], torch.randn(4, model.config.hidden_size), model.new_cache()
    for spans, n_caches, msg in (
        ([(0, 2), (3, 4)], 2, "must start at 2"),
        ([(0, 2), (2, 2)], 2, "non-empty"),
        ([(0, 2), (2, 3)], 2, "h has 4 rows"),
        ([(0, 4)], 2, "one per request"),
    ):
        with pytest.raises(ValueError, match=msg):
            layer.attention_block_batch(h, [c] * n_caches, spans)
    assert c.seq_len == 0  # nothing was appended by the rejected calls


# ---- KVCache storage -------------------------------------------------------------------------


def test_kv_cache_grows_by_doubling_and_keeps_contents():
    cache = KVCache(2)
    gen = torch.Generator().manual_seed(0)
    ks, vs = [], []
    caps = []
    for t in (3, 1, 4, 1, 5, 9, 2, 6):  # 31 rows in 8 appends
        k, v = torch.randn(t, 2, 4, generator=gen), torch.randn(t, 2, 3, generator=gen)
        ks.append(k)
        vs.append(v)
        k_all, v_all = cache.append(0, k, v)
        assert torch.equal(k_all, torch.cat(ks)) and torch.equal(v_all, torch.cat(vs))
        caps.append(cache.capacity(0))
    assert caps == [8, 8, 8, 16, 16, 32, 32, 32]
    assert cache.layer_len(0) == 31 and cache.layer_len(1) == 0 and cache.seq_len == 0
    assert cache.capacity(1) == 0
    cache.append(1, torch.zeros(40, 2, 4), torch.zeros(40, 2, 3))  # a long prompt: exact fit
    assert cache.capacity(1) == 40 and cache.seq_len == 31


def test_kv_cache_truncate_then_append_overwrites_dropped_positions():
    cache = KVCache(2)
    k, v = torch.arange(20.0).view(10, 2), -torch.arange(20.0).view(10, 2)
    for layer in (0, 1):
        cache.append(layer, k, v)
    cache.truncate(4)
    assert cache.seq_len == 4 and [cache.layer_len(i) for i in (0, 1)] == [4, 4]
    cache.truncate(9)  # longer than what is held: nothing changes
    assert cache.seq_len == 4
    k_all, v_all = cache.append(0, torch.full((2, 2), 7.0), torch.full((2, 2), 8.0))
    assert torch.equal(k_all, torch.cat([k[:4], torch.full((2, 2), 7.0)]))
    assert torch.equal(v_all, torch.cat([v[:4], torch.full((2, 2), 8.0)]))
    assert cache.capacity(0) == 10  # reused, not reallocated
    with pytest.raises(ValueError, match=">= 0"):
        cache.truncate(-1)


def test_kv_cache_rejects_rows_that_do_not_match():
    cache = KVCache(1)
    cache.append(0, torch.zeros(2, 3), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="do not match"):
        cache.append(0, torch.zeros(1, 4), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="do not match"):
        cache.append(0, torch.zeros(1, 3), torch.zeros(1, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="rows"):
        cache.append(0, torch.zeros(1, 3), torch.zeros(2, 5))
    assert cache.layer_len(0) == 2
