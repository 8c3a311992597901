"""One MoE layer's device exchange (eaas.engine.device_experts) between shards and servers.

Here, not in tests/engine: the channels' kernels (eaas_kernels.nvlink_p2p) run in Triton's CPU
interpreter, which this folder's conftest turns on before triton is imported. All ranks (shards
and servers) live in this one process, as in test_nvlink_p2p: each has its own buffers and the
deltas are address differences. Launches run one after another, so a round runs phase by phase
in an order where every wait is already satisfied: shards send, servers serve, shards
receive.
"""

from __future__ import annotations

import functools
import time
from types import SimpleNamespace

import pytest
import torch

from eaas.engine import device_experts
from eaas.engine.device_experts import (PAIRS, RESULTS, ROWS, ExchangeChannels, ExchangeFormat,
                                        ExpertPlacement, ServerExchange, ShardExchange,
                                        bank_rows)
from eaas.engine.row_layout import combine_rows, moe_per_pair_ref, pack_rows
from eaas.gpu import ChannelLayout
from eaas.gpu.nvshmem_plane import NvshmemChannel
from eaas.model.moe import ExpertBank
from eaas_kernels import fused_moe
from eaas_kernels.reference import expert_rows_ref

from .conftest import TOLERANCE, cuda_only, interpreter_only, moe_weights
H, F, E, K = 16, 8, 6, 3
HOSTED = ((0, 1, 2, 5), (2, 3, 4, 5))  # per server; 2 and 5 are on both
CHOICE = ({2: 1, 5: 0}, {2: 0, 5: 1})  # per layer: the replica the routing picked
EXACT = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.bfloat16: TOLERANCE[torch.bfloat16]}


