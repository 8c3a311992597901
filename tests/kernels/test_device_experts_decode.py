"""The decode step with its MoE layers going through the device exchange (eaas.engine.
device_experts) instead of the co-located experts: the same greedy tokens, and on CUDA the
exchange captured inside the decode graph of every bucket.

One shard and two servers live in this process (the channels of test_device_experts.py), and
the experts step runs each layer's round in stream order: the shard's puts, the servers' gather
+ GEMM + puts, the shard's gathers — the order a shard and its servers' device loops run in on
separate GPUs, without a second stream. Here, not in tests/engine: the channels' kernels run in
Triton's CPU interpreter on CPU (this folder's conftest)."""

from __future__ import annotations

import pytest
import torch

from eaas.engine.decode_graph import DecodeGraphs, DecodeRow
from eaas.engine.device_experts import (PAIRS, RESULTS, ROWS, ExchangeChannels, ExchangeFormat,
                                        ExpertPlacement, ServerExchange, ShardExchange)
from eaas.model import AttentionBatch, Checkpoint, DecoderModel, PagedKVCache, SeqSpan
from eaas.model import bank_experts, make_tiny

from .conftest import cuda_only, interpreter_only
from .test_device_experts import fake_channels

BLOCK = 4
PROMPTS = [[5, 6, 7, 8], [40], [9, 30, 31, 32, 33, 34, 35]]


class InProcessRound:
    """The executor's experts step over the exchange, every rank's half of a layer's round in
    this stream (shard send; servers serve; shard receive)."""

    def __init__(self, shard: ShardExchange, servers: list[ServerExchange]) -> None:
        self.shard, self.servers = shard, servers

    def __call__(self, layer, x, topk_ids, topk_weights, params=None) -> torch.Tensor:
        l = layer.layer_idx
        self.shard.send(l, x, topk_ids, topk_weights)
        for s in self.servers:
            s(l)
        return self.shard.receive()


def exchange_for(model: DecoderModel, max_rows: int) -> InProcessRound:
    """Experts e on server e % 2 (each server a view of the whole layer's bank: wire ids are
    global ids), one shard."""
    cfg, dev = model.config, model.device
    moe = [layer for layer in model.layers if layer.is_moe]
    num_experts = moe[0].experts.gate.shape[0]
    fmt = ExchangeFormat((0,), (1, 2), max_rows=max_rows, hidden=cfg.hidden_size,
                         top_k=cfg.num_experts_per_tok, dtype=str(model.dtype).removeprefix(
                             "torch."), num_slots=2, ctas_per_send=2, gather_ctas=2)
    chans = {name: fake_channels(lay, device=str(dev)) for name, lay in fmt.layouts().items()}
    ranks = [ExchangeChannels(chans[ROWS][r], chans[PAIRS][r], chans[RESULTS][r])
             for r in range(fmt.world_size)]
    place = {layer.layer_idx: ExpertPlacement.build(
        num_experts, {e: (e % 2, e) for e in range(num_experts)}, dev) for layer in moe}
    servers = [ServerExchange.from_banks(fmt, ranks[1 + s], {
        layer.layer_idx: layer.experts.view([e for e in range(num_experts) if e % 2 == s])
        for layer in moe}) for s in (0, 1)]
    return InProcessRound(ShardExchange(fmt, ranks[0], place), servers)


def greedy_decode(model: DecoderModel, experts, captured: bool, n_new: int) -> list[list[int]]:
    dev = str(model.device)
    each = -(-(max(map(len, PROMPTS)) + n_new) // BLOCK)
    pool = PagedKVCache(model.config, len(PROMPTS) * each + 1, BLOCK, model.dtype, dev)
    tables = [list(range(1 + i * each, 1 + (i + 1) * each)) for i in range(len(PROMPTS))]
    toks = []
    with torch.inference_mode():
        for p, t in zip(PROMPTS, tables):  # prefill with the co-located experts
            h = model.forward_hidden(torch.tensor(p, device=dev), pool,
                                     AttentionBatch.build([SeqSpan(t, 0, len(p))], BLOCK, dev))
            toks.append([int(model.lm_head(model.final_norm(h[-1:])).argmax())])
    graphs = DecodeGraphs(model, pool, max_num_seqs=4, max_blocks=each, experts=experts,
                          captured=captured)
    graphs.capture()
    for _ in range(n_new - 1):
        rows = [DecodeRow(t[-1], len(p) + len(t) - 1, tb)
                for p, t, tb in zip(PROMPTS, toks, tables)]
        ids, finite = graphs.step(rows)
        assert bool(finite.all())
        for t, x in zip(toks, ids.tolist()):
            t.append(x)
    assert graphs.replays == (n_new - 1 if graphs.captured else 0)
    return toks


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=interpreter_only),
                                    pytest.param("cuda", marks=[pytest.mark.cuda, cuda_only])])
def test_decode_steps_through_the_exchange_give_the_colocated_tokens(tmp_path, device):
    model = DecoderModel.load(Checkpoint.open(make_tiny(tmp_path / "m", "qwen3_moe", seed=7)),
                              device=device)
    n_new = 5
    want = greedy_decode(model, bank_experts, captured=False, n_new=n_new)
    round_ = exchange_for(model, max_rows=4)  # the largest bucket: nothing can overflow
    got = greedy_decode(model, round_, captured=device == "cuda", n_new=n_new)
    assert got == want
    moe_layers = sum(1 for layer in model.layers if layer.is_moe)
    rounds = int(round_.shard.channels.rows.sent[1])  # puts to server 0: one per layer round
    assert rounds >= (n_new - 1) * moe_layers > 0
    assert int(round_.shard.overflow) == 0
    assert int(round_.shard.failures().sum()) == 0
