"""The nvshmem:// direct path's kernels (put / gather / release) in Triton's CPU interpreter.

W "ranks" live in this one process: each has its own buffers, and the deltas the kernels add to
reach a peer are plain address differences, as NVSHMEM's peer mappings are on a GPU. Launches
run one after another here, so a put that would wait for credit is not exercised (the two-GPU
worker, tests/gpu/nvshmem_direct_worker.py, does that); everything else is: rows, tags, counts,
slots, signals, credits, spans, the zero-copy view, against `exchange_reference`.
"""

from __future__ import annotations

import pytest
import torch

from eaas.gpu import ChannelLayout
from eaas.gpu.credits import exchange_reference
from eaas.gpu.nvshmem_plane import NvshmemChannel

from .conftest import interpreter_only

pytestmark = interpreter_only
W, S, R, H = 3, 2, 6, 16


def host_plane(dtype: torch.dtype = torch.float32, ctas: int = 2) -> list[NvshmemChannel]:
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
                                    torch.zeros(3, W, dtype=torch.int64)))
    return chans


def inputs(rank: int, rnd: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(31 * rnd + rank)
    sizes = torch.randint(0, R + 3, (W,), generator=g)  # some past R: cut to R
    sizes[rnd % W] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    n = int(offsets[-1])
    return (torch.randn(n, H, generator=g).to(dtype), offsets,
            torch.randint(0, 1 << 40, (n,), generator=g))


def check(out, meta, want) -> None:
    w_out, w_meta = want
    for s in range(W):
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
        ch.gather(out, meta)
        mids.append((out, meta))
    starts = torch.arange(W, dtype=torch.int64) * R
    for ch, (out, meta) in zip(chans, mids):
        ch.put_spans((out * 2).view(W * R, H), starts, meta[:, 0],
                     meta[:, 1:].reshape(-1).contiguous())
    for me, ch in enumerate(chans):
        back, back_meta = torch.zeros(W, R, H), torch.zeros(W, R + 1, dtype=torch.int64)
        ch.gather(back, back_meta)
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

    from eaas.gpu.nvshmem_plane import peer_offsets

    hdl = SimpleNamespace(buffer_ptrs=[4096, 0, 4096 + 48, 4096 - 512])
    assert peer_offsets(hdl, 0, 16) == [0, None, 48, -512]
    assert peer_offsets(hdl, 0, 32) == [0, None, None, -512]