def fake_channels(lay: ChannelLayout, timeout_s: float | None = None,
                  device: str = "cpu") -> list[NvshmemChannel]:
    """W ranks of one channel in this process (test_nvlink_p2p's host_plane, any layout; on
    a GPU the deltas are differences of device addresses in this process's address space)."""
    w, i64 = lay.world_size, torch.int64
    z = functools.partial(torch.zeros, device=device)
    bufs = [(z(lay.recv_shape, dtype=getattr(torch, lay.dtype)), z(lay.meta_shape, dtype=i64),
             z(w, dtype=i64), z(w, dtype=i64)) for _ in range(w)]
    chans = []
    for me in range(w):
        delta = torch.tensor([[(bufs[d][k].data_ptr() - bufs[me][k].data_ptr())
                               // bufs[me][k].element_size() for d in range(w)]
                              for k in range(4)], dtype=i64, device=device)
        recv, meta, sig, credit = bufs[me]
        chans.append(NvshmemChannel(layout=lay, rank=me, recv_buf=recv, meta=meta, sig=sig,
                                    credit=credit, sent=z(w, dtype=i64), recvd=z(w, dtype=i64),
                                    delta=delta, done=z(3, w, dtype=i64), nvshmem=False,
                                    timeout_s=timeout_s, fail=z(4, w, dtype=i64)))
    return chans


class Cluster:
    """A shards, 2 servers (ranks A, A + 1), two MoE layers with different weights and routing:
    server 0 holds a loaded bank (rows = index in HOSTED[0]), server 1 a view of the whole
    layer (rows = global ids); experts 2 and 5 are on both, and each layer picks one replica."""

    def __init__(self, num_shards: int, dtype: torch.dtype, max_rows: int = 8,
                 timeout_s: float | None = None, device: str = "cpu", spares: int = 0) -> None:
        g = torch.Generator().manual_seed(5)
        self.live = (num_shards, num_shards + 1)  # the servers' ranks; spares: masked ranks
        self.spares = tuple(range(num_shards + 2, num_shards + 2 + spares))  # with no process
        self.fmt = ExchangeFormat(tuple(range(num_shards)), self.live + self.spares,
                                  max_rows=max_rows, hidden=H, top_k=K,
                                  dtype=str(dtype).removeprefix("torch."), num_slots=2,
                                  ctas_per_send=2, gather_ctas=2)
        chans = {name: fake_channels(lay, timeout_s, device)
                 for name, lay in self.fmt.layouts().items()}
        self.channels = [ExchangeChannels(chans[ROWS][r], chans[PAIRS][r], chans[RESULTS][r])
                         for r in range(self.fmt.world_size)]
        self.whole, placements, banks = {}, {}, ({}, {})
        for l in (0, 1):
            w13, w2 = moe_weights(E, H, F, dtype, g, device)
            whole = ExpertBank(l, tuple(range(E)), w13[:, :F], w13[:, F:], w2)
            ids0 = list(HOSTED[0])
            banks[0][l] = ExpertBank(l, HOSTED[0], whole.gate[ids0], whole.up[ids0],
                                     whole.down[ids0])
            banks[1][l] = whole.view(HOSTED[1])
            rows = [bank_rows(banks[s][l]) for s in (0, 1)]
            server_of = {e: (0 if e in HOSTED[0] else 1) for e in range(E)} | CHOICE[l]
            placements[l] = ExpertPlacement.build(
                E, {e: (s, rows[s][e]) for e, s in server_of.items()}, device)
            self.whole[l] = (whole, w13, w2)
        self.placements = placements
        self.shards = [ShardExchange(self.fmt, self.channels[r], placements)
                       for r in self.fmt.shard_ranks]
        for shard in self.shards:
            shard.peers[list(self.spares)] = 0
        self.servers = [ServerExchange.from_banks(self.fmt, self.channels[r], banks[s])
                        for s, r in enumerate(self.live)]

    def round(self, layer: int, inputs: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
        """One round of every rank, phase by phase (see the module docstring)."""
        for shard, (x, ids, w) in zip(self.shards, inputs):
            shard.send(layer, x, ids, w)
        self.serve(layer)
        return [shard.receive() for shard in self.shards]

    def serve(self, layer: int) -> None:
        for server in self.servers:
            server(layer)

    def references(self, layer: int, x, ids, w) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-pair MoE sum (fused_moe_ref's expert rows) and the co-located bank."""
        whole, w13, w2 = self.whole[layer]
        per_pair = moe_per_pair_ref(x, ids, w, lambda r, e: expert_rows_ref(r, e, w13, w2))
        return per_pair, whole.routed(x, ids, w)

    def layout(self, layer: int, ids, w):
        place = self.placements[layer]
        return pack_rows(ids, w, place.server, 2, self.fmt.max_rows, place.local)


def routing(T: int, seed: int, dtype: torch.dtype, device: str = "cpu"
            ) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.rand(T, E, generator=g).argsort(1)[:, :K]  # [T, K] distinct experts
    w = torch.rand(T, K, generator=g).softmax(-1)  # float32, like the routers
    return x.to(device), ids.to(device), w.to(device)


def check_wire(cl: Cluster, layer: int, inputs) -> None:
    """What each server received is the shard's packed rows bit for bit (rows, exact float32
    weights and ids, token tags), and what it computed came back bit for bit, one row per
    token, tagged with the same tokens."""
    fmt = cl.fmt
    ys = [device_experts.serve_pairs(sv.rows_in, sv.pairs_in, sv.meta_in[:, 0], fmt,
                                     *sv.experts[layer]).view(fmt.world_size, fmt.max_rows, H)
          for sv in cl.servers]  # deterministic: what each server put back
    for a, (shard, (x, ids, w)) in enumerate(zip(cl.shards, inputs)):
        lay = cl.layout(layer, ids, w)
        for s, server in enumerate(cl.servers):
            n = int(lay.counts[s])
            assert int(server.meta_in[a, 0]) == n
            tokens = lay.rows[s, :n]
            assert torch.equal(server.meta_in[a, 1:1 + n], tokens)
            assert torch.equal(server.rows_in[a, :n], x[tokens])
            got_ids, got_w = cl.fmt.decode_pairs(server.pairs_in[a, :n])
            assert torch.equal(got_ids, lay.pair_experts[s, :n])
            assert torch.equal(got_w, lay.pair_weights[s, :n])  # float32: exact
            rank = cl.fmt.server_ranks[s]
            assert int(shard.results_meta[rank, 0]) == n
            assert torch.equal(shard.results_meta[rank, 1:1 + n], tokens)
            assert torch.equal(shard.results_in[rank, :n], ys[s][a, :n])
        for server in cl.servers:  # nothing from the servers on the rows channel
            assert server.meta_in[list(cl.fmt.server_ranks), 0].tolist() == [0, 0]


def check_credits(cl: Cluster, rounds: int) -> None:
    """Every message of `rounds` rounds went one way, was taken, and its slot came back: shards
    put rows and pairs to servers and gather their results, servers the reverse, and nobody
    sent a message to a rank of its own kind."""
    fmt, w = cl.fmt, cl.fmt.world_size
    for ch in cl.channels:
        shard = ch.rank in fmt.shard_ranks
        peers = cl.live if shard else () if ch.rank in cl.spares else fmt.shard_ranks
        want, none = [rounds if r in peers else 0 for r in range(w)], [0] * w
        sends, takes = ((ch.rows, ch.pairs), (ch.results,)) if shard else \
            ((ch.results,), (ch.rows, ch.pairs))
        for c in sends:
            assert c.sent.tolist() == c.credit.tolist() == want and c.recvd.tolist() == none
        for c in takes:
            assert c.recvd.tolist() == want and c.sent.tolist() == none
        for c in (ch.rows, ch.pairs, ch.results):
            assert c.rows_cut() == none


ON_CPU = pytest.param("cpu", marks=interpreter_only)
ON_CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, cuda_only])


@pytest.mark.parametrize("device", [ON_CPU, ON_CUDA])
@pytest.mark.parametrize("num_shards,dtype", [(1, torch.float32), (2, torch.bfloat16),
                                              (2, torch.float32)])
def test_rounds_match_the_per_pair_reference_and_the_colocated_bank(num_shards, dtype,
                                                                     device) -> None:
    """Several rounds in a row (every slot used twice: credits came back), alternating layers
    whose routing picks different replicas; one round with an idle shard (T = 0). On CUDA the
    same ranks live on one GPU (the channels' real kernels, fused_moe's Triton path)."""
    cl = Cluster(num_shards, dtype, device=device)
    tol = EXACT[dtype] if device == "cpu" else TOLERANCE[dtype]
    sizes = [5, 8, 0, 3, 7]
    for rnd in range(5):
        layer = rnd % 2
        inputs = [routing(sizes[(rnd + a) % 5], 100 * rnd + a, dtype, device)
                  for a in range(num_shards)]
        outs = cl.round(layer, inputs)
        check_wire(cl, layer, inputs)
        check_credits(cl, rnd + 1)
        for out, (x, ids, w) in zip(outs, inputs):
            assert out.shape == x.shape and out.dtype == dtype
            if not x.shape[0]:
                continue  # the idle shard took part in the round (its credits are checked)
            per_pair, colocated = cl.references(layer, x, ids, w)
            torch.testing.assert_close(out, per_pair, **tol)
            torch.testing.assert_close(out, colocated, **tol)
            if num_shards == 1 and device == "cpu":  # the same math without the wire
                assert torch.equal(out, packed_local(cl, layer, x, cl.layout(layer, ids, w)))
    assert all(int(s.overflow) == 0 for s in cl.shards)


def packed_local(cl: Cluster, layer: int, x: torch.Tensor, lay) -> torch.Tensor:
    y = torch.zeros(2, cl.fmt.max_rows, H, dtype=x.dtype)
    for s, server in enumerate(cl.servers):
        rows, pe, pw = lay.rows[s], lay.pair_experts[s], lay.pair_weights[s]
        xs = torch.where(rows[:, None] >= 0, x[rows.clamp(min=0)], 0)
        y[s] = fused_moe(xs, *server.experts[layer], pe.clamp(min=0), torch.where(pe >= 0, pw, 0))
    return combine_rows(y, lay)


@interpreter_only
def test_spare_server_ranks_stay_masked_and_untouched() -> None:
    """A set with a spare server rank no process holds (kept for a server added later): the
    shard masks it, routes it nothing, and the rounds are those of the set without it."""
    cl = Cluster(1, torch.float32, spares=1)
    for rnd in range(3):
        x, ids, w = routing(5, 40 + rnd, torch.float32)
        (out,) = cl.round(rnd % 2, [(x, ids, w)])
        torch.testing.assert_close(out, cl.references(rnd % 2, x, ids, w)[0],
                                   **EXACT[torch.float32])
    check_credits(cl, 3)
    assert int(cl.shards[0].trouble().sum()) == 0


@interpreter_only
def test_rows_past_a_servers_capacity_are_counted_not_lost_silently() -> None:
    cl = Cluster(1, torch.float32, max_rows=4)
    x, ids, w = routing(7, 3, torch.float32)
    ids[:, 0] = 0  # every token needs server 0 (expert 0 lives there only): 3 rows too many
    lay = cl.layout(0, ids, w)
    need = [int(((cl.placements[0].server[ids] == s).any(1)).sum()) for s in (0, 1)]
    dropped = sum(max(n - 4, 0) for n in need)
    assert dropped >= 3 and int(lay.overflow) == dropped
    for rnd in range(3):
        (out,) = cl.round(0, [(x, ids, w)])
        assert int(cl.shards[0].overflow) == (rnd + 1) * dropped  # accumulated on the device
        check_credits(cl, rnd + 1)
    lost = (lay.pair_slots < 0) & (ids >= 0)  # the pairs of rows that did not fit
    per_pair, _ = cl.references(0, x, ids, torch.where(lost, 0, w))
    torch.testing.assert_close(out, per_pair, **EXACT[torch.float32])
    full, _ = cl.references(0, x, ids, w)
    assert not torch.allclose(out, full)  # the dropped rows are really missing


@interpreter_only
def test_a_server_that_does_not_answer_adds_nothing_and_is_reported() -> None:
    """With the channels' timeouts, server 1 skipping a round: the shard's gather from it times
    out (n = 0), its tokens get server 0's share only (not server 1's stale slots of the round
    before), failures() names it, and it drops out of the shard's mask: the next round does not
    wait for it again and counts the rows it could not send in trouble(). In the interpreter a
    timeout is a number of polls."""
    cl = Cluster(1, torch.float32, timeout_s=0.002)
    x, ids, w = routing(6, 1, torch.float32)
    (before,) = cl.round(0, [(x, ids, w)])  # a good round: server 1's slots hold its results
    shard, (server0, _) = cl.shards[0], cl.servers
    shard.send(0, x, ids, w)
    server0(0)
    out = shard.receive()
    gone = cl.fmt.server_ranks[1]
    fails = shard.failures()
    assert fails[0].tolist() == [0, 0, 0]  # the puts found free slots
    assert fails[1].tolist() == [0, 0, 1] and gone == 2  # its results did not come
    assert shard.peers.tolist() == [0, 1, 0]  # dropped from the mask
    on_1 = cl.placements[0].server[ids] == 1
    assert on_1.any()
    without_1 = cl.references(0, x, ids, torch.where(on_1, 0, w))[0]
    torch.testing.assert_close(out, without_1, **EXACT[torch.float32])
    torch.testing.assert_close(before, cl.references(0, x, ids, w)[0], **EXACT[torch.float32])
    lost = int(shard.trouble()[gone])
    assert lost == 1  # the one timeout; no rows left out yet (they were put)
    shard.send(0, x, ids, w)  # the next round skips server 1 at once: no wait, no timeout
    server0(0)
    torch.testing.assert_close(shard.receive(), without_1, **EXACT[torch.float32])
    assert shard.failures()[1].tolist() == [0, 0, 1]
    assert int(shard.trouble()[gone]) == 1 + int(cl.layout(0, ids, w).counts[1])
    assert int(shard.trouble()[1]) == 0


@interpreter_only
def test_the_shard_step_plugs_in_with_bank_experts_signature(monkeypatch) -> None:
    """`step(layer, x, topk_ids, topk_weights, params)` as the executor calls it; the servers'
    round runs between the shard's puts and its gathers (one process: launches are serial)."""
    cl = Cluster(2, torch.float32)
    other = routing(4, 9, torch.float32)
    shard0, shard1 = cl.shards
    receive = shard0.receive

    def servers_then_receive() -> torch.Tensor:
        shard1.send(1, *other)
        cl.serve(1)
        out1 = shard1.receive()
        torch.testing.assert_close(out1, cl.references(1, *other)[0], **EXACT[torch.float32])
        return receive()

    monkeypatch.setattr(shard0, "receive", servers_then_receive)
    x, ids, w = routing(6, 8, torch.float32)
    out = shard0(SimpleNamespace(layer_idx=1), x, ids, w, {})
    torch.testing.assert_close(out, cl.references(1, x, ids, w)[1], **EXACT[torch.float32])


def _no_host_sync(monkeypatch) -> None:
    def sync(self, *args, **kwargs):
        raise AssertionError("host sync: a device value read on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)


def _gathered_moe(x, w_gate_up, w_down, topk_ids, topk_weights):
    """A sync-free stand-in for fused_moe on CPU (whose reference loops over experts on the
    host): every pair's expert weights gathered, then batched products."""
    n, k = topk_ids.shape
    e = topk_ids.reshape(-1)
    rows = x.repeat_interleave(k, 0).float()  # [N * K, H]
    gate, up = torch.einsum("nfh,nh->nf", w_gate_up[e].float(), rows).chunk(2, -1)
    act = (torch.nn.functional.silu(gate) * up).to(x.dtype).float()
    y = torch.einsum("nhf,nf->nh", w_down[e].float(), act).to(x.dtype).view(n, k, -1)
    return (y.float() * topk_weights.float()[..., None]).sum(1).to(x.dtype)


@interpreter_only
def test_no_host_sync_in_the_shard_step_or_the_server_round(monkeypatch) -> None:
    """Nothing reads a device value on the host (on CUDA: capturable, no stall). The channels'
    launches run under the patch too; on the server, fused_moe's CPU reference (a host loop
    over experts; Triton on CUDA needs none) is replaced by a sync-free stand-in."""
    cl = Cluster(1, torch.bfloat16)
    x, ids, w = routing(6, 4, torch.bfloat16)
    shard = cl.shards[0]
    monkeypatch.setattr(device_experts, "fused_moe", _gathered_moe)
    with monkeypatch.context() as m:
        _no_host_sync(m)
        shard.send(0, x, ids, w)
        cl.serve(0)
        out = shard.receive()
    per_pair, _ = cl.references(0, x, ids, w)
    torch.testing.assert_close(out, per_pair, **TOLERANCE[torch.bfloat16])
    check_credits(cl, 1)


@interpreter_only
def test_bad_arguments_are_named() -> None:
    cl = Cluster(1, torch.float32)
    shard, fmt = cl.shards[0], cl.fmt
    x, ids, w = routing(3, 0, torch.float32)
    with pytest.raises(ValueError, match=r"x must be \[T, 16\] torch.float32"):
        shard.send(0, x.double(), ids, w)
    with pytest.raises(ValueError, match=r"topk_ids must be \[3, 3\]"):
        shard.send(0, x, ids[:, :2], w[:, :2])
    with pytest.raises(ValueError, match="layer 7 has no expert placement"):
        shard.send(7, x, ids, w)
    with pytest.raises(RuntimeError, match="no round was sent"):
        shard.receive()
    with pytest.raises(ValueError, match="rank 0 is not a server rank"):
        ServerExchange(fmt, cl.channels[0], {})
    with pytest.raises(ValueError, match="rank 1 is not a shard rank"):
        ShardExchange(fmt, cl.channels[1], cl.placements)
    with pytest.raises(ValueError, match="must be non-empty and split 0..W-1"):
        ExchangeFormat((0,), (2,), max_rows=4, hidden=H, top_k=K)
    other = ExchangeFormat((0,), (1, 2), max_rows=5, hidden=H, top_k=K, dtype="float32")
    with pytest.raises(ValueError, match="channel moe_rows: layout"):
        ShardExchange(other, cl.channels[0], cl.placements)
    assert fmt.pair_width == 8 and ExchangeFormat((0,), (1,), 4, 16, 8).pair_width == 16
    pe, pw = torch.tensor([[3, -1, 0]]), torch.tensor([[0.1, 0.0, 1 / 3]])
    pairs = fmt.encode_pairs(pe, pw)
    assert pairs.shape == (1, 8) and pairs.dtype == torch.float32
    got = fmt.decode_pairs(pairs)
    assert torch.equal(got[0], pe) and torch.equal(got[1], pw)


@pytest.mark.cuda
@cuda_only
def test_a_round_captured_in_a_cuda_graph_replays_like_eager_rounds() -> None:
    """Every rank's phases of one round (1 shard + 2 servers, one GPU) in one CUDA graph:
    replayed through every slot twice, each replay gives the eager round's output bit for bit
    and moves the device counters exactly as an eager round does (counts live on the device)."""
    cl = Cluster(1, torch.bfloat16, device="cuda")
    x, ids, w = routing(6, 2, torch.bfloat16, "cuda")
    (want,) = cl.round(0, [(x, ids, w)])  # also compiles every kernel before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (out,) = cl.round(0, [(x, ids, w)])
    for rnd in range(2 * cl.fmt.num_slots + 1):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want), f"replay {rnd}"
        check_credits(cl, rnd + 2)  # the eager round, then one per replay
    torch.testing.assert_close(out, cl.references(0, x, ids, w)[0], **TOLERANCE[torch.bfloat16])


@pytest.mark.cuda
@cuda_only
def test_a_silent_server_times_out_on_the_gpu_clock() -> None:
    """With timeout_s = 0.2, server 1 never answering: the shard's gather of results waits for
    it about one timeout (globaltimer, not a poll count), reports it in failures(), drops it
    from the mask (the next round takes no timeout at all), and the shard's tokens get server
    0's share only."""
    timeout = 0.2
    cl = Cluster(1, torch.float32, timeout_s=timeout, device="cuda")
    x, ids, w = routing(6, 1, torch.float32, "cuda")
    cl.round(0, [(x, ids, w)])  # warm: every kernel compiled, slots in use
    torch.cuda.synchronize()
    shard, (server0, _) = cl.shards[0], cl.servers
    t0 = time.perf_counter()
    shard.send(0, x, ids, w)
    server0(0)
    out = shard.receive()
    torch.cuda.synchronize()
    waited = time.perf_counter() - t0
    shard.send(0, x, ids, w)
    server0(0)
    again = shard.receive()
    torch.cuda.synchronize()
    second = time.perf_counter() - t0 - waited
    print(f"the timed-out gather took {waited:.3f} s (timeout_s {timeout}); the next round "
          f"{second * 1e3:.2f} ms")
    assert 0.9 * timeout <= waited <= 2 * timeout + 0.5
    assert second < 0.5 * timeout
    assert shard.failures()[1].tolist() == [0, 0, 1]
    assert shard.peers.tolist() == [0, 1, 0]
    assert server0.failures().sum() == 0
    on_1 = cl.placements[0].server[ids] == 1
    for y in (out, again):
        torch.testing.assert_close(y, cl.references(0, x, ids, torch.where(on_1, 0, w))[0],
                                   **TOLERANCE[torch.float32])
