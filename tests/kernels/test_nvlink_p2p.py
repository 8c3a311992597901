"""The nvshmem:// direct path's kernels (put / gather / release) in Triton's CPU interpreter.

W "ranks" live in this one process: each has its own buffers, and the deltas the kernels add to
reach a peer are plain address differences, as NVSHMEM's peer mappings are on a GPU. Launches
run one after another here, so a wait that a later launch would end is not exercised (the
two-GPU worker, tests/gpu/nvshmem_direct_worker.py, does that); everything else is: rows, tags,
counts, slots, signals, credits, spans, the zero-copy view, against `exchange_reference`, and
waits that can never end here time out (`timeout_s`: a poll budget in the interpreter), against
`ExchangeModel`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from eaas.gpu import ChannelLayout
from eaas.gpu.credits import ExchangeModel, exchange_reference
from eaas.gpu.nvshmem_plane import NvshmemChannel
from eaas_kernels.nvlink_p2p import TIMED_OUT

from .conftest import interpreter_only

pytestmark = interpreter_only
W, S, R, H = 3, 2, 6, 16


def host_plane(dtype: torch.dtype = torch.float32, ctas: int = 2,
               timeout_s: float | None = None) -> list[NvshmemChannel]:
    lay = ChannelLayout(world_size=W, num_slots=S, max_rows=R, hidden=H,
                        dtype=str(dtype).removeprefix("torch."), ctas_per_send=ctas)
    i64 = torch.int64
    bufs = [(torch.zeros(lay.recv_shape, dtype=dtype), torch.zeros(lay.meta_shape, dtype=i64),
             torch.zeros(W, dtype=i64), torch.zeros(W, dtype=i64)) for _ in range(W)]
    chans = []
    for me in range(W):
        delta = torch.tensor([[(bufs[d][k].data_ptr() - bufs[me][k].data_ptr())
                               // bufs[me][k].element_size() for d in range(W)]
                              for k in range(4)], dtype=torch.int64)
        chans.append(NvshmemChannel(lay, me, *bufs[me], torch.zeros(W, dtype=torch.int64),
                                    torch.zeros(W, dtype=torch.int64), delta,
                                    torch.zeros(3, W, dtype=torch.int64), timeout_s=timeout_s))
    return chans


def inputs(rank: int, rnd: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(31 * rnd + rank)
    sizes = torch.randint(0, R + 3, (W,), generator=g)  # some past R: cut to R
    sizes[rnd % W] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    n = int(offsets[-1])
    return (torch.randn(n, H, generator=g).to(dtype), offsets,
            torch.randint(0, 1 << 40, (n,), generator=g))


def check(out, meta, want, sources=range(W)) -> None:
    w_out, w_meta = want
    for s in sources:
        n = int(w_meta[s, 0])
        assert int(meta[s, 0]) == n
        assert torch.equal(meta[s, :1 + n], w_meta[s, :1 + n])
        assert torch.equal(out[s, :n], w_out[s, :n])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rounds_through_every_slot_match_the_reference(dtype) -> None:
    chans = host_plane(dtype)
    out = torch.zeros(W, R, H, dtype=dtype)
    meta = torch.zeros(W, R + 1, dtype=torch.int64)
    cut = torch.zeros(W, W, dtype=torch.int64)
    for rnd in range(2 * S + 1):  # every slot used twice: credits must have come back
        puts = [inputs(r, rnd, dtype) for r in range(W)]
        for ch, p in zip(chans, puts):
            ch.put(*p)
        for ch in chans:
            assert ch.sig.tolist() == [(rnd + 1) * ch.layout.ctas_per_send] * W
        want = exchange_reference(puts, R)
        for ch, w in zip(chans, want):
            ch.gather(out, meta, ctas=3)
            check(out, meta, w)
        for ch, (_, offsets, _) in zip(chans, puts):  # every destination consumed my message
            assert ch.sent.tolist() == ch.recvd.tolist() == [rnd + 1] * W
            assert ch.credit.tolist() == [rnd + 1] * W
            assert ch.done[:2].tolist() == [[0] * W, [0] * W]
            cut[ch.rank] += (offsets.diff() - R).clamp(min=0)
            assert ch.rows_cut() == cut[ch.rank].tolist()  # groups past R, counted per dest
    assert int(cut.sum()) > 0  # the inputs did exceed R somewhere


def test_spans_send_rows_back_from_where_they_landed() -> None:
    chans = host_plane()
    puts = [inputs(r, 0, torch.float32) for r in range(W)]
    for ch, p in zip(chans, puts):
        ch.put(*p)
    mids = []
    for ch in chans:
        out, meta = torch.zeros(W, R, H), torch.zeros(W, R + 1, dtype=torch.int64)
        ch.gather(out, meta, ctas=2)
        mids.append((out, meta))
    starts = torch.arange(W, dtype=torch.int64) * R
    for ch, (out, meta) in zip(chans, mids):
        ch.put_spans((out * 2).view(W * R, H), starts, meta[:, 0],
                     meta[:, 1:].reshape(-1).contiguous())
    for me, ch in enumerate(chans):
        back, back_meta = torch.zeros(W, R, H), torch.zeros(W, R + 1, dtype=torch.int64)
        ch.gather(back, back_meta, ctas=2)
        rows, offsets, tags = puts[me]
        for d in range(W):
            a = int(offsets[d])
            n = min(int(offsets[d + 1]) - a, R)
            assert int(back_meta[d, 0]) == n
            assert torch.equal(back[d, :n], rows[a:a + n] * 2)
            assert torch.equal(back_meta[d, 1:1 + n], tags[a:a + n])


def test_wait_all_views_alias_the_slots_until_release() -> None:
    chans = host_plane()
    for ch in chans:  # as after CUDA-graph replays: device counters ahead of the host mirror
        ch.recvd.fill_(S)
        ch.credit.fill_(S)
        ch.sent.fill_(S)
        ch.sig.fill_(S * ch.layout.ctas_per_send)
        ch.sync_counters()
    for rnd in range(S, 2 * S + 1):
        puts = [inputs(r, rnd, torch.float32) for r in range(W)]
        for ch, p in zip(chans, puts):
            ch.put(*p)
        for ch, (w_out, w_meta) in zip(chans, exchange_reference(puts, R)):
            views, metas = ch.wait_all()
            assert all(v.data_ptr() == ch.recv_buf[s, rnd % S].data_ptr()
                       for s, v in enumerate(views))
            check(torch.stack(views), torch.stack(metas), (w_out, w_meta))
            assert ch.recvd.tolist() == [rnd] * W  # not consumed until released
            ch.release_all()
        assert all(ch.credit.tolist() == [rnd + 1] * W for ch in chans)


TIMEOUT = 0.005  # 5 polls in the interpreter: nothing else runs during a launch there


def run_round(chans, model, puts, gather=None) -> list:
    """The ranks with puts[r] not None put, then the ranks in `gather` (default all) gather, on
    the channels and on the model; every gather and every failure word must match the model.
    Returns the model's outputs."""
    for ch, p in zip(chans, puts):
        if p is not None:
            ch.put(*p)
    want = model.round(puts, gather)
    for ch, w in zip(chans, want):
        if w is not None:
            out = torch.full((W, R, H), -1.0)
            meta = torch.full((W, R + 1), -1, dtype=torch.int64)
            ch.gather(out, meta, ctas=2)  # few CTAs: the interpreter runs each in turn
            check(out, meta, w)
    for ch in chans:
        assert ch.failures().tolist() == model.failures(ch.rank).tolist()
        assert not ch.fail[2:].any()  # every launch put its verdicts back
    return want


