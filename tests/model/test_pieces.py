"""The separately callable units: ExpertBank, router, combine_experts, attention block, batch
invariance."""

from __future__ import annotations

import pytest
import torch

from eaas.model import (ARCHS, AttentionBatch, Checkpoint, DecoderModel, ExpertBank,
                        combine_experts, linear)


def _moe_layer(model: DecoderModel):
    return next(layer for layer in model.layers if layer.is_moe)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS)
def test_expert_bank_rows_are_batch_invariant(tiny_dir, arch, dtype):
    ckpt = Checkpoint.open(tiny_dir(arch))
    cfg = ckpt.config
    layer = next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    bank = ExpertBank.load(ckpt, layer, range(cfg.num_experts), dtype, batch_invariant=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(33, cfg.hidden_size, generator=gen).to(dtype)  # [33, H]
    ids = torch.randint(0, cfg.num_experts, (33,), generator=gen)
    batched = bank.forward(x, ids)  # [33, H]
    for n in range(33):
        alone = bank.forward(x[n : n + 1], ids[n : n + 1])
        assert torch.equal(alone[0], batched[n]), f"row {n} differs alone vs in a batch of 33"
    # the same rows split over two servers-worth of calls give the same bits
    split = torch.cat([bank.forward(x[:11], ids[:11]), bank.forward(x[11:], ids[11:])])
    assert torch.equal(split, batched)


@pytest.mark.parametrize("arch", ARCHS)
def test_router_rows_are_batch_invariant(tiny_dir, arch):
    model = DecoderModel.load(Checkpoint.open(tiny_dir(arch)), batch_invariant=True)
    layer = _moe_layer(model)
    x = torch.randn(33, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    ids, weights = layer.router(x)
    assert ids.shape == (33, model.config.num_experts_per_tok) and weights.dtype == torch.float32
    for n in range(33):
        ids1, w1 = layer.router(x[n : n + 1])
        assert torch.equal(ids1[0], ids[n]) and torch.equal(w1[0], weights[n]), f"row {n}"


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_norms_shared_expert_and_lm_head_rows_are_batch_invariant(tiny_dir, arch):
    model = DecoderModel.load(Checkpoint.open(tiny_dir(arch)), batch_invariant=True)
    layer = _moe_layer(model)
    x = torch.randn(33, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    shared, logits = layer.shared_expert(x), model.lm_head(x)
    normed, final = layer.ffn_input(x), model.final_norm(x)
    for n in range(33):
        assert torch.equal(layer.ffn_input(x[n : n + 1])[0], normed[n]), f"ffn_input row {n}"
        assert torch.equal(model.final_norm(x[n : n + 1])[0], final[n]), f"final_norm row {n}"
        assert torch.equal(layer.shared_expert(x[n : n + 1])[0], shared[n]), f"shared row {n}"
        assert torch.equal(model.lm_head(x[n : n + 1])[0], logits[n]), f"lm_head row {n}"


def test_linear_batch_invariant_matches_plain_linear():
    gen = torch.Generator().manual_seed(2)
    x, w, b = (
        torch.randn(33, 40, generator=gen),
        torch.randn(24, 40, generator=gen),
        torch.randn(24),
    )
    got = linear(x, w, b, batch_invariant=True)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert torch.equal(linear(x[7:8], w, b, batch_invariant=True)[0], got[7])


def test_expert_bank_unknown_expert_is_a_value_error(tiny_dir):
    ckpt = Checkpoint.open(tiny_dir("mixtral"))
    bank = ExpertBank.load(ckpt, 0, [3, 7], torch.float32)
    x = torch.randn(3, ckpt.config.hidden_size)
    with pytest.raises(ValueError, match=r"experts \[5\] are not hosted"):
        bank.forward(x, torch.tensor([3, 5, 7]))


def test_expert_bank_subset_equals_full_bank(tiny_dir):
    ckpt = Checkpoint.open(tiny_dir("qwen2_moe"))
    full = ExpertBank.load(ckpt, 0, range(8), torch.float32, batch_invariant=True)
    part = ExpertBank.load(ckpt, 0, [6, 2], torch.float32, batch_invariant=True)
    assert part.expert_ids == (2, 6)
    x, ids = torch.randn(9, 64), torch.tensor([2, 6, 6, 2, 2, 6, 2, 6, 6])
    assert torch.equal(part.forward(x, ids), full.forward(x, ids))


def test_combine_experts_weights_and_sums_in_fixed_order():
    out = torch.tensor([[[1.0, 2.0], [10.0, 20.0]]], dtype=torch.bfloat16)  # [T=1, K=2, H=2]
    w = torch.tensor([[0.25, 0.5]])
    got = combine_experts(out, w)
    assert got.dtype == torch.bfloat16
    assert got.tolist() == [[5.25, 10.5]]
    with pytest.raises(ValueError, match="must be"):
        combine_experts(out, torch.ones(1, 3))


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_forward_equals_its_pieces(tiny_dir, arch):
    """The engine's piecewise path (attention, router, rows to experts, combine, shared) is the
    monolithic forward, bit for bit."""
    model = DecoderModel.load(Checkpoint.open(tiny_dir(arch)), batch_invariant=True)
    ids = torch.arange(4, 13)
    want = model.forward(ids, model.new_cache())
    cache = model.new_cache()
    batch = AttentionBatch.build([cache.span(ids.numel())], cache.pool.block_size, "cpu")
    h = model.embed(ids)
    for layer in model.layers:
        h = layer.attention_block(h, cache.pool, batch)
        x = layer.ffn_input(h)
        if not layer.is_moe:
            h = h + layer.dense_mlp(x)
            continue
        topk_ids, topk_weights = layer.router(x)  # [T, K]
        t, k = topk_ids.shape
        rows = x.repeat_interleave(k, dim=0)
        # "servers": each expert's rows computed in its own call, as a remote server would
        out = torch.empty_like(rows)
        flat = topk_ids.reshape(-1)
        for e in flat.unique().tolist():
            sel = (flat == e).nonzero(as_tuple=True)[0]
            out[sel] = layer.experts.forward(rows[sel], flat[sel])
        routed = combine_experts(out.view(t, k, -1), topk_weights)
        shared = layer.shared_expert(x)
        h = h + (routed if shared is None else routed + shared)
    assert torch.equal(model.lm_head(model.final_norm(h)), want)


def test_dense_and_moe_layers_follow_config(tiny_dir):
    for arch, dense in (("qwen3_moe", [1]), ("deepseek_v3", [0]), ("mixtral", [])):
        model = DecoderModel.load(Checkpoint.open(tiny_dir(arch)), load_experts=False)
        assert [i for i, layer in enumerate(model.layers) if not layer.is_moe] == dense, arch
        with pytest.raises(ValueError):
            model.layers[-1].dense_mlp(torch.zeros(1, 64))


def test_expert_bank_empty_batch_and_length_mismatch(tiny_dir):
    ckpt = Checkpoint.open(tiny_dir("qwen3_moe"))
    bank = ExpertBank.load(ckpt, 0, [1], torch.float32, batch_invariant=True)
    assert bank.forward(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)).shape == (0, 64)
    with pytest.raises(ValueError, match="rows"):
        bank.forward(torch.zeros(2, 64), torch.tensor([1]))


def test_cache_truncate_replays_identically(tiny_dir):
    model = DecoderModel.load(Checkpoint.open(tiny_dir("deepseek_v3")))
    ids = torch.arange(30, 40)
    cache = model.new_cache()
    model.forward(ids, cache)
    cache.truncate(6)  # drop the last 4 positions, then recompute them
    assert cache.seq_len == 6
    again = model.forward(ids[6:], cache)
    fresh = model.forward(ids, model.new_cache())[6:]
    torch.testing.assert_close(again, fresh, rtol=1e-5, atol=1e-5)


def test_generate_greedy_stops_at_stop_token(tiny_dir):
    model = DecoderModel.load(Checkpoint.open(tiny_dir("mixtral")))
    tokens = model.generate_greedy([5, 6, 7], 12)
    stop = tokens[3]
    assert (
        model.generate_greedy([5, 6, 7], 12, stop_token_ids=[stop])
        == tokens[: tokens.index(stop) + 1]
    )
    with pytest.raises(ValueError, match="empty"):
        model.generate_greedy([], 3)


def test_embed_checks_ids_on_the_host_list_when_given(tiny_dir):
    model = DecoderModel.load(Checkpoint.open(tiny_dir("mixtral")))
    v = model.config.vocab_size
    ids = [0, 5, v - 1]
    t = torch.tensor(ids)
    assert torch.equal(model.embed(t, host_ids=ids), model.embed(t))
    for bad in ([v], [-1, 3]):
        for kw in ({"host_ids": bad}, {}):
            with pytest.raises(ValueError, match=rf"token ids must be in 0..{v - 1}"):
                model.embed(torch.tensor(bad) if not kw else t, **kw)


def test_upload_builds_the_same_tensor_on_the_host() -> None:
    from eaas.model.ops import upload

    t = upload([3, 1, 2], "cpu")
    assert t.dtype == torch.long and t.tolist() == [3, 1, 2] and t.device.type == "cpu"
    src = torch.tensor([1.5, 2.5])
    assert torch.equal(upload(src, torch.device("cpu")), src)