def clear_failures(chans, model) -> None:
    for ch in chans:
        ch.clear_failures()
        model.clear_failures(ch.rank)
        assert not ch.failures().any()


def test_gather_from_a_rank_that_never_put_times_out_and_the_rank_can_come_back() -> None:
    chans = host_plane(timeout_s=TIMEOUT)
    model = ExchangeModel.for_layout(chans[0].layout)
    puts = [inputs(r, 0, torch.float32) for r in range(W)]
    run_round(chans, model, [puts[0], puts[1], None], gather=[0, 1])  # rank 2 is dead
    for ch in chans[:2]:  # n = 0 from rank 2 (run_round checked it), the others' rows intact
        assert ch.failures().tolist() == [[0, 0, 0], [0, 0, 1]]
        assert ch.recvd.tolist() == [1, 1, 0]  # nothing taken from rank 2 ...
    assert chans[2].credit.tolist() == [0, 0, 0]  # ... and no slot handed back to it
    run_round(chans, model, [None] * W, gather=[2])  # back: it takes what it missed
    assert chans[2].failures().tolist() == [[0, 0, 0], [0, 0, 1]]  # (from itself: nothing)
    clear_failures(chans, model)
    nxt = [inputs(r, 1, torch.float32) for r in range(W)]
    for got, fresh in zip(run_round(chans, model, nxt), exchange_reference(nxt, R)):
        check(*got, fresh)  # every pair in step again: what fresh counters would give
    assert all(not ch.failures().any() for ch in chans)


def test_put_to_a_rank_that_gives_no_credit_back_times_out_and_leaves_its_slots() -> None:
    chans = host_plane(timeout_s=TIMEOUT)
    model = ExchangeModel.for_layout(chans[0].layout)
    rounds = [[inputs(r, k, torch.float32) for r in range(W)] for k in range(S + 2)]
    for k in range(S):  # rank 2 puts but never gathers: then it holds all S slots of each pair
        run_round(chans, model, rounds[k], gather=[0, 1])
    held = chans[2].recv_buf.clone(), chans[2].meta.clone()
    run_round(chans, model, rounds[S], gather=[0, 1])  # one more put to rank 2: no free slot
    c = chans[0].layout.ctas_per_send
    for ch in chans:
        assert ch.failures().tolist() == [[0, 0, 1], [0, 0, 0]]
        assert ch.sent.tolist() == [S + 1, S + 1, S]  # not sent: the next put retries the slot
    assert chans[2].sig.tolist() == [S * c] * W  # no signal ...
    assert torch.equal(chans[2].recv_buf, held[0]) and torch.equal(chans[2].meta, held[1])
    for _ in range(S):  # ... and no slot touched: rank 2 comes back and takes its S messages
        run_round(chans, model, [None] * W, gather=[2])
    clear_failures(chans, model)
    for got, fresh in zip(run_round(chans, model, rounds[S + 1]),
                          exchange_reference(rounds[S + 1], R)):
        check(*got, fresh)


def test_one_ctas_timeout_vetoes_the_launch_for_every_cta() -> None:
    """On a GPU a signal landing at the deadline can be seen by some CTAs of a launch and not
    by others; the first verdict holds for all of them. Here the verdict word is set as a CTA
    that timed out first leaves it, while every CTA finds its target already reached."""
    chans = host_plane(timeout_s=TIMEOUT)
    puts = [inputs(r, 0, torch.float32) for r in range(W)]
    chans[0].fail[2, 1] = TIMED_OUT.value  # rank 0's put to rank 1
    chans[2].fail[3, 1] = TIMED_OUT.value  # rank 2's gather from rank 1
    for ch, p in zip(chans, puts):
        ch.put(*p)
    assert chans[0].sent.tolist() == [1, 0, 1] and chans[1].sig.tolist()[0] == 0  # nothing sent
    assert chans[0].failures().tolist() == [[0, 1, 0], [0, 0, 0]]
    out = torch.full((W, R, H), -1.0)
    meta = torch.full((W, R + 1), -1, dtype=torch.int64)
    chans[2].gather(out, meta)
    want = exchange_reference(puts, R)[2]
    check(out, meta, want, sources=(0, 2))
    assert int(meta[1, 0]) == 0 and bool((out[1] == -1).all())  # nothing copied from rank 1
    assert chans[2].recvd.tolist() == [1, 0, 1] and chans[1].credit.tolist()[2] == 0
    assert chans[2].failures().tolist() == [[0, 0, 0], [0, 1, 0]]
    assert not chans[0].fail[2:].any() and not chans[2].fail[2:].any()
    chans[2].gather(out, meta)  # rank 1's message stayed in its slot: this gather takes it
    check(out, meta, want, sources=(1,))
    assert int(meta[0, 0]) == int(meta[2, 0]) == 0  # (nothing more came from 0 and 2)
    assert chans[2].failures().tolist() == [[0, 0, 0], [1, 1, 1]]


def test_wait_all_from_a_rank_that_never_put_times_out_and_release_all_skips_it() -> None:
    chans = host_plane(timeout_s=TIMEOUT)
    puts = [inputs(r, 0, torch.float32) for r in range(2)] + [None]  # rank 2 is dead
    for ch, p in zip(chans[:2], puts[:2]):
        ch.put(*p)
    ch = chans[0]
    views, metas = ch.wait_all()
    check(torch.stack(views), torch.stack(metas), exchange_reference(puts, R)[0], sources=(0, 1))
    assert ch.failures().tolist() == [[0, 0, 0], [0, 0, 1]]  # rank 2's view: a stale slot
    ch.release_all()
    assert ch.recvd.tolist() == [1, 1, 0] and not ch.fail[2:].any()
    assert [int(c.credit[0]) for c in chans] == [1, 1, 0]  # no slot handed back to rank 2
    ch.sync_counters()  # the host mirror had counted rank 2's message too
    views, _ = ch.wait_all()
    assert views[2].data_ptr() == ch.recv_buf[2, 0].data_ptr()  # still its first slot
    ch.release_all()


def test_masks_and_dropped_peers_match_the_model_over_rounds() -> None:
    """Random peer masks, ranks that skip their put or their gather, one rank dropping peers
    that time out: every gather, failure word and mask equals ExchangeModel's."""
    chans = host_plane(timeout_s=TIMEOUT)
    model = ExchangeModel.for_layout(chans[0].layout)
    chans[1].drop_on_timeout = model.drop_on_timeout[1] = True
    g = torch.Generator().manual_seed(3)
    for rnd in range(6):
        if rnd % 3 == 0:  # new masks now and then (rank 1's drops stay until then)
            for ch in chans:
                mask = (torch.rand(W, generator=g) < 0.7).long()
                ch.peers.copy_(mask)
                model.peers[ch.rank] = mask
        puts = [inputs(r, rnd, torch.float32) if torch.rand(1, generator=g) < 0.8 else None
                for r in range(W)]
        takers = [r for r in range(W) if torch.rand(1, generator=g) < 0.8]
        run_round(chans, model, puts, gather=takers)
        for ch in chans:
            assert ch.peers.tolist() == model.peers[ch.rank].tolist(), (rnd, ch.rank)


def test_masked_peers_are_skipped_at_once_and_a_timeout_drops_its_peer() -> None:
    """peers: a put sends a masked destination nothing (no signal, no count), a gather reports
    n = 0 from a masked source without waiting or counting a failure, wait_all's verdict for
    it keeps release_all from handing its slot back. drop_on_timeout: a wait that timed out
    masks its peer, so the next launch does not wait for it again."""
    chans = host_plane(timeout_s=0.002)
    x = torch.randn(3, H)
    offsets = torch.tensor([0, 1, 2, 3])  # one row for each rank
    chans[0].set_peers([1])
    chans[0].put(x, offsets)
    assert chans[1].sig[0] == chans[0].layout.ctas_per_send and chans[2].sig.tolist() == [0] * W
    assert chans[0].sent.tolist() == [0, 1, 0]
    out, meta = torch.zeros(W, R, H), torch.full((W, R + 1), 7, dtype=torch.int64)
    chans[1].set_peers([0])
    chans[1].gather(out, meta, 2)
    assert meta[:, 0].tolist() == [1, 0, 0] and torch.equal(out[0, :1], x[1:2])
    assert chans[1].failures().sum() == 0 and chans[1].recvd.tolist() == [1, 0, 0]
    chans[0].put(x, offsets)
    rows, _ = chans[1].wait_all()  # masked 1 and 2: nothing waited for, nothing handed back
    chans[1].release_all()
    assert torch.equal(rows[0][:1], x[1:2])
    assert chans[1].failures().sum() == 0 and chans[1].recvd.tolist() == [2, 0, 0]
    assert chans[0].credit.tolist() == [0, 2, 0]
    chans[1].set_peers([0, 2])  # rank 2 never puts: the wait times out once, then is skipped
    chans[1].drop_on_timeout = True
    chans[1].gather(out, meta, 2)
    assert chans[1].failures()[1].tolist() == [1, 0, 1]  # 0 sent nothing new either
    assert chans[1].peers.tolist() == [0, 0, 0]
    chans[1].gather(out, meta, 2)
    assert chans[1].failures()[1].tolist() == [1, 0, 1] and meta[:, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_timeouts_are_named(bad) -> None:
    with pytest.raises(ValueError, match=r"timeout_s=.* must be None \(wait forever\) or"):
        host_plane(timeout_s=bad)
    ch = host_plane()[0]
    ch.timeout_s = bad  # set later: checked at the next launch
    with pytest.raises(ValueError, match="timeout_s="):
        ch.gather(torch.zeros(W, R, H), torch.zeros(W, R + 1, dtype=torch.int64))


def test_bad_arguments_are_named() -> None:
    ch = host_plane()[0]
    rows = torch.zeros(4, H)
    with pytest.raises(ValueError, match=r"offsets must be int64 \[4\]"):
        ch.put(rows, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"rows must be contiguous \[N, 16\]"):
        ch.put(torch.zeros(4, 8), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"tags must be int64 \[4\]"):
        ch.put(rows, torch.zeros(4, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"counts must be int64 \[3\]"):
        ch.put_spans(rows, torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"gather: out must be contiguous \[3, 6, 16\]"):
        ch.gather(torch.zeros(W, R, 8), torch.zeros(W, R + 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"rows is torch.float64, the channel carries"):
        ch.put(rows.double(), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"out_meta contiguous int64"):
        ch.gather(torch.zeros(W, R, H), torch.zeros(W, R + 1, dtype=torch.int32))
    odd = torch.zeros(4 * H + 1)[1:].view(4, H)  # 4 bytes past a 16-byte boundary
    with pytest.raises(ValueError, match="rows must start on a 16-byte boundary"):
        ch.put(odd, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"fail must be int64 \[4, 3\]"):
        dataclasses.replace(ch, fail=torch.zeros(2, W, dtype=torch.int64))
    ch.delta = None
    with pytest.raises(RuntimeError, match="no direct path"):
        ch.put(rows, torch.zeros(4, dtype=torch.int64))


def test_warm_up_runs_every_variant_and_leaves_fresh_counters() -> None:
    """NvshmemPlane.warm_up's steps (direct path) in lockstep over W ranks: every put and
    receive variant once, every message consumed, then counters zero, and a real round after
    it still matches the reference from slot 0."""
    chans = host_plane()
    for ch in chans:
        ch.nvshmem = False  # no NVSHMEM device library here: the direct path's steps only
    steps = chans[0].warm_up_steps()
    assert steps == [0, 1, 2, 3]
    for step in steps:
        for ch in chans:
            ch.warm_up_send(step)
        for ch in chans:
            ch.warm_up_take(step)
    for ch in chans:
        assert ch.sent.tolist() == ch.recvd.tolist() == ch.credit.tolist() == [4] * W
        assert ch.sig.tolist() == [4 * ch.layout.ctas_per_send] * W
        assert ch.rows_cut() == [0] * W
        ch.reset_counters()
        assert ch.sig.tolist() == ch.credit.tolist() == ch.sent.tolist() == [0] * W
    puts = [inputs(r, 0, torch.float32) for r in range(W)]
    for ch, p in zip(chans, puts):
        ch.put(*p)
    out, meta = torch.zeros(W, R, H), torch.zeros(W, R + 1, dtype=torch.int64)
    for ch, want in zip(chans, exchange_reference(puts, R)):
        ch.gather(out, meta)
        check(out, meta, want)


@pytest.mark.parametrize("nbytes", [1, 16, 4096, 70001])
def test_copy_kernel_puts_bytes_at_a_delta(nbytes: int) -> None:
    """The nvshmem:// transport's put to a mapped peer: bytes land at my heap + delta + offset."""
    from eaas_kernels.nvlink_p2p import copy_kernel

    mine, peer = torch.zeros(1 << 17, dtype=torch.uint8), torch.zeros(1 << 17, dtype=torch.uint8)
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    delta, offset = peer.data_ptr() - mine.data_ptr(), 512
    copy_kernel[(3,)](mine, delta + offset, src, nbytes, BLOCK=1024)
    assert torch.equal(peer[offset:offset + nbytes], src)
    assert not peer[:offset].any() and not peer[offset + nbytes:].any() and not mine.any()


def test_peer_offsets_skip_unmapped_and_misaligned_peers() -> None:
    from types import SimpleNamespace

    from eaas.gpu.symmetric_plane import peer_offsets

    hdl = SimpleNamespace(buffer_ptrs=[4096, 0, 4096 + 48, 4096 - 512])
    assert peer_offsets(hdl, 0, 16) == [0, None, 48, -512]
    assert peer_offsets(hdl, 0, 32) == [0, None, None, -512]
